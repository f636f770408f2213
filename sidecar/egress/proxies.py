"""Which egress proxy (if any) a URL goes through: a pure decision from settings and environment."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyRoute:
    """The forward proxy for one target, and the ``Proxy-Authorization`` value it needs (never logged)."""

    url: str
    authorization: str | None = None

    def __repr__(self) -> str:
        return "ProxyRoute(url=<proxy>, authorization=" + ("***" if self.authorization else "None") + ")"


def choose_proxy(target: str, setting: str | None, env: Mapping[str, str]) -> ProxyRoute | None:
    """The proxy for ``target`` (an http(s) URL): ``setting`` wins over the environment."""
    return None
