"""SQLAlchemy async engines whose DSN is reloaded live, with the guarantees of HotPool.

::

    from aiohotload.sqlalchemy import create_async_engine

    engine = create_async_engine("watchfiles://postgres/etc/app/dsn.txt", pool_size=10)
    async with AsyncSession(engine) as session: ...
    await engine.dispose()

The engine is SQLAlchemy's own (``postgresql+asyncpg``, one ``AsyncAdaptedQueuePool``);
aiohotload makes its connections and listens to its pool's events:

- the generation lifecycle HotPool uses (``_lifecycle.py``) follows the hotload URL: each new
  DSN is validated first with a connection made through the engine's own connect path (its
  ``connect`` event listeners run on it), a bad one is logged and retried while the engine
  keeps its current DSN;
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

What is SQLAlchemy-specific is the small set of operations on a generation (``_EngineOps``);
the swap, drain, kill, events and close are the lifecycle's, as for HotPool.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as _sqlalchemy_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool
from sqlalchemy.util import greenlet_spawn

from . import _asyncpg
from ._connector import Connector
from ._lifecycle import Generation, Lifecycle
from .dsn import as_url, writable_only
from .errors import DriverError, HotloadError, InvalidOptionError, InvalidURLError
from .events import EventHub, EventStream
from .redact import describe_error, shows_secret
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
# SQLSTATE of a write refused by a read-only server (a standby, a demoted primary).
_READ_ONLY_SQL_TRANSACTION = "25006"
# How a new connection shows that its server does not take writes.
_NOT_WRITABLE = "a new connection found a server that does not take writes"
# The generation being validated: the engine's creator connects with its DSN meanwhile.
_VALIDATING: contextvars.ContextVar[_EngineGeneration | None] = contextvars.ContextVar(
    "aiohotload_validating", default=None
)


class _EngineGeneration(Generation):
    """One DSN in use, and the engine's connections made with it."""

    __slots__ = ("connector", "drained", "idle", "out")

    def __init__(self, dsn: str, ops: _EngineOps) -> None:
        super().__init__(dsn)
        self.out: set[ConnectionPoolEntry] = set()  # checked out
        self.idle: set[ConnectionPoolEntry] = set()  # in the pool, connected
        # Stopped when retired: connections still being made for it go to the current DSN.
        self.connector = Connector(
            asyncpg.connect,
            lambda: ops.on_login_refused(self),
            on_not_writable=lambda: ops.on_not_writable(self, _NOT_WRITABLE),
        )
        self.drained = asyncio.Event()  # retired, and nothing checked out


class _EngineOps:
    """The lifecycle's operations on an engine's generations: its pool's connections tagged
    with the generation they were made for."""

    def __init__(self, engine: HotEngine) -> None:
        self._engine = weakref.ref(engine)
        self.on_login_refused: Callable[[Generation], None] = lambda gen: None
        """Told when a connection's login is refused (the current lifecycle's)."""
        self.on_not_writable: Callable[[Generation, str], None] = lambda gen, reason: None
        """Told when a generation's server does not take writes (the current lifecycle's)."""

    async def open(self, dsn: str) -> _EngineGeneration:
        """Validate *dsn* with one connection made as the engine makes them: through a copy
        of its pool (same creator, same event listeners), closed at once."""
        engine = self._engine()
        if engine is None:
            raise HotloadError("engine was garbage-collected")
        gen = _EngineGeneration(dsn, self)
        token = _VALIDATING.set(gen)
        dialect = engine.sync_engine.dialect
        try:
            pool = engine.sync_engine.pool.recreate()
            try:
                connection = await greenlet_spawn(pool.connect)
                await greenlet_spawn(connection.close)
            finally:
                await greenlet_spawn(pool.dispose)
        except dialect.loaded_dbapi.Error as exc:
            # As an engine's first connect raises it: wrapped in SQLAlchemy's DBAPIError.
            raise DBAPIError.instance(
                None, None, exc, dialect.loaded_dbapi.Error, dialect=dialect
            ) from exc
        finally:
            _VALIDATING.reset(token)
        gen.out.clear()
        gen.idle.clear()
        return gen

    def discard(self, gen: _EngineGeneration) -> None:
        """Nothing stays open for a generation that never served."""
        gen.connector.stop()

    def retire(self, gen: _EngineGeneration) -> None:
        """Connections being made for *gen* go to the current DSN; idle ones close now (their
        slots reconnect when next used)."""
        gen.connector.stop()
        for record in list(gen.idle):
            record.invalidate()
        gen.idle.clear()
        if not gen.out:
            gen.drained.set()

    async def wait_idle(self, gen: _EngineGeneration) -> None:
        """Until every connection of *gen* is checked in (and closed there)."""
        await gen.drained.wait()

    async def close(self, gen: _EngineGeneration) -> None:
        """Nothing left: each connection was closed at checkin."""

    async def kill(self, gen: _EngineGeneration) -> int:
        """Invalidate every connection of *gen* and cancel what the checked-out ones run on
        the server; returns how many were checked out."""
        out = list(gen.out)
        # Read before invalidating: the cancel requests need the connections' keys.
        cancelling = _asyncpg.cancel_queries(
            [r.driver_connection for r in out if r.driver_connection is not None]
        )
        self.terminate(gen)
        await cancelling
        return len(out)

    def terminate(self, gen: _EngineGeneration) -> None:
        """Invalidate every connection of *gen* now."""
        gen.connector.stop()
        for record in [*gen.out, *gen.idle]:
            # Closes its socket now (outside SQLAlchemy's greenlet, invalidation terminates):
            # the session using it sees a disconnect at its next statement, SQLAlchemy
            # invalidates it there, and the slot reconnects to the current DSN.
            record.invalidate()
        gen.idle.clear()
        gen.out.clear()
        gen.drained.set()


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
        self._events = EventHub()
        self._ops = _EngineOps(self)
        self._lc: Lifecycle[_EngineGeneration] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._disposed = False  # until used again
        # Connections the creator made, until the connect event tags them.
        self._made: weakref.WeakKeyDictionary[asyncpg.Connection, _EngineGeneration] = (
            weakref.WeakKeyDictionary()
        )

        event.listen(sync_engine, "connect", self._on_connect)
        event.listen(sync_engine, "checkout", self._on_checkout)
        event.listen(sync_engine, "checkin", self._on_checkin)
        event.listen(sync_engine, "close", self._on_close)
        event.listen(sync_engine, "detach", self._on_detach)
        event.listen(sync_engine, "handle_error", self._on_error)

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        """Get the first DSN and validate it now rather than at the first connection: a bad
        URL option, a missing source or an unreachable first DSN raises here. Idempotent."""
        await self._started()

    async def dispose(self, close: bool = True) -> None:
        """Stop following the DSN, then dispose of the pool as SQLAlchemy does.

        Connections still checked out are waited for (bounded by ``drain_timeout``, then
        invalidated), as HotPool's close does; idle ones are closed. No background task is
        left. Using the engine again starts it again.
        """
        self._disposed = True
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        lc = self._lc
        if lc is not None and lc.state != "closed":
            await lc.close()
            logger.info("engine stopped following %s", self._hotload_url.path)
        self._events.close()  # also when it never started: streams end
        await super().dispose(close=close)

    async def _started(self) -> _EngineGeneration:
        """The current generation; starts following the URL if it is not yet."""
        while (lc := self._lc) is None or (gen := lc.current) is None:
            if lc is not None and lc.state == "starting" and self._starting is None:
                raise lc.unusable()
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
        # Generation numbers go on across restarts, so a connection of an earlier start is
        # never taken for one of this start.
        first = self._lc.generation + 1 if self._lc is not None else 0
        lc = Lifecycle(
            self._hotload_url,
            self._ops,
            self._events,
            name=self._name,
            action="connect to",
            first_number=first,
        )
        self._lc = lc
        self._ops.on_login_refused = lc.login_refused
        self._ops.on_not_writable = lc.not_writable
        self._disposed = False
        self._events.open()
        gen = await lc.start()
        logger.info(
            "engine follows %s (generation %d, validated in %.0f ms)",
            gen.target,
            gen.number,
            gen.opened_in * 1000,
        )

    # ------------------------------------------------------------------ connections

    async def _connect(self) -> asyncpg.Connection:
        """The engine's ``async_creator``: a connection with the current DSN (or the DSN
        being validated)."""
        gen = _VALIDATING.get() or await self._started()
        while True:
            try:
                conn = await gen.connector(as_url(gen.dsn), **self._connect_kwargs(gen))
                break
            except asyncpg.InterfaceError:
                if not gen.retired:
                    raise
                # Retired while connecting (the old server may not even answer): use the new
                # DSN.
                gen = await self._started()
            except Exception as exc:
                if shows_secret(exc, gen.dsn):  # never seen from asyncpg, but it must not show
                    redacted = describe_error(exc, gen.dsn)
                    raise DriverError(f"could not connect to {gen.target}: {redacted}") from None
                raise
        self._made[conn] = gen
        return conn

    def _connect_kwargs(self, gen: _EngineGeneration) -> dict[str, Any]:
        if not self._hotload_url.follow_primary:
            return self._connect_args
        kwargs = dict(self._connect_args)
        writable_only(gen.dsn, kwargs)
        return kwargs

    def _on_error(self, context: ExceptionContext) -> None:
        # A statement refused by a server that no longer takes writes: a failover.
        error = context.original_exception
        if getattr(error, "sqlstate", None) == _READ_ONLY_SQL_TRANSACTION:
            lc, gen = self._lc, self._lc.current if self._lc is not None else None
            if lc is not None and gen is not None:
                lc.not_writable(gen, "a query failed with 25006 read_only_sql_transaction")

    def _on_connect(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        conn = record.driver_connection
        record.info[_GENERATION] = self._made.pop(conn, None) if conn is not None else None
        record.info[_FRESH] = True

    def _on_checkout(
        self, dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        info = record.info
        gen: _EngineGeneration | None = info.get(_GENERATION)
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
        gen: _EngineGeneration | None = record.info.get(_GENERATION)
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
        gen: _EngineGeneration | None = record.info.get(_GENERATION)
        if gen is not None:
            gen.idle.discard(record)

    def _on_detach(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # The connection left the pool for good: no longer ours to drain.
        gen: _EngineGeneration | None = record.info.get(_GENERATION)
        if gen is not None:
            gen.idle.discard(record)
            gen.out.discard(record)
            if gen.retired and not gen.out:
                gen.drained.set()

    # ------------------------------------------------------------------ events and state

    @property
    def name(self) -> str:
        """The name events carry (``create_async_engine(..., name=...)``; default: the URL's
        path)."""
        return self._name

    def add_listener(self, callback: Any) -> None:
        """Call *callback(event)* for each reload event, as :meth:`HotPool.add_listener`."""
        self._events.add_listener(callback)

    def remove_listener(self, callback: Any) -> None:
        """Stop calling *callback*; no error if it was not added."""
        self._events.remove_listener(callback)

    def events(self, *, max_queued: int = 1000) -> EventStream:
        """Iterate over reload events from this call on, until the engine is disposed."""
        return self._events.stream(max_queued)

    @property
    def generation(self) -> int:
        """The generation serving new connections: 0 for the first DSN, +1 per swap."""
        return self._lc.generation if self._lc is not None else 0

    @property
    def target(self) -> str | None:
        """The current DSN with its password redacted (None before start and after dispose)."""
        gen = self._lc.current if self._lc is not None else None
        return gen.target if gen is not None else None

    @property
    def last_error(self) -> HotloadError | None:
        """Why the newest DSN is not in use yet (redacted), or None if it is."""
        return self._lc.last_error if self._lc is not None else None

    @property
    def draining(self) -> int:
        """How many old generations still have connections being drained."""
        return len(self._lc.retired) if self._lc is not None else 0

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
        """Wait until the next swap and return the new generation (starting the engine if it
        is not yet); :class:`TimeoutError` after *timeout* seconds,
        :class:`~aiohotload.PoolClosedError` if disposed first."""
        await self._started()
        assert self._lc is not None
        return await self._lc.wait_for_swap(timeout)

    def __repr__(self) -> str:
        url = self._hotload_url
        state = self._lc.state if self._lc is not None else "idle"
        state = "disposed" if self._disposed else state
        return (
            f"<aiohotload.HotEngine {url.strategy}://{url.driver}{url.path} "
            f"generation={self.generation} target={self.target!r} {state}>"
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
