"""A local cloud that speaks SPEC §1, for tests, ``sidecar mock-cloud`` and ``sidecar demo``.

It is a real aiohttp server on loopback: login (browser redirect and headless
poll), refresh in both flavors with single-use rotating refresh tokens and
reuse detection (presenting a spent refresh token revokes its whole login
family, as the OAuth security BCP asks), ``whoami``, and a set of protected
endpoints that report exactly what they received (echo, upload) or produce
awkward responses on purpose (huge streams, SSE, gzip, redirects, WebSocket,
any status). It is also a standard OpenID Connect provider (``oidc``:
discovery, authorization code with PKCE, device authorization, revocation,
userinfo) for the oauth2 flavor's logins. Test hooks are plain methods and
attributes, and the refresh hooks are reachable over HTTP under ``/_mock/``
for subprocess users.

The package stands alone: stdlib, aiohttp, yarl and orjson only, so tests of
every other module can use it as their upstream without import cycles.
"""

from __future__ import annotations

from sidecar.mockcloud.cloud import DEFAULT_ACCESS_TTL, DEFAULT_REFRESH_TTL, MockCloud, run_mock_cloud

__all__ = ["DEFAULT_ACCESS_TTL", "DEFAULT_REFRESH_TTL", "MockCloud", "run_mock_cloud"]
