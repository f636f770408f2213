"""Which store a ``store`` setting names."""

from __future__ import annotations

from sidecar.store.file import FileStore
from sidecar.store.interface import TokenStore


def open_store(location: str) -> TokenStore:
    """The store at ``location`` (a file path)."""
    return FileStore(location)
