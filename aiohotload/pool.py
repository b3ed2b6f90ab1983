"""HotPool: an asyncpg-compatible pool whose DSN is reloaded live.

The swap is one state machine: each DSN that opens successfully becomes a *generation*
(an inner pool plus a count of the callers using it). Exactly one generation is current;
new work always goes to it. A swap makes the new generation current and *retires* the old
one, which is then drained (graceful) or terminated (``force_kill``) by ``_drain``. Only
``_swap``, ``_retire`` and ``_drain`` change that state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from types import TracebackType
from typing import Any, Literal, Protocol

import anyio
import asyncpg
from anyio.abc import TaskGroup
from asyncpg.pool import PoolConnectionProxy

from .drivers import Driver, cancel_in_flight, get_driver, stop_connecting, terminate_pool
from .errors import HotloadError
from .events import Event, SwapDone, deliver, run_listener
from .redact import redact_dsn
from .reloader import Reloader, report_drain
from .url import HotloadURL, parse_url

__all__ = ["HotPool", "create_pool"]

logger = logging.getLogger("aiohotload")

CopyFormat = Literal["text", "csv", "binary"]

# Bound on closing a released connection of an old pool (its server may have gone silent).
_RELEASE_TIMEOUT = 5.0
# What asyncpg raises when a query starts on a connection that was just cut off under it:
# see _terminated_mid_query.
_BROKEN_MID_QUERY = (AttributeError, asyncpg.InternalClientError)
# What a release raises when the connection turned out to be broken: asyncpg has terminated
# it and given its slot back by then, so the pool is in order and the caller's work is done.
_RELEASE_ERRORS = (
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. the old pool was terminated mid-release
    asyncpg.PostgresError,
    OSError,
    asyncio.TimeoutError,
)


class _Generation:
    """One inner pool and the number of callers currently inside it."""

    __slots__ = (
        "acquire",
        "dsn",
        "idle",
        "number",
        "opened_in",
        "pool",
        "retired",
        "target",
        "users",
    )

    def __init__(self, number: int, pool: asyncpg.Pool, dsn: str, opened_in: float) -> None:
        self.number = number
        self.pool = pool
        # asyncpg's Pool._acquire skips the PoolAcquireContext that Pool.acquire builds: one
        # allocation and one frame less on the hottest path. Other drivers use acquire().
        self.acquire: Callable[[float | None], Awaitable[PoolConnectionProxy]] = getattr(
            pool, "_acquire", None
        ) or (lambda timeout: pool.acquire(timeout=timeout))
        self.dsn = dsn
        self.target = redact_dsn(dsn)
        self.opened_in = opened_in
        self.users = 0
        self.retired = False
        self.idle = asyncio.Event()


class HotPool:
    """A drop-in for :class:`asyncpg.Pool` that follows its DSN as it changes.

    Create it with :func:`create_pool`. Every :class:`asyncpg.Pool` method is available with
    the same signature; on top, :attr:`generation`, :attr:`target`, :attr:`last_error` and
    :meth:`wait_for_swap` show the reloads.
    """

    def __init__(self, url: str, *, name: str | None = None, **pool_kwargs: Any) -> None:
        """See :func:`create_pool`."""
        self._url: HotloadURL = parse_url(url)
        self._name = name if name is not None else self._url.path
        # Runs the strategy, opens each new DSN's pool and calls _swap with it.
        self._reloader: Reloader[asyncpg.Pool] = Reloader(
            self._url,
            name=self._name,
            open=self._open_pool,
            close=terminate_pool,
            swap=self._swap,
            serving=lambda: self._current,
            emit=self._emit,
        )
        self._driver: Driver = get_driver(self._url.driver)
        self._pool_kwargs = pool_kwargs
        self._listeners: list[Callable[[Event], object]] = []

        self._current: _Generation | None = None
        self._retired: set[_Generation] = set()
        self._generation = 0
        self._owners: dict[PoolConnectionProxy, _Generation] = {}

        self._next_swap: asyncio.Future[int] | None = None

        self._tg: TaskGroup | None = None
        self._stop: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing_task: asyncio.Task[None] | None = None
        self._initialized = False
        self._initializing = False
        self._closing = False
        self._closed = False
        self._stray: set[asyncio.Task[None]] = set()
        self._event_waiters: set[asyncio.Event] = set()
        self._drained = asyncio.Event()  # set each time a drain ends

    # ------------------------------------------------------------------ lifecycle

    async def _async__init__(self) -> HotPool:
        if self._initialized:
            return self
        if self._initializing:
            raise asyncpg.InterfaceError("pool is being initialized in another task")
        if self._closed:
            raise asyncpg.InterfaceError("pool is closed")
        self._initializing = True
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._next_swap = loop.create_future()
        self._runner = loop.create_task(self._run(), name=f"aiohotload:{self._url.strategy}")
        try:
            dsn, pool, opened_in = await self._reloader.first()
        except BaseException:
            await self._abort_init()
            raise
        self._current = _Generation(0, pool, dsn, opened_in)
        self._initialized = True
        self._initializing = False
        self._reloader.started(dsn)  # reloads at once if the source changed meanwhile
        logger.info(
            "pool opened on %s (generation 0, %.0f ms)", self._current.target, opened_in * 1000
        )
        return self

    async def _abort_init(self) -> None:
        self._initializing = False
        self._closing = True
        self._closed = True
        self._reloader.close()
        if self._stop is not None:
            self._stop.set()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    def __await__(self) -> Generator[Any, None, HotPool]:
        return self._async__init__().__await__()

    async def __aenter__(self) -> HotPool:
        return await self._async__init__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop watching, drain every inner pool (bounded by ``drain_timeout``) and close.

        New acquires fail with :class:`asyncpg.InterfaceError` from the moment ``close()``
        is called; work already holding a connection finishes. Idempotent.
        """
        if self._closed and self._closing_task is None:
            return
        if self._closing_task is None:
            self._closing_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing_task)

    async def _close(self) -> None:
        self._closing = True
        self._reloader.stop()
        if self._current is not None:
            self._retire(self._current, force=False)
        while self._retired and self._tg is not None:
            await self._drained.wait()
            self._drained.clear()
        # Only now: the strategy hears about every DSN released by the drains first.
        self._reloader.close()
        if self._stop is not None:
            self._stop.set()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        self._finish_close()
        logger.info("pool closed")

    def terminate(self) -> None:
        """Terminate every connection of every inner pool at once and stop watching."""
        if self._closed and self._closing_task is None:
            return
        self._closing = True
        for gen in [self._current, *self._retired]:
            if gen is not None:
                terminate_pool(gen.pool)
                self._reloader.done_with(gen.dsn)
        self._reloader.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        if self._stop is not None:
            self._stop.set()
        self._finish_close()

    def _finish_close(self) -> None:
        self._closed = True
        for waiter in self._event_waiters:
            waiter.set()  # lets events() iterators end
        self._current = None
        self._retired.clear()
        self._owners.clear()
        if self._next_swap is not None and not self._next_swap.done():
            self._next_swap.set_exception(asyncpg.InterfaceError("pool is closed"))
            self._next_swap.exception()

    def is_closing(self) -> bool:
        """True once :meth:`close` or :meth:`terminate` has been called."""
        return self._closing or self._closed

    # ------------------------------------------------------------------ background work

    async def _run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._reloader.run)
                assert self._stop is not None
                await self._stop.wait()
                # Leaving the task group waits for the drains started by close().
        except Exception:
            logger.exception("aiohotload background task failed; reloads have stopped")
        finally:
            self._tg = None

    async def _open_pool(self, dsn: str) -> asyncpg.Pool:
        """Open an inner pool on *dsn* (the reloader bounds it and redacts its errors)."""
        return await self._driver(dsn, **self._pool_kwargs)

    # ------------------------------------------------------------------ the swap state machine

    def _swap(self, dsn: str, pool: asyncpg.Pool, opened_in: float) -> None:
        old = self._current
        assert old is not None
        self._generation += 1
        new = _Generation(self._generation, pool, dsn, opened_in)
        self._current = new
        logger.info(
            "swapped to generation %d: %s -> %s (new pool opened in %.0f ms, old one %s)",
            new.number,
            old.target,
            new.target,
            opened_in * 1000,
            "terminated" if self._url.force_kill else "draining",
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
        self._retire(old, force=self._url.force_kill)
        waiter = self._next_swap
        self._next_swap = asyncio.get_running_loop().create_future()
        if waiter is not None and not waiter.done():
            waiter.set_result(new.number)

    def _retire(self, gen: _Generation, *, force: bool) -> None:
        if gen.retired:
            return
        gen.retired = True
        if self._current is gen:
            self._current = None
        self._retired.add(gen)
        if gen.users == 0:
            gen.idle.set()
        if self._tg is not None:
            self._tg.start_soon(self._drain, gen, force)
        else:  # the background task is gone (terminate); nothing can drain: stop it now
            terminate_pool(gen.pool)
            self._retired.discard(gen)
            self._reloader.done_with(gen.dsn)

    async def _drain(self, gen: _Generation, force: bool) -> None:
        started = time.perf_counter()
        terminated = 0
        timed_out = None
        try:
            if force:
                _stop_refilling(gen.pool)
                terminated = await self._kill(gen)
            else:
                # Expired connections are closed when released instead of going back idle.
                await gen.pool.expire_connections()
                _stop_refilling(gen.pool)
                with anyio.move_on_after(self._url.drain_timeout) as scope:
                    await gen.idle.wait()
                    await gen.pool.close()
                if scope.cancelled_caught:
                    timed_out = self._url.drain_timeout
                    terminated = await self._kill(gen)
        except Exception:
            logger.exception("draining generation %d failed; terminating it", gen.number)
            terminate_pool(gen.pool)
        finally:
            self._retired.discard(gen)
            self._reloader.done_with(gen.dsn)
            self._drained.set()
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
        """Terminate *gen*'s pool, cancelling on the server what its checked-out connections
        run; returns how many cancel requests were sent."""
        # Before the cancel requests: callers waiting on a new connection to the old server
        # move to the new pool now (see stop_connecting).
        stop_connecting(gen.pool)
        terminated = await cancel_in_flight(gen.pool)
        terminate_pool(gen.pool)
        return terminated

    # ------------------------------------------------------------------ events

    @property
    def name(self) -> str:
        """The name events and metrics carry (``create_pool(..., name=...)``; default: the
        URL's path)."""
        return self._name

    def add_listener(self, callback: Callable[[Event], object]) -> None:
        """Call *callback(event)* for each reload event; an ``async def`` callback is run as a
        task. A listener's error is logged and never affects the pool."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[Event], object]) -> None:
        """Stop calling *callback*; no error if it was not added."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def events(self, *, max_queued: int = 1000) -> EventStream:
        """Iterate over reload events from this call on, until the pool closes
        (``async for event in pool.events(): ...``).

        A consumer that falls more than *max_queued* events behind loses the oldest ones.
        """
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

    # ------------------------------------------------------------------ hot path

    async def _checkout(self, timeout: float | None) -> tuple[PoolConnectionProxy, _Generation]:
        gen = self._current
        if gen is not None:
            gen.users += 1
            try:
                return await gen.acquire(timeout), gen
            except BaseException as exc:
                self._leave(gen)
                if not self._moved_on(gen, exc):
                    raise
        return await self._checkout_again(timeout)

    async def _checkout_again(
        self, timeout: float | None
    ) -> tuple[PoolConnectionProxy, _Generation]:
        """The slow path of :meth:`_checkout`: retry on newer generations."""
        while True:
            gen = self._current
            if gen is None:
                raise asyncpg.InterfaceError(self._unusable_reason())
            gen.users += 1
            try:
                return await gen.acquire(timeout), gen
            except BaseException as exc:
                self._leave(gen)
                if not self._moved_on(gen, exc):
                    raise

    def _moved_on(self, gen: _Generation, exc: BaseException) -> bool:
        """Whether an acquire failed only because *gen* was retired and stopped under it
        (force kill, drain timeout, its server went away), so a newer generation can serve
        the caller instead."""
        return (
            gen.retired
            and self._current is not None
            and isinstance(exc, (asyncpg.InterfaceError, asyncpg.PostgresError, OSError))
        )

    def _checkin(
        self, con: PoolConnectionProxy, gen: _Generation, timeout: float | None
    ) -> Awaitable[None]:
        """Release *con* to *gen*'s pool; returns the awaitable release."""
        if gen.retired:
            return self._release_retired(con, gen, timeout)
        # Counting the caller out before the release completes is safe: a drain only closes
        # the pool once this count is 0, and asyncpg's close() waits for in-flight releases.
        gen.users -= 1
        # The release itself, not a wrapper coroutine: callers catch _RELEASE_ERRORS (see
        # _release_failed), which costs nothing until one is raised.
        return gen.pool.release(con, timeout=timeout)

    async def _release_retired(
        self, con: PoolConnectionProxy, gen: _Generation, timeout: float | None
    ) -> None:
        # The connection belongs to a pool being discarded: asyncpg closes it (it was
        # expired), bounded so a silent old server cannot hang the caller, and a failure to
        # close it cleanly is not the caller's problem.
        try:
            await gen.pool.release(con, timeout=_RELEASE_TIMEOUT if timeout is None else timeout)
        except _RELEASE_ERRORS as exc:
            logger.debug(
                "closing a connection of generation %d failed: %s", gen.number, type(exc).__name__
            )
        finally:
            self._leave(gen)

    def _leave(self, gen: _Generation) -> None:
        gen.users -= 1
        if gen.users == 0 and gen.retired:
            gen.idle.set()

    def _unusable_reason(self) -> str:
        if self._closed or self._closing:
            return "pool is closing" if not self._closed else "pool is closed"
        return "pool is not initialized"

    def acquire(self, *, timeout: float | None = None) -> _AcquireContext:
        """Acquire a connection from the current inner pool (``await`` or ``async with``)."""
        return _AcquireContext(self, timeout)

    async def _acquire(self, timeout: float | None) -> PoolConnectionProxy:
        con, gen = await self._checkout(timeout)
        self._owners[con] = gen
        return con

    async def release(
        self, connection: PoolConnectionProxy, *, timeout: float | None = None
    ) -> None:
        """Release *connection* to the inner pool it came from, also after a swap."""
        gen = self._owners.pop(connection, None)
        if gen is None:
            if isinstance(connection, PoolConnectionProxy) and connection._con is None:  # type: ignore[attr-defined]
                return  # already released, as asyncpg allows
            raise asyncpg.InterfaceError(
                f"HotPool.release() received invalid connection: {connection!r} "
                "is not a member of this pool"
            )
        try:
            await self._checkin(connection, gen, timeout)
        except _RELEASE_ERRORS as exc:
            _release_failed(gen, exc)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Execute an SQL command (or commands); see :meth:`asyncpg.Connection.execute`."""
        con, gen = await self._checkout(None)
        try:
            return await con.execute(query, *args, timeout=timeout)
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    async def executemany(
        self, command: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Execute *command* once per sequence in *args*; see asyncpg's ``executemany``."""
        con, gen = await self._checkout(None)
        try:
            await con.executemany(command, args, timeout=timeout)
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    async def fetch(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> list[Any]:
        """Run a query and return the rows; see :meth:`asyncpg.Connection.fetch`."""
        con, gen = await self._checkout(None)
        try:
            rows: list[Any] = await con.fetch(
                query, *args, timeout=timeout, record_class=record_class
            )
            return rows
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        """Run a query and return one value of the first row; see asyncpg's ``fetchval``."""
        con, gen = await self._checkout(None)
        try:
            return await con.fetchval(query, *args, column=column, timeout=timeout)
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    async def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> Any:
        """Run a query and return the first row; see :meth:`asyncpg.Connection.fetchrow`."""
        con, gen = await self._checkout(None)
        try:
            return await con.fetchrow(query, *args, timeout=timeout, record_class=record_class)
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    async def fetchmany(
        self,
        query: str,
        args: Iterable[Sequence[Any]],
        *,
        timeout: float | None = None,
        record_class: Any = None,
    ) -> list[Any]:
        """Run a query for each sequence in *args* and return the rows; see
        :meth:`asyncpg.Connection.fetchmany`."""
        con, gen = await self._checkout(None)
        try:
            rows: list[Any] = await con.fetchmany(
                query, args, timeout=timeout, record_class=record_class
            )
            return rows
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    async def copy_from_table(
        self,
        table_name: str,
        *,
        output: Any,
        columns: Iterable[str] | None = None,
        schema_name: str | None = None,
        timeout: float | None = None,
        format: CopyFormat | None = None,
        oids: int | None = None,
        delimiter: str | None = None,
        null: str | None = None,
        header: bool | None = None,
        quote: str | None = None,
        escape: str | None = None,
        force_quote: bool | Iterable[str] | None = None,
        encoding: str | None = None,
    ) -> str:
        """Copy a table's contents to *output*; see :meth:`asyncpg.Connection.copy_from_table`."""
        con, gen = await self._checkout(None)
        try:
            result: str = await con.copy_from_table(
                table_name,
                output=output,
                columns=columns,
                schema_name=schema_name,
                timeout=timeout,
                format=format,
                oids=oids,
                delimiter=delimiter,
                null=null,
                header=header,
                quote=quote,
                escape=escape,
                force_quote=force_quote,
                encoding=encoding,
            )
            return result
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    async def copy_from_query(
        self,
        query: str,
        *args: Any,
        output: Any,
        timeout: float | None = None,
        format: CopyFormat | None = None,
        oids: int | None = None,
        delimiter: str | None = None,
        null: str | None = None,
        header: bool | None = None,
        quote: str | None = None,
        escape: str | None = None,
        force_quote: bool | Iterable[str] | None = None,
        encoding: str | None = None,
    ) -> str:
        """Copy a query's results to *output*; see :meth:`asyncpg.Connection.copy_from_query`."""
        con, gen = await self._checkout(None)
        try:
            result: str = await con.copy_from_query(
                query,
                *args,
                output=output,
                timeout=timeout,
                format=format,
                oids=oids,
                delimiter=delimiter,
                null=null,
                header=header,
                quote=quote,
                escape=escape,
                force_quote=force_quote,
                encoding=encoding,
            )
            return result
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    async def copy_to_table(
        self,
        table_name: str,
        *,
        source: Any,
        columns: Iterable[str] | None = None,
        schema_name: str | None = None,
        timeout: float | None = None,
        format: CopyFormat | None = None,
        oids: int | None = None,
        freeze: bool | None = None,
        delimiter: str | None = None,
        null: str | None = None,
        header: bool | None = None,
        quote: str | None = None,
        escape: str | None = None,
        force_quote: bool | Iterable[str] | None = None,
        force_not_null: bool | Iterable[str] | None = None,
        force_null: bool | Iterable[str] | None = None,
        encoding: str | None = None,
        where: str | None = None,
    ) -> str:
        """Copy data from *source* into a table; see :meth:`asyncpg.Connection.copy_to_table`."""
        con, gen = await self._checkout(None)
        try:
            result: str = await con.copy_to_table(
                table_name,
                source=source,
                columns=columns,
                schema_name=schema_name,
                timeout=timeout,
                format=format,
                oids=oids,
                freeze=freeze,
                delimiter=delimiter,
                null=null,
                header=header,
                quote=quote,
                escape=escape,
                force_quote=force_quote,
                force_not_null=force_not_null,
                force_null=force_null,
                encoding=encoding,
                where=where,
            )
            return result
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    async def copy_records_to_table(
        self,
        table_name: str,
        *,
        records: Any,
        columns: Iterable[str] | None = None,
        schema_name: str | None = None,
        timeout: float | None = None,
        where: str | None = None,
    ) -> str:
        """Copy *records* into a table; see :meth:`asyncpg.Connection.copy_records_to_table`."""
        con, gen = await self._checkout(None)
        try:
            result: str = await con.copy_records_to_table(
                table_name,
                records=records,
                columns=columns,
                schema_name=schema_name,
                timeout=timeout,
                where=where,
            )
            return result
        except _BROKEN_MID_QUERY as exc:
            raise _terminated_mid_query(con, exc) from None
        finally:
            try:
                await self._checkin(con, gen, None)
            except _RELEASE_ERRORS as exc:
                _release_failed(gen, exc)

    # ------------------------------------------------------------------ sizes and state

    async def expire_connections(self) -> None:
        """Replace the current inner pool's connections on their next acquire."""
        if self._current is not None:
            await self._current.pool.expire_connections()

    def get_size(self) -> int:
        """Connections open in the current inner pool and in those still draining."""
        return sum(g.pool.get_size() for g in self._generations())

    def get_min_size(self) -> int:
        """The minimum size of each inner pool."""
        return self._require_current().pool.get_min_size()

    def get_max_size(self) -> int:
        """The maximum size of each inner pool."""
        return self._require_current().pool.get_max_size()

    def get_idle_size(self) -> int:
        """Idle connections in the current inner pool."""
        gen = self._current
        return gen.pool.get_idle_size() if gen is not None else 0

    @property
    def generation(self) -> int:
        """How many swaps have happened: 0 for the first inner pool, +1 per swap."""
        return self._generation

    @property
    def target(self) -> str | None:
        """The current DSN with its password redacted (None before init and after close)."""
        gen = self._current
        return gen.target if gen is not None else None

    @property
    def last_error(self) -> HotloadError | None:
        """Why the newest DSN is not in use yet (redacted), or None if it is."""
        return self._reloader.last_error

    @property
    def draining(self) -> int:
        """How many old inner pools are still draining."""
        return len(self._retired)

    @property
    def url(self) -> HotloadURL:
        """The parsed hotload URL."""
        return self._url

    async def wait_for_swap(self, timeout: float | None = None) -> int:
        """Wait until the next swap and return the new generation.

        Raises :class:`TimeoutError` after *timeout* seconds and
        :class:`asyncpg.InterfaceError` if the pool closes first.
        """
        if self._next_swap is None or self._closed:
            raise asyncpg.InterfaceError(self._unusable_reason())
        waiter = self._next_swap
        with anyio.fail_after(timeout):
            return await asyncio.shield(waiter)

    async def wait_until(
        self, predicate: Callable[[HotPool], bool], timeout: float | None = None
    ) -> None:
        """Wait until *predicate(pool)* holds, re-checking after each swap."""
        with anyio.fail_after(timeout):
            while not predicate(self):
                assert self._next_swap is not None
                await asyncio.shield(self._next_swap)

    def _generations(self) -> list[_Generation]:
        gens = list(self._retired)
        if self._current is not None:
            gens.append(self._current)
        return gens

    def _require_current(self) -> _Generation:
        if self._current is None:
            raise asyncpg.InterfaceError(self._unusable_reason())
        return self._current

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        return (
            f"<aiohotload.HotPool {self._url.strategy}://{self._url.driver}{self._url.path} "
            f"generation={self._generation} target={self.target!r} {state}>"
        )


class _EventSource(Protocol):
    """What an :class:`EventStream` follows: a HotPool, or an engine."""

    _closed: bool
    _event_waiters: set[asyncio.Event]

    def add_listener(self, callback: Callable[[Event], object]) -> None: ...

    def remove_listener(self, callback: Callable[[Event], object]) -> None: ...


class EventStream:
    """What :meth:`HotPool.events` returns: an async iterator of :data:`Event`, subscribed
    from its creation; ``aclose()`` (or leaving the loop early) unsubscribes."""

    def __init__(self, pool: _EventSource, max_queued: int) -> None:
        self._pool = pool
        self._queue: collections.deque[Event] = collections.deque(maxlen=max_queued)
        self._ready = asyncio.Event()
        pool.add_listener(self._push)
        pool._event_waiters.add(self._ready)

    def _push(self, event: Event) -> None:
        self._queue.append(event)
        self._ready.set()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._pool._closed:
                await self.aclose()
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    async def aclose(self) -> None:
        """Unsubscribe."""
        self._pool.remove_listener(self._push)
        self._pool._event_waiters.discard(self._ready)


class _AcquireContext:
    """What :meth:`HotPool.acquire` returns: awaitable, or an async context manager."""

    __slots__ = ("_con", "_done", "_pool", "_timeout")

    def __init__(self, pool: HotPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._con: PoolConnectionProxy | None = None
        self._done = False

    async def __aenter__(self) -> PoolConnectionProxy:
        if self._con is not None or self._done:
            raise asyncpg.InterfaceError("a connection is already acquired")
        pool = self._pool
        # HotPool._checkout inlined: this is the hottest path, and a frame is measurable.
        gen = pool._current
        if gen is not None:
            gen.users += 1
            try:
                con = await gen.acquire(self._timeout)
            except BaseException as exc:
                pool._leave(gen)
                if not pool._moved_on(gen, exc):
                    raise
                con, gen = await pool._checkout_again(self._timeout)
        else:
            con, gen = await pool._checkout_again(self._timeout)
        pool._owners[con] = gen
        self._con = con
        return con

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done = True
        con, self._con = self._con, None
        if con is None:
            return
        pool = self._pool
        gen = pool._owners.pop(con, None)
        if gen is None:  # released inside the block already
            await pool.release(con)
        else:
            try:
                await pool._checkin(con, gen, None)
            except _RELEASE_ERRORS as error:
                _release_failed(gen, error)

    def __await__(self) -> Generator[Any, None, PoolConnectionProxy]:
        self._done = True
        return self._pool._acquire(self._timeout).__await__()


def create_pool(url: str, *, name: str | None = None, **pool_kwargs: Any) -> HotPool:
    """Create a :class:`HotPool` from a hotload URL; ``await`` it or use ``async with``.

    *url* is ``<strategy>://<driver>/<path>?<options>``, e.g.
    ``watchfiles://postgres/etc/app/dsn.txt?drain_timeout=10``. *pool_kwargs* go to the driver
    for every inner pool (``min_size``, ``max_size``, ``init``, ``setup``, ...). A malformed URL
    or unknown strategy/driver raises here; a bad option, a missing source or an unreachable
    first DSN raises when awaited. *name* labels the pool's events and metrics (default: the
    URL's path).
    """
    return HotPool(url, name=name, **pool_kwargs)


def _stop_refilling(pool: asyncpg.Pool) -> None:
    """Keep a retired asyncpg pool from reconnecting to the old server.

    asyncpg refills a pool up to ``min_size`` whenever a connection closes, and a drain closes
    each released connection: without this the old pool would open new connections to the old
    server (with credentials that may just have been rotated away) while it drains.
    """
    if hasattr(pool, "_minsize"):
        pool._minsize = 0


def _release_failed(gen: _Generation, exc: BaseException) -> None:
    """asyncpg resets a released connection. If the server dropped it meanwhile (shutdown,
    pg_terminate_backend, a cut network) the reset fails, asyncpg terminates it and raises.
    Raising that to the caller would report a query that succeeded (a committed write, then
    retried) as failed, or hide the query's own error: log it instead."""
    logger.debug(
        "releasing a connection of generation %d failed: %s", gen.number, type(exc).__name__
    )


def _terminated_mid_query(con: PoolConnectionProxy, exc: Exception) -> BaseException:
    """Report as the connection error it is what asyncpg raises when a query starts on a
    connection that was just cut off: ``AttributeError: 'NoneType' object has no attribute
    ...`` when we terminated it (force kill, drain timeout), and ``InternalClientError: cannot
    switch to state ...; another operation (2) is in progress`` when the server ended the
    session while it sat idle (shutdown, pg_terminate_backend), before its socket closed.
    State 2 is asyncpg's "consuming an error": an error no operation asked for."""
    if isinstance(exc, asyncpg.InternalClientError):
        if "another operation (2) is in progress" in str(exc):
            return asyncpg.ConnectionDoesNotExistError(
                "connection was closed by the server in the middle of operation"
            )
        return exc
    raw = getattr(con, "_con", None)
    if raw is None or raw.is_closed():
        return asyncpg.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        )
    return exc
