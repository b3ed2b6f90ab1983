"""Drivers: what builds an inner pool from a DSN. The built-in one is asyncpg."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import anyio
import asyncpg
from asyncpg import connect_utils

from ._registry import Registry
from .dsn import as_url
from .errors import RegistryError, UnknownDriverError

__all__ = [
    "Driver",
    "abandon_connect",
    "asyncpg_driver",
    "cancel_in_flight",
    "cancel_queries",
    "driver_names",
    "get_driver",
    "register_driver",
    "stop_connecting",
    "terminate_pool",
    "unregister_driver",
]

logger = logging.getLogger("aiohotload")

#: Bound on sending cancel requests to an old server (force kill, drain timeout).
CANCEL_TIMEOUT = 5.0


@runtime_checkable
class Driver(Protocol):
    """An async factory: ``await driver(dsn, **pool_kwargs)`` returns an open inner pool with
    the :class:`asyncpg.Pool` interface."""

    def __call__(self, dsn: str, **pool_kwargs: Any) -> Awaitable[asyncpg.Pool]: ...


async def asyncpg_driver(dsn: str, **pool_kwargs: Any) -> asyncpg.Pool:
    """Open an :class:`asyncpg.Pool` on *dsn* with *pool_kwargs*.

    asyncpg reads only URL DSNs; a libpq ``key=value`` DSN is converted first, and any DSN
    asyncpg would misread is refused with :class:`~aiohotload.InvalidDSNError`
    (:func:`~aiohotload.dsn.as_url`). The pool's new connections can be abandoned with
    :func:`stop_connecting`.
    """
    dsn = as_url(dsn)
    connect = pool_kwargs.pop("connect", None) or asyncpg.connect
    return await asyncpg.create_pool(dsn, connect=_StoppableConnect(connect), **pool_kwargs)


def stop_connecting(pool: asyncpg.Pool) -> None:
    """Abandon the connections *pool* is opening, and open no more: each such attempt raises
    :class:`asyncpg.InterfaceError` at once. For pools about to be terminated.

    Terminating an asyncpg pool closes the connections it has, not those it is opening: a
    caller waiting for a new connection to an old server that stopped answering would wait
    for asyncpg's connect timeout (60 s), long after the drain ended, only to be refused by
    the terminated pool. Pools not opened by :func:`asyncpg_driver` are left alone.
    """
    connect = getattr(pool, "_connect", None)
    if isinstance(connect, _StoppableConnect):
        connect.stop()


def terminate_pool(pool: asyncpg.Pool) -> None:
    """Terminate *pool* at once: :meth:`asyncpg.Pool.terminate`, after
    :func:`stop_connecting`, with one difference for work still running on it.

    ``Connection.terminate()`` drops the connection's protocol object, so a query that was
    between two steps when it ran fails with ``AttributeError: 'NoneType' object has no
    attribute 'bind_execute'``, even on a connection the caller holds directly. Aborting
    through the protocol instead (what ``terminate()`` does first) and keeping it makes such a
    query fail with asyncpg's own ``InterfaceError: connection is closed``.
    """
    stop_connecting(pool)
    for holder in getattr(pool, "_holders", ()):
        con = getattr(holder, "_con", None)
        protocol = getattr(con, "_protocol", None)
        if con is None or protocol is None or not hasattr(con, "_aborted"):
            continue  # not asyncpg's layout: Pool.terminate() below does it all
        if not con._aborted:
            protocol.abort()  # also drops the socket of a connection in a graceful close
            con._aborted = True  # so terminate() below keeps the protocol: see above
    pool.terminate()


class _StoppableConnect:
    """asyncpg's ``connect=`` for a pool: *connect*, until :meth:`stop` is called."""

    __slots__ = ("_connect", "_stop")

    def __init__(self, connect: Callable[..., Awaitable[asyncpg.Connection]]) -> None:
        self._connect = connect
        self._stop: asyncio.Future[None] | None = None  # made on first use, in the loop

    def stop(self) -> None:
        if self._stop is None:
            self._stop = asyncio.get_running_loop().create_future()
        if not self._stop.done():
            self._stop.set_result(None)

    async def __call__(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        if self._stop is None:
            self._stop = asyncio.get_running_loop().create_future()
        if self._stop.done():
            raise asyncpg.InterfaceError("pool is closing: no new connections")
        # A task of its own, so stop() can abandon it without cancelling the caller.
        opening = asyncio.ensure_future(self._connect(*args, **kwargs))
        try:
            await asyncio.wait((opening, self._stop), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller was cancelled
            abandon_connect(opening)
            raise
        # Stopped wins even over a connection made in the same instant: the pool it would
        # go to is being terminated, and would never close it.
        if self._stop.done():
            abandon_connect(opening)
            raise asyncpg.InterfaceError("pool is closing: connection attempt abandoned")
        return opening.result()


def abandon_connect(opening: asyncio.Future[asyncpg.Connection]) -> None:
    """Give up a connection attempt (a task running ``asyncpg.connect``): cancel it, or close
    the connection it made anyway, also when it completes in the same instant."""
    if not opening.done():
        opening.cancel()  # asyncpg closes the socket of a cancelled connect
    # Done now or later: a connection it made after all is closed, an error of its own is
    # retrieved, unlogged.
    opening.add_done_callback(_close_if_connected)


def _close_if_connected(opening: asyncio.Future[asyncpg.Connection]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().terminate()


def _coerce(item: object) -> Driver:
    if callable(item):
        return item
    raise RegistryError(
        "a driver must be an async callable (dsn, **pool_kwargs) -> pool; "
        f"got {type(item).__name__}"
    )


_registry: Registry[Driver] = Registry("driver", "aiohotload.drivers", UnknownDriverError, _coerce)


def register_driver(name: str, factory: object, *, replace: bool = False) -> None:
    """Register *factory* (``async (dsn, **pool_kwargs) -> pool``) as the URL host *name*.

    Raises :class:`~aiohotload.RegistryError` for an empty or already registered name
    unless ``replace=True``.
    """
    _registry.register(name, factory, replace=replace)


def unregister_driver(name: str) -> None:
    """Remove the driver registered under *name*, if any."""
    _registry.unregister(name)


def get_driver(name: str) -> Driver:
    """The driver registered under *name*; :class:`~aiohotload.UnknownDriverError` if none."""
    return _registry.get(name)


def driver_names() -> list[str]:
    """Names of every registered driver, entry-point plugins included."""
    return _registry.names()


register_driver("postgres", asyncpg_driver)
register_driver("postgresql", asyncpg_driver)


async def cancel_in_flight(pool: asyncpg.Pool, timeout: float = CANCEL_TIMEOUT) -> int:
    """Ask the server to cancel whatever each checked-out connection of *pool* is running.

    Closing a socket does not stop a query: the backend notices only when it next writes, so
    a long query keeps running (and holding locks) on the old server. PostgreSQL's cancel
    request needs no login (it carries the backend's secret key), so it works after a password
    rotation too. Returns how many cancel requests were sent. Non-asyncpg pools are skipped.
    """
    connections = []
    for holder in getattr(pool, "_holders", ()):
        con = getattr(holder, "_con", None)
        if con is not None and getattr(holder, "_in_use", None) is not None:
            connections.append(con)
    return await cancel_queries(connections, timeout)


def cancel_queries(
    connections: Iterable[asyncpg.Connection], timeout: float = CANCEL_TIMEOUT
) -> Awaitable[int]:
    """Ask the server to cancel whatever each of *connections* is running (see
    :func:`cancel_in_flight`); await the result for how many requests were sent.

    What each request needs is read at the call, so the connections may be terminated before
    the result is awaited. Closed connections are skipped.
    """
    targets = []
    for con in connections:
        protocol = getattr(con, "_protocol", None)
        if con.is_closed() or protocol is None:
            continue
        targets.append(
            connect_utils._cancel(  # type: ignore[attr-defined]
                loop=asyncio.get_running_loop(),
                addr=con._addr,  # type: ignore[attr-defined]
                params=con._params,  # type: ignore[attr-defined]
                backend_pid=protocol.backend_pid,
                backend_secret=protocol.backend_secret,
            )
        )
    return _send_cancels(targets, timeout)


async def _send_cancels(targets: list[Awaitable[object]], timeout: float) -> int:
    if not targets:
        return 0
    results: list[object] = []
    with anyio.move_on_after(timeout) as scope:
        results = await asyncio.gather(*targets, return_exceptions=True)
    if scope.cancelled_caught:
        logger.warning("cancel requests to the old server timed out after %.1fs", timeout)
        return len(targets)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        logger.warning(
            "%d of %d cancel requests failed: %s",
            len(failed),
            len(targets),
            type(failed[0]).__name__,
        )
    return len(targets)
