"""HotPool's generations: one inner asyncpg pool per DSN, and the lifecycle's operations on
them (open and validate, retire, wait until idle, close, kill, terminate)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _asyncpg
from ._connector import Connector
from ._lifecycle import Generation, Lifecycle
from .drivers import Driver, asyncpg_driver
from .dsn import as_url, writable_only

__all__ = ["Inner", "InnerPools", "Retired"]

logger = logging.getLogger("aiohotload")

# asyncpg's default min_size.
_DEFAULT_MIN_SIZE = 10
# How a new connection shows that its server does not take writes.
_NOT_WRITABLE = "a new connection found a server that does not take writes"
# Bound on closing an idle connection of a retired pool (its server may have gone silent).
_CLOSE_TIMEOUT = 5.0


class Retired(asyncpg.InterfaceError):
    """Raised in a caller queued on a pool that was just retired: it moves to the new one."""


class Inner(Generation):
    """One inner pool, and the number of callers inside it."""

    __slots__ = ("acquire", "connector", "idle", "pool", "users")

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.pool: Any = None  # an asyncpg.Pool, or a third-party driver's pool
        self.acquire: Callable[[float | None], Awaitable[PoolConnectionProxy]]
        self.connector: Connector | None = None
        self.users = 0
        self.idle = asyncio.Event()  # set once retired with no user left

    def leave(self) -> None:
        """A caller is done with this generation."""
        self.users -= 1
        if self.users == 0 and self.retired:
            self.idle.set()


class InnerPools:
    """The lifecycle's operations (:class:`~aiohotload._lifecycle.Ops`) for HotPool."""

    def __init__(
        self,
        driver: Driver,
        pool_kwargs: dict[str, Any],
        connect_kwargs: dict[str, Any],
        lifetime: tuple[float, float] | None,
        *,
        follow_primary: bool = False,
    ) -> None:
        self._driver = driver
        self._pool_kwargs = pool_kwargs
        self.connect_kwargs = connect_kwargs
        """Passed to every connection of later generations (``set_connect_args``)."""
        self._lifetime = lifetime
        self._follow_primary = follow_primary
        self.on_login_refused: Callable[[Generation], None] = lambda gen: None
        self.on_not_writable: Callable[[Generation, str], None] = lambda gen, reason: None
        self._opened_first = False

    async def open(self, dsn: str) -> Inner:
        """Open an inner pool on *dsn* and prove it before it serves.

        The first pool opens as asyncpg's ``create_pool`` does: ``init_size`` (default
        ``min_size``) connections, each through ``init``, and ``setup`` only when a caller
        acquires; if that is none, one connection logs in to prove the DSN and is closed
        (``init`` then runs at the first acquire, as with asyncpg).
        A later one, a reload that would replace a working pool, is proven by acquiring and
        releasing one connection, so that a DSN whose ``init`` or ``setup`` fails never
        replaces one that works. It is swapped in then; the rest of ``min_size`` opens in the
        background (asyncpg 0.32's floor upkeep; before 0.32, as callers need them), and
        callers meanwhile get connections as they come. Passing ``init_size`` opens that many
        before the swap instead. A driver other than asyncpg is always proven by an acquire.
        """
        gen = Inner(dsn)
        kwargs = {**self._pool_kwargs, **self.connect_kwargs}
        is_asyncpg = self._driver is asyncpg_driver
        min_size = kwargs.get("min_size", _DEFAULT_MIN_SIZE)
        floor = None
        if self._opened_first and is_asyncpg and "init_size" not in kwargs:
            kwargs["min_size"], floor = min(1, min_size), min_size
        if self._follow_primary:
            writable_only(dsn, kwargs)
        if is_asyncpg:
            gen.connector = Connector(
                kwargs.pop("connect", None) or asyncpg.connect,
                lambda: self.on_login_refused(gen),
                self._lifetime,
                lambda: self.on_not_writable(gen, _NOT_WRITABLE),
            )
            kwargs["connect"] = gen.connector
        pool = None
        try:
            pool = await self._driver(dsn, **kwargs)
            if self._opened_first or not is_asyncpg:
                async with pool.acquire():
                    pass
            elif pool.get_idle_size() == 0:
                # asyncpg opened no connection (init_size 0), so proved nothing: log in once.
                con = await _asyncpg.connect_as_pool(pool)
                if isinstance(con, asyncpg.Connection):  # else asyncpg says so at acquire
                    await con.close(timeout=_CLOSE_TIMEOUT)
            if floor is not None:
                _asyncpg.set_floor(pool, floor)
            if min_size == 0:
                # A pool that keeps no connection keeps none for having been proven either.
                await asyncio.gather(*_asyncpg.close_idle(pool, _CLOSE_TIMEOUT))
        except BaseException:
            self._stop(gen, pool)
            raise
        gen.pool = pool
        gen.acquire = _asyncpg.fast_acquire(pool)
        self._opened_first = True
        return gen

    async def expire_idle(self, lifecycle: Lifecycle[Inner]) -> None:
        """Close the current generation's idle connections past their ``max_lifetime``, now
        and then, for ever (those in use are checked when released). asyncpg refills the
        pool as needed."""
        if self._lifetime is None:
            return
        period = min(60.0, max(0.05, self._lifetime[0] / 4))
        while True:
            await asyncio.sleep(period)
            gen = lifecycle.current
            if gen is None or gen.connector is None:
                continue
            now = asyncio.get_running_loop().time()
            for con in _asyncpg.idle(gen.pool):
                born, deadline = gen.connector.lifetimes.get(con, (now, math.inf))
                if now >= deadline:
                    lifecycle.connection_expired(gen, now - born)
                    with contextlib.suppress(Exception):  # closed either way
                        await con.close(timeout=_CLOSE_TIMEOUT)

    def set_connect_args(self, gen: Inner, connect_kwargs: dict[str, Any]) -> None:
        """Use *connect_kwargs* for *gen*'s new connections from now on."""
        self.connect_kwargs = connect_kwargs
        if isinstance(gen.pool, asyncpg.Pool):
            gen.pool.set_connect_args(as_url(gen.dsn), **connect_kwargs)

    def discard(self, gen: Inner) -> None:
        """Terminate a pool that never served."""
        self._stop(gen, gen.pool)

    def retire(self, gen: Inner) -> None:
        """Open nothing more for *gen*; move its waiting callers on; its connections close
        as they are released."""
        if gen.users == 0:
            gen.idle.set()
        # The refill first: stopping the connector under it would make it log a failure.
        _asyncpg.stop_refilling(gen.pool)
        if gen.connector is not None:
            gen.connector.stop()
        _asyncpg.expire(gen.pool)
        moved = _asyncpg.wake_waiters(gen.pool, lambda: Retired("pool was replaced"))
        if moved:
            logger.debug("moved %d waiting caller(s) off generation %d", moved, gen.number)

    async def wait_idle(self, gen: Inner) -> None:
        """Close *gen*'s idle connections now, then wait for the callers still using it."""
        if not isinstance(gen.pool, asyncpg.Pool):
            await gen.pool.expire_connections()
        closing = _asyncpg.close_idle(gen.pool, _CLOSE_TIMEOUT)
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        await gen.idle.wait()

    async def close(self, gen: Inner) -> None:
        """Close an idle pool gracefully."""
        await gen.pool.close()
        _asyncpg.disarm(gen.pool)

    async def kill(self, gen: Inner) -> int:
        """Cancel on the server what *gen*'s checked-out connections run, then terminate it;
        returns how many cancel requests were sent."""
        # Before the cancel requests: callers waiting on a new connection to the old server
        # move on now.
        if gen.connector is not None:
            gen.connector.stop()
        cancelled = await _asyncpg.cancel_queries(_asyncpg.in_use(gen.pool))
        self._stop(gen, gen.pool)
        return cancelled

    def terminate(self, gen: Inner) -> None:
        """Terminate *gen* at once."""
        self._stop(gen, gen.pool)

    def _stop(self, gen: Inner, pool: Any) -> None:
        connections = set(_asyncpg.all_connections(pool))
        if gen.connector is not None:
            gen.connector.stop()
            # Also those of a pool that failed to open (asyncpg < 0.32 leaves them open).
            connections.update(gen.connector.made)
        for con in connections:
            _asyncpg.abort(con)
        if pool is not None:
            with contextlib.suppress(asyncpg.InterfaceError):  # never initialised
                pool.terminate()
            _asyncpg.disarm(pool)
