#!/usr/bin/env python3
"""Loopback benchmark of ``sidecar serve`` against nginx and a minimal aiohttp proxy.

    python tests/perf/bench.py [--quick] [--duration S] [--runs N] [--json FILE]
                               [--baseline DIR [--compare-runs N] [--only-compare]]
                               [--redis] [--only-redis]

Starts, in a temp dir: a mock cloud (``python -m sidecar mock-cloud``); an
upstream nginx serving ``/small`` (100 B), ``/big`` (1 MiB), ``/huge`` (sparse
1 GiB) and proxying the refresh and upload endpoints to the mock cloud; the
sidecar under test (``python -m sidecar serve``); a reference nginx proxy; and
``minimal_proxy.py``. Then drives them with wrk (client pinned to CPU 0,
servers to CPU 1 when possible) and prints tables, the issue's targets with
PASS/FAIL, a refresh burst, 1 GiB streaming both ways and ``--workers 2`` vs 1.

The sidecar under test is always the code of the checkout this file is in:
every ``python -m sidecar`` runs with that checkout first on PYTHONPATH (and
from a temp dir, since ``-m`` would put the working directory first), whatever
sidecar the interpreter has installed; the bench checks where ``import
sidecar`` resolves before it starts one.

``--baseline DIR`` compares with another checkout (e.g. ``git worktree add
DIR OLD_COMMIT``): a second sidecar, run by the same interpreter with DIR on
PYTHONPATH and its own store written by DIR's ``sidecar import``, beside the
current one against the same upstream nginx and mock cloud. The cases are
GET /small at 64 connections, GET /big at 64 and GET /small at 1, each run
``--compare-runs`` times (default 4) per side, alternating current, baseline,
current, baseline... so drift hits both alike. The table gives each side's
mean req/s, p50, p99 and CPU per request, the ratio current/baseline of the
mean req/s and the run-to-run spread ((max - min) / mean req/s, the larger of
the two sides); a case is "within noise" when |ratio - 1| is inside that
spread, and the verdict line says "no regression beyond noise" when no case
is slower beyond it. ``--only-compare`` skips everything else (nginx and
minimal-proxy references, targets, burst, streaming, workers): with
``--quick`` that takes about a minute. Everything is also in ``--json``
(key ``compare``).

The Redis store case (in the full run when redis-server is on PATH; ``--redis``
to require it, also with ``--only-compare``; ``--only-redis`` for it alone,
about 30 s with ``--quick``) starts a throwaway redis-server (``--save ''
--appendonly no``, free loopback port) and four ``sidecar serve`` on one login
in it (``--store redis://127.0.0.1:PORT/0?key=bench``, ``--leeway 2``), then:
a run with wrk -c16 on each of the four at once, the imported pair already
expired when they started; a second run where a newly imported pair falls due
on all four mid-run (refresh calls counted by the mock cloud from each import
to the end of its run: must be 1); file store vs Redis store, one sidecar
each, GET /small at 64 connections, alternating runs (``--compare-runs``,
default 3 here), with the ratio Redis/file and the run-to-run spread; and the
Redis commands per proxied request (``INFO commandstats`` summed over every
command but INFO, before and after each run, over wrk's request count), for
the one sidecar and for the four. Everything is in ``--json`` (key ``redis``).

Exit status: 0 when the benchmark ran (whatever the PASS/FAIL lines and the
verdict say), 1 on an error (missing tool, a server that does not start, a
broken check).

Not a pytest module: nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MINIMAL_PROXY = HERE / "minimal_proxy.py"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LEEWAY = 120.0  # sidecar's default leeway; passed explicitly to the burst sidecar
# The Redis sidecars' leeway: `sidecar import` stamps obtainedAt = now, and a token is never due
# before half its lifetime, so a pair due in a few seconds needs a leeway of at most those seconds.
REDIS_LEEWAY = 2.0
SMALL_BODY = ("sidecar-bench small body " + "." * 100)[:99] + "!"  # exactly 100 bytes
assert len(SMALL_BODY) == 100

TARGETS = ["direct", "sidecar", "nginx-proxy", "minimal-aiohttp"]
CASES = [
    # key, path, connections, title
    ("small_1c", "/small", 1, "small body (100 B), 1 connection"),
    ("small_64c", "/small", 64, "small body (100 B), 64 connections"),
    ("big_8c", "/big", 8, "1 MiB body, 8 connections"),
]

# The steady-state cases of --baseline: current and baseline sidecar, nothing else.
COMPARE_CASES = [
    ("small_64c", "/small", 64, "small body (100 B), 64 connections"),
    ("big_64c", "/big", 64, "1 MiB body, 64 connections"),
    ("small_1c", "/small", 1, "small body (100 B), 1 connection"),
    # A new connection per request (wrk reconnects after Connection: close): what per-connection work costs.
    ("small_64c_close", "/small", 64, "small body (100 B), 64 connections, a new connection per request"),
]
# Cases whose requests each close their connection.
_CLOSE_CASES = frozenset({"small_64c_close"})


class BenchError(Exception):
    """A failure that makes the benchmark meaningless: reported on one line, exit 1."""


# --------------------------------------------------------------------------
# small helpers


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f}us"
    if us < 1_000_000:
        return f"{us / 1000:.2f}ms"
    return f"{us / 1_000_000:.2f}s"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _fmt_cpu(us: float | None) -> str:
    return "-" if us is None else f"{us:.0f}us"


def compare_case(path: str, conns: int, title: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Means, spread and verdict of one --baseline case; ``runs`` has "current" and "baseline" runs.

    The spread of a side is (max - min) / mean of its req/s; the noise band is the larger
    of the two sides'. The verdict is "within noise" when |ratio - 1| is inside it, else
    "SLOWER" or "faster" (current against baseline).
    """
    out: dict[str, Any] = {"path": path, "connections": conns, "title": title, "runs": runs}
    spreads = {}
    for side, rs in runs.items():
        rps = [r["rps"] for r in rs]
        avg = statistics.fmean(rps)
        spreads[side] = (max(rps) - min(rps)) / avg if avg else float("inf")
        out[side] = {f: mean([r.get(f) for r in rs]) for f in ("rps", "p50_us", "p99_us", "cpu_us_per_req")}
        out[side]["spread"] = spreads[side]
    cur, base = out["current"]["rps"], out["baseline"]["rps"]
    ratio = cur / base if base else float("inf")
    spread = max(spreads.values())
    out["ratio"] = ratio
    out["spread"] = spread
    out["pair_ratios"] = [
        a["rps"] / b["rps"] if b["rps"] else float("inf")
        for a, b in zip(runs["current"], runs["baseline"], strict=True)
    ]
    if abs(ratio - 1) <= spread:
        out["verdict"] = "within noise"
    else:
        out["verdict"] = "SLOWER" if ratio < 1 else "faster"
    return out


def iso(epoch: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


_used_ports: set[int] = set()


def free_port() -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return int(port)
    raise BenchError("could not find a free port on 127.0.0.1")


def http_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Redis (a plain RESP client: the bench itself needs no redis-py)


class Resp:
    """One connection to a Redis server speaking RESP2; ``command`` sends one command, returns its reply."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, *args: str) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self) -> Any:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise BenchError("redis-server closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise BenchError(f"redis-server answered an error: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2].decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise BenchError(f"cannot parse a reply of redis-server: {line[:80]!r}")


def redis_commands(port: int) -> tuple[int, dict[str, int]]:
    """Commands redis-server has run so far, INFO itself left out: (total, calls per command)."""
    with Resp(port) as r:
        text = r.command("INFO", "commandstats")
    calls: dict[str, int] = {}
    for line in str(text).splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
        if m and m.group(1) != "info":
            calls[m.group(1)] = int(m.group(2))
    return sum(calls.values()), calls


def command_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls per command between two ``redis_commands`` snapshots (only commands that ran)."""
    return {k: n - before.get(k, 0) for k, n in sorted(after.items()) if n - before.get(k, 0)}


# --------------------------------------------------------------------------
# /proc


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids``, in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Samples the summed VmRSS of some pids every 20 ms in a thread."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.start_kib = rss_kib(pids)
        self.peak_kib = self.start_kib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, rss_kib(self.pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, rss_kib(self.pids))


# --------------------------------------------------------------------------
# processes


class Server:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path, port: int) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        return [self.pid, *descendants(self.pid)]

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-n:])


class Processes:
    """Every process the benchmark starts; ``stop_all`` ends them (and only them)."""

    def __init__(self, workdir: Path, server_cpus: str | None, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.server_cpus = server_cpus
        self.env = env
        self.servers: list[Server] = []

    def start(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> Server:
        if self.server_cpus is not None:
            argv = ["taskset", "-c", self.server_cpus, *argv]
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.env if env is None else env,
            )
        server = Server(name, proc, log, port)
        self.servers.append(server)
        return server

    def wait_ready(
        self,
        server: Server,
        path: str,
        *,
        expect: int = 200,
        timeout: float = 30.0,
        consecutive: int = 1,
    ) -> float:
        """Poll ``path`` until it answers ``expect`` (``consecutive`` times in a row); return seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        streak = 0
        last = "no answer"
        while True:
            rc = server.proc.poll()
            if rc is not None:
                raise BenchError(f"{server.name} exited with status {rc} while starting; log:\n{server.log_tail()}")
            try:
                status, _ = http_request(server.port, path, timeout=2.0)
                last = f"HTTP {status}"
                streak = streak + 1 if status == expect else 0
            except OSError as exc:
                last = str(exc)
                streak = 0
            if streak >= consecutive:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{server.name} not ready after {timeout:.0f} s (GET {path}: {last}); log:\n{server.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, server: Server) -> None:
        if server not in self.servers:
            return
        self.servers.remove(server)
        proc = server.proc
        if proc.poll() is not None:
            return
        kids = []
        for pid in descendants(proc.pid):
            try:
                kids.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes()))
            except OSError:
                pass
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        # Children of ours that outlived their parent (same pid, same command line).
        for pid, cmdline in kids:
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    def stop_all(self) -> None:
        for server in reversed(list(self.servers)):
            try:
                self.stop(server)
            except Exception as exc:  # keep stopping the rest
                print(f"bench: warning: stopping {server.name}: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------
# wrk

_UNITS_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0, "m": 60_000_000.0, "h": 3_600_000_000.0}


def _to_us(value: str, unit: str) -> float:
    return float(value) * _UNITS_US[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise BenchError(f"cannot parse wrk output:\n{text}")
    out["rps"] = float(m.group(1))
    m = re.search(r"^\s+Latency\s+([\d.]+)(us|ms|s|m)\s+([\d.]+)(us|ms|s|m)\s+([\d.]+)(us|ms|s|m)", text, re.M)
    if m:
        out["avg_us"] = _to_us(m.group(1), m.group(2))
        out["max_us"] = _to_us(m.group(5), m.group(6))
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        out[f"p{pct}_us"] = _to_us(value, unit)
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    out["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    non2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    sock = sum(int(g) for g in m.groups()) if m else 0
    out["non2xx"] = non2xx
    out["socket_errors"] = sock
    out["errors"] = non2xx + sock
    return out


class Wrk:
    def __init__(self, wrk: str, client_cpus: str | None) -> None:
        self.wrk = wrk
        self.prefix = ["taskset", "-c", client_cpus] if client_cpus is not None else []

    def run(self, port: int, path: str, conns: int, duration: int, *, close: bool = False) -> dict[str, Any]:
        argv = [
            *self.prefix,
            self.wrk,
            *(["-H", "Connection: close"] if close else []),
            "-t1",
            f"-c{conns}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "--latency",
            f"http://127.0.0.1:{port}{path}",
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
        if done.returncode != 0:
            raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return parse_wrk(done.stdout)

    def measured(
        self, port: int, path: str, conns: int, duration: int, cpu_pids: list[int] | None, *, close: bool = False
    ) -> dict[str, Any]:
        """One wrk run; with ``cpu_pids``, also the CPU those processes spent per request."""
        before = cpu_seconds(cpu_pids) if cpu_pids else None
        t0 = time.time()
        result = self.run(port, path, conns, duration, close=close)
        result["wall_start"] = t0
        result["wall_end"] = time.time()
        if cpu_pids and before is not None:
            spent = cpu_seconds(cpu_pids) - before
            result["cpu_s"] = spent
            reqs = result.get("requests") or 0
            result["cpu_us_per_req"] = spent * 1e6 / reqs if reqs else None
        else:
            result["cpu_us_per_req"] = None
        return result


# --------------------------------------------------------------------------
# configuration files


def _user_directive() -> str:
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"


def _nginx_common(prefix: Path) -> str:
    for sub in ("logs", "tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    return f"""
worker_processes 1;
{_user_directive()}
pid {prefix}/logs/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    tcp_nodelay on;
"""


def upstream_nginx_conf(prefix: Path, www: Path, port: int, mock_port: int) -> Path:
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix)
        + f"""
http {{
{_nginx_http_common(prefix)}
    sendfile on;
    tcp_nopush on;
    upstream mockcloud {{
        server 127.0.0.1:{mock_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = /small {{ default_type text/plain; return 200 "{SMALL_BODY}"; }}
        location = /big {{ }}
        location = /huge {{ }}
        location = /api/v1/auth/token/refresh {{
            proxy_pass http://mockcloud;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /api/v1/upload {{
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_pass http://mockcloud;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_send_timeout 300s;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
    )
    return conf


def proxy_nginx_conf(prefix: Path, port: int, upstream_port: int) -> Path:
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix)
        + f"""
http {{
{_nginx_http_common(prefix)}
    upstream origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer x";
        }}
    }}
}}
"""
    )
    return conf


# --------------------------------------------------------------------------
# environment


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def cpu_plan() -> tuple[str | None, str | None, str]:
    """(client cpus, server cpus, description) for taskset, or Nones when not pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if not shutil.which("taskset") or len(cpus) < 2:
        return None, None, "not pinned (needs taskset and >= 2 CPUs)"
    client = str(cpus[0])
    servers = cpus[1:3] if len(cpus) >= 4 else cpus[1:2]
    server_s = ",".join(map(str, servers))
    return client, server_s, f"wrk/curl on CPU {client}, every server process on CPU {server_s}"


def _version_of(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def _cmd_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    return (done.stdout + done.stderr).strip()


def with_code(env: dict[str, str], checkout: Path) -> dict[str, str]:
    """``env`` with ``checkout`` first on PYTHONPATH, so ``python -m sidecar`` runs that checkout's code."""
    out = dict(env)
    rest = env.get("PYTHONPATH")
    out["PYTHONPATH"] = str(checkout) + (os.pathsep + rest if rest else "")
    return out


def code_origin(env: dict[str, str], cwd: Path, checkout: Path) -> str:
    """Where ``import sidecar`` resolves under ``env``; BenchError unless it is ``checkout``'s package."""
    done = subprocess.run(
        [sys.executable, "-c", "import sidecar; print(sidecar.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )
    if done.returncode != 0:
        raise BenchError(f"cannot import sidecar from {checkout}: {done.stderr.strip()}")
    where = Path(done.stdout.strip()).resolve().parent
    if where != (checkout / "sidecar").resolve():
        raise BenchError(f"with PYTHONPATH={checkout}, sidecar is imported from {where}, not from that checkout")
    return str(where)


def checkout_desc(checkout: Path, env: dict[str, str], cwd: Path) -> str:
    """``sidecar X.Y.Z (git abc1234[, sidecar/ modified]) from PATH`` for the header.

    ``cwd`` must not be a checkout: ``python -m`` puts the working directory before PYTHONPATH.
    """
    git = _cmd_output(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_output(["git", "-C", str(checkout), "status", "--porcelain", "--", "sidecar"])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sidecar", "--version"],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=30,
        )
        version = (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        version = f"? ({exc})"
    return f"{version} (git {git}{', sidecar/ modified' if dirty else ''}) from {checkout}"


def background_load(seconds: float = 1.0) -> dict[str, float]:
    """Busy share of each CPU over ``seconds`` before the benchmark starts (other work on the box)."""

    def snap() -> dict[str, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                out[name] = (sum(v[:8]), idle)
        return out

    try:
        a = snap()
        time.sleep(seconds)
        b = snap()
    except OSError:
        return {}
    load = {}
    for name in a:
        total = b[name][0] - a[name][0]
        idle = b[name][1] - a[name][1]
        load[name] = round(100.0 * (total - idle) / total, 1) if total else 0.0
    return load


def header_info(
    nginx: str,
    wrk: str,
    plan_desc: str,
    minimal_loop: str,
    usable_cpus: int,
    env: dict[str, str],
    baseline: tuple[Path, dict[str, str]] | None,
    cwd: Path,
) -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "python": platform.python_version(),
        "aiohttp": _version_of("aiohttp"),
        "uvloop": _version_of("uvloop"),
        "nginx": _cmd_output([nginx, "-v"]).replace("nginx version: ", ""),
        "wrk": _cmd_output([wrk, "-v"]).splitlines()[0].split(" Copyright")[0],
        "sidecar": checkout_desc(REPO, env, cwd),
        "baseline": checkout_desc(*baseline, cwd) if baseline else None,
        "pinning": plan_desc,
        "minimal_proxy_loop": minimal_loop,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "busy_percent_before_start": background_load(),
    }


# --------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        workdir: Path,
        nginx: str,
        wrk: str,
        curl: str,
        plan: tuple[str | None, str | None, str],
        usable_cpus: int,
    ) -> None:
        self.args = args
        self.duration: int = args.duration
        self.runs: int = args.runs
        self.warmup = 1
        self.workdir = workdir
        self.nginx = nginx
        self.curl = curl
        self.client_cpus, self.server_cpus, self.plan_desc = plan
        self.usable_cpus = usable_cpus
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env["XDG_CONFIG_HOME"] = str(workdir / "xdg-config")  # no user sidecar.toml
        env["PYTHONUNBUFFERED"] = "1"
        self.env = with_code(env, REPO)  # "current" = this checkout, not whatever the venv has installed
        self.baseline: Path | None = args.baseline
        self.baseline_env = with_code(env, args.baseline) if args.baseline else None
        self.only_compare: bool = args.only_compare
        self.compare_runs: int = args.compare_runs
        self.redis_runs: int = args.redis_runs
        self.procs = Processes(workdir, self.server_cpus, self.env)
        self.wrk_path = wrk
        self.wrk = Wrk(wrk, self.client_cpus)
        self.results: dict[str, Any] = {}
        names = ("seed", "burst", "rtt", "redis_expired", "redis_due")
        self.tokens = {name: f"rt_bench_{name}_{os.urandom(8).hex()}" for name in names}
        self.only_redis: bool = args.only_redis
        self.redis_path: str | None = args.redis_server

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    # -- servers ----------------------------------------------------------

    def start_mock_cloud(self) -> Server:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "mock-cloud",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--access-ttl",
            "86400",
            "--log-level",
            "warning",
        ]
        for token in self.tokens.values():
            argv += ["--known-refresh-token", token]
        server = self.procs.start("mock-cloud", argv, port)
        self.procs.wait_ready(server, "/_mock/stats")
        return server

    def start_nginx(self, name: str, conf: Path, port: int, ready_path: str) -> Server:
        prefix = conf.parent
        argv = [
            self.nginx,
            "-p",
            str(prefix),
            "-c",
            str(conf),
            "-e",
            str(prefix / "logs" / "error.log"),
            "-g",
            "daemon off;",
        ]
        server = self.procs.start(name, argv, port)
        self.procs.wait_ready(server, ready_path)
        return server

    def start_sidecar(
        self, name: str, store: Path | str, *extra: str, consecutive: int = 1, env: dict[str, str] | None = None
    ) -> tuple[Server, float]:
        """``python -m sidecar serve`` of this checkout, or of the one ``env`` puts on PYTHONPATH."""
        server = self.spawn_sidecar(name, store, *extra, env=env)
        waited = self.procs.wait_ready(server, "/_sidecar/ready", consecutive=consecutive)
        return server, waited

    def spawn_sidecar(self, name: str, store: Path | str, *extra: str, env: dict[str, str] | None = None) -> Server:
        """``start_sidecar`` without waiting for /_sidecar/ready; ``store`` is a file or a Redis URL."""
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--upstream",
            self.upstream_url,
            "--store",
            str(store),
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            *extra,
        ]
        return self.procs.start(name, argv, port, env)

    def refresh_direct(self, refresh_token: str, conn: http.client.HTTPConnection | None = None) -> dict[str, Any]:
        own = conn is None
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.mock.port, timeout=10)
        try:
            conn.request(
                "POST",
                "/api/v1/auth/token/refresh",
                body=json.dumps({"refreshToken": refresh_token}),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            body = resp.read()
        finally:
            if own:
                conn.close()
        if resp.status != 200:
            raise BenchError(f"mock cloud refused a known refresh token: HTTP {resp.status} {body[:200]!r}")
        document: dict[str, Any] = json.loads(body)
        return document

    def mock_stats(self) -> dict[str, int]:
        status, body = http_request(self.mock.port, "/_mock/stats")
        if status != 200:
            raise BenchError(f"GET /_mock/stats: HTTP {status}")
        stats: dict[str, int] = json.loads(body)
        return stats

    def sidecar_status(self, server: Server) -> dict[str, Any]:
        status, body = http_request(server.port, "/_sidecar/status")
        if status != 200:
            raise BenchError(f"{server.name}: GET /_sidecar/status: HTTP {status}")
        document: dict[str, Any] = json.loads(body)
        return document

    def import_store(self, store: Path, env: dict[str, str]) -> None:
        """``sidecar import`` of the seed pair into ``store``, by the checkout ``env`` runs."""
        self.import_pair(
            store, env, self.pair["accessToken"], self.pair["refreshToken"], self.pair["accessTokenExpiresAt"]
        )

    def import_pair(
        self, store: Path | str, env: dict[str, str], access_token: str, refresh_token: str, expires_at: str
    ) -> None:
        """``sidecar import`` of one pair into ``store`` (a file or a Redis URL), by the checkout ``env`` runs."""
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar",
                "import",
                "--store",
                str(store),
                "--upstream",
                self.upstream_url,
                "--access-token",
                access_token,
                "--refresh-token",
                refresh_token,
                "--expires-at",
                expires_at,
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.workdir,
            timeout=60,
        )
        if done.returncode != 0:
            checkout = env["PYTHONPATH"].split(os.pathsep)[0]
            raise BenchError(f"sidecar import (from {checkout}) failed ({done.returncode}): {done.stderr.strip()}")

    def setup(self) -> None:
        w = self.workdir
        www = w / "www"
        www.mkdir()
        (www / "big").write_bytes(os.urandom(MiB))
        self.huge = www / "huge"
        with open(self.huge, "wb") as f:
            f.truncate(GiB)  # sparse: no disk used, served as zeros

        self.mock = self.start_mock_cloud()

        up_port = free_port()
        conf = upstream_nginx_conf(w / "nginx-upstream", www, up_port, self.mock.port)
        self.upstream = self.start_nginx("nginx-upstream", conf, up_port, "/small")
        self.upstream_url = f"http://127.0.0.1:{up_port}"

        # A real pair from the mock cloud (so /api/v1/upload accepts it), valid for a day.
        self.pair = self.refresh_direct(self.tokens["seed"])
        self.access_token = self.pair["accessToken"]  # for the direct (no proxy) upload reference
        self.store = w / "store-main.json"
        self.import_store(self.store, self.env)

        code_origin(self.env, w, REPO)
        self.sidecar, self.sidecar_startup = self.start_sidecar("sidecar", self.store)
        self.targets: dict[str, tuple[Server, Server | None]] = {
            "direct": (self.upstream, None),
            "sidecar": (self.sidecar, self.sidecar),
        }
        if not self.only_compare and not self.only_redis:
            self.setup_references()
        # Sanity: every target serves both bodies correctly.
        for name, (server, _) in self.targets.items():
            self.check_bodies(name, server)

    def check_bodies(self, name: str, server: Server) -> None:
        status, body = http_request(server.port, "/small")
        if status != 200 or body != SMALL_BODY.encode():
            raise BenchError(f"{name}: GET /small answered {status} with {len(body)} bytes")
        status, body = http_request(server.port, "/big")
        if status != 200 or len(body) != MiB:
            raise BenchError(f"{name}: GET /big answered {status} with {len(body)} bytes")

    def setup_references(self) -> None:
        """The nginx proxy and the minimal aiohttp proxy the main cases compare sidecar with."""
        w = self.workdir
        up_port = self.upstream.port
        px_port = free_port()
        conf = proxy_nginx_conf(w / "nginx-proxy", px_port, up_port)
        self.nginx_proxy = self.start_nginx("nginx-proxy", conf, px_port, "/small")

        mp_port = free_port()
        self.minimal = self.procs.start(
            "minimal-aiohttp",
            [sys.executable, str(MINIMAL_PROXY), "--upstream", self.upstream_url, "--port", str(mp_port)],
            mp_port,
        )
        self.procs.wait_ready(self.minimal, "/small")
        self.targets["nginx-proxy"] = (self.nginx_proxy, self.nginx_proxy)
        self.targets["minimal-aiohttp"] = (self.minimal, self.minimal)

    # -- main cases -------------------------------------------------------

    def run_cases(self) -> None:
        cases: dict[str, Any] = {}
        for key, path, conns, title in CASES:
            for server, _ in self.targets.values():  # warm-up, not reported
                self.wrk.run(server.port, path, conns, self.warmup)
            runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS}
            for _ in range(self.runs):  # interleaved, so drift hits every target alike
                for name in TARGETS:
                    server, cpu_server = self.targets[name]
                    cpu_pids = cpu_server.tree() if cpu_server else None
                    runs[name].append(self.wrk.measured(server.port, path, conns, self.duration, cpu_pids))
            cases[key] = {"path": path, "connections": conns, "title": title, "runs": runs}
            self.print_case(key, cases[key])
        self.results["cases"] = cases

    def print_case(self, key: str, case: dict[str, Any]) -> None:
        runs = case["runs"]
        means = {
            t: {f: mean([r.get(f) for r in runs[t]]) for f in ("rps", "p50_us", "p99_us", "cpu_us_per_req")}
            for t in TARGETS
        }
        # Interference from other work on the box only ever slows a run down, so the
        # summary is each target's best run (highest req/s); the mean is in the JSON.
        best = {t: max(runs[t], key=lambda r: r["rps"]) for t in TARGETS}
        case["means"] = means
        case["best"] = best
        one_conn = case["connections"] == 1
        self.say()
        self.say(
            f"== {case['title']} (GET {case['path']}, wrk -t1 -c{case['connections']}, {self.duration} s per run) =="
        )
        cols = (
            f"{'target':<16} {'run':>4} {'req/s':>10} {'p50':>9} {'p99':>9} {'CPU us/req':>10} {'errors':>6} "
            f"{'x direct':>8} {'x nginx':>8} {'x minimal':>9}"
        )
        if one_conn:
            cols += f" {'+p50 vs direct':>14}"
        self.say(cols)
        d_rps, n_rps, m_rps = best["direct"]["rps"], best["nginx-proxy"]["rps"], best["minimal-aiohttp"]["rps"]
        d_p50 = best["direct"].get("p50_us")
        for t in TARGETS:
            rows = [(str(i + 1), r) for i, r in enumerate(runs[t])]
            rows.append(("best", best[t]))
            for label, r in rows:
                rps = r["rps"]
                x_min = fmt_ratio(rps / m_rps) if t == "sidecar" and m_rps else "-"
                cpu = r.get("cpu_us_per_req")
                line = (
                    f"{t:<16} {label:>4} {rps:>10,.0f} {fmt_us(r.get('p50_us')):>9} {fmt_us(r.get('p99_us')):>9} "
                    f"{('-' if cpu is None else f'{cpu:.1f}'):>10} {r.get('errors', 0):>6} "
                    f"{fmt_ratio(rps / d_rps if d_rps else None):>8} {fmt_ratio(rps / n_rps if n_rps else None):>8} {x_min:>9}"
                )
                if one_conn:
                    p50 = r.get("p50_us")
                    added = p50 - d_p50 if p50 is not None and d_p50 is not None else None
                    line += f" {('-' if t == 'direct' or added is None else f'{added:+.0f} us'):>14}"
                self.say(line)
        self.say(
            "  ratios: req/s over the best run of direct / nginx-proxy / minimal-aiohttp; "
            "CPU: the proxy's process(es), utime+stime per request"
        )
        errors = {t: sum(r["errors"] for r in runs[t]) for t in TARGETS if any(r["errors"] for r in runs[t])}
        if errors:
            self.say(f"  WARNING: non-2xx/3xx or socket errors during runs: {errors}")
        noisy = {
            t: round(max(r["rps"] for r in runs[t]) / max(min(r["rps"] for r in runs[t]), 1e-9), 2) for t in TARGETS
        }
        noisy = {t: v for t, v in noisy.items() if v > 1.2}
        case["noisy"] = noisy
        if noisy:
            self.say(
                f"  NOISY: runs of the same target differ by more than 20% (best/worst req/s: {noisy}); other load on the box?"
            )

    def print_targets(self) -> None:
        cases = self.results["cases"]
        b64 = cases["small_64c"]["best"]
        b1 = cases["small_1c"]["best"]
        bbig = cases["big_8c"]["best"]
        checks = []

        def check(name: str, value: float | None, op: str, limit: float, shown: str) -> None:
            ok = value is not None and (value >= limit if op == ">=" else value <= limit)
            checks.append({"name": name, "value": value, "op": op, "limit": limit, "pass": ok})
            self.say(f"  {'PASS' if ok else 'FAIL'}  {name}: {shown} ({op} {limit:g})")

        self.say()
        self.say("== targets from the issue (best run of each target) ==")
        r = b64["sidecar"]["rps"] / b64["nginx-proxy"]["rps"]
        check("64 conns small: sidecar req/s / nginx-proxy req/s", r, ">=", 0.25, f"{r:.3f}")
        r = b64["sidecar"]["rps"] / b64["minimal-aiohttp"]["rps"]
        check("64 conns small: sidecar req/s / minimal-aiohttp req/s", r, ">=", 1.3, f"{r:.3f}")
        added = b1["sidecar"]["p50_us"] - b1["direct"]["p50_us"]
        check("1 conn small: sidecar p50 - direct p50", added, "<=", 100, f"{added:+.0f} us")
        r = bbig["sidecar"]["rps"] / bbig["nginx-proxy"]["rps"]
        check("1 MiB 8 conns: sidecar req/s / nginx-proxy req/s", r, ">=", 1.0, f"{r:.3f}")
        if any(cases[k].get("noisy") for k in cases):
            self.say("  (some cases were NOISY, see above: treat close calls with care)")
        self.results["targets"] = checks

    # -- current vs baseline ----------------------------------------------

    def run_compare(self) -> None:
        """This checkout's sidecar against the ``--baseline`` checkout's, same upstream, runs interleaved."""
        assert self.baseline is not None and self.baseline_env is not None
        self.say()
        self.say(
            f"== current vs baseline sidecar (runs interleaved current, baseline, current, ...: "
            f"{self.compare_runs} x {self.duration} s each per case, after a {self.warmup} s warm-up) =="
        )
        code_origin(self.baseline_env, self.workdir, self.baseline)
        store = self.workdir / "store-baseline.json"
        self.import_store(store, self.baseline_env)  # the baseline's own import: its own store format
        base, base_startup = self.start_sidecar("sidecar-baseline", store, env=self.baseline_env)
        self.check_bodies("sidecar-baseline", base)
        sides = {"current": self.sidecar, "baseline": base}
        cases: dict[str, Any] = {}
        for key, path, conns, title in COMPARE_CASES:
            close = key in _CLOSE_CASES
            for server in sides.values():  # warm-up, not reported
                self.wrk.run(server.port, path, conns, self.warmup, close=close)
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
            for _ in range(self.compare_runs):
                for side, server in sides.items():
                    runs[side].append(
                        self.wrk.measured(server.port, path, conns, self.duration, server.tree(), close=close)
                    )
            cases[key] = compare_case(path, conns, title, runs)
        self.procs.stop(base)
        self.print_compare(cases, base_startup)

    def print_compare(self, cases: dict[str, Any], base_startup: float) -> None:
        info = self.results.get("header", {})
        self.say(f"  current:  {info.get('sidecar', REPO)}")
        self.say(f"  baseline: {info.get('baseline', self.baseline)}")
        self.say(f"  startup to /_sidecar/ready: current {self.sidecar_startup:.2f} s, baseline {base_startup:.2f} s")
        self.say(
            f"{'case':<12} {'cur req/s':>10} {'base req/s':>10} {'ratio':>6} {'spread':>6} "
            f"{'cur p50':>8} {'cur p99':>8} {'base p50':>8} {'base p99':>8} {'cur CPU':>7} {'base CPU':>8}  verdict"
        )
        for key, c in cases.items():
            cur, base = c["current"], c["baseline"]
            self.say(
                f"{key:<12} {cur['rps']:>10,.0f} {base['rps']:>10,.0f} {c['ratio']:>6.3f} {c['spread'] * 100:>5.1f}% "
                f"{fmt_us(cur['p50_us']):>8} {fmt_us(cur['p99_us']):>8} "
                f"{fmt_us(base['p50_us']):>8} {fmt_us(base['p99_us']):>8} "
                f"{_fmt_cpu(cur['cpu_us_per_req']):>7} {_fmt_cpu(base['cpu_us_per_req']):>8}  {c['verdict']}"
            )
        self.say(
            "  req/s, p50, p99, CPU (us per request, the sidecar process) are means over the runs; ratio = current / baseline "
            "mean req/s; spread = run-to-run spread, (max - min) / mean req/s, the larger of the two sides"
        )
        for key, c in cases.items():
            pairs = ", ".join(f"{r:.3f}" for r in c["pair_ratios"])
            per_run = " / ".join(
                f"{side} " + " ".join(f"{r['rps']:,.0f}" for r in c["runs"][side]) for side in ("current", "baseline")
            )
            self.say(f"  {key}: req/s per run: {per_run}; run-by-run ratios: {pairs}")
        errors = {
            f"{key} {side}": n
            for key, c in cases.items()
            for side in ("current", "baseline")
            if (n := sum(r["errors"] for r in c["runs"][side]))
        }
        if errors:
            self.say(f"  WARNING: non-2xx/3xx or socket errors during runs: {errors}")
        slower = [k for k, c in cases.items() if c["verdict"] == "SLOWER"]
        faster = [k for k, c in cases.items() if c["verdict"] == "faster"]
        if slower:
            verdict = "REGRESSION beyond noise in: " + ", ".join(
                f"{k} (ratio {cases[k]['ratio']:.3f}, spread {cases[k]['spread'] * 100:.1f}%)" for k in slower
            )
        else:
            verdict = "no regression beyond noise"
            if faster:
                verdict += " (current faster beyond noise in: " + ", ".join(faster) + ")"
        if errors:
            verdict += "; but some runs had errors, see above"
        self.say(f"  verdict: {verdict}")
        self.results["compare"] = {
            "current": str(REPO),
            "baseline": str(self.baseline),
            "runs_per_side": self.compare_runs,
            "duration_s": self.duration,
            "baseline_startup_s": base_startup,
            "cases": cases,
            "errors": errors,
            "verdict": verdict,
        }

    # -- refresh burst ----------------------------------------------------

    def run_burst(self) -> None:
        self.say()
        self.say("== refresh burst: the stored token falls due in the middle of a 64-connection run (GET /small) ==")
        # One refresh round trip, straight to the mock cloud, with a refresh token nobody used yet.
        rtts = []
        conn = http.client.HTTPConnection("127.0.0.1", self.mock.port, timeout=10)
        try:
            token = self.tokens["rtt"]
            for _ in range(5):
                t0 = time.perf_counter()
                pair = self.refresh_direct(token, conn)
                rtts.append((time.perf_counter() - t0) * 1e6)
                token = pair["refreshToken"]  # the rotated one: again fresh
        finally:
            conn.close()

        offset = min(1.5, self.duration * 0.4)  # where in the run the refresh should fall
        lead = self.sidecar_startup * 2 + 2.0  # time to start the sidecar, warm it up and get wrk going
        now = time.time()
        due = now + lead + offset  # expiry - leeway: the background refresh fires here
        store = self.workdir / "store-burst.json"
        store.write_text(
            json.dumps(
                {
                    "accessToken": "at_bench_burst_not_checked_by_nginx",
                    "refreshToken": self.tokens["burst"],
                    "apiUrl": self.upstream_url,
                    "expiresAt": iso(due + LEEWAY),
                    "obtainedAt": iso(now - 3600),
                }
            )
        )
        os.chmod(store, 0o600)
        server, _ = self.start_sidecar("sidecar-burst", store, "--leeway", f"{LEEWAY:g}")
        wait = due - offset - time.time()
        if wait < 0:
            raise BenchError(
                f"sidecar-burst took too long to start ({-wait:.1f} s late); rerun with a longer --duration"
            )
        if wait > 1.5:  # warm-up when there is time
            self.wrk.run(server.port, "/small", 64, 1)
        time.sleep(max(0.0, due - offset - time.time()))  # start wrk `offset` seconds before the refresh is due
        before = self.mock_stats()["refresh_calls"]
        burst = self.wrk.measured(server.port, "/small", 64, self.duration, server.tree())
        during = self.mock_stats()["refresh_calls"] - before
        status = self.sidecar_status(server)
        last = status.get("lastRefreshAt")
        at = parse_iso(last) - burst["wall_start"] if last else None
        before = self.mock_stats()["refresh_calls"]
        calm = self.wrk.measured(server.port, "/small", 64, self.duration, server.tree())
        after_calm = self.mock_stats()["refresh_calls"] - before
        self.procs.stop(server)

        self.say(f"{'run':<22} {'req/s':>10} {'p50':>9} {'p99':>9} {'max':>9} {'errors':>6} {'refresh calls':>13}")
        for label, r, calls in (("with refresh due", burst, during), ("without expiry", calm, after_calm)):
            self.say(
                f"{label:<22} {r['rps']:>10,.0f} {fmt_us(r.get('p50_us')):>9} {fmt_us(r.get('p99_us')):>9} "
                f"{fmt_us(r.get('max_us')):>9} {r['errors']:>6} {calls:>13}"
            )
        ok = during == 1
        self.say(
            f"  {'PASS' if ok else 'FAIL'}  refresh calls seen by the mock cloud during the burst run: {during} (must be 1); "
            f"refresh landed {('?' if at is None else f'{at:.2f} s')} into the {self.duration} s run "
            f"(sidecar status: refreshes={status.get('refreshes')})"
        )
        ratio = burst["p99_us"] / calm["p99_us"] if calm.get("p99_us") else None
        self.say(f"  p99 with refresh / p99 without: {fmt_ratio(ratio)}")
        self.say(
            f"  one refresh round trip, direct POST to the mock cloud (fresh refresh token): {fmt_us(rtts[0])} "
            f"(new connection; median of {len(rtts)} chained: {fmt_us(statistics.median(rtts))})"
        )
        self.results["refresh_burst"] = {
            "with_refresh": burst,
            "without_expiry": calm,
            "refresh_calls_during_burst": during,
            "refresh_calls_during_calm": after_calm,
            "refresh_offset_s": at,
            "pass": ok,
            "p99_ratio": ratio,
            "refresh_rtt_us": rtts,
            "sidecar_status": status,
        }

    # -- streaming --------------------------------------------------------

    def _curl(self, argv: list[str], timeout: float = 600) -> str:
        prefix = ["taskset", "-c", self.client_cpus] if self.client_cpus is not None else []
        try:
            done = subprocess.run([*prefix, self.curl, *argv], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"curl timed out: {argv}") from None
        if done.returncode != 0:
            raise BenchError(f"curl failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def _download(self, port: int, sidecar: Server | None) -> dict[str, Any]:
        pids = sidecar.tree() if sidecar else []
        cpu0 = cpu_seconds(pids)
        with RssSampler(pids) as rss:
            text = self._curl(
                [
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{size_download} %{time_total}",
                    f"http://127.0.0.1:{port}/huge",
                ]
            )
        cpu = cpu_seconds(pids) - cpu0
        code, size, secs = text.split()
        size_i, secs_f = int(size), float(secs)
        if code != "200" or size_i != GiB:
            raise BenchError(f"1 GiB download from port {port}: HTTP {code}, {size_i} bytes (want {GiB})")
        return self._stream_result(size_i, secs_f, rss, cpu, sidecar)

    def _upload(self, port: int, sidecar: Server | None) -> dict[str, Any]:
        pids = sidecar.tree() if sidecar else []
        auth = [] if sidecar else ["-H", f"Authorization: Bearer {self.access_token}"]
        cpu0 = cpu_seconds(pids)
        with RssSampler(pids) as rss:
            text = self._curl(
                [
                    "-sS",
                    "-H",
                    "Expect:",
                    "-H",
                    "Content-Type: application/octet-stream",
                    *auth,
                    # -T streams the file (with Content-Length); --data-binary @FILE would load it
                    # into memory, and curl refuses files of 1 GiB and more ("out of memory").
                    "-X",
                    "POST",
                    "-T",
                    str(self.huge),
                    "-w",
                    "\n%{http_code} %{size_upload} %{time_total}",
                    f"http://127.0.0.1:{port}/api/v1/upload",
                ]
            )
        cpu = cpu_seconds(pids) - cpu0
        body, _, stats = text.rpartition("\n")
        code, size, secs = stats.split()
        try:
            received = json.loads(body).get("received")
        except (ValueError, AttributeError):
            received = None
        if code != "200" or received != GiB:
            raise BenchError(f"1 GiB upload to port {port}: HTTP {code}, response {body[:200]!r} (want received={GiB})")
        result = self._stream_result(int(size), float(secs), rss, cpu, sidecar)
        result["received"] = received
        return result

    @staticmethod
    def _stream_result(size: int, secs: float, rss: RssSampler, cpu: float, sidecar: Server | None) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes": size, "seconds": secs, "mb_per_s": size / secs / 1e6}
        if sidecar:
            out.update(
                rss_start_kib=rss.start_kib,
                rss_peak_kib=rss.peak_kib,
                rss_growth_kib=rss.peak_kib - rss.start_kib,
                sidecar_cpu_s=cpu,
            )
        return out

    def run_streaming(self) -> None:
        self.say()
        self.say("== streaming 1 GiB through sidecar (curl; RSS of the sidecar process sampled every 20 ms) ==")
        out = {
            "down": self._download(self.sidecar.port, self.sidecar),
            "down_direct": self._download(self.upstream.port, None),
            "up": self._upload(self.sidecar.port, self.sidecar),
            "up_direct": self._upload(self.upstream.port, None),
        }
        self.say(
            f"{'direction':<22} {'bytes':>12} {'seconds':>8} {'MB/s':>8} {'RSS start':>10} {'RSS peak':>10} "
            f"{'RSS growth':>10} {'sidecar CPU':>11}"
        )
        for key, label in (
            ("down", "down, sidecar"),
            ("down_direct", "down, direct"),
            ("up", "up, sidecar"),
            ("up_direct", "up, direct"),
        ):
            r = out[key]
            line = f"{label:<22} {r['bytes']:>12} {r['seconds']:>8.2f} {r['mb_per_s']:>8.0f}"
            if "rss_peak_kib" in r:
                line += (
                    f" {r['rss_start_kib'] / 1024:>8.1f}Mi {r['rss_peak_kib'] / 1024:>8.1f}Mi "
                    f"{r['rss_growth_kib'] / 1024:>8.1f}Mi {r['sidecar_cpu_s']:>10.2f}s"
                )
            else:
                line += f" {'-':>10} {'-':>10} {'-':>10} {'-':>11}"
            self.say(line)
        self.say(
            "  down: curl -o /dev/null of /huge (sparse file on the upstream nginx); up: curl -X POST -T FILE -H 'Expect:' "
            "to /api/v1/upload (mock cloud behind nginx, proxy_request_buffering off); "
            f"upload responses: received={out['up']['received']} / {out['up_direct']['received']} (== 1 GiB: yes); "
            "direct = same transfer without the sidecar; MB = 10^6 bytes"
        )
        self.results["streaming"] = out

    # -- workers ----------------------------------------------------------

    def run_workers(self) -> None:
        self.say()
        self.say(f"== sidecar --workers 2 vs 1 worker (GET /small, 64 connections, {self.duration} s per run) ==")
        store = self.workdir / "store-workers.json"
        shutil.copy2(self.store, store)
        w2, _ = self.start_sidecar("sidecar-workers2", store, "--workers", "2", consecutive=20)
        kids = descendants(w2.pid)
        self.wrk.run(w2.port, "/small", 64, self.warmup)
        self.wrk.run(self.sidecar.port, "/small", 64, self.warmup)
        runs: dict[str, list[dict[str, Any]]] = {"1 worker": [], "2 workers": []}
        for _ in range(self.runs):
            for label, server in (("1 worker", self.sidecar), ("2 workers", w2)):
                runs[label].append(self.wrk.measured(server.port, "/small", 64, self.duration, server.tree()))
        self.procs.stop(w2)
        self.say(f"{'sidecar':<10} {'run':>4} {'req/s':>10} {'p50':>9} {'p99':>9} {'CPU us/req':>10} {'errors':>6}")
        for label, rs in runs.items():
            for i, r in enumerate(rs):
                self.say(
                    f"{label:<10} {i + 1:>4} {r['rps']:>10,.0f} {fmt_us(r.get('p50_us')):>9} {fmt_us(r.get('p99_us')):>9} "
                    f"{r['cpu_us_per_req']:>10.1f} {r['errors']:>6}"
                )
        two, one = mean([r["rps"] for r in runs["2 workers"]]), mean([r["rps"] for r in runs["1 worker"]])
        ratio = two / one if two is not None and one else float("nan")
        self.say(f"  2 workers / 1 worker req/s: {ratio:.2f}  (worker processes seen: {len(kids)})")
        if self.server_cpus is not None and "," not in self.server_cpus:
            self.say(
                f"  note: servers are pinned to one CPU ({self.server_cpus}) with wrk on the other, so two workers share "
                "one core with nginx: this box cannot show the ~1.8x scaling; it only shows the extra worker costs little."
            )
        elif self.server_cpus is None:
            self.say("  note: not pinned; wrk, nginx and the workers share the same CPUs, so the ratio says little.")
        self.results["workers"] = {"runs": runs, "ratio_2_over_1": ratio, "worker_processes": len(kids)}

    # -- Redis store ------------------------------------------------------

    def start_redis(self) -> Server:
        """A throwaway redis-server on a free loopback port: no persistence, data dir in the workdir."""
        assert self.redis_path is not None
        port = free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        argv = [
            self.redis_path,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
            "--daemonize",
            "no",
        ]
        server = self.procs.start("redis-server", argv, port)
        deadline = time.monotonic() + 15
        while True:
            rc = server.proc.poll()
            if rc is not None:
                raise BenchError(f"redis-server exited with status {rc} while starting; log:\n{server.log_tail()}")
            try:
                with Resp(port, timeout=2.0) as r:
                    if r.command("PING") == "PONG":
                        return server
            except (OSError, BenchError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"redis-server not answering PING after 15 s; log:\n{server.log_tail()}")
            time.sleep(0.02)

    def wrk_spread(self, servers: list[Server], path: str, conns: int, duration: int) -> dict[str, Any]:
        """One wrk per server, all at once (``conns`` connections each); the summed result and each run."""
        results: list[dict[str, Any] | BaseException] = [RuntimeError("wrk did not run")] * len(servers)

        def one(i: int, server: Server) -> None:
            try:
                results[i] = self.wrk.measured(server.port, path, conns, duration, server.tree())
            except BaseException as exc:  # re-raised below, in the caller's thread
                results[i] = exc

        threads = [threading.Thread(target=one, args=(i, s), daemon=True) for i, s in enumerate(servers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        runs: list[dict[str, Any]] = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            runs.append(r)
        p99s = [r["p99_us"] for r in runs if r.get("p99_us") is not None]
        return {
            "rps": sum(r["rps"] for r in runs),
            "requests": sum(r.get("requests") or 0 for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "p99_us_max": max(p99s) if p99s else None,
            "runs": runs,
        }

    def refreshes_by(self, servers: list[Server]) -> list[Any]:
        """Successful refreshes each sidecar made so far (its /_sidecar/status)."""
        out = []
        for server in servers:
            refreshes = self.sidecar_status(server).get("refreshes")
            out.append(refreshes.get("ok") if isinstance(refreshes, dict) else refreshes)
        return out

    def run_redis(self) -> None:
        """Four sidecars on one Redis login (one refresh for all), Redis vs file store, Redis commands per request."""
        n_sidecars, per_conns = 4, 16
        self.say()
        self.say(
            f"== Redis store: {n_sidecars} sidecars on one login (refresh burst, wrk -c{per_conns} on each at once), "
            f"Redis vs file store, Redis commands per request =="
        )
        code = subprocess.run(
            [sys.executable, "-c", "import redis"], capture_output=True, text=True, env=self.env, cwd=self.workdir
        )
        if code.returncode != 0:
            raise BenchError(f"the Redis store needs redis-py in {sys.executable}: pip install 'sidecar[redis]'")
        redis = self.start_redis()
        url = f"redis://127.0.0.1:{redis.port}/0?key=bench"
        version = "?"
        with Resp(redis.port) as conn:
            m = re.search(r"redis_version:(\S+)", str(conn.command("INFO", "server")))
            version = m.group(1) if m else version
        self.say(f"  redis-server {version} on 127.0.0.1:{redis.port} (--save '' --appendonly no), store {url}")
        out: dict[str, Any] = {"redis_version": version, "sidecars": n_sidecars, "connections_each": per_conns}
        checks: list[dict[str, Any]] = []

        def check(name: str, ok: bool, shown: str) -> None:
            checks.append({"name": name, "pass": ok, "shown": shown})
            self.say(f"  {'PASS' if ok else 'FAIL'}  {name}: {shown}")

        # 1a. The pair is already expired when the sidecars start: every one of them wants a refresh at once.
        before = self.mock_stats()["refresh_calls"]
        self.import_pair(url, self.env, "at_bench_redis_expired", self.tokens["redis_expired"], iso(time.time() - 60))
        spawned = [
            self.spawn_sidecar(f"sidecar-redis{i + 1}", url, "--leeway", f"{REDIS_LEEWAY:g}") for i in range(n_sidecars)
        ]
        t0 = time.monotonic()
        for server in spawned:
            self.procs.wait_ready(server, "/_sidecar/ready")
        startup = time.monotonic() - t0
        expired = self.wrk_spread(spawned, "/small", per_conns, self.duration)
        calls_expired = self.mock_stats()["refresh_calls"] - before
        by_expired = self.refreshes_by(spawned)

        # 1b. A new pair falls due in the middle of a run on all four: their refreshes race for the lock.
        offset = min(1.5, self.duration * 0.4)
        lead = max(2.5, REDIS_LEEWAY)  # import (one python start) and wrk start well inside it
        due = time.time() + lead + offset
        before = self.mock_stats()["refresh_calls"]
        mid_total0, mid_calls0 = redis_commands(redis.port)
        # Lifetime lead + offset + leeway, due after lead + offset: past half of it (see REDIS_LEEWAY).
        self.import_pair(url, self.env, "at_bench_redis_due", self.tokens["redis_due"], iso(due + REDIS_LEEWAY))
        wait = due - offset - time.time()
        if wait < 0:
            raise BenchError(f"sidecar import into Redis took too long ({-wait:.1f} s late); rerun")
        time.sleep(wait)
        t_run = time.time()
        mid = self.wrk_spread(spawned, "/small", per_conns, self.duration)
        during_mid = self.mock_stats()["refresh_calls"] - before
        mid_total1, mid_calls1 = redis_commands(redis.port)
        by_mid = self.refreshes_by(spawned)
        landed = [self.sidecar_status(s).get("lastRefreshAt") for s in spawned]
        times = [parse_iso(x) for x in landed if isinstance(x, str)]
        at = max(times) - t_run if times else None

        # 3a. Steady state on all four: Redis commands per proxied request.
        total0, calls0 = redis_commands(redis.port)
        steady4 = self.wrk_spread(spawned, "/small", per_conns, self.duration)
        total1, calls1 = redis_commands(redis.port)
        cmds4 = total1 - total0
        per_req4 = cmds4 / steady4["requests"] if steady4["requests"] else None
        for server in spawned[1:]:
            self.procs.stop(server)
        one = spawned[0]

        self.say(
            f"  {n_sidecars} sidecars started in parallel, all ready after {startup:.2f} s; "
            f"{self.duration} s per run, wrk -t1 -c{per_conns} on each sidecar at once"
        )
        self.say(
            f"{'run':<34} {'req/s (sum)':>11} {'p99 (max)':>9} {'errors':>6} {'refresh calls':>13}  refreshes per sidecar so far"
        )
        for label, r, calls, by in (
            ("expired at start (import..end)", expired, calls_expired, by_expired),
            (f"falls due {offset:g} s into the run", mid, during_mid, by_mid),
            ("steady (no refresh due)", steady4, None, None),
        ):
            self.say(
                f"{label:<34} {r['rps']:>11,.0f} {fmt_us(r['p99_us_max']):>9} {r['errors']:>6} "
                f"{'-' if calls is None else calls:>13}  {'-' if by is None else by}"
            )
        check(
            "refresh calls seen by the mock cloud, pair expired when the 4 sidecars started (import through the run)",
            calls_expired == 1,
            f"{calls_expired} (must be 1)",
        )
        check(
            "refresh calls seen by the mock cloud, pair falling due during the run on all 4 (import through the run)",
            during_mid == 1,
            f"{during_mid} (must be 1); the refresh landed {'?' if at is None else f'{at:.2f} s'} into the run",
        )
        out["burst"] = {
            "startup_s": startup,
            "expired_at_start": {"run": expired, "refresh_calls": calls_expired, "refreshes_by_sidecar": by_expired},
            "due_mid_run": {
                "run": mid,
                "refresh_calls": during_mid,
                "refreshes_by_sidecar": by_mid,
                "offset_s": offset,
                "landed_s": at,
            },
        }

        # 2. Steady-state throughput: one sidecar on the file store vs one on the Redis store, alternating.
        n = self.redis_runs
        self.say()
        self.say(
            f"  file store vs Redis store, one sidecar each (GET /small, wrk -t1 -c64, {n} x {self.duration} s per side, "
            f"alternating file, redis, file, ...; after a {self.warmup} s warm-up)"
        )
        sides = {"file": self.sidecar, "redis": one}
        for server in sides.values():
            self.wrk.run(server.port, "/small", 64, self.warmup)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        cmds1, reqs1 = 0, 0
        per_cmd: dict[str, int] = {}
        for _ in range(n):
            for side, server in sides.items():
                c0, k0 = redis_commands(redis.port)
                r = self.wrk.measured(server.port, "/small", 64, self.duration, server.tree())
                c1, k1 = redis_commands(redis.port)
                r["redis_commands"] = c1 - c0
                runs[side].append(r)
                if side == "redis":
                    cmds1 += c1 - c0
                    reqs1 += r.get("requests") or 0
                    for k, v in command_delta(k0, k1).items():
                        per_cmd[k] = per_cmd.get(k, 0) + v
        stats: dict[str, dict[str, Any]] = {}
        for side, rs in runs.items():
            rps = [r["rps"] for r in rs]
            avg = statistics.fmean(rps)
            stats[side] = {
                "rps": avg,
                "spread": (max(rps) - min(rps)) / avg if avg else float("inf"),
                "p99_us": mean([r.get("p99_us") for r in rs]),
                "cpu_us_per_req": mean([r.get("cpu_us_per_req") for r in rs]),
                "errors": sum(r["errors"] for r in rs),
            }
        ratio = stats["redis"]["rps"] / stats["file"]["rps"] if stats["file"]["rps"] else float("inf")
        spread = max(s["spread"] for s in stats.values())
        pair_ratios = [
            b["rps"] / a["rps"] if a["rps"] else float("inf") for a, b in zip(runs["file"], runs["redis"], strict=True)
        ]
        self.say(
            f"{'store':<8} {'req/s per run':<40} {'mean':>9} {'spread':>7} {'p99':>8} {'CPU us/req':>10} {'errors':>6}"
        )
        for side, rs in runs.items():
            st = stats[side]
            per_run = " ".join(f"{r['rps']:,.0f}" for r in rs)
            self.say(
                f"{side:<8} {per_run:<40} {st['rps']:>9,.0f} {st['spread'] * 100:>6.1f}% {fmt_us(st['p99_us']):>8} "
                f"{_fmt_cpu(st['cpu_us_per_req']):>10} {st['errors']:>6}"
            )
        noise = "within noise" if abs(ratio - 1) <= spread else ("slower beyond noise" if ratio < 1 else "faster")
        check(
            "steady state: Redis-store req/s / file-store req/s",
            ratio >= 0.95,
            f"{ratio:.3f} (>= 0.95; run-to-run spread {spread * 100:.1f}%, {noise}; "
            f"run-by-run ratios {', '.join(f'{x:.3f}' for x in pair_ratios)})",
        )
        out["throughput"] = {
            "runs": runs,
            "file": stats["file"],
            "redis": stats["redis"],
            "ratio_redis_over_file": ratio,
            "spread": spread,
            "pair_ratios": pair_ratios,
            "verdict": noise,
        }

        # 3b. Redis commands per proxied request.
        per_req1 = cmds1 / reqs1 if reqs1 else None
        idle = sum(r["redis_commands"] for r in runs["file"])
        self.say()
        self.say(
            "  Redis commands per proxied request (INFO commandstats before and after each run, INFO itself left out):"
        )
        for label, cmds, reqs, per, detail in (
            ("1 sidecar, the redis runs above", cmds1, reqs1, per_req1, per_cmd),
            (
                f"{n_sidecars} sidecars, the steady run",
                cmds4,
                steady4["requests"],
                per_req4,
                command_delta(calls0, calls1),
            ),
        ):
            shown = "-" if per is None else f"{per:.6f}"
            self.say(f"    {label:<34} {cmds:>6} commands / {reqs:>9,} requests = {shown}  {detail or ''}")
        self.say(f"    (during the file-store runs, the idle Redis-store sidecar made {idle} commands)")
        mid_cmds = command_delta(mid_calls0, mid_calls1)
        self.say(
            f"    for comparison, the import and the run where the pair fell due on all {n_sidecars}: "
            f"{mid_total1 - mid_total0} commands {mid_cmds}; since redis-server started: {total1} (INFO left out)"
        )
        ok = per_req1 is not None and per_req4 is not None and max(per_req1, per_req4) <= 0.001
        check(
            "Redis commands per proxied request",
            ok,
            f"1 sidecar {per_req1 if per_req1 is None else f'{per_req1:.6f}'}, {n_sidecars} sidecars "
            f"{per_req4 if per_req4 is None else f'{per_req4:.6f}'} (<= 0.001)",
        )
        out["commands"] = {
            "one_sidecar": {"commands": cmds1, "requests": reqs1, "per_request": per_req1, "by_command": per_cmd},
            "four_sidecars": {
                "commands": cmds4,
                "requests": steady4["requests"],
                "per_request": per_req4,
                "by_command": command_delta(calls0, calls1),
            },
            "idle_sidecar_during_file_runs": idle,
            "import_and_due_run": {"commands": mid_total1 - mid_total0, "by_command": mid_cmds},
        }
        out["checks"] = checks
        self.procs.stop(one)
        self.procs.stop(redis)
        self.results["redis"] = out

    # -- all --------------------------------------------------------------

    def run(self) -> None:
        minimal_loop = "uvloop" if _version_of("uvloop") != "not installed" else "asyncio (uvloop not importable)"
        baseline = (self.baseline, self.baseline_env) if self.baseline and self.baseline_env else None
        info = header_info(
            self.nginx, self.wrk_path, self.plan_desc, minimal_loop, self.usable_cpus, self.env, baseline, self.workdir
        )
        self.results["header"] = info
        self.results["settings"] = {
            "duration_s": self.duration,
            "runs": self.runs,
            "warmup_s": self.warmup,
            "baseline": str(self.baseline) if self.baseline else None,
            "compare_runs": self.compare_runs if self.baseline else None,
            "only_compare": self.only_compare,
            "only_redis": self.only_redis,
            "redis_runs": self.redis_runs if self.redis_path else None,
        }
        self.say("sidecar loopback benchmark")
        for key, label in (
            ("date", "date"),
            ("machine", "uname -m"),
            ("cpu_model", "CPU"),
            ("cores", "cores"),
            ("python", "Python"),
            ("aiohttp", "aiohttp"),
            ("uvloop", "uvloop"),
            ("nginx", "nginx"),
            ("wrk", "wrk"),
            ("sidecar", "sidecar"),
            ("baseline", "baseline sidecar"),
            ("pinning", "pinning"),
            ("minimal_proxy_loop", "minimal proxy loop"),
            ("busy_percent_before_start", "other load"),
        ):
            value = info[key]
            if value is None:
                continue
            if key == "cores":
                value = f"{value} (usable: {info['usable_cpus']})"
            if key == "busy_percent_before_start":
                busy = ", ".join(f"{cpu} {pct:.0f}% busy" for cpu, pct in value.items())
                value = f"{busy} over 1 s before start; loadavg {' '.join(info['loadavg'])}"
            self.say(f"  {label + ':':<20} {value}")
        if self.redis_path:
            self.say(f"  {'redis-server:':<20} {self.redis_path}")
        if not self.only_compare and not self.only_redis:
            self.say(
                f"  {'runs:':<20} {self.runs} x {self.duration} s per target and case, after a {self.warmup} s warm-up"
            )
        t0 = time.monotonic()
        self.setup()
        self.say(f"  {'sidecar startup:':<20} {self.sidecar_startup:.2f} s to /_sidecar/ready")
        if self.only_compare:
            self.run_compare()
            if self.args.redis:
                self.run_redis()
        elif self.only_redis:
            self.run_redis()
        else:
            self.run_cases()
            self.print_targets()
            if self.baseline:
                self.run_compare()
            self.run_burst()
            self.run_streaming()
            self.run_workers()
            if self.redis_path:
                self.run_redis()
            else:
                self.say()
                self.say("== Redis store: skipped (no redis-server on PATH; apt-get install redis-server) ==")
        total = time.monotonic() - t0
        self.results["total_seconds"] = total
        self.say()
        self.say(f"total benchmark time: {total:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Loopback benchmark: sidecar vs direct, nginx proxy and a minimal aiohttp proxy."
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs instead of 5 s")
    parser.add_argument(
        "--duration",
        type=int,
        default=None,
        metavar="S",
        help="seconds per wrk run (whole seconds; default 5, --quick 2)",
    )
    parser.add_argument("--runs", type=int, default=2, help="runs per target and case (at least 2; default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write every number as JSON to FILE")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another checkout of sidecar (e.g. a git worktree at an older commit): also run its sidecar beside "
        "this one and compare the steady-state cases",
    )
    parser.add_argument(
        "--compare-runs",
        type=int,
        default=None,
        metavar="N",
        help="runs per side and case of the --baseline comparison (at least 2; default 4) and of the "
        "file vs Redis store comparison (default 3)",
    )
    parser.add_argument(
        "--only-compare",
        action="store_true",
        help="with --baseline: only the comparison (no nginx/minimal reference, burst, streaming or workers)",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="run the Redis store case (4 sidecars on one login, Redis vs file store, commands per request) and "
        "fail if redis-server is missing; the full run includes it anyway when redis-server is on PATH",
    )
    parser.add_argument(
        "--only-redis",
        action="store_true",
        help="only the Redis store case (no references, targets, burst, streaming or workers)",
    )
    args = parser.parse_args()
    if args.only_compare and args.only_redis:
        parser.error("--only-compare and --only-redis exclude each other (use --only-compare --redis)")
    if args.only_compare and args.baseline is None:
        parser.error("--only-compare needs --baseline DIR")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "sidecar" / "__init__.py").is_file():
            parser.error(f"--baseline {args.baseline}: no sidecar/__init__.py there (not a checkout of sidecar)")
        if args.baseline == REPO.resolve():
            parser.error("--baseline is this checkout itself")
    args.redis_runs = max(2, args.compare_runs if args.compare_runs is not None else 3)
    args.compare_runs = max(2, args.compare_runs if args.compare_runs is not None else 4)
    if args.duration is None:
        args.duration = 2 if args.quick else 5
    if args.duration < 1:
        parser.error("--duration must be at least 1 (wrk takes whole seconds)")
    args.runs = max(2, args.runs)

    missing = [name for name in ("wrk", "nginx", "curl") if find_tool(name) is None]
    if missing:
        print(
            f"bench: error: {' and '.join(missing)} not found; install with: apt-get install wrk nginx curl",
            file=sys.stderr,
        )
        return 1
    nginx, wrk, curl = find_tool("nginx"), find_tool("wrk"), find_tool("curl")
    assert nginx and wrk and curl
    args.redis_server = find_tool("redis-server")
    if (args.redis or args.only_redis) and args.redis_server is None:
        print("bench: error: redis-server not found; install with: apt-get install redis-server", file=sys.stderr)
        return 1
    if args.only_compare and not args.redis:
        args.redis_server = None  # --only-compare runs the Redis case only when asked

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    plan = cpu_plan()
    usable_cpus = len(os.sched_getaffinity(0))
    client_cpus = plan[0]
    if client_cpus is not None:
        os.sched_setaffinity(0, {int(client_cpus)})  # this script's own work stays off the server CPU(s)

    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    bench = Bench(args, workdir, nginx, wrk, curl, plan, usable_cpus)
    rc = 0
    try:
        bench.run()
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        rc = 130
    finally:
        bench.procs.stop_all()
        if args.json:
            try:
                Path(args.json).write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
            except OSError as exc:
                print(f"bench: error: writing {args.json}: {exc}", file=sys.stderr)
                rc = rc or 1
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
