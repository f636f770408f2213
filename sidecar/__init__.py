"""sidecar: a local reverse proxy that holds a cloud login and injects a fresh bearer token."""

from __future__ import annotations

__version__ = "0.1.0"
