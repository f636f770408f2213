"""The 401 rule (SPEC §3, §4), written once for forwarded requests and WebSocket handshakes.

``after_401`` is the policy and does no I/O, in the shape of httpx's
``Auth.auth_flow``: a generator that yields what it needs next and is sent
what happened.

- ``Attempt(token)``: send the request with ``token``; send back the
  answer's status.
- ``Renew(rejected)``: the upstream answered 401 to ``rejected``; send back
  the token to use now (``TokenManager.token_rejected``), or throw in the
  NotLoggedIn or RefreshTransient that it raised.

Its return value, an ``Ending``, says what the client gets.  ``drive`` runs
the policy against one exchange's I/O and keeps the Outcome's ``retried``
and ``refreshed`` flags.
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
class Renew:
    """Get the token to use now that ``rejected`` drew a 401.

    ``replay`` says the rejected answer will be replaced by a replay, so it
    can be let go before the renewal; otherwise it is what the client gets.
    """

    rejected: str
    replay: bool


class Ending(enum.Enum):
    """How the exchange ends for the client."""

    ANSWER = "answer"  # the last answer, as it came
    NOT_REPLAYABLE = "not-replayable"  # the 401, marked X-Sidecar-Retry: not-replayable


Step = Attempt | Renew
Flow = Generator[Step, int | str, Ending]


def after_401(token: str, *, replayable: bool) -> Flow:
    """Send once; after a 401 renew the token, and replay once if the request can be sent again.

    A failed renewal ends a replayable exchange with that failure (raised
    out of the generator); a request that cannot be replayed gets the
    upstream's 401 whatever the renewal did, so the next request has a
    fresh token.
    """
    status = yield Attempt(token)
    if status != 401:
        return Ending.ANSWER
    if not replayable:
        try:
            yield Renew(token, replay=False)
        except RENEWAL_FAILURES:
            pass  # the client gets the upstream's 401 either way
        return Ending.NOT_REPLAYABLE
    fresh = yield Renew(token, replay=True)
    assert isinstance(fresh, str), "a Renew step is sent a token"
    yield Attempt(fresh, retry=True)
    return Ending.ANSWER


class Answer(Protocol):
    """What the policy needs of one attempt's answer."""

    @property
    def status(self) -> int: ...

    def release(self) -> None:
        """Let go of the answer: nobody will relay it."""


AnswerT = TypeVar("AnswerT", bound=Answer)


async def drive(
    flow: Flow,
    send: Callable[[str], Awaitable[AnswerT]],
    renew: Callable[[str], Awaitable[str]],
    outcome: Outcome,
) -> tuple[Ending, AnswerT]:
    """Run ``flow``: ``send(token)`` for each Attempt, ``renew(rejected)`` for each Renew.

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
                reply: int | str = answer.status
            else:
                assert answer is not None  # a Renew always follows an Attempt
                outcome.refreshed = True
                if step.replay:
                    held = False
                    answer.release()
                try:
                    reply = await renew(step.rejected)
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
