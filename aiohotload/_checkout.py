"""HotPool's checkout path: every connection handed out and given back goes through
:class:`Checkouts`, and :class:`Checkout` is how a caller holds one (``pool.acquire()``, and
each query method)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from . import _asyncpg
from ._inner_pools import Inner, Retired
from ._lifecycle import Lifecycle

if TYPE_CHECKING:
    _ContextBase = PoolAcquireContext[asyncpg.Record]
    Proxy = PoolConnectionProxy[asyncpg.Record]
else:
    _ContextBase = PoolAcquireContext
    Proxy = PoolConnectionProxy

__all__ = ["Checkout", "Checkouts", "Proxy"]

logger = logging.getLogger("aiohotload")

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


class Checkouts:
    """Hands out connections of the current generation and takes them back."""

    __slots__ = ("_lc", "lifetimes", "owners")

    def __init__(self, lifecycle: Lifecycle[Inner]) -> None:
        self._lc = lifecycle
        self.lifetimes = False
        """Whether connections have a ``max_lifetime`` to check at release."""
        self.owners: dict[Proxy, Inner] = {}
        """Connections handed out by ``acquire()``, with their generation, for release()."""

    async def take(self, timeout: float | None) -> tuple[Proxy, Inner]:
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
            await self.give_back_retired(con, gen, None)

    async def take_owned(self, timeout: float | None) -> Proxy:
        """:meth:`take`, for a caller that gives it back with ``release()``."""
        con, gen = await self.take(timeout)
        self.owners[con] = gen
        return con

    def give_back(self, con: Proxy, gen: Inner, timeout: float | None) -> Awaitable[None]:
        """Release *con* to *gen*'s pool; returns the awaitable release."""
        if gen.retired:
            return self.give_back_retired(con, gen, timeout)
        # Counting the caller out before the release completes is safe: a drain only closes
        # the pool once this count is 0, and asyncpg's close() waits for in-flight releases.
        gen.users -= 1
        if self.lifetimes:
            self._expire_if_old(con, gen)
        return gen.pool.release(con, timeout=timeout)  # type: ignore[no-any-return]

    def _expire_if_old(self, con: Proxy, gen: Inner) -> None:
        """Close *con* at this release if its lifetime is over (``max_lifetime``)."""
        raw = _asyncpg.connection_of(con)
        lifetime = gen.connector.lifetimes.get(raw) if gen.connector and raw else None
        if lifetime is None:
            return
        now = asyncio.get_running_loop().time()
        born, deadline = lifetime
        if now >= deadline:
            _asyncpg.expire_at_release(con)
            self._lc.connection_expired(gen, now - born)

    def query_failed(self, gen: Inner, exc: BaseException) -> None:
        """A caller's work on *gen* raised *exc*: a server that refuses writes is a sign of a
        failover."""
        if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
            self._lc.not_writable(gen, "a query failed with 25006 read_only_sql_transaction")

    async def give_back_retired(self, con: Proxy, gen: Inner, timeout: float | None) -> None:
        """Release *con* to a retired generation: asyncpg closes it (it was expired), bounded
        so a silent old server cannot hang the caller, and a failure to close it cleanly is
        not the caller's problem."""
        try:
            await gen.pool.release(con, timeout=_RELEASE_TIMEOUT if timeout is None else timeout)
        except _RELEASE_ERRORS as exc:
            logger.debug(
                "closing a connection of generation %d failed: %s", gen.number, type(exc).__name__
            )
        finally:
            gen.leave()

    async def release(self, con: Proxy, timeout: float | None) -> None:
        """``HotPool.release()``: see its docstring."""
        gen = self.owners.pop(con, None)
        if gen is None:
            if isinstance(con, PoolConnectionProxy) and _asyncpg.connection_of(con) is None:
                return  # already released, as asyncpg allows
            raise asyncpg.InterfaceError(
                f"HotPool.release() received invalid connection: {con!r} "
                "is not a member of this pool"
            )
        retired = gen.retired
        try:
            await self.give_back(con, gen, timeout)
        except asyncio.TimeoutError:
            if not retired:
                raise
        except _RELEASE_ERRORS as exc:
            _release_failed(gen, exc)


class Checkout(_ContextBase):
    """What ``HotPool.acquire()`` returns (awaitable, or an async context manager), and how
    each query method holds its connection."""

    __slots__ = ("checkouts", "gen", "owned")

    def __init__(
        self, pool: Any, checkouts: Checkouts, timeout: float | None, *, owned: bool
    ) -> None:
        self.pool = pool
        self.checkouts = checkouts
        self.timeout = timeout
        self.connection: Proxy | None = None
        self.done = False
        self.gen: Inner | None = None
        self.owned = owned  # acquire(): release() may be called on it inside the block

    async def __aenter__(self) -> Proxy:
        if self.connection is not None or self.done:
            raise asyncpg.InterfaceError("a connection is already acquired")
        con, self.gen = await self.checkouts.take(self.timeout)
        if self.owned:
            self.checkouts.owners[con] = self.gen
        self.connection = con
        return con

    async def __aexit__(self, *exc: object) -> None:
        self.done = True
        con, self.connection = self.connection, None
        gen, self.gen = self.gen, None
        if con is None or gen is None:
            return
        if self.owned and self.checkouts.owners.pop(con, None) is None:
            return  # released inside the block already
        error = exc[1]
        broken = _broken_mid_query(con, error) if isinstance(error, _BROKEN_MID_QUERY) else None
        if isinstance(broken, asyncpg.ConnectionDoesNotExistError):
            # Known dead: a release would reset it, waiting for an answer that never comes
            # when its socket stays open (asyncpg before 0.32 does not mark it closed).
            raw = _asyncpg.connection_of(con)
            if raw is not None:
                raw.terminate()
        try:
            await self.checkouts.give_back(con, gen, None)
        except _RELEASE_ERRORS as failure:
            _release_failed(gen, failure)
        if isinstance(error, BaseException):
            self.checkouts.query_failed(gen, error)
        if broken is not None:
            raise broken from None

    def __await__(self) -> Generator[Any, None, Proxy]:
        self.done = True
        return self.checkouts.take_owned(self.timeout).__await__()


def _release_failed(gen: Inner, exc: BaseException) -> None:
    """asyncpg resets a released connection. If the server dropped it meanwhile (shutdown,
    pg_terminate_backend, a cut network) the reset fails, asyncpg terminates it and raises.
    Raising that to the caller would report a query that succeeded (a committed write, then
    retried) as failed, or hide the query's own error: log it instead."""
    logger.debug(
        "releasing a connection of generation %d failed: %s", gen.number, type(exc).__name__
    )


def _broken_mid_query(con: Proxy, exc: BaseException) -> BaseException:
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
