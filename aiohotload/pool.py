"""HotPool: an :class:`asyncpg.Pool` whose DSN is reloaded live.

HotPool is the asyncpg-compatible front; the swap machinery is the generation lifecycle
(``_lifecycle.py``) and the inner asyncpg pools it drives are in ``_inner_pools.py``. Every
checkout goes through :meth:`HotPool._checkout`, every release through
:meth:`HotPool._checkin`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
import weakref
from collections.abc import AsyncIterable, Awaitable, Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import asyncpg
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from . import _asyncpg
from ._inner_pools import Inner, InnerPools, Retired
from ._lifecycle import Lifecycle
from .drivers import asyncpg_driver, get_driver
from .errors import HotloadError, InvalidOptionError
from .events import Event, EventHub, EventStream
from .url import HotloadURL, parse_url

__all__ = ["HotPool", "create_pool"]

logger = logging.getLogger("aiohotload")

if TYPE_CHECKING:
    _PoolBase = asyncpg.Pool[asyncpg.Record]
    _ContextBase = PoolAcquireContext[asyncpg.Record]
    _Proxy = PoolConnectionProxy[asyncpg.Record]
else:
    _PoolBase = asyncpg.Pool
    _ContextBase = PoolAcquireContext
    _Proxy = PoolConnectionProxy

_R = TypeVar("_R", bound=asyncpg.Record)
CopyFormat = Literal["text", "csv", "binary"]

# asyncpg.create_pool's own keyword arguments (the rest go to asyncpg.connect), and their
# defaults as asyncpg documents them.
_POOL_ARGUMENTS = frozenset(
    {
        "min_size",
        "max_size",
        "init_size",
        "max_queries",
        "max_inactive_connection_lifetime",
        "connect",
        "setup",
        "init",
        "reset",
        "loop",
        "connection_class",
        "record_class",
    }
)
_DEFAULT_SIZE = 10
# Bound on closing a released connection of a retired pool (its server may have gone silent).
_RELEASE_TIMEOUT = 5.0
# Why an acquire on a retired generation failed when a newer one can serve the caller.
_MOVE_ON = (Retired, asyncpg.InterfaceError, asyncpg.PostgresError, OSError)
# What asyncpg raises when a query starts on a connection that was just cut off under it:
# see _broken_mid_query.
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

# Pools of this process, so a forked child can disown them (see _disown_after_fork).
_live: weakref.WeakSet[HotPool] = weakref.WeakSet()


class HotPool(_PoolBase):
    """A drop-in for :class:`asyncpg.Pool` that follows its DSN as it changes.

    Create it with :func:`create_pool`. It is an :class:`asyncpg.Pool` (``isinstance`` and
    type checkers agree) and every method of one works with the same signature; on top,
    :attr:`generation`, :attr:`target`, :attr:`last_error`, :meth:`wait_for_swap` and the
    reload events show the reloads.
    """

    def __init__(self, url: str, *, name: str | None = None, **pool_kwargs: Any) -> None:
        """See :func:`create_pool`."""
        self._url: HotloadURL = parse_url(url)
        self._name = name if name is not None else self._url.path
        self._events = EventHub()
        driver = get_driver(self._url.driver)
        lifetime = _lifetime(pool_kwargs)
        pool_args = {k: v for k, v in pool_kwargs.items() if k in _POOL_ARGUMENTS}
        connect_args = {k: v for k, v in pool_kwargs.items() if k not in _POOL_ARGUMENTS}
        if driver is asyncpg_driver:
            _check_asyncpg_arguments(pool_args)
        self._sizes = (
            pool_args.get("min_size", _DEFAULT_SIZE),
            pool_args.get("max_size", _DEFAULT_SIZE),
            pool_args.get("init_size", pool_args.get("min_size", _DEFAULT_SIZE)),
        )
        self._lifetimes = lifetime is not None
        self._inner = InnerPools(driver, pool_args, connect_args, lifetime)
        self._lc: Lifecycle[Inner] = Lifecycle(
            self._url, self._inner, self._events, name=self._name, action="open a pool on"
        )
        self._inner.on_login_refused = self._lc.login_refused
        # Connections handed out by acquire(), with their generation, for release().
        self._owners: dict[_Proxy, Inner] = {}
        _live.add(self)

    # ------------------------------------------------------------------ open and close

    async def _async__init__(self) -> HotPool:
        if self._lc.state == "open":
            return self
        if self._lc.state == "starting":
            raise asyncpg.InterfaceError("pool is being initialized in another task")
        gen = await self._lc.start()
        logger.info("pool opened on %s (generation 0, %.0f ms)", gen.target, gen.opened_in * 1000)
        return self

    def __await__(self) -> Generator[Any, None, HotPool]:
        return self._async__init__().__await__()

    async def __aenter__(self) -> HotPool:
        return await self._async__init__()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop watching, drain every inner pool (bounded by ``drain_timeout``) and close.

        New acquires fail with :class:`asyncpg.InterfaceError` from the moment ``close()``
        is called; work already holding a connection finishes. Idempotent.
        """
        was_open = self._lc.state == "open"
        await self._lc.close()
        if was_open:
            logger.info("pool closed")

    def terminate(self) -> None:
        """Terminate every connection of every inner pool at once and stop watching; also
        from synchronous code, outside the event loop."""
        self._lc.terminate()

    def is_closing(self) -> bool:
        """True once :meth:`close` or :meth:`terminate` has been called."""
        return self._lc.state in ("closing", "closed")

    def __del__(self) -> None:
        # A pool dropped without close(): as asyncpg does for its connections, say so and
        # close what it holds (nothing of the lifecycle refers back to this object).
        lc = getattr(self, "_lc", None)
        if lc is not None and lc.state not in ("new", "closed"):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)
            lc.terminate()

    # ------------------------------------------------------------------ checkout and checkin

    async def _checkout(self, timeout: float | None) -> tuple[_Proxy, Inner]:
        """A connection of the current generation. A caller whose generation is retired
        while it waits moves to the new one, with what is left of its *timeout*."""
        deadline = None
        while True:
            gen = self._lc.current
            if gen is None:
                raise self._lc.unusable()
            if timeout is not None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout if deadline is None else deadline
                timeout = deadline - loop.time()
                if timeout <= 0:
                    raise asyncio.TimeoutError
            gen.users += 1
            try:
                con = await gen.acquire(timeout)
            except BaseException as exc:
                gen.leave()
                if gen.retired and self._lc.current is not None and isinstance(exc, _MOVE_ON):
                    continue
                raise
            if not gen.retired:
                return con, gen
            # Handed out just as its generation was retired: nobody may use it after the swap.
            await self._release_retired(con, gen, None)

    def _checkin(self, con: _Proxy, gen: Inner, timeout: float | None) -> Awaitable[None]:
        """Release *con* to *gen*'s pool; returns the awaitable release."""
        if gen.retired:
            return self._release_retired(con, gen, timeout)
        # Counting the caller out before the release completes is safe: a drain only closes
        # the pool once this count is 0, and asyncpg's close() waits for in-flight releases.
        gen.users -= 1
        if self._lifetimes:
            _expire_if_old(con, gen)
        return gen.pool.release(con, timeout=timeout)  # type: ignore[no-any-return]

    async def _release_retired(self, con: _Proxy, gen: Inner, timeout: float | None) -> None:
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
            gen.leave()

    def acquire(self, *, timeout: float | None = None) -> _ContextBase:
        """Acquire a connection from the current inner pool (``await`` or ``async with``)."""
        return _Checkout(self, timeout, owned=True)

    async def _acquire(self, timeout: float | None) -> _Proxy:
        con, gen = await self._checkout(timeout)
        self._owners[con] = gen
        return con

    async def release(self, connection: _Proxy, *, timeout: float | None = None) -> None:
        """Release *connection* to the inner pool it came from, also after a swap.

        As with asyncpg, a release that runs out of *timeout* raises
        :class:`asyncio.TimeoutError`; a connection found broken at release is logged, not
        raised (the caller's work on it is done). Releasing to a retired generation closes
        the connection and never raises.
        """
        gen = self._owners.pop(connection, None)
        if gen is None:
            if isinstance(connection, PoolConnectionProxy) and (
                _asyncpg.connection_of(connection) is None
            ):
                return  # already released, as asyncpg allows
            raise asyncpg.InterfaceError(
                f"HotPool.release() received invalid connection: {connection!r} "
                "is not a member of this pool"
            )
        retired = gen.retired
        try:
            await self._checkin(connection, gen, timeout)
        except asyncio.TimeoutError:
            if not retired:
                raise
        except _RELEASE_ERRORS as exc:
            _release_failed(gen, exc)

    def _use(self) -> _Checkout:
        """A connection for one query method (``async with self._use() as con``)."""
        return _Checkout(self, None, owned=False)

    # ------------------------------------------------------------------ queries

    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str:
        """Execute an SQL command (or commands); see :meth:`asyncpg.Connection.execute`."""
        async with self._use() as con:
            return await con.execute(query, *args, timeout=timeout)

    async def executemany(
        self, command: str, args: object, *, timeout: float | None = None
    ) -> None:
        """Execute *command* once per sequence in *args*; see asyncpg's ``executemany``."""
        async with self._use() as con:
            await con.executemany(command, args, timeout=timeout)  # type: ignore[arg-type]

    @overload
    async def fetch(
        self, query: str, *args: object, timeout: float | None = ..., record_class: None = ...
    ) -> list[asyncpg.Record]: ...
    @overload
    async def fetch(
        self, query: str, *args: object, timeout: float | None = ..., record_class: type[_R]
    ) -> list[_R]: ...
    @overload
    async def fetch(
        self,
        query: str,
        *args: object,
        timeout: float | None = ...,
        record_class: type[_R] | None,
    ) -> list[asyncpg.Record] | list[_R]: ...
    async def fetch(
        self, query: str, *args: object, timeout: float | None = None, record_class: Any = None
    ) -> Any:
        """Run a query and return the rows; see :meth:`asyncpg.Connection.fetch`."""
        async with self._use() as con:
            return await con.fetch(query, *args, timeout=timeout, record_class=record_class)

    async def fetchval(
        self, query: str, *args: object, column: int = 0, timeout: float | None = None
    ) -> Any:
        """Run a query and return one value of the first row; see asyncpg's ``fetchval``."""
        async with self._use() as con:
            return await con.fetchval(query, *args, column=column, timeout=timeout)

    @overload
    async def fetchrow(
        self, query: str, *args: object, timeout: float | None = ..., record_class: None = ...
    ) -> asyncpg.Record | None: ...
    @overload
    async def fetchrow(
        self, query: str, *args: object, timeout: float | None = ..., record_class: type[_R]
    ) -> _R | None: ...
    @overload
    async def fetchrow(
        self,
        query: str,
        *args: object,
        timeout: float | None = ...,
        record_class: type[_R] | None,
    ) -> asyncpg.Record | _R | None: ...
    async def fetchrow(
        self, query: str, *args: object, timeout: float | None = None, record_class: Any = None
    ) -> Any:
        """Run a query and return the first row; see :meth:`asyncpg.Connection.fetchrow`."""
        async with self._use() as con:
            return await con.fetchrow(query, *args, timeout=timeout, record_class=record_class)

    @overload
    async def fetchmany(
        self,
        query: str,
        args: Iterable[Any],
        *,
        timeout: float | None = None,
        record_class: None = ...,
    ) -> list[asyncpg.Record]: ...
    @overload
    async def fetchmany(
        self,
        query: str,
        args: Iterable[Any],
        *,
        timeout: float | None = None,
        record_class: type[_R],
    ) -> list[_R]: ...
    @overload
    async def fetchmany(
        self,
        query: str,
        args: Iterable[Any],
        *,
        timeout: float | None = None,
        record_class: type[_R] | None,
    ) -> list[asyncpg.Record | _R]: ...
    async def fetchmany(
        self,
        query: str,
        args: Iterable[Any],
        *,
        timeout: float | None = None,
        record_class: Any = None,
    ) -> Any:
        """Run a query for each sequence in *args* and return the rows; see
        :meth:`asyncpg.Connection.fetchmany`."""
        async with self._use() as con:
            return await con.fetchmany(query, args, timeout=timeout, record_class=record_class)

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
        async with self._use() as con:
            return await con.copy_from_table(
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

    async def copy_from_query(
        self,
        query: str,
        *args: object,
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
        async with self._use() as con:
            return await con.copy_from_query(
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
        async with self._use() as con:
            return await con.copy_to_table(
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

    async def copy_records_to_table(
        self,
        table_name: str,
        *,
        records: Iterable[Sequence[object]] | AsyncIterable[Sequence[object]],
        columns: Iterable[str] | None = None,
        schema_name: str | None = None,
        timeout: float | None = None,
        where: str | None = None,
    ) -> str:
        """Copy *records* into a table; see :meth:`asyncpg.Connection.copy_records_to_table`."""
        async with self._use() as con:
            return await con.copy_records_to_table(
                table_name,
                records=records,
                columns=columns,
                schema_name=schema_name,
                timeout=timeout,
                where=where,
            )

    # ------------------------------------------------------------------ sizes and settings

    async def expire_connections(self) -> None:
        """Replace the current inner pool's connections on their next acquire."""
        gen = self._lc.current
        if gen is not None:
            await gen.pool.expire_connections()

    def set_connect_args(self, dsn: str | None = None, **connect_kwargs: Any) -> None:
        """Use *connect_kwargs* (arguments of :func:`asyncpg.connect`) for every new
        connection, of the current generation and of every later one; as with asyncpg, they
        replace the ones given before and existing connections keep theirs until expired.

        *dsn* cannot be given: a HotPool's DSN comes from its hotload URL's source (write the
        new DSN there); :class:`~aiohotload.InvalidOptionError` says so.
        """
        if dsn is not None:
            raise InvalidOptionError(
                f"set_connect_args() cannot set a HotPool's DSN: it comes from "
                f"{self._url.strategy}://{self._url.driver}{self._url.path}; write the new "
                "DSN to that source (connection keyword arguments can be set here)"
            )
        for key in connect_kwargs:
            if key in _POOL_ARGUMENTS:
                raise InvalidOptionError(f"{key!r} is a pool argument, not a connect argument")
        gen = self._lc.current
        if gen is not None:
            self._inner.set_connect_args(gen, connect_kwargs)
        else:
            self._inner.connect_kwargs = connect_kwargs

    def get_size(self) -> int:
        """Connections open in the current inner pool and in those still draining."""
        gens = [*self._lc.retired, self._lc.current]
        return sum(g.pool.get_size() for g in gens if g is not None)

    def get_idle_size(self) -> int:
        """Idle connections in the current inner pool."""
        gen = self._lc.current
        return int(gen.pool.get_idle_size()) if gen is not None else 0

    def get_min_size(self) -> int:
        """The minimum size of each inner pool (as configured, also before init and after
        close)."""
        return self._sizes[0]  # type: ignore[no-any-return]

    def get_max_size(self) -> int:
        """The maximum size of each inner pool."""
        return self._sizes[1]  # type: ignore[no-any-return]

    def get_init_size(self) -> int:
        """How many connections each inner pool opens when it is created."""
        return self._sizes[2]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ reloads

    @property
    def name(self) -> str:
        """The name events and metrics carry (``create_pool(..., name=...)``; default: the
        URL's path)."""
        return self._name

    @property
    def url(self) -> HotloadURL:
        """The parsed hotload URL."""
        return self._url

    @property
    def generation(self) -> int:
        """How many swaps have happened: 0 for the first inner pool, +1 per swap."""
        return self._lc.generation

    @property
    def target(self) -> str | None:
        """The current DSN with its password redacted (None before init and after close)."""
        gen = self._lc.current
        return gen.target if gen is not None else None

    @property
    def last_error(self) -> HotloadError | None:
        """Why the newest DSN is not in use yet (redacted), or None if it is."""
        return self._lc.last_error

    @property
    def draining(self) -> int:
        """How many old inner pools are still draining."""
        return len(self._lc.retired)

    async def wait_for_swap(self, timeout: float | None = None) -> int:
        """Wait until the next swap and return the new generation.

        Raises :class:`TimeoutError` after *timeout* seconds and
        :class:`~aiohotload.PoolClosedError` (an :class:`asyncpg.InterfaceError`) if the pool
        is not open or closes first.
        """
        return await self._lc.wait_for_swap(timeout)

    async def wait_until(
        self, predicate: Callable[[HotPool], bool], timeout: float | None = None
    ) -> None:
        """Wait until *predicate(pool)* holds, re-checking after each swap."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate(self):
            left = None if deadline is None else max(0.0, deadline - loop.time())
            await self._lc.wait_for_swap(left)

    def add_listener(self, callback: Callable[[Event], object]) -> None:
        """Call *callback(event)* for each reload event; an ``async def`` callback is run as a
        task. A listener's error is logged and never affects the pool."""
        self._events.add_listener(callback)

    def remove_listener(self, callback: Callable[[Event], object]) -> None:
        """Stop calling *callback*; no error if it was not added."""
        self._events.remove_listener(callback)

    def events(self, *, max_queued: int = 1000) -> EventStream:
        """Iterate over reload events from this call on, until the pool closes
        (``async for event in pool.events(): ...``).

        A consumer that falls more than *max_queued* events behind loses the oldest ones.
        """
        return self._events.stream(max_queued)

    def __repr__(self) -> str:
        url = self._url
        return (
            f"<aiohotload.HotPool {url.strategy}://{url.driver}{url.path} "
            f"generation={self._lc.generation} target={self.target!r} {self._lc.state}>"
        )


class _Checkout(_ContextBase):
    """What :meth:`HotPool.acquire` returns (awaitable, or an async context manager), and
    how each query method holds its connection."""

    __slots__ = ("gen", "owned")

    def __init__(self, pool: HotPool, timeout: float | None, *, owned: bool) -> None:
        self.pool: HotPool = pool
        self.timeout = timeout
        self.connection: _Proxy | None = None
        self.done = False
        self.gen: Inner | None = None
        self.owned = owned  # acquire(): release() may be called on it inside the block

    async def __aenter__(self) -> _Proxy:
        if self.connection is not None or self.done:
            raise asyncpg.InterfaceError("a connection is already acquired")
        con, self.gen = await self.pool._checkout(self.timeout)
        if self.owned:
            self.pool._owners[con] = self.gen
        self.connection = con
        return con

    async def __aexit__(self, *exc: object) -> None:
        self.done = True
        con, self.connection = self.connection, None
        gen, self.gen = self.gen, None
        if con is None or gen is None:
            return
        if self.owned and self.pool._owners.pop(con, None) is None:
            return  # released inside the block already
        try:
            await self.pool._checkin(con, gen, None)
        except _RELEASE_ERRORS as failure:
            _release_failed(gen, failure)
        if isinstance(exc[1], _BROKEN_MID_QUERY):
            raise _broken_mid_query(con, exc[1]) from None

    def __await__(self) -> Generator[Any, None, _Proxy]:
        self.done = True
        return self.pool._acquire(self.timeout).__await__()


def create_pool(url: str, *, name: str | None = None, **pool_kwargs: Any) -> HotPool:
    """Create a :class:`HotPool` from a hotload URL; ``await`` it or use ``async with``.

    *url* is ``<strategy>://<driver>/<path>?<options>``, e.g.
    ``watchfiles://postgres/etc/app/dsn.txt?drain_timeout=10``. *pool_kwargs* are
    :func:`asyncpg.create_pool`'s (``min_size``, ``max_size``, ``init``, ``setup``, connect
    arguments...), for every inner pool, plus ``max_lifetime`` (seconds a connection may live
    before it is replaced at release; default: forever, as asyncpg) and
    ``max_lifetime_jitter`` (the fraction by which each connection's lifetime is shortened at
    random, default 0.1). A malformed URL, an unknown strategy or driver, or bad pool
    arguments raise here; a bad option, a missing source or an unreachable first DSN raise
    when awaited, as asyncpg raises them (``asyncpg.InvalidPasswordError``, ...). *name*
    labels the pool's events and metrics (default: the URL's path).
    """
    return HotPool(url, name=name, **pool_kwargs)


def _lifetime(pool_kwargs: dict[str, Any]) -> tuple[float, float] | None:
    """Pop ``max_lifetime`` and ``max_lifetime_jitter`` from *pool_kwargs*, checked."""
    lifetime = pool_kwargs.pop("max_lifetime", None)
    jitter = pool_kwargs.pop("max_lifetime_jitter", 0.1)
    if not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
        raise InvalidOptionError(
            f"max_lifetime_jitter must be a fraction in [0, 1); got {jitter!r}"
        )
    if lifetime is None:
        return None
    if not isinstance(lifetime, (int, float)) or lifetime <= 0:
        raise InvalidOptionError(f"max_lifetime must be seconds > 0; got {lifetime!r}")
    return float(lifetime), float(jitter)


def _check_asyncpg_arguments(pool_args: dict[str, Any]) -> None:
    """Raise now, as :func:`asyncpg.create_pool` does, for pool arguments asyncpg refuses
    (``min_size > max_size``, ``init_size < min_size``, a bad ``connection_class``...).

    asyncpg checks them when the pool object is made, which needs the event loop: outside a
    running loop they are checked when the pool is awaited instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    asyncpg.create_pool(**pool_args)  # makes no connection until awaited


def _expire_if_old(con: _Proxy, gen: Inner) -> None:
    """Close *con* at this release if its lifetime is over (``max_lifetime``)."""
    connector = gen.connector
    raw = _asyncpg.connection_of(con)
    if connector is None or raw is None:
        return
    deadline = connector.deadlines.get(raw)
    if deadline is not None and asyncio.get_running_loop().time() >= deadline:
        _asyncpg.expire_at_release(con)


def _release_failed(gen: Inner, exc: BaseException) -> None:
    """asyncpg resets a released connection. If the server dropped it meanwhile (shutdown,
    pg_terminate_backend, a cut network) the reset fails, asyncpg terminates it and raises.
    Raising that to the caller would report a query that succeeded (a committed write, then
    retried) as failed, or hide the query's own error: log it instead."""
    logger.debug(
        "releasing a connection of generation %d failed: %s", gen.number, type(exc).__name__
    )


def _broken_mid_query(con: _Proxy, exc: BaseException) -> BaseException:
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
    raw = _asyncpg.connection_of(con)
    if raw is None or raw.is_closed():
        return asyncpg.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        )
    return exc


def _disown_after_fork() -> None:
    """In a forked child: the pools inherited from the parent share its connections. Using
    them, or draining them at a swap, would break the parent's sessions, so they are disowned:
    nothing is closed (a graceful close would end the parent's session on the server) and the
    first use fails clearly."""
    for pool in list(_live):
        pool._inner.forked = True
        pool._lc.disown(
            "pool was inherited from its parent process by fork(); create a new pool in "
            "the child process"
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_after_fork)
