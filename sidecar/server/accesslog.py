"""One access-log line per request on stderr: JSON, or plain text on a terminal.

Only the fields of SPEC §4 are written: never a query string, a header, a
cookie or a token.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import TextIO

import orjson


class AccessLog:
    """Writes request lines; ``enabled`` False skips all formatting work."""

    def __init__(self, stream: TextIO | None = None, fmt: str = "auto", enabled: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr
        if fmt == "auto":
            isatty = getattr(self._stream, "isatty", None)
            fmt = "text" if isatty is not None and isatty() else "json"
        self.json = fmt == "json"
        self.enabled = enabled

    def write(
        self,
        method: str,
        path: str,
        status: int,
        upstream_status: int | None,
        duration_ms: float,
        retried: bool,
        refreshed: bool,
    ) -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.json:
            line = orjson.dumps(
                {
                    "ts": datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "method": method,
                    "path": path,
                    "status": status,
                    "upstream_status": upstream_status,
                    "duration_ms": round(duration_ms, 3),
                    "retried": retried,
                    "refreshed": refreshed,
                }
            ).decode()
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(now))
            flags = (" retried" if retried else "") + (" refreshed" if refreshed else "")
            upstream = (
                f" (upstream {upstream_status})" if upstream_status is not None and upstream_status != status else ""
            )
            line = f"{stamp} {method} {path} -> {status}{upstream} {duration_ms:.1f} ms{flags}"
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not break the proxy
