"""``serve --workers N``: N processes accepting on one port (SO_REUSEPORT), sharing the store.

The parent forks the workers before any event loop exists, forwards SIGTERM
and SIGINT to them, restarts one that dies unexpectedly, and exits 0 once all
have stopped.  Each worker has its own token manager; the store lock and the
re-read under it keep refreshes to one call per expiry across all of them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from sidecar.errors import ConfigError, SidecarError
from sidecar.server.listen import ListenAddress

log = logging.getLogger("sidecar.workers")

# A worker exiting with this code hit bad configuration: not restarted.
EXIT_FATAL = 2
# A worker that dies sooner than this after starting is not restarted at once.
RESTART_DELAY = 1.0


def reserve_port(address: ListenAddress) -> tuple[ListenAddress, socket.socket | None]:
    """Bind the port once in the parent (a busy port is exit 2 before any fork); port 0 becomes one real port.

    The bound, never-listening socket holds the port until the workers have
    bound theirs with SO_REUSEPORT.
    """
    if address.unix_path is not None:
        raise ConfigError("workers: more than one worker needs a TCP listen address (HOST:PORT)")
    family = socket.AF_INET6 if address.host and ":" in address.host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((address.host, address.port or 0))
    except OSError as exc:
        holder.close()
        raise ConfigError(f"listen: cannot listen on {address.host}:{address.port}: {exc.strerror}") from None
    port = holder.getsockname()[1]
    return ListenAddress(host=address.host, port=port), holder


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this worker when the parent dies (even by SIGKILL).

    Elsewhere the parent's own signal handling is all there is.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def run_workers(count: int, worker: Callable[[], int]) -> int:
    """Fork ``count`` workers running ``worker()`` and supervise them until a signal."""
    stopping = False
    children: dict[int, float] = {}

    def spawn() -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            _die_with_parent(parent)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = 1
            try:
                code = worker()
            except KeyboardInterrupt:
                code = 0
            except SidecarError as exc:
                print(f"sidecar: {exc}", file=sys.stderr, flush=True)
                code = EXIT_FATAL
            finally:
                os._exit(code)
        children[pid] = time.monotonic()

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for _ in range(count):
        spawn()
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        started = children.pop(pid, None)
        if started is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, code if code > 0 else 0)
            continue
        if code == EXIT_FATAL:
            # Bad configuration: another worker would fail the same way.
            forward(signal.SIGTERM, None)
            worst = EXIT_FATAL
            continue
        log.error("worker %d exited with %d; starting another", pid, code)
        if time.monotonic() - started < RESTART_DELAY:
            time.sleep(RESTART_DELAY)
        if not stopping:
            spawn()
    return worst
