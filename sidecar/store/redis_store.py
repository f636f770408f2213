"""A token store in Redis (SPEC §7): one login shared by sidecars on many hosts.

Records, all in one hash slot: ``sidecar:{NAME}:pair`` (a hash of the
document's fields plus ``generation``), ``sidecar:{NAME}:lock`` (``HOLDER
DEADLINE_MS`` with a TTL) and the channel ``sidecar:{NAME}:events`` (the new
generation, ``cleared`` or ``unlocked``; never a token).

Safety rests on the compare-and-set on ``generation`` (redis_scripts.py), not
on the lock: a holder that stalls past its TTL loses the lock, and its late
write is refused.  The lock is renewed every TTL/3 while held; waiters wake
on ``unlocked`` or at the holder's published deadline, whichever is first.
``changed_since`` answers from what the events subscription heard (no round
trip on the request path), and from a poll beside the caller while the
subscription is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson

from sidecar.errors import ConfigError, StoreConflict, StoreError, StoreLockTimeout
from sidecar.store import redis_scripts
from sidecar.store.document import KNOWN_FIELDS, parse_store, serialize_store
from sidecar.store.interface import StoreSnapshot, Version
from sidecar.store.redis_url import REPLICA_WAIT_MS, RedisLocation
from sidecar.tokens import TokenPair

log = logging.getLogger("sidecar.store")

T = TypeVar("T")
# Fields of the pair's hash that are not the §2 document: the CAS counter and the client key (SPEC §9).
CLIENT_KEY_FIELD = "clientKey"
_NOT_PAIR_FIELDS = frozenset({"generation", CLIENT_KEY_FIELD})


def _redis_module() -> Any:
    try:
        import redis.asyncio
        import redis.exceptions
    except ImportError:
        raise ConfigError("the Redis store needs redis-py: pip install 'sidecar[redis]'") from None
    return redis


def _reason(exc: BaseException) -> str:
    """What went wrong, without the server's text (which can quote a command)."""
    name = type(exc).__name__
    if name == "AuthenticationError" or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return "Redis refused the credentials"
    if "Timeout" in name:
        return "Redis did not answer in time"
    if "Connection" in name or isinstance(exc, OSError):
        return "cannot connect to Redis"
    return f"Redis failed ({name})"


def _fields(pair: TokenPair) -> list[str]:
    """The pair as hash field/value strings: known fields as text, unknown ones as JSON."""
    document: dict[str, Any] = orjson.loads(serialize_store(pair))
    flat: list[str] = []
    for key, value in document.items():
        flat += [key, value if key in KNOWN_FIELDS else orjson.dumps(value).decode()]
    return flat


def _pair(record: dict[str, str]) -> TokenPair:
    document: dict[str, Any] = {}
    for key, value in record.items():
        if key in _NOT_PAIR_FIELDS:
            continue
        document[key] = value if key in KNOWN_FIELDS else orjson.loads(value)
    return parse_store(orjson.dumps(document))


class _RedisWrite:
    def __init__(self, store: RedisStore, expected: Version | None) -> None:
        self._store = store
        self._expected = expected
        self._done = False

    async def commit(self, pair: TokenPair) -> Version:
        if self._done:
            raise StoreError("token store write already finished")
        self._done = True
        return await self._store.compare_and_set(pair, self._expected)

    async def abort(self) -> None:
        self._done = True


class RedisStore:
    """One login's pair in Redis, shared by every sidecar that names it."""

    def __init__(self, location: RedisLocation, *, lock_ttl: float | None = None) -> None:
        self._location = location
        self._redis = _redis_module()
        self._lock_ttl_ms = max(int((location.lock_ttl if lock_ttl is None else lock_ttl) * 1000), 1)
        braces = "{" + location.name + "}"
        self.pair_key = f"sidecar:{braces}:pair"
        self.lock_key = f"sidecar:{braces}:lock"
        self.events = f"sidecar:{braces}:events"
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self._heard: Version | None = None  # the generation the events (or the poll) last announced
        self._poll: asyncio.Task[None] | None = None
        self._poll_problem: str | None = None
        self._known = False  # whether _heard has been learnt from Redis at all
        self._pulse = asyncio.Event()
        self._closing = False
        # The holder id of the lock the current task holds: begin_write checks it is still ours.
        self._holder: contextvars.ContextVar[str] = contextvars.ContextVar(f"redis-lock-{id(self)}", default="")

    @property
    def description(self) -> str:
        return self._location.shown

    @property
    def following_events(self) -> bool:
        """The events subscription is up: ``changed_since`` needs no round trip."""
        return self._listening

    # -- Redis calls --------------------------------------------------------

    def _connection(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # A CLI command runs each step in its own asyncio.run: one client per loop.
            self._client = self._redis.asyncio.Redis.from_url(
                self._location.url, decode_responses=True, socket_connect_timeout=3.0, socket_timeout=5.0
            )
            self._client_loop = loop
            self._listener = self._poll = None
            self._listening = self._known = False
            self._pulse = asyncio.Event()
        return self._client

    async def _call(self, step: Callable[[Any], Awaitable[T]]) -> T:
        try:
            return await step(self._connection())
        except (self._redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"token store {self.description}: {_reason(exc)}") from None

    # -- the store interface ---------------------------------------------

    async def read(self) -> StoreSnapshot:
        record: dict[str, str] = await self._call(lambda r: r.hgetall(self.pair_key))
        if "generation" not in record:  # nothing, or only the client key
            return StoreSnapshot(None, None, None)
        version = record.get("generation")
        try:
            return StoreSnapshot(_pair(record), None, version)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return StoreSnapshot(None, f"token store {self.description} is unusable: {exc}", version)

    async def changed_since(self, version: Version | None) -> bool:
        """From what the events said; while they are down, from a poll that runs beside the caller.

        Either way the caller never waits for Redis: a request that triggers
        the once-a-second look must not stall on an unreachable server.
        """
        self._listen()
        if not self._listening:
            if self._poll is None or self._poll.done():
                self._poll = asyncio.get_running_loop().create_task(self._poll_generation())
            if not self._known:
                await asyncio.shield(self._poll)  # nothing heard yet: once, this look does wait
            if self._poll_problem is not None:
                raise StoreError(self._poll_problem)
        return self._heard != version

    async def _poll_generation(self) -> None:
        try:
            self._heard = await self._call(lambda r: r.hget(self.pair_key, "generation"))
        except StoreError as exc:
            self._poll_problem = str(exc)
        else:
            self._poll_problem = None
            self._known = True

    async def begin_write(self, expected: Version | None) -> _RedisWrite:
        """Checked just before a refresh token is spent: Redis answers, the lock is still ours, nobody wrote since."""
        keys_and_args = [self.lock_key, self.pair_key, self._holder.get(), "" if expected is None else str(expected)]
        fenced = int(await self._call(lambda r: r.eval(redis_scripts.FENCE, 2, *keys_and_args)))
        if fenced == 0:
            raise StoreConflict(
                f"the refresh lock of {self.description} was taken over (this sidecar stalled past its TTL)"
            )
        if fenced == -1:
            raise StoreConflict(f"token store {self.description} changed since it was read")
        return _RedisWrite(self, expected)

    async def compare_and_set(self, pair: TokenPair, expected: Version | None) -> Version:
        start = str(int(time.time() * 1000))
        keys_and_args = [self.pair_key, self.events, "" if expected is None else str(expected), start, *_fields(pair)]
        wanted = self._location.replicas
        if wanted:
            result, acked = await self._call(lambda r: self._write_and_wait(r, keys_and_args, wanted))
        else:
            result = await self._call(lambda r: r.eval(redis_scripts.COMPARE_AND_SET, 2, *keys_and_args))
        if str(result) == "-1":
            raise StoreConflict(f"token store {self.description} changed since it was read")
        self._heard = str(result)
        if wanted and int(acked) < wanted:
            log.warning(
                "token store %s: %d of %d replicas had the new pair within %d ms; a failover now could lose it",
                self.description,
                int(acked),
                wanted,
                REPLICA_WAIT_MS,
            )
        return str(result)

    @staticmethod
    async def _write_and_wait(client: Any, keys_and_args: list[str], wanted: int) -> tuple[Any, Any]:
        """The CAS, then WAIT on the same connection (WAIT counts the replicas that have that client's writes)."""
        async with client.pipeline(transaction=False) as pipe:
            pipe.eval(redis_scripts.COMPARE_AND_SET, 2, *keys_and_args)
            pipe.execute_command("WAIT", wanted, REPLICA_WAIT_MS)
            result, acked = await pipe.execute()
        return result, acked

    async def clear(self) -> bool:
        had = await self._call(lambda r: r.eval(redis_scripts.CLEAR, 2, self.pair_key, self.events))
        self._heard = None
        return bool(had)

    async def client_key(self, new: str) -> str:
        """The client key kept in the login's record (SPEC §9); ``new`` becomes it if there is none."""
        key: str = await self._call(lambda r: r.eval(redis_scripts.ENSURE_CLIENT_KEY, 1, self.pair_key, new))
        return key

    async def current_client_key(self) -> str | None:
        key: str | None = await self._call(lambda r: r.hget(self.pair_key, CLIENT_KEY_FIELD))
        return key

    async def replace_client_key(self, new: str) -> None:
        await self._call(lambda r: r.hset(self.pair_key, CLIENT_KEY_FIELD, new))

    @contextlib.asynccontextmanager
    async def refresh_lock(self, timeout: float) -> AsyncIterator[None]:
        holder = secrets.token_hex(16)
        await self._acquire(holder, timeout)
        watchdog = asyncio.get_running_loop().create_task(self._renew_while_held(holder))
        held = self._holder.set(holder)
        try:
            yield
        finally:
            self._holder.reset(held)
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            try:
                await self._call(lambda r: r.eval(redis_scripts.RELEASE, 2, self.lock_key, self.events, holder))
            except StoreError as exc:
                log.warning("%s (the lock expires by itself)", exc)

    def _stopping(self) -> bool:
        # redis-py's pubsub read can swallow a cancellation (asyncio.run's at
        # exit, aclose's): the task's own cancel count still says stop.
        task = asyncio.current_task()
        return self._closing or (task is not None and task.cancelling() > 0)

    async def aclose(self) -> None:
        self._closing = True
        if self._poll is not None:
            self._poll.cancel()
        if self._listener is not None:
            self._listener.cancel()
            # redis-py's pubsub can swallow one cancellation in its read: do not wait forever.
            await asyncio.wait([self._listener], timeout=1.0)
        if self._client is not None and self._client_loop is asyncio.get_running_loop():
            with contextlib.suppress(Exception):
                await self._client.aclose()
        self._client = None

    # -- the lock ----------------------------------------------------------

    def _lock_value(self, holder: str) -> str:
        return f"{holder} {int(time.time() * 1000) + self._lock_ttl_ms}"

    async def _acquire(self, holder: str, timeout: float) -> None:
        give_up = time.monotonic() + timeout
        self._listen()
        while True:
            pulse = self._pulse
            taken = await self._call(
                lambda r: r.eval(
                    redis_scripts.ACQUIRE, 1, self.lock_key, self._lock_value(holder), str(self._lock_ttl_ms)
                )
            )
            if int(taken) == 1:
                return
            left = give_up - time.monotonic()
            if left <= 0:
                raise StoreLockTimeout(f"the refresh lock of {self.description} was held for more than {timeout:g} s")
            value = await self._call(lambda r: r.get(self.lock_key))
            # Follow the holder's published deadline; an 'unlocked' event wakes us sooner.
            until_deadline = _deadline_of(value) - time.time() if value else 0.0
            wait = min(left, max(until_deadline, 0.005), 1.0 if not self._listening else left)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pulse.wait(), wait)

    async def _renew_while_held(self, holder: str) -> None:
        interval = self._lock_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                kept = await self._call(
                    lambda r: r.eval(
                        redis_scripts.RENEW, 1, self.lock_key, holder, self._lock_value(holder), str(self._lock_ttl_ms)
                    )
                )
            except StoreError as exc:
                log.warning("cannot renew the refresh lock: %s", exc)
                continue
            if not int(kept):
                log.warning("the refresh lock of %s was lost; the generation check guards the write", self.description)
                return

    # -- the events subscription ----------------------------------------

    def _listen(self) -> None:
        client = self._connection()
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._follow_events(client))

    async def _follow_events(self, client: Any) -> None:
        backoff = 0.1
        while not self._stopping():
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.events)
                # What was written before the subscription took hold.
                self._heard = await client.hget(self.pair_key, "generation")
                self._listening = self._known = True
                self._poll_problem = None
                backoff = 0.1
                while not self._stopping():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    data = message.get("data")
                    if data == "cleared":
                        self._heard = None
                    elif isinstance(data, str) and data.isdigit():
                        self._heard = data
                    pulse, self._pulse = self._pulse, asyncio.Event()
                    pulse.set()
            except (self._redis.exceptions.RedisError, OSError) as exc:
                if self._stopping():
                    return
                if self._listening:
                    log.warning(
                        "token store %s: events subscription lost (%s); polling", self.description, _reason(exc)
                    )
                    # Said at once (ready, status), not after the next poll fails.
                    self._poll_problem = f"token store {self.description}: {_reason(exc)}"
                self._listening = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


def _deadline_of(value: str) -> float:
    """The holder's deadline in seconds since the epoch, from ``HOLDER DEADLINE_MS``."""
    try:
        return int(value.split()[1]) / 1000
    except (IndexError, ValueError):
        return 0.0
