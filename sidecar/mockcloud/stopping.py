"""Sleeps that the cloud's stop() cuts short, so hung and slow handlers never delay shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

# Sleeps ``seconds``; true when the sleep ran out, false when stop() cut it short.
Pause = Callable[[float], Awaitable[bool]]


class StopSignal:
    """Set by stop(); every pause in progress wakes up."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()

    def reset(self) -> None:
        """Arm a fresh signal for the next start."""
        # A fresh event per start: an Event is bound to the loop that first waits on it.
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Wake every pause in progress, and make new ones return at once."""
        self._stopping.set()

    async def pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stop() comes first; true when the sleep ran out."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=max(seconds, 0.0))
        except TimeoutError:
            return True
        return False
