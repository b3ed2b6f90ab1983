"""Every use of asyncpg's private internals, in one place.

aiohotload needs a few things asyncpg's public API does not offer: wake the callers queued on
a pool that is being retired, close its idle connections at once, cancel on the server what its
checked-out connections run, and so on. Each function below says why it is needed and what it
touches. All of it was checked against asyncpg 0.30.0, 0.31.0 and 0.32.0 (the range
``pyproject.toml`` allows), and ``tests/test_asyncpg_internals.py`` pins every behaviour relied
on against the installed asyncpg, so an upgrade that changes one fails there, in one place.

Every function takes any pool or connection: anything that is not asyncpg's own (a third-party
driver's pool) is left alone, and the caller falls back to the public API.
"""

# This module is the one place where asyncpg's private names are used (see above).
# ruff: noqa: SLF001

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import asyncpg
from asyncpg import connect_utils
from asyncpg.pool import PoolConnectionProxy

logger = logging.getLogger("aiohotload")

#: Bound on sending cancel requests to an old server (force kill, drain timeout).
CANCEL_TIMEOUT = 5.0

__all__ = [
    "abort",
    "all_connections",
    "cancel_queries",
    "cancel_request",
    "close_idle",
    "connect_as_pool",
    "connection_of",
    "disarm",
    "expire",
    "expire_at_release",
    "fast_acquire",
    "idle",
    "in_use",
    "set_floor",
    "stop_refilling",
    "wake_waiters",
]


def fast_acquire(pool: object) -> Callable[[float | None], Awaitable[PoolConnectionProxy]]:
    """The fastest way to acquire from *pool*: ``Pool._acquire(timeout)``.

    ``Pool.acquire()`` builds a ``PoolAcquireContext`` around ``_acquire``; calling it directly
    saves an allocation and a frame on the hottest path. Other pools: ``acquire(timeout=)``.
    """
    if isinstance(pool, asyncpg.Pool):
        acquire: Callable[[float | None], Awaitable[PoolConnectionProxy]] = pool._acquire  # type: ignore[attr-defined]
        return acquire
    public: Any = pool
    return lambda timeout: public.acquire(timeout=timeout)


def connection_of(proxy: object) -> asyncpg.Connection | None:
    """The connection behind a pool proxy (``PoolConnectionProxy._con``), None once released.

    Used to tell a released proxy from a foreign object, and a query broken because we
    terminated its connection from one that failed on its own.
    """
    con = getattr(proxy, "_con", None) if isinstance(proxy, PoolConnectionProxy) else None
    return con if isinstance(con, asyncpg.Connection) else None


def wake_waiters(pool: object, error: Callable[[], BaseException]) -> int:
    """Make every caller queued in *pool*'s ``acquire`` raise ``error()`` now; returns how
    many.

    A caller that finds no free connection waits in ``Pool._queue.get()`` (an asyncio queue of
    connection holders). When the pool is retired it must not stay there: a holder released
    by the old generation would hand it a connection to the old server, or reconnect to it.
    Failing the queue's getter futures (``Queue._getters``) makes ``get()`` raise *error*, and
    ``Queue.get`` removes the failed getter itself.
    """
    if not isinstance(pool, asyncpg.Pool):
        return 0
    queue: asyncio.Queue[Any] | None = pool._queue  # type: ignore[attr-defined]
    if queue is None:
        return 0
    woken = 0
    for getter in list(queue._getters):  # type: ignore[attr-defined]
        if not getter.done():
            getter.set_exception(error())
            woken += 1
    return woken


def expire(pool: object) -> None:
    """Make *pool* close each connection when it is next released (or acquired).

    ``Pool.expire_connections()`` does it by bumping ``Pool._generation``, but as a coroutine:
    at a swap it must happen before the next release can return a connection to the idle
    queue, so it is done here, synchronously.
    """
    if isinstance(pool, asyncpg.Pool):
        pool._generation += 1  # type: ignore[attr-defined]


def disarm(pool: object) -> None:
    """Cancel the idle timers of a closed *pool*'s connection holders.

    asyncpg arms a timer on each released holder (``max_inactive_connection_lifetime``, 300 s
    by default) and cancels it when the holder's connection closes through the holder. A
    holder whose expired connection was dropped for a reconnect that then failed (a retired
    generation opens nothing) keeps its timer, and through it the whole pool, until it fires:
    every swap would hold its old pool in memory for that long. ``_maybe_cancel_inactive_
    callback()`` is the holder's own way to cancel it.
    """
    if isinstance(pool, asyncpg.Pool):
        for holder in pool._holders:  # type: ignore[attr-defined]
            holder._maybe_cancel_inactive_callback()


def set_floor(pool: object, min_size: int) -> None:
    """Make *pool*, opened with ``min_size=1`` to be swapped in at its first connection (or
    to prove its DSN), keep *min_size* connections from now on.

    asyncpg 0.32 refuses an ``init_size`` below ``min_size``, so a pool that opens one
    connection has ``min_size=1``; setting ``Pool._minsize`` and scheduling its floor upkeep
    (``Pool._schedule_min_size_maintenance()``) opens the rest in the background. Before 0.32
    ``min_size`` only sized the first connections: the pool then grows as callers need it.
    """
    if not isinstance(pool, asyncpg.Pool):
        return
    pool._minsize = min_size  # type: ignore[attr-defined]
    schedule = getattr(pool, "_schedule_min_size_maintenance", None)
    if schedule is not None:
        schedule()


def stop_refilling(pool: object) -> None:
    """Keep a retired pool from reconnecting to the old server on its own.

    asyncpg 0.32 refills a pool up to ``min_size`` whenever a connection closes (its
    ``_maintain_min_size`` task), and a drain closes each released connection: without this
    the old pool would open new connections to the old server, with credentials that may just
    have been rotated away. ``Pool._minsize = 0`` turns the refill off, and a refill running
    now (``Pool._maintenance_task``) is cancelled: left to fail when the pool's connector
    stops, it would log a warning with a traceback at every swap. (0.30 and 0.31 have no
    refill; ``_minsize`` only sized the initial connections there.)
    """
    if isinstance(pool, asyncpg.Pool):
        pool._minsize = 0  # type: ignore[attr-defined]
        refilling = getattr(pool, "_maintenance_task", None)
        if refilling is not None:
            refilling.cancel()


async def connect_as_pool(pool: asyncpg.Pool) -> object:
    """Open one connection as *pool* opens its own, without its ``init``: its ``connect=``
    (``Pool._connect``) called with its arguments (``_connect_args``, ``_connect_kwargs``,
    ``_connection_class``, ``_record_class``), as ``Pool._get_new_connection()`` does before
    it runs ``init``. Returns what ``connect=`` returned."""
    return await pool._connect(  # type: ignore[attr-defined]
        *pool._connect_args,  # type: ignore[attr-defined]
        loop=asyncio.get_running_loop(),
        connection_class=pool._connection_class,  # type: ignore[attr-defined]
        record_class=pool._record_class,  # type: ignore[attr-defined]
        **pool._connect_kwargs,  # type: ignore[attr-defined]
    )


def close_idle(pool: object, timeout: float) -> list[Awaitable[None]]:
    """Start closing every idle connection of *pool* (gracefully, bounded by *timeout*);
    returns the closes to await.

    ``Pool.close()`` waits until every connection is released before it closes any, so the
    idle ones of a draining pool would stay open on the old server until the last caller is
    done. Closing a connection through itself lets its holder know (asyncpg's own path).
    """
    return [con.close(timeout=timeout) for con in idle(pool)]


def idle(pool: object) -> list[asyncpg.Connection]:
    """The connections of *pool* that are open and not checked out (holders whose
    ``_in_use`` is None)."""
    if not isinstance(pool, asyncpg.Pool):
        return []
    return [
        holder._con
        for holder in pool._holders  # type: ignore[attr-defined]
        if holder._in_use is None and holder._con is not None and not holder._con.is_closed()
    ]


def in_use(pool: object) -> list[asyncpg.Connection]:
    """The connections of *pool* checked out now (holders with ``_in_use`` set)."""
    if not isinstance(pool, asyncpg.Pool):
        return []
    return [
        holder._con
        for holder in pool._holders  # type: ignore[attr-defined]
        if holder._con is not None and holder._in_use is not None
    ]


def all_connections(pool: object) -> list[asyncpg.Connection]:
    """Every connection *pool* holds now, idle or checked out."""
    if not isinstance(pool, asyncpg.Pool):
        return []
    return [h._con for h in pool._holders if h._con is not None]  # type: ignore[attr-defined]


def abort(con: asyncpg.Connection) -> None:
    """Drop *con*'s socket at once, keeping its protocol object.

    ``Connection.terminate()`` sets ``_protocol`` to None, so a query that was between two
    steps fails with ``AttributeError: 'NoneType' object has no attribute 'bind_execute'``,
    even on a connection the caller holds directly. Aborting through the protocol and setting
    ``_aborted`` instead (what ``terminate()`` does first) makes it fail with asyncpg's own
    ``InterfaceError: connection is closed``; the later ``terminate()`` of the pool then only
    cleans up. It also drops the socket of a connection in a graceful close.
    """
    protocol = con._protocol  # type: ignore[attr-defined]
    if protocol is not None and not con._aborted:  # type: ignore[attr-defined]
        protocol.abort()
        con._aborted = True  # type: ignore[attr-defined]


def cancel_request(con: asyncpg.Connection) -> Awaitable[None] | None:
    """A PostgreSQL cancel request for what *con* runs, or None if it is closed.

    Closing a socket does not stop a query: the backend notices only when it next writes, so a
    long query keeps running (and holding locks) on the old server. The cancel request needs no
    login (it carries the backend's key), so it works after a password rotation too. asyncpg
    sends one only for its own timeouts (``connect_utils._cancel`` with the connection's
    ``_addr``, ``_params`` and the protocol's backend pid and secret); everything it needs is
    read now, so *con* may be terminated before the request is awaited.
    """
    protocol = con._protocol  # type: ignore[attr-defined]
    if con.is_closed() or protocol is None:
        return None
    request: Awaitable[None] = connect_utils._cancel(  # type: ignore[attr-defined]
        loop=asyncio.get_running_loop(),
        addr=con._addr,  # type: ignore[attr-defined]
        params=con._params,  # type: ignore[attr-defined]
        backend_pid=protocol.backend_pid,
        backend_secret=protocol.backend_secret,
    )
    return request


def expire_at_release(proxy: object) -> None:
    """Make the pool close *proxy*'s connection when it is released, and open a new one for
    the next caller (``max_lifetime``).

    asyncpg closes a released connection whose holder's ``_generation`` differs from the
    pool's (that is how ``expire_connections()`` works, for all holders at once); setting one
    holder's to None expires just that connection.
    """
    holder = getattr(proxy, "_holder", None) if isinstance(proxy, PoolConnectionProxy) else None
    if holder is not None:
        holder._generation = None


def cancel_queries(
    connections: Iterable[asyncpg.Connection], timeout: float = CANCEL_TIMEOUT
) -> Awaitable[int]:
    """Send a cancel request (:func:`cancel_request`) for each of *connections*, bounded by
    *timeout*; await the result for how many were sent. What each request needs is read at
    the call, so the connections may be terminated before the result is awaited."""
    requests = [r for con in connections if (r := cancel_request(con)) is not None]
    return _send(requests, timeout)


async def _send(requests: list[Awaitable[None]], timeout: float) -> int:
    if not requests:
        return 0
    results: list[object] = []
    with anyio.move_on_after(timeout) as scope:
        results = await asyncio.gather(*requests, return_exceptions=True)
    if scope.cancelled_caught:
        logger.warning("cancel requests to the old server timed out after %.1fs", timeout)
        return len(requests)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        logger.warning(
            "%d of %d cancel requests failed: %s",
            len(failed),
            len(requests),
            type(failed[0]).__name__,
        )
    return len(requests)
