"""One etcd watch per event loop, key and options, shared by every pool following that key.

A service with many pools on one key (multi-tenant services open one per tenant) would
otherwise hold a connection and a watch stream on etcd for each. :func:`subscribe` joins the
:class:`SharedWatch` of the running loop for the key and options, starting it for the first
subscriber; the last one out stops it and closes its connections.

The watch is kept honest: a stream silent for ``keepalive`` seconds is checked with a read
through the same member, bounded by ``timeout``. A member alive for TCP but not answering (a
frozen process, a stalled disk) fails that read, and the watch moves to the next endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import weakref
from collections.abc import AsyncIterator

import anyio

from ...errors import StrategyError
from ..toolkit import Backoff, describe_error
from ._client import Batch, CompactedError, DeniedError, EtcdClient, Event, Read, UnavailableError
from ._options import EtcdOptions, ssl_context

__all__ = ["SharedWatch", "Subscriber", "retry_delay", "subscribe"]

logger = logging.getLogger("aiohotload.strategies.etcd")

# Reconnect delays after every endpoint failed once more: doubling, with jitter, so that many
# replicas watching one key do not reconnect in lockstep after an etcd outage.
_BACKOFF = Backoff(first=0.1, maximum=5.0)
# Bounds the wait for the watch to stop (and its connections to close) when the last
# subscriber leaves.
_STOP_TIMEOUT = 5.0


class Subscriber:
    """One strategy's view of a shared watch: the latest change it has not seen yet."""

    def __init__(self, watch: SharedWatch) -> None:
        self.watch = watch
        self.seen = 0  # the revision its value is as of
        self._latest: Event | None = None
        self._error: StrategyError | None = None
        self._woken = asyncio.Event()

    async def first_read(self) -> Read:
        """The key as of now (a read shared with concurrent joiners); raises
        UnavailableError naming each endpoint's failure, or DeniedError."""
        read = await self.watch.read()
        self.seen = max(self.seen, read.revision)
        return read

    async def next_event(self) -> Event:
        """The next change after what this subscriber has seen (intermediate ones are
        skipped if it was slow: only the latest value counts); StrategyError if the watch
        failed for good."""
        while True:
            await self._woken.wait()
            self._woken.clear()
            if self._error is not None:
                raise self._error
            event, self._latest = self._latest, None
            if event is not None and event.revision > self.seen:
                self.seen = event.revision
                return event

    def deliver(self, event: Event) -> None:
        if self._latest is None or event.revision > self._latest.revision:
            self._latest = event
            self._woken.set()

    def fail(self, error: StrategyError) -> None:
        self._error = error
        self._woken.set()


class SharedWatch:
    """The watch on one key with one set of options, for the subscribers on one loop.

    Only its task, :meth:`_run`, reads the stream, moves between endpoints and changes the
    position it watches from; subscribers join, leave and ask for reads.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, opts: EtcdOptions, key: str, client: EtcdClient
    ) -> None:
        self.key = key
        self._loop = loop
        self._opts = opts
        self._client = client
        self._subscribers: set[Subscriber] = set()
        self._reading: asyncio.Future[Read] | None = None
        self._next_rev = 0  # the stream has delivered every change before this revision
        self._heard_at = loop.time()  # when the stream last said anything
        self._failures = 0  # consecutive lost watches
        self._task: asyncio.Task[None] | None = None

    def join(self) -> Subscriber:
        sub = Subscriber(self)
        self._subscribers.add(sub)
        if self._task is None:
            # A fresh context: the task serves every subscriber, not the one that started it.
            self._task = contextvars.Context().run(
                self._loop.create_task, self._run(), name=f"aiohotload-etcd-{self.key}"
            )
        return sub

    async def leave(self, sub: Subscriber) -> None:
        """Let *sub* go; the last one out stops the watch and waits (a bounded time) for it."""
        self._subscribers.discard(sub)
        if self._subscribers:
            return
        self._retire()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with anyio.move_on_after(_STOP_TIMEOUT, shield=True):
                await asyncio.wait([task])

    async def read(self) -> Read:
        """Read the key, trying each endpoint once; concurrent callers share one read."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._client.read_any(self.key))
            # Retrieved here, so that a read every caller gave up on logs no warning.
            self._reading.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Shielded: one caller cancelled must not cancel the read the others wait for.
        return await asyncio.shield(self._reading)

    def _retire(self) -> None:
        """New subscribers no longer join this watch, but start another."""
        watches = _watches.get(self._loop)
        if watches is not None and watches.get((self._opts, self.key)) is self:
            del watches[(self._opts, self.key)]
            if not watches:
                del _watches[self._loop]

    def _broadcast(self, event: Event) -> None:
        for sub in self._subscribers:
            sub.deliver(event)

    # ------------------------------------------------------------------ the task

    async def _run(self) -> None:
        key = self.key
        try:
            resync = True  # where to watch from is not known yet: read the key first
            while True:
                try:
                    if resync:
                        # The first read is the one the first subscribers wait for too.
                        first = self._next_rev == 0
                        read = await (self.read() if first else self._client.read(key))
                        resync = False
                        self._next_rev = read.revision + 1
                        self._broadcast(Event.of(read))
                    await self._follow()
                except CompactedError as exc:
                    # The history since next_rev is gone: the key's value now is what counts.
                    logger.info(
                        "etcd compacted key %r's history up to revision %d while the watch "
                        "was behind; re-reading the key",
                        key,
                        exc.revision,
                    )
                    resync = True
                except UnavailableError as exc:
                    await self._lost(exc)
        except DeniedError as exc:
            self._fail(StrategyError(f"etcd key {key!r}: {exc.reason}"))
        except Exception as exc:  # a bug: the strategies restart and start a new watch
            logger.exception("the watch on etcd key %r failed", key)
            self._fail(
                StrategyError(f"the watch on etcd key {key!r} failed: {describe_error(exc)}")
            )
        finally:
            with anyio.CancelScope(shield=True):
                reading = self._reading
                if reading is not None and not reading.done():
                    if self._subscribers:  # they wait for it: let it end first
                        with anyio.move_on_after(_STOP_TIMEOUT):
                            await asyncio.wait([reading])
                    reading.cancel()
                await self._client.aclose()

    async def _follow(self) -> None:
        """Watch from ``_next_rev`` through the current endpoint until the stream fails;
        check a silent stream with a read every ``keepalive`` seconds."""
        batches = self._client.watch(self.key, self._next_rev)
        reader = asyncio.ensure_future(self._pump(batches))
        keepalive = self._opts.keepalive or None
        self._heard_at = self._loop.time()
        try:
            while not reader.done():
                silent = self._loop.time() - self._heard_at
                if keepalive is not None and silent >= keepalive:
                    await self._check(keepalive)
                    continue
                await asyncio.wait(
                    [reader], timeout=None if keepalive is None else keepalive - silent
                )
            reader.result()  # raises what ended the stream
        finally:
            reader.cancel()
            with anyio.move_on_after(_STOP_TIMEOUT, shield=True):
                await asyncio.wait([reader])
                await batches.aclose()
            if reader.done() and not reader.cancelled():
                reader.exception()  # retrieved: what counts is raised above

    async def _pump(self, batches: AsyncIterator[Batch]) -> None:
        async for batch in batches:
            self._heard_at = self._loop.time()
            if self._failures:
                logger.info(
                    "watching etcd key %r again through %s", self.key, self._client.endpoint
                )
                self._failures = 0
            # Resume point: a reconnect asks for what came after this batch.
            self._next_rev = max(self._next_rev, batch.revision + 1)
            if batch.events:
                self._broadcast(batch.events[-1])
        raise UnavailableError("the watch stream ended")

    async def _check(self, keepalive: float) -> None:
        """Read the key through the watch's member: a member that cannot answer within
        ``timeout`` cannot deliver changes either."""
        try:
            await self._client.read(self.key)
        except UnavailableError as exc:
            raise UnavailableError(
                f"{exc.reason} to a read after the watch was silent for {keepalive:g}s"
            ) from None
        self._heard_at = self._loop.time()

    async def _lost(self, exc: UnavailableError) -> None:
        self._failures += 1
        delay = retry_delay(self._failures, self._client.endpoints)
        # Once per outage at warning level: a down etcd must not flood the log.
        logger.log(
            logging.WARNING if self._failures == 1 else logging.DEBUG,
            "lost the watch on etcd key %r through %s: %s; retrying (attempt %d)",
            self.key,
            self._client.endpoint,
            exc.reason,
            self._failures,
        )
        self._client.next_endpoint()
        await anyio.sleep(delay)

    def _fail(self, error: StrategyError) -> None:
        """End the watch for good: every subscriber raises *error*, and later ones start anew."""
        self._retire()
        for sub in self._subscribers:
            sub.fail(error)


_watches: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[EtcdOptions, str], SharedWatch]
] = weakref.WeakKeyDictionary()


def retry_delay(failures: int, endpoints: int) -> float:
    """Seconds to wait after the *failures*-th lost watch in a row: none while another
    endpoint is still untried in this round, then doubling per round, with jitter."""
    rounds, untried = divmod(failures, endpoints)
    return 0.0 if untried else _BACKOFF.delay(rounds)


@contextlib.asynccontextmanager
async def subscribe(opts: EtcdOptions, key: str) -> AsyncIterator[Subscriber]:
    """Follow *key* through the loop's shared watch for *opts*, started if there is none.

    Raises :class:`~aiohotload.InvalidOptionError` if the TLS files cannot be loaded.
    """
    loop = asyncio.get_running_loop()
    watches = _watches.setdefault(loop, {})
    watch = watches.get((opts, key))
    if watch is None:
        client = EtcdClient(opts, ssl_context(opts))
        watch = watches[(opts, key)] = SharedWatch(loop, opts, key, client)
    sub = watch.join()
    try:
        yield sub
    finally:
        # Shielded: a cancelled pool must still let go, so the last one out closes the watch.
        with anyio.CancelScope(shield=True):
            await watch.leave(sub)
