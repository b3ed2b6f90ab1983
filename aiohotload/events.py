"""Reload events: what a :class:`~aiohotload.HotPool` reports to its listeners.

Every field is safe to log or export: targets are redacted DSNs and errors are redacted
messages. Subscribe with :meth:`HotPool.add_listener` or ``async for event in pool.events()``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from anyio.abc import TaskGroup

__all__ = [
    "ConnectionExpired",
    "Event",
    "EventHub",
    "EventStream",
    "FailoverDetected",
    "ForceKillDone",
    "PoolDrained",
    "RefreshRequested",
    "ReloadFailed",
    "ReloadStarted",
    "SwapDone",
]

logger = logging.getLogger("aiohotload")


@dataclass(frozen=True)
class _Base:
    pool: str
    """The pool's name (``create_pool(..., name=...)``, by default the URL's path)."""
    at: float = field(default_factory=time.time, kw_only=True)
    """When it happened (seconds since the epoch)."""


@dataclass(frozen=True)
class ReloadStarted(_Base):
    """A new DSN arrived (or is retried) and a pool is being opened on it."""

    target: str
    attempt: int
    generation: int
    """The generation still serving."""


@dataclass(frozen=True)
class SwapDone(_Base):
    """New work now goes to the new generation."""

    old_generation: int
    new_generation: int
    old_target: str
    new_target: str
    open_seconds: float
    """How long the new pool took to open."""
    reason: str = "changed"
    """Why it swapped: ``"changed"`` (a new DSN), ``"refresh"`` (a new DSN the strategy found
    when asked to look again after a refused login), ``"failover"`` (the server stopped
    taking writes: the same DSN opened again on the one that does)."""


@dataclass(frozen=True)
class ReloadFailed(_Base):
    """A pool could not be opened on the new DSN; the current one keeps serving."""

    target: str
    error: str
    attempt: int
    retry_in: float
    """Seconds until the next attempt (a newer DSN is tried at once)."""
    generation: int


@dataclass(frozen=True)
class PoolDrained(_Base):
    """An old generation is closed: gracefully, or with stragglers terminated at the timeout."""

    generation: int
    target: str
    seconds: float
    terminated: int
    """Connections still in use at ``drain_timeout``, cancelled and terminated."""


@dataclass(frozen=True)
class ForceKillDone(_Base):
    """An old generation was terminated at once (``force_kill``)."""

    generation: int
    target: str
    cancelled: int
    """Queries that were running on it, cancelled on the server."""


@dataclass(frozen=True)
class RefreshRequested(_Base):
    """The strategy was asked to look at its source again now, before its next poll."""

    generation: int
    reason: str
    """Why: ``"login refused"`` (the server refused the DSN in use: rotated credentials)."""


@dataclass(frozen=True)
class FailoverDetected(_Base):
    """The current generation's server stopped taking writes (``follow_primary``): the same
    DSN is opened again, to reach the server that does; a :class:`SwapDone` with reason
    ``"failover"`` follows once one is found."""

    generation: int
    target: str
    reason: str
    """What showed it: a query failed with ``25006 read_only_sql_transaction``, or a new
    connection found a server that does not take writes."""


@dataclass(frozen=True)
class ConnectionExpired(_Base):
    """A connection reached its ``max_lifetime`` and was closed when released (a new one
    replaces it when needed)."""

    generation: int
    age: float
    """Seconds since it was opened."""


Event = (
    ReloadStarted
    | SwapDone
    | ReloadFailed
    | PoolDrained
    | ForceKillDone
    | RefreshRequested
    | FailoverDetected
    | ConnectionExpired
)


class _Mailbox:
    """The events waiting for one :class:`EventStream`: filled by the hub, emptied by the
    stream."""

    __slots__ = ("ended", "events", "ready")

    def __init__(self, max_queued: int) -> None:
        self.events: collections.deque[Event] = collections.deque(maxlen=max_queued)
        self.ready = asyncio.Event()
        self.ended = False

    def put(self, event: Event) -> None:
        self.events.append(event)
        self.ready.set()

    def end(self) -> None:
        self.ended = True
        self.ready.set()


class EventHub:
    """The listeners of one pool or engine, and the event streams following it.

    Its owner calls :meth:`emit`; an ``async def`` listener runs as a task of the task group
    given to :meth:`attach` (the owner's, so it ends with the owner), or on its own while none
    is attached. A listener that raises is logged and never affects the owner.
    """

    __slots__ = ("_closed", "_listeners", "_mailboxes", "_strays", "_task_group")

    def __init__(self) -> None:
        self._listeners: list[Callable[[Event], object]] = []
        self._mailboxes: set[_Mailbox] = set()
        self._task_group: TaskGroup | None = None
        self._strays: set[asyncio.Future[None]] = set()
        self._closed = False

    def add_listener(self, callback: Callable[[Event], object]) -> None:
        """Call *callback(event)* for each event."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[Event], object]) -> None:
        """Stop calling *callback*; no error if it was not added."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def stream(self, max_queued: int) -> EventStream:
        """A new :class:`EventStream` of the events from now on."""
        mailbox = _Mailbox(max_queued)
        self._mailboxes.add(mailbox)
        if self._closed:
            mailbox.end()
        return EventStream(mailbox, lambda: self._mailboxes.discard(mailbox))

    def emit(self, event: Event) -> None:
        """Deliver *event* to every listener and stream."""
        for mailbox in list(self._mailboxes):
            mailbox.put(event)
        for callback in list(self._listeners):
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:
                logger.exception("aiohotload event listener %r failed", callback)

    def attach(self, task_group: TaskGroup | None) -> None:
        """Run async listeners in *task_group* from now on (None: on their own)."""
        self._task_group = task_group

    def open(self) -> None:
        """Let new streams run again (an engine restarting after ``dispose()``)."""
        self._closed = False

    def close(self) -> None:
        """End every stream once it has handed out what it holds."""
        self._closed = True
        for mailbox in list(self._mailboxes):
            mailbox.end()

    def _spawn(self, awaitable: Awaitable[object]) -> None:
        if self._task_group is not None:
            self._task_group.start_soon(_run_listener, awaitable)
            return
        task = asyncio.ensure_future(_run_listener(awaitable))
        self._strays.add(task)
        task.add_done_callback(self._strays.discard)


class EventStream:
    """An async iterator of the events of one pool or engine (``pool.events()``), from its
    creation until the pool closes; ``aclose()`` (or leaving the loop early) unsubscribes.

    A consumer that falls more than *max_queued* events behind loses the oldest ones.
    """

    __slots__ = ("_mailbox", "_unsubscribe")

    def __init__(self, mailbox: _Mailbox, unsubscribe: Callable[[], None]) -> None:
        self._mailbox = mailbox
        self._unsubscribe = unsubscribe

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        mailbox = self._mailbox
        while not mailbox.events:
            if mailbox.ended:
                await self.aclose()
                raise StopAsyncIteration
            mailbox.ready.clear()
            await mailbox.ready.wait()
        return mailbox.events.popleft()

    async def aclose(self) -> None:
        """Unsubscribe."""
        self._unsubscribe()


async def _run_listener(awaitable: Awaitable[object]) -> None:
    """Await what an ``async def`` listener returned, logging its error instead of raising."""
    try:
        await awaitable
    except Exception:
        logger.exception("aiohotload event listener failed")
