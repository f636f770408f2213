"""The countdown switches that make the next refresh calls misbehave, and what they dictate.

The hang's sleep is handed in (``StopSignal.pause`` in the cloud), so the
decision itself does no I/O and touches no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.mockcloud.stopping import Pause


@dataclass(slots=True)
class Countdown:
    """A countdown test switch: the next ``remaining`` refresh calls misbehave."""

    remaining: int = 0
    status: int = 503
    seconds: float = 0.0

    def take(self) -> bool:
        """Consume one use; true when this call is affected."""
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


@dataclass(frozen=True, slots=True)
class Misbehaviour:
    """The error a flipped switch answers instead of a refresh.

    ``status`` None is a rejection: the caller answers its flavor's
    invalid_grant status and revokes the chain it was shown.
    """

    error: str
    status: int | None


REJECTED = Misbehaviour("invalid_grant", None)


@dataclass(slots=True)
class RefreshSwitches:
    """The hang, fail and reject countdowns, consulted in that order by every refresh call."""

    fail: Countdown = field(default_factory=Countdown)
    hang: Countdown = field(default_factory=Countdown)
    reject: Countdown = field(default_factory=Countdown)

    async def take(self, pause: Pause) -> Misbehaviour | None:
        """Consume the switches this call trips; the misbehaviour to answer, or None to proceed.

        A hang that stop() cuts short answers 503; one that runs out lets the
        call go on to the other switches.
        """
        if self.hang.take() and not await pause(self.hang.seconds):
            return Misbehaviour("server_error", 503)
        if self.fail.take():
            return Misbehaviour("server_error", self.fail.status)
        if self.reject.take():
            return REJECTED
        return None
