"""The generation lifecycle: the swap state machine HotPool and the SQLAlchemy engine share.

Each DSN that opens successfully becomes a *generation*. Exactly one generation is current;
new work always goes to it. A swap makes a new generation current and *retires* the old one,
which is then drained (graceful, bounded by ``drain_timeout``) or killed (``force_kill``, or
at the drain timeout), and finally released (its DSN is no longer in use). Only
:meth:`Lifecycle.swap`, :meth:`Lifecycle._retire` and :meth:`Lifecycle._drain` change that
state; close and terminate go through them too.

What differs between an asyncpg pool and a SQLAlchemy pool is the small :class:`Ops`
interface each front implements: open a generation, retire it (no new connections, waiters
moved on, idle connections closed), wait until it is idle, close it, kill it, terminate it.

Every background task (the reloader, drains, async event listeners) runs in the lifecycle's
task group and ends with it. The lifecycle holds no reference to its front, so a pool dropped
without ``close()`` can be garbage-collected (its front then terminates the lifecycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

import anyio
from anyio.abc import TaskGroup

from .dsn import wants_primary
from .errors import HotloadError, PoolClosedError
from .events import (
    ConnectionExpired,
    EventHub,
    FailoverDetected,
    ForceKillDone,
    PoolDrained,
    RefreshRequested,
    SwapDone,
)
from .redact import redact_dsn
from .reloader import Reloader
from .url import HotloadURL

__all__ = ["Generation", "Lifecycle", "Ops"]

logger = logging.getLogger("aiohotload")


class Generation:
    """One DSN in use. Fronts subclass it with what they opened on the DSN."""

    __slots__ = ("dsn", "number", "opened_in", "released", "retired", "target")

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.target = redact_dsn(dsn)
        self.number = -1  # set when it starts serving
        self.opened_in = 0.0
        self.retired = False
        self.released = False


G = TypeVar("G", bound=Generation)


class Ops(Protocol[G]):
    """What a front does to its generations; the lifecycle decides when."""

    async def open(self, dsn: str) -> G:
        """Open a generation on *dsn*, proven to work as the front's connections would be
        (raises otherwise)."""
        ...

    def discard(self, gen: G) -> None:
        """Close at once a generation that never served (opened too late)."""
        ...

    def retire(self, gen: G) -> None:
        """*gen* is no longer current: open no new connection for it, move the callers
        waiting on it to the current generation, close its idle connections."""
        ...

    async def wait_idle(self, gen: G) -> None:
        """Return once nothing of *gen* is in use."""
        ...

    async def close(self, gen: G) -> None:
        """Close an idle *gen* gracefully."""
        ...

    async def kill(self, gen: G) -> int:
        """Cancel on the server what *gen*'s connections run, then terminate them; returns
        how many were in use."""
        ...

    def terminate(self, gen: G) -> None:
        """Terminate *gen* at once (no event loop needed)."""
        ...


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Lifecycle(Generic[G]):
    """Generations of one pool or engine, from the first DSN to close."""

    def __init__(
        self,
        url: HotloadURL,
        ops: Ops[G],
        events: EventHub,
        *,
        name: str,
        action: str,
        first_number: int = 0,
    ) -> None:
        self.url = url
        self.current: G | None = None
        """The generation new work goes to (None before start and once closing)."""
        self.retired: set[G] = set()
        """Generations still draining."""
        self.generation = first_number
        """The current generation's number: the first one's, +1 per swap."""
        self._ops = ops
        self._events = events
        self._name = name
        self._reloader: Reloader[G] = Reloader(
            url, name=name, owner=self, emit=events.emit, action=action
        )
        self._state = _State.NEW
        self._runner: asyncio.Task[None] | None = None
        self._task_group: TaskGroup | None = None
        self._stop = asyncio.Event()
        self._drained = asyncio.Event()
        self._next_swap: asyncio.Future[int] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._disowned: str | None = None  # why, once inherited by a forked child
        self._background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        _live.add(self)

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``open``, ``closing`` or ``closed``."""
        return self._state.value

    @property
    def last_error(self) -> HotloadError | None:
        """Why the newest DSN is not in use yet (redacted), or None if it is."""
        return self._reloader.last_error

    def unusable(self) -> PoolClosedError:
        """The error for an operation that needs a current generation and finds none, worded
        as asyncpg words it."""
        if self._disowned is not None:
            return PoolClosedError(self._disowned)
        messages = {
            _State.NEW: "pool is not initialized",
            _State.STARTING: "pool is being initialized, but not yet ready: likely there is "
            "a race between creating a pool and using it",
            _State.CLOSING: "pool is closing",
            _State.CLOSED: "pool is closed",
        }
        return PoolClosedError(messages.get(self._state, "pool is closed"))

    def run_in_background(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run *work* in the lifecycle's task group from :meth:`start` until the end (call
        before starting)."""
        self._background.append(work)

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> G:
        """Get the first DSN, open it, and start following the source; returns the first
        generation. Raises what the strategy or the open raised."""
        if self._state is not _State.NEW:
            raise self.unusable()
        self._state = _State.STARTING
        loop = asyncio.get_running_loop()
        self._next_swap = loop.create_future()
        self._runner = loop.create_task(self._run(), name=f"aiohotload:{self.url.strategy}")
        try:
            dsn, gen, opened_in = await self._first_unless_stopped()
        except BaseException:
            self._state = _State.CLOSED
            self._reloader.close()
            self._stop.set()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._finish()
            raise
        gen.number, gen.opened_in = self.generation, opened_in
        self.current = gen
        self._state = _State.OPEN
        self._reloader.started(dsn)  # reloads at once if the source changed meanwhile
        return gen

    async def _first_unless_stopped(self) -> tuple[str, G, float]:
        """The reloader's first DSN, opened; :meth:`unusable` at once if the pool is closed
        or terminated meanwhile (what it opened then is discarded)."""
        first = asyncio.ensure_future(self._reloader.first())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((first, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not first.done():
                first.cancel()
            outcome = (await asyncio.gather(first, return_exceptions=True))[0]
        if not self._stop.is_set():
            return first.result()
        if isinstance(outcome, tuple):
            self._ops.discard(outcome[1])
        raise self.unusable()

    async def close(self) -> None:
        """Stop following the source, drain every generation (bounded by
        ``drain_timeout``), release their DSNs, close the strategy. Idempotent."""
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            self._finish()
        if self._state is _State.CLOSED and self._closing is None:
            return
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._state = _State.CLOSING
        self._reloader.stop()
        if self.current is not None:
            self._retire(self.current, force=False)
        while self.retired and self._task_group is not None:
            self._drained.clear()
            await self._drained.wait()
        # Only now: the strategy has heard about every DSN the drains released.
        self._reloader.close()
        self._stop.set()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        self._state = _State.CLOSED
        self._finish()

    def terminate(self) -> None:
        """Terminate every generation at once and stop; works without a running event loop
        (synchronous shutdown hooks, a garbage-collected pool)."""
        if self._state is _State.CLOSED and self._closing is None:
            return
        self._state = _State.CLOSED
        for gen in [self.current, *self.retired]:
            if gen is not None:
                # RuntimeError: the loop is closed; its sockets went with it.
                with contextlib.suppress(RuntimeError):
                    self._ops.terminate(gen)
                self._release(gen)
        self.current = None
        self.retired.clear()
        self._drained.set()  # a close() waiting for drains (cut short by a timeout) ends too
        self._stop.set()
        if self._runner is not None and not self._runner.done():
            # Cancelling needs no running loop; the reloader closes the strategy when the loop
            # runs the cancellation.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs any more
                self._runner.cancel()
        self._finish()

    def disown(self, reason: str) -> None:
        """Drop every generation without touching it and refuse all use with *reason*: what a
        forked child does with what it inherited (see :func:`_disown_after_fork`). Needs no
        running loop."""
        self._disowned = reason
        self._state = _State.CLOSED
        self.current = None
        self.retired.clear()
        if self._runner is not None and not self._runner.done():
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._runner.cancel()

    def _finish(self) -> None:
        self.current = None
        self._events.close()
        waiter = self._next_swap
        if waiter is not None and not waiter.done():
            with contextlib.suppress(RuntimeError):  # the loop is closed
                waiter.set_exception(self.unusable())
                waiter.exception()  # retrieved: nobody may be waiting

    async def _run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                self._events.attach(tg)
                tg.start_soon(self._reloader.run)
                for work in self._background:
                    tg.start_soon(work)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("aiohotload background task failed; reloads have stopped")
        finally:
            self._task_group = None
            self._events.attach(None)

    # ------------------------------------------------------------------ the reloader's owner

    async def open(self, dsn: str) -> G:
        """Open a generation on *dsn* (the reloader bounds it and reports its errors)."""
        return await self._ops.open(dsn)

    def discard(self, opened: G) -> None:
        """Close a generation that opened too late to serve."""
        self._ops.discard(opened)

    def serving(self) -> G | None:
        """The current generation, or None once closing."""
        return self.current if self._state is _State.OPEN else None

    def swap(self, gen: G, opened_in: float, reason: str) -> None:
        """Make *gen* current and retire the generation it replaces."""
        old = self.current
        assert old is not None
        self.generation += 1
        gen.number, gen.opened_in = self.generation, opened_in
        self.current = gen
        force = self.url.force_kill
        logger.info(
            "swapped to generation %d: %s -> %s (%s; opened in %.0f ms; old one %s)",
            gen.number,
            old.target,
            gen.target,
            reason,
            opened_in * 1000,
            "terminated" if force else "draining",
        )
        self._events.emit(
            SwapDone(
                self._name,
                old_generation=old.number,
                new_generation=gen.number,
                old_target=old.target,
                new_target=gen.target,
                open_seconds=opened_in,
                reason=reason,
            )
        )
        self._retire(old, force=force)
        waiter, self._next_swap = self._next_swap, asyncio.get_running_loop().create_future()
        if waiter is not None and not waiter.done():
            waiter.set_result(gen.number)

    # ------------------------------------------------------------------ what the front asks

    async def wait_for_swap(self, timeout: float | None = None) -> int:
        """Wait until the next swap and return the new generation; :class:`TimeoutError`
        after *timeout* seconds, :class:`PoolClosedError` if closed first."""
        if self._state not in (_State.OPEN, _State.STARTING) or self._next_swap is None:
            raise self.unusable()
        with anyio.fail_after(timeout):
            return await asyncio.shield(self._next_swap)

    def login_refused(self, gen: Generation) -> None:
        """A connection for *gen* was refused at login: if it is current, ask the strategy
        to look again now (it may hold a newer password)."""
        if gen is self.current and self._reloader.request_refresh():
            self._events.emit(
                RefreshRequested(self._name, generation=gen.number, reason="login refused")
            )

    def not_writable(self, gen: Generation, reason: str) -> None:
        """*gen*'s server does not take writes (*reason* says how it showed). With
        ``follow_primary`` (or a DSN asking for ``target_session_attrs=read-write``), open
        the same DSN again, which reaches the server that does once the name points to it,
        and swap to it; meanwhile the current generation keeps serving."""
        if gen is not self.current or not (self.url.follow_primary or wants_primary(gen.dsn)):
            return
        if self._reloader.reopen("failover"):
            logger.warning(
                "generation %d (%s) does not take writes (%s): opening it again to reach "
                "the server that does",
                gen.number,
                gen.target,
                reason,
            )
            self._events.emit(
                FailoverDetected(
                    self._name, generation=gen.number, target=gen.target, reason=reason
                )
            )

    def connection_expired(self, gen: Generation, age: float) -> None:
        """A connection of *gen* reached its ``max_lifetime`` and is closed at its release."""
        self._events.emit(ConnectionExpired(self._name, generation=gen.number, age=age))

    # ------------------------------------------------------------------ retire and drain

    def _retire(self, gen: G, *, force: bool) -> None:
        if gen.retired:
            return
        gen.retired = True
        if self.current is gen:
            self.current = None
        self.retired.add(gen)
        self._ops.retire(gen)
        if self._task_group is not None:
            self._task_group.start_soon(self._drain, gen, force)
        else:  # the background task is gone: nothing can drain, stop it now
            self._ops.terminate(gen)
            self._end(gen)

    async def _drain(self, gen: G, force: bool) -> None:
        started = time.perf_counter()
        terminated = 0
        timed_out = None
        try:
            if force:
                terminated = await self._ops.kill(gen)
            else:
                with anyio.move_on_after(self.url.drain_timeout) as scope:
                    await self._ops.wait_idle(gen)
                    await self._ops.close(gen)
                if scope.cancelled_caught:
                    timed_out = self.url.drain_timeout
                    terminated = await self._ops.kill(gen)
        except Exception:
            logger.exception("draining generation %d failed; terminating it", gen.number)
            self._ops.terminate(gen)
        finally:
            self._end(gen)
        self._report_drain(gen, force, time.perf_counter() - started, terminated, timed_out)

    def _end(self, gen: G) -> None:
        self.retired.discard(gen)
        self._release(gen)
        if not self.retired:
            self._drained.set()

    def _release(self, gen: Generation) -> None:
        if not gen.released:
            gen.released = True
            # RuntimeError: terminate() after the loop closed, nobody to tell.
            with contextlib.suppress(RuntimeError):
                self._reloader.done_with(gen.dsn)

    def _report_drain(
        self, gen: G, force: bool, seconds: float, terminated: int, timed_out: float | None
    ) -> None:
        if timed_out is not None:
            logger.warning(
                "generation %d (%s) did not drain within %gs: terminated %d connection(s) "
                "still in use",
                gen.number,
                gen.target,
                timed_out,
                terminated,
            )
        logger.info(
            "generation %d (%s) %s in %.0f ms",
            gen.number,
            gen.target,
            "terminated" if force else "drained",
            seconds * 1000,
        )
        if force:
            event: ForceKillDone | PoolDrained = ForceKillDone(
                self._name, generation=gen.number, target=gen.target, cancelled=terminated
            )
        else:
            event = PoolDrained(
                self._name,
                generation=gen.number,
                target=gen.target,
                seconds=seconds,
                terminated=terminated,
            )
        self._events.emit(event)


# Every lifecycle of this process, for a forked child to disown.
_live: weakref.WeakSet[Lifecycle[Any]] = weakref.WeakSet()


def _disown_after_fork() -> None:
    """In a forked child (gunicorn ``--preload``, ``multiprocessing`` with fork): the pools and
    engines inherited from the parent share its connections. Using them, draining them at a
    swap or closing them (a graceful close ends the session on the server) would break the
    parent's sessions, so they are disowned: nothing is closed, and the first use fails with
    :class:`~aiohotload.PoolClosedError` saying to open a new pool in the child."""
    for lifecycle in list(_live):
        lifecycle.disown(
            "pool was inherited from its parent process by fork(); create a new pool in "
            "the child process"
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_after_fork)
