"""The 401 policy (sidecar/proxy/retry.py) on its own: no sockets, no HTTP.

The policy is a generator; ``play`` feeds it scripted replies (a status for
an Attempt, a verdict for a Withhold, a token or an exception for a Renew,
None for a RejectedAgain) and records the steps it yields.  The driver is
tested with fake answers that record their release and a fake renewer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from sidecar.errors import NotLoggedIn, RefreshTransient
from sidecar.proxy.outcome import Outcome
from sidecar.proxy.retry import Attempt, Ending, Flow, RejectedAgain, Renew, Reply, Step, Withhold, after_401, drive

OLD = "old-token"
NEW = "new-token"
FAILURES = [NotLoggedIn("not logged in"), RefreshTransient("token endpoint down", 2.0)]
FAILURE_IDS = ["not-logged-in", "refresh-transient"]


def play(flow: Flow, *replies: Reply | BaseException) -> tuple[list[Step], Ending]:
    """Run ``flow`` to its end with ``replies``, one per step; the steps it yielded and its ending.

    Fails if the flow asks for more steps than there are replies, or ends
    before using them all.
    """
    steps = [next(flow)]
    remaining = list(replies)
    while True:
        assert remaining, f"the policy asked for more than the script holds: {steps}"
        reply = remaining.pop(0)
        try:
            step = flow.throw(reply) if isinstance(reply, BaseException) else flow.send(reply)
        except StopIteration as stop:
            assert not remaining, f"the policy ended with replies left over: {remaining}"
            return steps, stop.value
        steps.append(step)


# -- the policy --------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 101, 204, 403, 407, 500, 511])
@pytest.mark.parametrize("replayable", [True, False], ids=["replayable", "not-replayable"])
def test_an_answer_other_than_401_is_final(status: int, replayable: bool) -> None:
    """Any status but 401 ends the exchange after one attempt with the given token, renewing nothing."""
    steps, ending = play(after_401(OLD, replayable=replayable), status)
    assert steps == [Attempt(OLD)]
    assert ending is Ending.ANSWER


def test_a_401_renews_the_rejected_token_then_replays_with_the_new_one() -> None:
    """A 401 not withheld asks to renew exactly the rejected token, then sends once more with the renewed one, marked as the retry."""
    steps, ending = play(after_401(OLD, replayable=True), 401, False, NEW, 200)
    assert steps == [Attempt(OLD), Withhold(OLD), Renew(OLD, replay=True), Attempt(NEW, retry=True)]
    assert ending is Ending.ANSWER


def test_a_second_401_is_reported_and_passed_on_without_another_renewal() -> None:
    """When the replay draws a 401 too, that is reported with the renewed token and the 401 is the answer: never a second renewal or a third attempt."""
    steps, ending = play(after_401(OLD, replayable=True), 401, False, NEW, 401, None)
    assert steps == [Attempt(OLD), Withhold(OLD), Renew(OLD, replay=True), Attempt(NEW, retry=True), RejectedAgain(NEW)]
    assert ending is Ending.ANSWER


def test_a_renewal_that_returns_the_same_token_still_replays_once() -> None:
    """The policy replays with whatever the renewal gives, once; the manager decides what token that is."""
    steps, _ = play(after_401(OLD, replayable=True), 401, False, OLD, 401, None)
    assert [step for step in steps if isinstance(step, Attempt)] == [Attempt(OLD), Attempt(OLD, retry=True)]


@pytest.mark.parametrize("replayable", [True, False], ids=["replayable", "not-replayable"])
def test_a_withheld_401_is_passed_on_without_renewing(replayable: bool) -> None:
    """A 401 the manager withholds (401s force no refresh for now) ends the exchange at once, marked not-retried, whatever the body."""
    steps, ending = play(after_401(OLD, replayable=replayable), 401, True)
    assert steps == [Attempt(OLD), Withhold(OLD)]
    assert ending is Ending.NOT_RETRIED


def test_only_a_401_is_offered_for_withholding() -> None:
    """An answer other than 401 asks the manager nothing: the common case costs no cooldown check."""
    steps, _ = play(after_401(OLD, replayable=True), 403)
    assert not any(isinstance(step, Withhold) for step in steps)


@pytest.mark.parametrize(
    ("ending", "header"),
    [(Ending.ANSWER, None), (Ending.NOT_REPLAYABLE, "not-replayable"), (Ending.NOT_RETRIED, "not-retried")],
)
def test_each_ending_names_its_x_sidecar_retry_header(ending: Ending, header: str | None) -> None:
    """An answer as it came carries no X-Sidecar-Retry; a 401 passed on says why it was not retried (SPEC §3, §4)."""
    assert ending.retry_header == header


def test_the_first_attempt_is_not_marked_as_a_retry() -> None:
    """Only the replay carries retry=True: the access log's ``retried`` must stay false for a request sent once."""
    flow = after_401(OLD, replayable=True)
    first = next(flow)
    assert isinstance(first, Attempt) and first.retry is False


def test_a_401_on_a_request_that_cannot_be_replayed_renews_and_passes_it_on() -> None:
    """Without a replayable body, a 401 still renews the token (for the next request) and then goes to the client marked not-replayable."""
    steps, ending = play(after_401(OLD, replayable=False), 401, False, NEW)
    assert steps == [Attempt(OLD), Withhold(OLD), Renew(OLD, replay=False)]
    assert ending is Ending.NOT_REPLAYABLE


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
def test_a_failed_renewal_does_not_replace_a_not_replayable_401(failure: Exception) -> None:
    """When the request cannot be replayed, a renewal failure is absorbed: the client gets the upstream's 401, not a problem."""
    steps, ending = play(after_401(OLD, replayable=False), 401, False, failure)
    assert steps == [Attempt(OLD), Withhold(OLD), Renew(OLD, replay=False)]
    assert ending is Ending.NOT_REPLAYABLE


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
def test_a_failed_renewal_ends_a_replayable_exchange_with_that_failure(failure: Exception) -> None:
    """When the request could be replayed, a renewal failure leaves the policy as that same error, so it becomes the 511 or 503."""
    flow = after_401(OLD, replayable=True)
    next(flow)
    assert flow.send(401) == Withhold(OLD)
    assert flow.send(False) == Renew(OLD, replay=True)
    with pytest.raises(type(failure)) as raised:
        flow.throw(failure)
    assert raised.value is failure


@pytest.mark.parametrize("replayable", [True, False], ids=["replayable", "not-replayable"])
def test_errors_other_than_renewal_failures_are_not_absorbed(replayable: bool) -> None:
    """Only NotLoggedIn and RefreshTransient are renewal outcomes; any other error during a renewal propagates."""
    flow = after_401(OLD, replayable=replayable)
    next(flow)
    flow.send(401)
    flow.send(False)
    with pytest.raises(LookupError):
        flow.throw(LookupError("a bug"))


# -- the driver --------------------------------------------------------------------


@dataclass
class FakeAnswer:
    """An answer with a status that records how often it was released."""

    status: int
    log: list[str] = field(default_factory=list)

    def release(self) -> None:
        self.log.append(f"release {self.status}")


@dataclass
class FakeExchange:
    """Scripted I/O and renewer for ``drive``: answers to hand out in turn, a withhold verdict, a renewal result, one shared event log."""

    statuses: list[int]
    renewed: str | BaseException = NEW
    withheld: bool = False
    log: list[str] = field(default_factory=list)

    async def send(self, token: str) -> FakeAnswer:
        self.log.append(f"send {token}")
        return FakeAnswer(self.statuses.pop(0), self.log)

    @property
    def rejections(self) -> FakeExchange:
        return self

    def withholds_retry(self, token: str) -> bool:
        return self.withheld

    async def token_rejected(self, token: str) -> str:
        self.log.append(f"renew {token}")
        if isinstance(self.renewed, BaseException):
            raise self.renewed
        return self.renewed

    def rejected_again(self, token: str) -> None:
        self.log.append(f"rejected again {token}")


async def test_drive_sends_once_and_flags_nothing_for_a_200() -> None:
    """A 200 is sent once and returned unreleased, with neither retried nor refreshed set."""
    exchange, outcome = FakeExchange([200]), Outcome()
    ending, answer = await drive(after_401(OLD, replayable=True), exchange.send, exchange, outcome)
    assert (ending, answer.status) == (Ending.ANSWER, 200)
    assert exchange.log == [f"send {OLD}"]
    assert (outcome.retried, outcome.refreshed) == (False, False)


async def test_drive_releases_the_401_before_renewing_and_returns_the_replay() -> None:
    """When replaying, the rejected answer is released before the renewal and the replay's answer is returned unreleased."""
    exchange, outcome = FakeExchange([401, 200]), Outcome()
    ending, answer = await drive(after_401(OLD, replayable=True), exchange.send, exchange, outcome)
    assert (ending, answer.status) == (Ending.ANSWER, 200)
    assert exchange.log == [f"send {OLD}", "release 401", f"renew {OLD}", f"send {NEW}"]
    assert (outcome.retried, outcome.refreshed) == (True, True)


async def test_drive_keeps_a_not_replayable_401_for_the_client() -> None:
    """Without a replay, the 401 is held through the renewal and returned unreleased, with refreshed set and retried not."""
    exchange, outcome = FakeExchange([401]), Outcome()
    ending, answer = await drive(after_401(OLD, replayable=False), exchange.send, exchange, outcome)
    assert (ending, answer.status) == (Ending.NOT_REPLAYABLE, 401)
    assert exchange.log == [f"send {OLD}", f"renew {OLD}"]
    assert (outcome.retried, outcome.refreshed) == (False, True)


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
async def test_drive_raises_a_renewal_failure_of_a_replayable_exchange(failure: Exception) -> None:
    """A failed renewal before a replay propagates out of drive, the rejected answer released and nothing sent again."""
    exchange = FakeExchange([401], renewed=failure)
    with pytest.raises(type(failure)):
        await drive(after_401(OLD, replayable=True), exchange.send, exchange, Outcome())
    assert exchange.log == [f"send {OLD}", "release 401", f"renew {OLD}"]


async def test_drive_releases_a_held_401_when_the_renewal_is_cancelled() -> None:
    """A not-replayable 401 held through the renewal is released when the renewal is cancelled (the client hung up)."""
    exchange = FakeExchange([401], renewed=asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await drive(after_401(OLD, replayable=False), exchange.send, exchange, Outcome())
    assert exchange.log == [f"send {OLD}", f"renew {OLD}", "release 401"]


async def test_drive_passes_a_withheld_401_on_without_renewing_or_flags() -> None:
    """A withheld 401 is returned unreleased after one send, with no renewal and neither retried nor refreshed set."""
    exchange, outcome = FakeExchange([401], withheld=True), Outcome()
    ending, answer = await drive(after_401(OLD, replayable=True), exchange.send, exchange, outcome)
    assert (ending, answer.status) == (Ending.NOT_RETRIED, 401)
    assert exchange.log == [f"send {OLD}"]
    assert (outcome.retried, outcome.refreshed) == (False, False)


async def test_drive_reports_a_replay_that_draws_a_401_too() -> None:
    """A replay rejected again is reported to the renewer with the renewed token, and its 401 is returned unreleased."""
    exchange = FakeExchange([401, 401])
    ending, answer = await drive(after_401(OLD, replayable=True), exchange.send, exchange, Outcome())
    assert (ending, answer.status) == (Ending.ANSWER, 401)
    assert exchange.log == [f"send {OLD}", "release 401", f"renew {OLD}", f"send {NEW}", f"rejected again {NEW}"]
