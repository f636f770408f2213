"""``sidecar demo --flavor oauth2``: the whole standard-provider story with nothing else running."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import aiohttp
from conftest import child_env, finish, free_port, kill_running, read_lines_until, start_sidecar


async def test_oauth2_demo_logs_in_through_discovery_and_proxies(tmp_path: Path) -> None:
    """The oauth2 demo logs in at its mock provider (code + PKCE), proxies with that login, and stops with exit 0."""
    xdg, tmp = tmp_path / "xdg", tmp_path / "tmp"
    xdg.mkdir()
    tmp.mkdir()
    port = free_port()
    process = await start_sidecar(
        child_env(xdg, TMPDIR=str(tmp)),
        "demo",
        "--flavor",
        "oauth2",
        "--listen",
        f"127.0.0.1:{port}",
        stderr=subprocess.DEVNULL,
    )
    try:
        out = "".join(await read_lines_until(process.stdout, "Press Ctrl-C", 15.0, "the demo's stdout"))
        assert "authorization code flow with PKCE" in out
        issuer = re.search(r"provider\s*:\s*(\S+)", out)
        assert issuer is not None
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{port}/api/v1/auth/whoami") as response:
                assert response.status == 200
            async with client.get(issuer.group(1) + "/.well-known/openid-configuration") as response:
                assert (await response.json())["issuer"] == issuer.group(1)
        process.send_signal(signal.SIGINT)
        assert (await finish(process, timeout=10.0)).code == 0
    finally:
        await kill_running([process])
