"""SQLAlchemy async engines whose DSN is reloaded live, with the guarantees of HotPool.

::

    from aiohotload.sqlalchemy import create_async_engine

    engine = create_async_engine("watchfiles://postgres/etc/app/dsn.txt", pool_size=10)
    async with AsyncSession(engine) as session: ...
    await engine.dispose()

The engine is SQLAlchemy's own (``postgresql+asyncpg``, one ``AsyncAdaptedQueuePool``);
aiohotload makes its connections and listens to its pool's events:

- a :class:`~aiohotload.reloader.Reloader` follows the hotload URL as for HotPool: each new
  DSN is validated with a real connection first, a bad one is logged and retried while the
  engine keeps its current DSN;
- the pool's ``async_creator`` connects with the current DSN, and the ``connect`` event tags
  each connection with the generation it was made for;
- on a swap, idle connections of the old generation are closed at once; checked-out ones
  keep working (an open transaction commits on the old server) and are closed when checked
  in (``checkin`` event) instead of returned, their pool slot reconnecting to the new DSN
  when next used; a checkout that meets an old connection anyway makes SQLAlchemy replace it
  (``checkout`` raises :class:`~sqlalchemy.exc.DisconnectionError`);
- after ``drain_timeout`` (``force_kill``: at once) the old connections still checked out
  get a cancel request for what they run and are invalidated, SQLAlchemy's way of dropping a
  connection: their sessions see a disconnect.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskGroup
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as _sqlalchemy_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from .drivers import abandon_connect, cancel_queries
from .dsn import as_url
from .errors import DriverError, HotloadError, InvalidOptionError, InvalidURLError
from .events import Event, SwapDone, deliver, run_listener
from .pool import EventStream
from .redact import describe_error, redact_dsn
from .reloader import Reloader, report_drain
from .strategies import get_strategy
from .url import HotloadURL, parse_url

__all__ = ["HotEngine", "create_async_engine"]

logger = logging.getLogger("aiohotload")

# The hotload URL drivers the engine accepts: it always connects with asyncpg.
_DRIVERS = frozenset({"postgres", "postgresql"})
# Engine arguments that are aiohotload's to set.
_RESERVED = ("async_creator", "creator")
# Keys of a connection record's info: the generation it was made for, and "not checked out
# since it was made" (a new connection is never refused at its first checkout).
_GENERATION = "aiohotload.generation"
_FRESH = "aiohotload.fresh"
# Bound on closing the connection that validated a new DSN.
_CLOSE_TIMEOUT = 5.0


class _Generation:
    """One DSN in use, and the connections of the pool made with it."""

    __slots__ = ("drained", "dsn", "idle", "number", "opened_in", "out", "retired", "retiring")

    def __init__(self, number: int, dsn: str, opened_in: float) -> None:
        self.number = number
        self.dsn = dsn
        self.opened_in = opened_in
        self.out: set[ConnectionPoolEntry] = set()  # checked out
        self.idle: set[ConnectionPoolEntry] = set()  # in the pool, connected
        self.retired = False
        # Done when retired: connections still being made for it go to the current DSN.
        self.retiring: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.drained = asyncio.Event()  # retired, and nothing checked out

    @property
    def target(self) -> str:
        return redact_dsn(self.dsn)


class HotEngine(AsyncEngine):
    """A SQLAlchemy :class:`~sqlalchemy.ext.asyncio.AsyncEngine` that follows a hotload URL.

    Create it with :func:`create_async_engine`. It is used as any ``AsyncEngine``
    (``AsyncSession(engine)``, ``engine.begin()``, ``engine.connect()``); on top,
    :attr:`generation`, :attr:`target`, :attr:`last_error`, :meth:`wait_for_swap` and the
    reload events show the reloads. It starts following the URL at its first connection (or
    :meth:`start`); :meth:`dispose` stops it.
    """

    def __init__(self, url: str, *, name: str | None = None, **engine_kwargs: Any) -> None:
        """See :func:`create_async_engine`."""
        hotload_url = parse_url(url)
        if hotload_url.driver not in _DRIVERS:
            raise InvalidURLError(
                f"the SQLAlchemy engine connects with asyncpg: the hotload URL's driver must "
                f"be 'postgres' or 'postgresql', not {hotload_url.driver!r}"
            )
        get_strategy(hotload_url.strategy)  # an unknown strategy fails here, not at first use
        for key in _RESERVED:
            if key in engine_kwargs:
                raise InvalidOptionError(
                    f"{key!r} cannot be given: aiohotload makes the engine's connections "
                    "(pass asyncpg.connect() arguments as connect_args)"
                )
        self._connect_args: dict[str, Any] = dict(engine_kwargs.pop("connect_args", None) or {})
        made = _sqlalchemy_async_engine(
            "postgresql+asyncpg://", async_creator=self._connect, **engine_kwargs
        )
        sync_engine = made.sync_engine
        # Dropped before this engine registers as sync_engine's proxy, or its collection
        # would unregister this one (SQLAlchemy keeps one proxy per sync engine).
        del made
        super().__init__(sync_engine)

        self._hotload_url = hotload_url
        self._name = name if name is not None else hotload_url.path
        self._listeners: list[Callable[[Event], object]] = []
        self._event_waiters: set[asyncio.Event] = set()
        self._closed = False  # disposed (event streams end); a later connection restarts it

        self._current: _Generation | None = None
        self._generations: dict[int, _Generation] = {}  # current and draining, by number
        self._numbers = itertools.count()
        self._generation = 0
        # Connections the creator made, until the connect event tags them.
        self._made: weakref.WeakKeyDictionary[asyncpg.Connection, _Generation] = (
            weakref.WeakKeyDictionary()
        )

        self._reloader: Reloader[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._tg: TaskGroup | None = None
        self._next_swap: asyncio.Future[int] | None = None
        self._stray: set[asyncio.Task[None]] = set()

        event.listen(sync_engine, "connect", self._on_connect)
        event.listen(sync_engine, "checkout", self._on_checkout)
        event.listen(sync_engine, "checkin", self._on_checkin)
        event.listen(sync_engine, "close", self._on_close)
        event.listen(sync_engine, "detach", self._on_detach)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Get the first DSN and validate it now rather than at the first connection: a bad
        URL option, a missing source or an unreachable first DSN raises here. Idempotent."""
        await self._started()

    async def dispose(self, close: bool = True) -> None:
        """Stop following the DSN, then dispose of the pool as SQLAlchemy does.

        Idle connections are closed (with *close*, SQLAlchemy's default); connections still
        checked out, of any generation, are closed when checked in. No background task is
        left. Using the engine again starts it again.
        """
        await self._stop_reloading()
        await super().dispose(close=close)

    async def _started(self) -> _Generation:
        """The current generation; starts following the URL if it is not yet."""
        while (gen := self._current) is None:
            task = self._starting
            if task is None:
                task = asyncio.get_running_loop().create_task(
                    self._start(), name=f"aiohotload:{self._hotload_url.strategy}:start"
                )
                task.add_done_callback(_retrieve)
                self._starting = task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():  # by dispose(), not by our caller
                    raise HotloadError("engine was disposed while starting") from None
                raise
            finally:
                if task.done() and self._starting is task:
                    self._starting = None
        return gen

    async def _start(self) -> None:
        reloader: Reloader[None] = Reloader(
            self._hotload_url,
            name=self._name,
            open=self._validate,
            close=lambda _: None,
            swap=self._swap,
            serving=lambda: self._current,
            emit=self._emit,
            action="connect to",
        )
        stop = asyncio.Event()
        self._reloader, self._stop = reloader, stop
        self._runner = asyncio.get_running_loop().create_task(
            self._run(reloader, stop), name=f"aiohotload:{self._hotload_url.strategy}"
        )
        try:
            dsn, _, opened_in = await reloader.first()
        except BaseException:
            reloader.close()
            stop.set()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._reloader = self._stop = self._runner = None
            raise
        self._closed = False
        gen = self._new_generation(dsn, opened_in)
        self._current = gen
        reloader.started(dsn)  # reloads at once if the source changed meanwhile
        logger.info(
            "engine follows %s (generation %d, validated in %.0f ms)",
            gen.target,
            gen.number,
            opened_in * 1000,
        )

    async def _run(self, reloader: Reloader[None], stop: asyncio.Event) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(reloader.run)
                await stop.wait()
                tg.cancel_scope.cancel()  # drains end too: see dispose()
        except Exception:
            logger.exception("aiohotload background task failed; reloads have stopped")
        finally:
            self._tg = None

    async def _stop_reloading(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        if self._reloader is not None:
            self._reloader.stop()
        # Every connection made so far is closed at checkin from now on (its generation is
        # unknown); connections still being made finish and are closed likewise.
        for gen in self._generations.values():
            gen.retired = True
            if self._reloader is not None:
                self._reloader.done_with(gen.dsn)
        self._generations.clear()
        if self._reloader is not None:
            self._reloader.close()
        was_open = self._current is not None
        self._current = None
        if self._stop is not None:
            self._stop.set()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        self._reloader = self._stop = self._runner = None
        self._closed = True
        for waiter in self._event_waiters:
            waiter.set()  # lets events() iterators end
        if self._next_swap is not None and not self._next_swap.done():
            self._next_swap.set_exception(HotloadError("engine was disposed"))
            self._next_swap.exception()
        self._next_swap = None
        if was_open:
            logger.info("engine stopped following %s", self._hotload_url.path)

    # ------------------------------------------------------------------ reloads

    async def _validate(self, dsn: str) -> None:
        """Connect once with *dsn* (the reloader bounds it and redacts errors)."""
        conn = await asyncpg.connect(as_url(dsn), **self._connect_args)
        try:
            await conn.close(timeout=_CLOSE_TIMEOUT)
        except Exception:
            conn.terminate()  # it connected: that is what counts
        except BaseException:
            conn.terminate()
            raise

    def _new_generation(self, dsn: str, opened_in: float) -> _Generation:
        gen = _Generation(next(self._numbers), dsn, opened_in)
        self._generations[gen.number] = gen
        self._generation = gen.number
        return gen

    def _swap(self, dsn: str, _: None, opened_in: float) -> None:
        old = self._current
        assert old is not None
        new = self._new_generation(dsn, opened_in)
        self._current = new
        force = self._hotload_url.force_kill
        logger.info(
            "swapped to generation %d: %s -> %s (validated in %.0f ms, old connections %s)",
            new.number,
            old.target,
            new.target,
            opened_in * 1000,
            "terminated" if force else "draining",
        )
        self._emit(
            SwapDone(
                self._name,
                old_generation=old.number,
                new_generation=new.number,
                old_target=old.target,
                new_target=new.target,
                open_seconds=opened_in,
            )
        )
        self._retire(old, force=force)
        waiter, self._next_swap = self._next_swap, None
        if waiter is not None and not waiter.done():
            waiter.set_result(new.number)

    def _retire(self, gen: _Generation, *, force: bool) -> None:
        gen.retired = True
        gen.retiring.set_result(None)
        # Idle connections of the old DSN close now; their slots reconnect when next used.
        for record in list(gen.idle):
            record.invalidate()
        gen.idle.clear()
        if not gen.out:
            gen.drained.set()
        if self._tg is not None:
            self._tg.start_soon(self._drain, gen, force)
        else:  # not running (cannot happen while swapping): stop it now
            self._generations.pop(gen.number, None)

    async def _drain(self, gen: _Generation, force: bool) -> None:
        started = time.perf_counter()
        terminated = 0
        timed_out = None
        try:
            if force:
                terminated = await self._kill(gen)
            else:
                with anyio.move_on_after(self._hotload_url.drain_timeout) as scope:
                    await gen.drained.wait()
                if scope.cancelled_caught:
                    timed_out = self._hotload_url.drain_timeout
                    terminated = await self._kill(gen)
        except Exception:
            logger.exception("draining generation %d failed; terminating it", gen.number)
            await self._kill(gen)
        finally:
            if self._generations.pop(gen.number, None) is not None and self._reloader:
                self._reloader.done_with(gen.dsn)
        report_drain(
            self._emit,
            self._name,
            gen,
            force=force,
            seconds=time.perf_counter() - started,
            terminated=terminated,
            timed_out=timed_out,
        )

    async def _kill(self, gen: _Generation) -> int:
        """Invalidate every connection of *gen* and cancel what the checked-out ones run on
        the server; returns how many were checked out."""
        out = list(gen.out)
        # Read before invalidating: the cancel requests need the connections' keys.
        cancelling = cancel_queries(
            [r.driver_connection for r in out if r.driver_connection is not None],
        )
        for record in [*out, *gen.idle]:
            # Closes its socket now (outside SQLAlchemy's greenlet, invalidation terminates):
            # the session using it sees a disconnect at its next statement, SQLAlchemy
            # invalidates it there, and the slot reconnects to the current DSN.
            record.invalidate()
        gen.idle.clear()
        gen.out.clear()
        gen.drained.set()
        await cancelling
        return len(out)

    # ------------------------------------------------------------------ pool events

    async def _connect(self) -> asyncpg.Connection:
        """The engine's ``async_creator``: a connection with the current DSN."""
        gen = await self._started()
        while True:
            opening = asyncio.ensure_future(asyncpg.connect(as_url(gen.dsn), **self._connect_args))
            try:
                await asyncio.wait((opening, gen.retiring), return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                abandon_connect(opening)
                raise
            if not gen.retiring.done():
                break
            # Retired while connecting (the old server may not even answer): use the new DSN.
            abandon_connect(opening)
            gen = await self._started()
        try:
            conn: asyncpg.Connection = opening.result()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            redacted = describe_error(exc, gen.dsn)
            if redacted != message:  # never seen from asyncpg, but a password must not show
                raise DriverError(f"could not connect to {gen.target}: {redacted}") from None
            raise
        self._made[conn] = gen
        return conn

    def _on_connect(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        conn = record.driver_connection
        gen = self._made.pop(conn, None) if conn is not None else None
        record.info[_GENERATION] = gen.number if gen is not None else None
        record.info[_FRESH] = True

    def _on_checkout(
        self, dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        info = record.info
        gen = self._generations.get(info.get(_GENERATION, -1))
        if info.pop(_FRESH, False) or (gen is not None and not gen.retired):
            if gen is not None:
                gen.idle.discard(record)
                gen.out.add(record)
                if gen.retired:  # made for it just before its swap: wait for this one too
                    gen.drained.clear()
            return
        # An idle connection of a retired DSN (closed at the swap unless it raced with it):
        # SQLAlchemy invalidates it and connects again, with the current DSN.
        raise DisconnectionError("connection of a replaced DSN")

    def _on_checkin(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        gen = self._generations.get(record.info.get(_GENERATION, -1))
        if gen is not None and not gen.retired:
            gen.out.discard(record)
            if dbapi_connection is not None:
                gen.idle.add(record)
            return
        # A connection of a replaced DSN: closed instead of returned (gracefully: this runs in
        # SQLAlchemy's greenlet); the slot reconnects with the current DSN when next used.
        try:
            if dbapi_connection is not None:
                record.invalidate()
        finally:
            if gen is not None:
                gen.out.discard(record)
                if not gen.out:
                    gen.drained.set()

    def _on_close(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        gen = self._generations.get(record.info.get(_GENERATION, -1))
        if gen is not None:
            gen.idle.discard(record)

    def _on_detach(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # The connection left the pool for good: no longer ours to drain.
        gen = self._generations.get(record.info.get(_GENERATION, -1))
        if gen is not None:
            gen.idle.discard(record)
            gen.out.discard(record)
            if gen.retired and not gen.out:
                gen.drained.set()

    # ------------------------------------------------------------------ events

    @property
    def name(self) -> str:
        """The name events carry (``create_async_engine(..., name=...)``; default: the URL's
        path)."""
        return self._name

    def add_listener(self, callback: Callable[[Event], object]) -> None:
        """Call *callback(event)* for each reload event, as :meth:`HotPool.add_listener`."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[Event], object]) -> None:
        """Stop calling *callback*; no error if it was not added."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    def events(self, *, max_queued: int = 1000) -> EventStream:
        """Iterate over reload events from this call on, until the engine is disposed."""
        return EventStream(self, max_queued)

    def _emit(self, event: Event) -> None:
        deliver(self._listeners, event, self._spawn)

    def _spawn(self, awaitable: Awaitable[object]) -> None:
        if self._tg is not None:
            self._tg.start_soon(run_listener, awaitable)
        else:
            task = asyncio.ensure_future(run_listener(awaitable))
            self._stray.add(task)
            task.add_done_callback(self._stray.discard)

    # ------------------------------------------------------------------ state

    @property
    def generation(self) -> int:
        """The generation serving new connections: 0 for the first DSN, +1 per swap."""
        return self._generation

    @property
    def target(self) -> str | None:
        """The current DSN with its password redacted (None before start and after dispose)."""
        gen = self._current
        return gen.target if gen is not None else None

    @property
    def last_error(self) -> HotloadError | None:
        """Why the newest DSN is not in use yet (redacted), or None if it is."""
        return self._reloader.last_error if self._reloader is not None else None

    @property
    def draining(self) -> int:
        """How many old generations still have connections being drained."""
        return sum(1 for gen in self._generations.values() if gen.retired)

    def get_size(self) -> int:
        """Connections the engine's pool holds now, idle and checked out, of every generation
        (for metrics, as :meth:`HotPool.get_size`)."""
        pool = self.sync_engine.pool
        return pool.checkedin() + pool.checkedout() if isinstance(pool, QueuePool) else 0

    def get_idle_size(self) -> int:
        """Connections idle in the engine's pool (as :meth:`HotPool.get_idle_size`)."""
        pool = self.sync_engine.pool
        return pool.checkedin() if isinstance(pool, QueuePool) else 0

    def is_closing(self) -> bool:
        """Always False: a disposed engine starts again when next used, as SQLAlchemy's
        engines reconnect (metrics keep tracking it until it is garbage-collected)."""
        return False

    @property
    def hotload_url(self) -> HotloadURL:
        """The parsed hotload URL (``url`` is SQLAlchemy's, which holds no DSN)."""
        return self._hotload_url

    async def wait_for_swap(self, timeout: float | None = None) -> int:
        """Wait until the next swap and return the new generation; :class:`TimeoutError`
        after *timeout* seconds, :class:`~aiohotload.HotloadError` if disposed first."""
        if self._next_swap is None:
            self._next_swap = asyncio.get_running_loop().create_future()
        waiter = self._next_swap
        with anyio.fail_after(timeout):
            return await asyncio.shield(waiter)

    def __repr__(self) -> str:
        url = self._hotload_url
        state = "open" if self._current is not None else "disposed" if self._closed else "idle"
        return (
            f"<aiohotload.HotEngine {url.strategy}://{url.driver}{url.path} "
            f"generation={self._generation} target={self.target!r} {state}>"
        )


def create_async_engine(url: str, *, name: str | None = None, **engine_kwargs: Any) -> HotEngine:
    """Create a :class:`HotEngine`: a SQLAlchemy async engine (``postgresql+asyncpg``) whose
    DSN comes from the hotload URL *url* and is reloaded live.

    *url* is what :func:`aiohotload.create_pool` takes, with the same options
    (``force_kill``, ``drain_timeout``, ``connect_timeout``) and strategies; its driver must
    be ``postgres`` or ``postgresql``. *engine_kwargs* go to SQLAlchemy's
    ``create_async_engine`` (``pool_size``, ``max_overflow``, ``pool_pre_ping``, ``echo``,
    ...), except ``connect_args``, which go to :func:`asyncpg.connect` for every connection.
    *name* labels the reload events (default: the URL's path). A malformed URL, an unknown
    strategy or driver, or a bad option raises here; the DSN is read at the first connection
    (or :meth:`HotEngine.start`).
    """
    return HotEngine(url, name=name, **engine_kwargs)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen, so it is not logged as lost."""
    if not task.cancelled():
        task.exception()
