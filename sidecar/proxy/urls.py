"""The configured upstream URL, split once, and the one rewrite that depends on it (redirects)."""

from __future__ import annotations

import dataclasses

from yarl import URL

from sidecar.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class Upstream:
    """The configured upstream URL, split once: origin, path prefix, pool key."""

    url: str
    base: str
    origin: str
    scheme: str
    host: str
    port: int
    prefix: str
    prefix_bytes: bytes

    @classmethod
    def parse(cls, url: str) -> Upstream:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"upstream: expected an http:// or https:// URL, got {url!r}")
        base = url.rstrip("/")
        origin = str(parsed.origin())
        prefix = base[len(origin) :] if base.startswith(origin) else parsed.raw_path.rstrip("/")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return cls(url, base, origin, parsed.scheme, parsed.host, port, prefix, prefix.encode())

    def local_location(self, location: str, sidecar_host: str) -> str:
        """``location`` pointed at the sidecar (``http://sidecar_host``) if it points inside the upstream, else as is."""
        base, prefix = self.base, self.prefix
        if location.startswith(base + "/") or location == base:
            rest = location[len(base) :] or "/"
        elif (
            location.startswith("/")
            and not location.startswith("//")
            and prefix
            and (location.startswith(prefix + "/") or location == prefix)
        ):
            rest = location[len(prefix) :] or "/"
        else:
            return location
        return f"http://{sidecar_host}{rest}"
