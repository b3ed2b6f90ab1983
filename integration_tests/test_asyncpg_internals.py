"""Pins every asyncpg private behaviour ``aiohotload/_asyncpg.py`` relies on, against the
installed asyncpg and a real server: an asyncpg release that changes one fails here, by
name, before it can fail a swap in production."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from aiohotload import _asyncpg
from aiohotload.testing import PgServer, RoleFactory, wait_until

pytestmark = pytest.mark.timeout(60)


class Woken(Exception):
    pass


@pytest.fixture
async def dsn(pg_a: PgServer, role: RoleFactory) -> str:
    user, password = await role(pg_a)
    return pg_a.dsn(user, password)


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    made = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    try:
        yield made
    finally:
        made.terminate()


async def backend_alive(server: PgServer, pid: int) -> bool:
    return bool(await server.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))


async def test_fast_acquire_is_the_pools_own_acquire(pool: asyncpg.Pool) -> None:
    acquire = _asyncpg.fast_acquire(pool)
    con = await acquire(5.0)
    assert isinstance(con, asyncpg.pool.PoolConnectionProxy)
    assert await con.fetchval("SELECT 1") == 1
    await pool.release(con)


async def test_connection_of_a_proxy_until_released(pool: asyncpg.Pool) -> None:
    con = await pool.acquire()
    raw = _asyncpg.connection_of(con)
    assert isinstance(raw, asyncpg.Connection) and not raw.is_closed()
    await pool.release(con)
    assert _asyncpg.connection_of(con) is None
    assert _asyncpg.connection_of(object()) is None


async def test_wake_waiters_fails_the_callers_queued_for_a_connection(
    pool: asyncpg.Pool,
) -> None:
    held = [await pool.acquire(), await pool.acquire()]
    waiters = [asyncio.ensure_future(pool.acquire(timeout=10)) for _ in range(3)]
    queue: Any = pool._queue  # type: ignore[attr-defined]
    await wait_until(lambda: len(queue._getters), lambda n: n == 3, timeout=5)
    assert _asyncpg.wake_waiters(pool, lambda: Woken("moved")) == 3
    for waiter in waiters:
        with pytest.raises(Woken):
            await waiter
    assert _asyncpg.wake_waiters(pool, lambda: Woken("moved")) == 0
    for con in held:
        await pool.release(con)
    # The pool is in order afterwards: both connections can be acquired again.
    again = [await pool.acquire(timeout=5), await pool.acquire(timeout=5)]
    for con in again:
        await pool.release(con)


async def test_expire_closes_each_connection_at_its_release(
    pool: asyncpg.Pool, pg_a: PgServer
) -> None:
    con = await pool.acquire()
    pid = con.get_server_pid()
    _asyncpg.expire(pool)
    await pool.release(con)
    await wait_until(lambda: backend_alive(pg_a, pid), lambda alive: not alive, timeout=5)


async def test_expire_at_release_closes_one_connection(pool: asyncpg.Pool, pg_a: PgServer) -> None:
    first, second = await pool.acquire(), await pool.acquire()
    expired, kept = first.get_server_pid(), second.get_server_pid()
    _asyncpg.expire_at_release(first)
    await pool.release(first)
    await pool.release(second)
    await wait_until(lambda: backend_alive(pg_a, expired), lambda alive: not alive, timeout=5)
    assert await backend_alive(pg_a, kept)
    # The holder reconnects for its next caller.
    async with pool.acquire() as a, pool.acquire() as b:
        assert {a.get_server_pid(), b.get_server_pid()} - {expired} == {
            a.get_server_pid(),
            b.get_server_pid(),
        }


async def test_stop_refilling_keeps_a_pool_below_min_size(
    pool: asyncpg.Pool, pg_a: PgServer
) -> None:
    _asyncpg.stop_refilling(pool)
    con = await pool.acquire()
    _asyncpg.expire(pool)
    await pool.release(con)  # closed: asyncpg 0.32 would reconnect to reach min_size
    await wait_until(pool.get_size, lambda n: n == 1, timeout=5)
    assert pool._maintenance_task is None if hasattr(pool, "_maintenance_task") else True
    assert pool.get_size() == 1


async def test_close_idle_closes_idle_connections_only(pool: asyncpg.Pool, pg_a: PgServer) -> None:
    busy = await pool.acquire()
    assert len(_asyncpg.in_use(pool)) == 1 and len(_asyncpg.all_connections(pool)) == 2
    closing = _asyncpg.close_idle(pool, 5.0)
    assert len(closing) == 1
    await asyncio.gather(*closing)
    assert pool.get_size() == 1
    assert await busy.fetchval("SELECT 1") == 1
    await pool.release(busy)


async def test_abort_makes_a_query_fail_as_a_closed_connection(pool: asyncpg.Pool) -> None:
    con = await pool.acquire()
    raw = _asyncpg.connection_of(con)
    assert raw is not None
    _asyncpg.abort(raw)
    assert raw.is_closed()
    with pytest.raises(asyncpg.InterfaceError, match="closed"):
        await con.fetchval("SELECT 1")  # not AttributeError: the protocol is kept
    await pool.release(con)


async def test_cancel_request_stops_a_running_query(pool: asyncpg.Pool) -> None:
    con = await pool.acquire()
    raw = _asyncpg.connection_of(con)
    assert raw is not None
    running = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.2)  # the query reaches the server (the fault itself)
    assert await _asyncpg.cancel_queries([raw]) == 1
    with pytest.raises(asyncpg.QueryCanceledError):
        await asyncio.wait_for(running, timeout=10)
    await pool.release(con)
    request = _asyncpg.cancel_request(raw)
    assert request is not None
    await request  # nothing runs now: the server ignores it
    raw.terminate()
    assert _asyncpg.cancel_request(raw) is None


def test_non_asyncpg_pools_are_left_alone() -> None:
    class Other:
        pass

    other = Other()
    assert _asyncpg.wake_waiters(other, Woken) == 0
    assert _asyncpg.close_idle(other, 1.0) == []
    assert _asyncpg.in_use(other) == [] and _asyncpg.all_connections(other) == []
    _asyncpg.stop_refilling(other)
    _asyncpg.expire(other)
    _asyncpg.expire_at_release(other)


async def test_disarm_cancels_the_idle_timer_a_failed_reconnect_leaves(dsn: str) -> None:
    """asyncpg keeps a released holder's idle timer (and through it the pool) when the
    holder's expired connection is dropped for a reconnect that fails; disarm() cancels it."""
    refuse = False

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        if refuse:
            raise ConnectionRefusedError("refused by the test")
        con: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
        return con

    made = await asyncpg.create_pool(dsn, min_size=1, max_size=1, connect=connect)
    try:
        async with made.acquire():
            pass  # released: its idle timer is armed
        holder: Any = made._holders[0]  # type: ignore[attr-defined]
        assert holder._inactive_callback is not None
        _asyncpg.expire(made)
        refuse = True
        with pytest.raises(ConnectionRefusedError):
            await made.acquire()
        assert holder._con is None and holder._inactive_callback is not None
        _asyncpg.disarm(made)
        assert holder._inactive_callback is None
    finally:
        made.terminate()


async def test_set_floor_opens_the_rest_of_min_size_in_the_background(
    dsn: str, pg_a: PgServer
) -> None:
    made = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        assert made.get_size() == 1
        _asyncpg.set_floor(made, 3)
        assert made.get_min_size() == 3
        if hasattr(made, "_schedule_min_size_maintenance"):  # asyncpg 0.32: opened for us
            await wait_until(made.get_size, lambda n: n == 3, timeout=10)
        else:  # before 0.32: as callers need them
            async with made.acquire(), made.acquire(), made.acquire():
                pass
            assert made.get_size() == 3
    finally:
        made.terminate()
