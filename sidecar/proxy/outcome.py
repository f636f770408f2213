"""What happened to one request: the record that the access log and the metrics read."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class Outcome:
    """What happened to one request, for the access log and metrics."""

    status: int = 0
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    retried: bool = False
    refreshed: bool = False
    error: str | None = None
