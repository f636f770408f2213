"""The one seam where sidecar's OIDC code talks HTTP to the provider.

Every call goes through a ProviderSession (an aiohttp session from
``egress.outbound.client_session`` and the egress proxy choice, so corporate
CAs and proxies apply), reads at most 1 MiB, has a total deadline, never
follows a redirect, and turns aiohttp's exceptions into ProviderError.  What
comes back is an Answer: the status and the JSON object of the body (empty
when the body is not one), never free text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp

from sidecar import __version__
from sidecar.auth.answers import AnswerTooLarge, error_code, json_object, read_capped
from sidecar.egress.outbound import Proxies
from sidecar.egress.tls import describe_tls_failure
from sidecar.errors import SidecarError

# One call to the provider (discovery, a token, a device code, revocation,
# userinfo) gets this long in all, like a refresh.
CALL_TIMEOUT = 30.0
_HEADERS = {"Accept": "application/json", "User-Agent": f"sidecar/{__version__}"}
_FORM = "application/x-www-form-urlencoded"


class ProviderError(SidecarError):
    """The provider could not be reached, or answered something sidecar cannot use."""


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """A provider's answer: its status and the JSON object it carried (empty when it carried none)."""

    status: int
    document: Mapping[str, Any]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> str | None:
        """The RFC 6749 §5.2 ``error`` code, if it is fit to print."""
        return error_code(self.document.get("error"))

    def describe(self) -> str:
        """``HTTP 400 (invalid_grant)``: the status and the error code, for one line of output."""
        return f"HTTP {self.status}" + (f" ({self.error})" if self.error else "")


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderSession:
    """How sidecar reaches a provider: the session (TLS, timeouts) and the egress proxy choice (None: direct)."""

    client: aiohttp.ClientSession
    proxies: Proxies | None = None


async def post_form(
    session: ProviderSession,
    url: str,
    form: Mapping[str, str],
    *,
    what: str,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """POST ``form`` (urlencoded) to ``url``; ``what`` names the endpoint in errors."""
    body = urlencode(dict(form)).encode("ascii")
    return await _call(
        session, "POST", url, what=what, data=body, headers={**_HEADERS, "Content-Type": _FORM, **(headers or {})}
    )


async def get_json(
    session: ProviderSession, url: str, *, what: str, headers: Mapping[str, str] | None = None
) -> Answer:
    """GET ``url`` asking for JSON; ``what`` names the endpoint in errors."""
    return await _call(session, "GET", url, what=what, headers={**_HEADERS, **(headers or {})})


async def _call(
    session: ProviderSession,
    method: str,
    url: str,
    *,
    what: str,
    headers: Mapping[str, str],
    data: bytes | None = None,
) -> Answer:
    """One exchange; a pooled connection that turns out closed is retried once on a fresh one.

    A server or proxy may close an idle keep-alive connection at any time
    (RFC 9112 §9.3.1); tinyproxy does it right after an answer.  Every call
    made here may be repeated: discovery, userinfo, revocation and device
    polls are idempotent, and an authorization code sent twice is refused
    (the login fails) rather than spent twice.
    """
    options: Any = session.proxies.options(url, headers) if session.proxies is not None else {"headers": headers}
    for attempt in (1, 2):
        try:
            return await _exchange(session.client, method, url, data, options)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if attempt == 2 or isinstance(exc, aiohttp.ClientConnectorError):
                raise ProviderError(f"the {what} could not be reached ({_reason(exc, what)})") from None
        except AnswerTooLarge:
            raise ProviderError(f"the {what} answered with a body over 1 MiB") from None
        except TimeoutError:
            raise ProviderError(f"the {what} timed out") from None
        except aiohttp.InvalidURL:
            raise ProviderError(f"the {what}'s URL is not valid") from None
        except aiohttp.ClientError as exc:
            raise ProviderError(f"the {what} could not be reached ({_reason(exc, what)})") from None
        except OSError as exc:
            reason = describe_tls_failure(exc, f"the {what}") or exc.strerror or type(exc).__name__
            raise ProviderError(f"the {what} could not be reached ({reason})") from None
    raise AssertionError("unreachable")


def _reason(exc: BaseException, what: str) -> str:
    """A TLS failure named (unknown CA, expired...), else the exception's class name."""
    return describe_tls_failure(exc, f"the {what}") or type(exc).__name__


async def _exchange(client: aiohttp.ClientSession, method: str, url: str, data: bytes | None, options: Any) -> Answer:
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    async with client.request(method, url, data=data, timeout=timeout, allow_redirects=False, **options) as response:
        return Answer(response.status, json_object(await read_capped(response)))
