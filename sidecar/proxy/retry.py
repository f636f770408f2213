"""The 401 rule (SPEC §3, §4), written once for forwarded requests and WebSocket handshakes.

``after_401`` is the policy and does no I/O, in the shape of httpx's
``Auth.auth_flow``: a generator that yields what it needs next and is sent
what happened.

- ``Attempt(token)``: send the request with ``token``; send back the
  answer's status.
- ``Withhold(rejected)``: the upstream answered 401 to ``rejected``; send
  back whether that 401 goes to the client as it came, because 401s force no
  refresh for now (``TokenManager.rejections.withholds_retry``).
- ``Renew(rejected)``: send back the token to use now
  (``TokenManager.token_rejected``), or throw in the NotLoggedIn or
  RefreshTransient that it raised.
- ``RejectedAgain(token)``: the replay with ``token`` drew a 401 too; report
  it (``TokenManager.rejections.rejected_again``), send back None.

Withhold is a step of its own, asked before Renew and without I/O: a
renewal before a replay lets the 401 go first, and a withheld 401 must still
be there to pass on.

Its return value, an ``Ending``, says what the client gets.  ``drive`` runs
the policy against one exchange's I/O and a ``Renewer`` (the token manager)
and keeps the Outcome's ``retried`` and ``refreshed`` flags.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Awaitable, Callable, Generator
from typing import Protocol, TypeVar

from sidecar.errors import NotLoggedIn, RefreshTransient
from sidecar.proxy.outcome import Outcome

# What a renewal can fail with: no login any more, or a failing token endpoint.
RENEWAL_FAILURES = (NotLoggedIn, RefreshTransient)


# Steps are not frozen: a frozen dataclass's __init__ costs about three times
# as much, and every forwarded request makes one Attempt.
@dataclasses.dataclass(slots=True)
class Attempt:
    """Send the request with ``token``; ``retry`` marks the one replay after a 401."""

    token: str
    retry: bool = False


@dataclasses.dataclass(slots=True)
class Withhold:
    """Ask whether the 401 to ``rejected`` is passed on as it came, with no refresh and no retry."""

    rejected: str


@dataclasses.dataclass(slots=True)
class Renew:
    """Get the token to use now that ``rejected`` drew a 401.

    ``replay`` says the rejected answer will be replaced by a replay, so it
    can be let go before the renewal; otherwise it is what the client gets.
    """

    rejected: str
    replay: bool


@dataclasses.dataclass(slots=True)
class RejectedAgain:
    """Report that the replay with ``token``, the renewed one, drew a 401 as well."""

    token: str


class Ending(enum.Enum):
    """How the exchange ends for the client; ``retry_header`` is what the answer says about the retry."""

    ANSWER = "answer"  # the last answer, as it came
    NOT_REPLAYABLE = "not-replayable"  # the 401: its body could not be sent again
    NOT_RETRIED = "not-retried"  # the 401: refreshing does not cure these 401s for now (SPEC §3)

    @property
    def retry_header(self) -> str | None:
        """The ``X-Sidecar-Retry`` value the client's answer carries, or None."""
        return None if self is Ending.ANSWER else self.value


Step = Attempt | Withhold | Renew | RejectedAgain
# What a step is sent back: a status, a withhold verdict, a token, or None.
Reply = int | bool | str | None
Flow = Generator[Step, Reply, Ending]


def after_401(token: str, *, replayable: bool) -> Flow:
    """Send once; after a 401 renew the token, and replay once if the request can be sent again.

    A 401 that is withheld (401s force no refresh for now) goes to the
    client as it came, whatever the body.  A failed renewal ends a
    replayable exchange with that failure (raised out of the generator); a
    request that cannot be replayed gets the upstream's 401 whatever the
    renewal did, so the next request has a fresh token.  A replay that draws
    a 401 too is reported, so the manager can stop forcing refreshes.
    """
    status = yield Attempt(token)
    if status != 401:
        return Ending.ANSWER
    if (yield Withhold(token)):
        return Ending.NOT_RETRIED
    if not replayable:
        try:
            yield Renew(token, replay=False)
        except RENEWAL_FAILURES:
            pass  # the client gets the upstream's 401 either way
        return Ending.NOT_REPLAYABLE
    fresh = yield Renew(token, replay=True)
    assert isinstance(fresh, str), "a Renew step is sent a token"
    status = yield Attempt(fresh, retry=True)
    if status == 401:
        yield RejectedAgain(fresh)
    return Ending.ANSWER


class Answer(Protocol):
    """What the policy needs of one attempt's answer."""

    @property
    def status(self) -> int: ...

    def release(self) -> None:
        """Let go of the answer: nobody will relay it."""


AnswerT = TypeVar("AnswerT", bound=Answer)


class Rejections(Protocol):
    """The cooldown against refresh storms from 401s (``sidecar.refreshing.RejectionCooldown``)."""

    def withholds_retry(self, token: str) -> bool: ...

    def rejected_again(self, token: str) -> None: ...


class Renewer(Protocol):
    """What the policy asks of the token manager (``sidecar.manager.TokenManager``)."""

    @property
    def rejections(self) -> Rejections: ...

    async def token_rejected(self, token: str) -> str: ...


async def drive(
    flow: Flow,
    send: Callable[[str], Awaitable[AnswerT]],
    renewer: Renewer,
    outcome: Outcome,
) -> tuple[Ending, AnswerT]:
    """Run ``flow``: ``send(token)`` for each Attempt, ``renewer`` for the other steps.

    Returns the ending and the answer to give the client.  Errors from
    ``send`` propagate, as do renewal failures the policy does not absorb;
    an answer that will not be relayed is released on the way, once.
    """
    step = next(flow)
    answer: AnswerT | None = None
    held = False  # ``answer`` is not released yet
    try:
        while True:
            if isinstance(step, Attempt):
                if step.retry:
                    outcome.retried = True
                answer = await send(step.token)
                held = True
                reply: Reply = answer.status
            elif isinstance(step, Withhold):
                reply = renewer.rejections.withholds_retry(step.rejected)
            elif isinstance(step, RejectedAgain):
                renewer.rejections.rejected_again(step.token)
                reply = None
            else:
                assert answer is not None  # a Renew always follows an Attempt
                outcome.refreshed = True
                if step.replay:
                    held = False
                    answer.release()
                try:
                    reply = await renewer.token_rejected(step.rejected)
                except RENEWAL_FAILURES as exc:
                    step = flow.throw(exc)
                    continue
            step = flow.send(reply)
    except StopIteration as stop:
        assert answer is not None
        return stop.value, answer
    except BaseException:
        if held and answer is not None:
            answer.release()
        raise
