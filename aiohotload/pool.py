"""HotPool: an :class:`asyncpg.Pool` whose DSN is reloaded live.

HotPool is the asyncpg-compatible front. The swap machinery is the generation lifecycle
(``_lifecycle.py``), the inner asyncpg pools it drives are in ``_inner_pools.py``, and every
connection handed out and given back goes through ``_checkout.py``.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncIterable, Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import asyncpg
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from ._checkout import Checkout, Checkouts
from ._inner_pools import Inner, InnerPools
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

# asyncpg.Pool's private attributes. Code written against asyncpg reads some of them
# (``pool._queue.qsize()``, ``len(pool._holders)`` in monitoring, ``_maintenance_task`` in
# asyncpg's own test harness): on a HotPool they read the current inner pool's.
_ASYNCPG_PRIVATE = frozenset(name for name in asyncpg.Pool.__slots__ if not name.startswith("__"))


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
        self._inner = InnerPools(
            driver, pool_args, connect_args, lifetime, follow_primary=self._url.follow_primary
        )
        self._lc: Lifecycle[Inner] = Lifecycle(
            self._url, self._inner, self._events, name=self._name, action="open a pool on"
        )
        self._inner.on_login_refused = self._lc.login_refused
        self._inner.on_not_writable = self._lc.not_writable
        self._checkouts = Checkouts(self._lc)
        self._checkouts.lifetimes = lifetime is not None
        if lifetime is not None:
            inner, lc = self._inner, self._lc
            lc.run_in_background(lambda: inner.expire_idle(lc))

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

    def acquire(self, *, timeout: float | None = None) -> _ContextBase:
        """Acquire a connection from the current inner pool (``await`` or ``async with``)."""
        return Checkout(self, self._checkouts, timeout, owned=True)

    async def release(self, connection: _Proxy, *, timeout: float | None = None) -> None:
        """Release *connection* to the inner pool it came from, also after a swap.

        As with asyncpg, a release that runs out of *timeout* raises
        :class:`asyncio.TimeoutError`; a connection found broken at release is logged, not
        raised (the caller's work on it is done). Releasing to a retired generation closes
        the connection and never raises.
        """
        await self._checkouts.release(connection, timeout)

    def _use(self) -> Checkout:
        """A connection for one query method (``async with self._use() as con``)."""
        return Checkout(self, self._checkouts, None, owned=False)

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

    if not TYPE_CHECKING:  # a type checker keeps flagging misspelt attributes

        def __getattr__(self, name: str) -> Any:
            # Only reached for what HotPool lacks: asyncpg's private slots, never set on it.
            if name in _ASYNCPG_PRIVATE:
                lc = self.__dict__.get("_lc")
                gen = lc.current if lc is not None else None
                if gen is not None and hasattr(gen.pool, name):
                    return getattr(gen.pool, name)
                if name == "_maintenance_task":  # none runs: as asyncpg's before init, after close
                    return None
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        url = self._url
        return (
            f"<aiohotload.HotPool {url.strategy}://{url.driver}{url.path} "
            f"generation={self._lc.generation} target={self.target!r} {self._lc.state}>"
        )


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
