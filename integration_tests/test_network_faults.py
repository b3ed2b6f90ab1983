"""Network faults between the pool and its servers, injected by a loopback TCP proxy.

A server that accepts but never answers, one that resets every connection, connections cut
in the middle of a query, and an old server going silent while it drains: the pool keeps
serving from a good server, never waits on a bad one beyond its timeouts, and leaks nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import aiohotload
from aiohotload import HotPool, PoolDrained, ReloadFailed, ReloadStarted
from aiohotload.testing import (
    PgServer,
    RoleFactory,
    port_of,
    url_dsn,
    wait_until,
    watch_url,
    write_dsn,
)

from .faults import CONNECTION_ERRORS, EventLog, Load, no_new_tasks
from .tcpproxy import Mode, TcpProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def proxy_a(pg_a: PgServer) -> AsyncIterator[TcpProxy]:
    async with TcpProxy(pg_a.host, pg_a.port) as proxy:
        yield proxy


@pytest.fixture
async def proxy_b(pg_b: PgServer) -> AsyncIterator[TcpProxy]:
    async with TcpProxy(pg_b.host, pg_b.port) as proxy:
        yield proxy


def via(proxy: TcpProxy, user: str, password: str) -> str:
    """A DSN that reaches the proxy's server through the proxy."""
    return url_dsn("127.0.0.1", proxy.port, user, password)


def client_port(conn: Any) -> int:
    """The local port of an acquired connection's socket (the proxy's ``client_port``)."""
    port: int = conn._con._transport.get_extra_info("sockname")[1]
    return port


async def test_silent_server_is_superseded_by_a_newer_dsn_at_once(
    pg_a: PgServer,
    pg_b: PgServer,
    proxy_b: TcpProxy,
    user_ab: tuple[str, str],
    tmp_path: Path,
) -> None:
    user, password = user_ab
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    proxy_b.mode = "blackhole"
    # connect_timeout is far longer than the test's deadlines: only superseding can pass it.
    url = watch_url(path, connect_timeout="60")
    async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool, Load(pool) as load:
        log = EventLog(pool)
        write_dsn(path, via(proxy_b, user, password))
        await log.wait(ReloadStarted)
        await wait_until(lambda: proxy_b.active, lambda n: n >= 1, what="an attempt on the proxy")
        await load.progress()  # the current pool serves while the attempt hangs

        write_dsn(path, pg_b.dsn(user, password))
        await pool.wait_until(lambda p: p.generation == 1, timeout=10)
        assert await port_of(pool) == pg_b.port
        # The superseded attempt let go of its connection to the silent server.
        await wait_until(lambda: proxy_b.active, lambda n: n == 0, timeout=10)
        assert log.of(ReloadFailed) == []
        assert pool.last_error is None
    assert load.failures == []


@pytest.mark.parametrize("mode", ["blackhole", "reset"])
async def test_unreachable_new_server_is_retried_until_it_answers(
    mode: Mode, pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], tmp_path: Path
) -> None:
    user, password = user_ab
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    url = watch_url(path, connect_timeout="1")
    async with (
        TcpProxy(pg_b.host, pg_b.port) as proxy_b,
        aiohotload.create_pool(url, min_size=1, max_size=2) as pool,
        Load(pool) as load,
    ):
        proxy_b.mode = mode
        log = EventLog(pool)
        write_dsn(path, via(proxy_b, user, password))
        failed = await log.wait(ReloadFailed, 2, timeout=20)
        assert [e.attempt for e in failed[:2]] == [1, 2]
        if mode == "blackhole":  # each attempt was cut off by connect_timeout
            assert all("connect_timeout" in e.error for e in failed)
        assert pool.generation == 0
        assert pool.last_error is not None
        await load.progress()

        proxy_b.mode = "pass"  # the server answers again: a retry finds it, no new file event
        await pool.wait_until(lambda p: p.generation == 1, timeout=20)
        assert await port_of(pool) == pg_b.port
        assert pool.last_error is None
        await log.wait(PoolDrained)
        # Every failed attempt closed its connections: only the current pool's go through.
        await wait_until(
            lambda: proxy_b.active == pool.get_size(), timeout=10, what="no leftover attempts"
        )
    assert load.failures == []
    assert proxy_b.active == 0


async def test_first_dsn_on_a_silent_server_fails_within_connect_timeout(
    proxy_a: TcpProxy, role: RoleFactory, pg_a: PgServer, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, via(proxy_a, user, password))
    proxy_a.mode = "blackhole"
    tasks_before = asyncio.all_tasks()
    with pytest.raises(aiohotload.DriverError, match="connect_timeout"):
        await asyncio.wait_for(
            aiohotload.create_pool(watch_url(path, connect_timeout="1")), timeout=10
        )
    await wait_until(lambda: proxy_a.active, lambda n: n == 0, timeout=10)
    await no_new_tasks(tasks_before)


async def test_connection_cut_mid_query_fails_that_query_only(
    pg_a: PgServer, proxy_a: TcpProxy, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, via(proxy_a, user, password))
    # The server checks for a vanished client while a query runs, so the backend ends too.
    settings = {"client_connection_check_interval": "100ms"}
    async with (
        aiohotload.create_pool(
            watch_url(path), min_size=3, max_size=3, server_settings=settings
        ) as pool,
        Load(pool, workers=2) as load,
    ):
        await load.progress()
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            slow = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(30)"))
            await wait_until(
                lambda: pg_a.backends(usename=user),
                lambda rows: any(r["pid"] == pid and r["state"] == "active" for r in rows),
                what="the slow query running",
            )
            assert proxy_a.cut(client_port=client_port(conn)) == 1
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                await asyncio.wait_for(slow, timeout=10)
        # Releasing the broken connection (leaving the block) raised nothing.
        await load.progress(50)
        await wait_until(
            lambda: pg_a.backends(usename=user),
            lambda rows: pid not in [r["pid"] for r in rows],
            timeout=10,
            what="the cut connection's backend gone",
        )
        assert await port_of(pool) == pg_a.port
        await wait_until(pool.get_size, lambda n: n == 3, timeout=10, what="the pool refilled")
    assert load.failures == []


async def test_every_connection_cut_the_pool_recovers(
    pg_a: PgServer, proxy_a: TcpProxy, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, via(proxy_a, user, password))

    async def short_query(pool: HotPool) -> None:
        await pool.fetchval("SELECT pg_sleep(0.005)")

    async with (
        aiohotload.create_pool(watch_url(path), min_size=2, max_size=4) as pool,
        Load(pool, workers=6, work=short_query) as load,
    ):
        await load.progress()
        cut = proxy_a.cut()
        assert cut >= 2
        await load.progress(100)
    # Only queries on a cut connection failed: at most one per connection, then asyncpg
    # reconnects that slot.
    assert len(load.failures) <= cut
    unexpected = [e for e in load.failures if not isinstance(e, CONNECTION_ERRORS)]
    assert unexpected == []
    await wait_until(lambda: pg_a.backends(usename=user), lambda rows: not rows, timeout=10)


async def test_old_server_cut_while_draining_ends_the_drain_promptly(
    pg_a: PgServer,
    pg_b: PgServer,
    proxy_a: TcpProxy,
    user_ab: tuple[str, str],
    tmp_path: Path,
) -> None:
    user, password = user_ab
    path = tmp_path / "dsn"
    write_dsn(path, via(proxy_a, user, password))
    # drain_timeout is far longer than the deadlines: the drain must end on its own.
    async with aiohotload.create_pool(
        watch_url(path, drain_timeout="60"), min_size=2, max_size=4
    ) as pool:
        log = EventLog(pool)
        held = await pool.acquire()
        tx = held.transaction()
        await tx.start()
        write_dsn(path, pg_b.dsn(user, password))
        await pool.wait_until(lambda p: p.generation == 1, timeout=10)
        async with Load(pool) as load:
            proxy_a.cut()
            with pytest.raises(CONNECTION_ERRORS):
                await held.fetchval("SELECT 1")
            await asyncio.wait_for(pool.release(held), timeout=10)
            (drained,) = await log.wait(PoolDrained, timeout=10)
            assert drained.generation == 0
            assert drained.terminated == 0
            await load.progress()
        assert await port_of(pool) == pg_b.port
    assert load.failures == []
    await wait_until(lambda: pg_a.backends(usename=user), lambda rows: not rows, timeout=10)


async def test_old_server_going_silent_while_draining_is_bounded(
    pg_a: PgServer,
    pg_b: PgServer,
    proxy_a: TcpProxy,
    user_ab: tuple[str, str],
    tmp_path: Path,
) -> None:
    user, password = user_ab
    path = tmp_path / "dsn"
    write_dsn(path, via(proxy_a, user, password))
    async with aiohotload.create_pool(
        watch_url(path, drain_timeout="1"), min_size=1, max_size=2
    ) as pool:
        log = EventLog(pool)
        held = await pool.acquire()  # the pool's only connection so far
        await held.execute("SELECT 1")
        proxy_a.mode = "blackhole"  # the old server stops answering, mid-query for held
        straggler = asyncio.ensure_future(held.fetchval("SELECT 1"))
        accepted = proxy_a.accepted
        # Needs a second connection: asyncpg opens one to the old server, which never answers.
        waiter = asyncio.ensure_future(pool.fetchval("SELECT inet_server_port()"))
        await wait_until(lambda: proxy_a.accepted > accepted, what="the waiter connecting")

        write_dsn(path, pg_b.dsn(user, password))
        await pool.wait_until(lambda p: p.generation == 1, timeout=10)
        async with Load(pool) as load:
            await load.progress()
            # Bounded by drain_timeout plus the bound on cancel requests (which go unanswered).
            (drained,) = await log.wait(PoolDrained, timeout=20)
            assert drained.terminated == 1
            # At drain_timeout the waiter moved to the new generation (not after asyncpg's
            # 60 s connect timeout); the straggler's query failed.
            assert await asyncio.wait_for(waiter, timeout=10) == pg_b.port
            with pytest.raises(CONNECTION_ERRORS):
                await asyncio.wait_for(straggler, timeout=10)
            await asyncio.wait_for(pool.release(held), timeout=10)
            assert pool.draining == 0
            assert await port_of(pool) == pg_b.port
    assert load.failures == []


async def test_force_kill_moves_a_caller_waiting_on_a_connect_to_a_silent_old_server(
    pg_b: PgServer, proxy_a: TcpProxy, user_ab: tuple[str, str], tmp_path: Path
) -> None:
    user, password = user_ab
    path = tmp_path / "dsn"
    write_dsn(path, via(proxy_a, user, password))
    # drain_timeout far beyond the deadline: only the force kill can move the waiter.
    url = watch_url(path, force_kill="true", drain_timeout="60")
    async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
        held = await pool.acquire()
        proxy_a.mode = "blackhole"
        accepted = proxy_a.accepted
        waiter = asyncio.ensure_future(pool.fetchval("SELECT inet_server_port()"))
        await wait_until(lambda: proxy_a.accepted > accepted, what="the waiter connecting")
        write_dsn(path, pg_b.dsn(user, password))
        await pool.wait_until(lambda p: p.generation == 1, timeout=10)
        assert await asyncio.wait_for(waiter, timeout=10) == pg_b.port
        await asyncio.wait_for(pool.release(held), timeout=10)


async def test_close_is_bounded_when_the_server_goes_silent(
    pg_a: PgServer, proxy_a: TcpProxy, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, via(proxy_a, user, password))
    tasks_before = asyncio.all_tasks()
    pool = await aiohotload.create_pool(watch_url(path, drain_timeout="1"), min_size=3, max_size=3)
    assert await pool.fetchval("SELECT 1") == 1
    proxy_a.mode = "blackhole"
    # Closing a connection waits for the server to acknowledge it, which never comes; close()
    # still returns, at drain_timeout.
    await asyncio.wait_for(pool.close(), timeout=10)
    await no_new_tasks(tasks_before)
    proxy_a.mode = "pass"  # let the server see the closes, so the role can be dropped
    await wait_until(lambda: proxy_a.active, lambda n: n == 0, timeout=10)


async def test_server_ending_a_session_shows_as_a_connection_error_never_as_a_lost_result(
    pg_a: PgServer, proxy_a: TcpProxy, role: RoleFactory, tmp_path: Path
) -> None:
    """The server ends a pooled session (pg_terminate_backend, shutdown, idle timeout) and
    its goodbye arrives before its socket closes: asyncpg then fails the next use of the
    connection with an InternalClientError, and the release after a query that succeeded."""
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, via(proxy_a, user, password))
    proxy_a.hold_server_close = True  # the goodbye arrives, the socket stays open

    async def server_ends_the_session() -> None:
        closed = proxy_a.server_closed
        assert await pg_a.terminate(usename=user) == 1
        await wait_until(lambda: proxy_a.server_closed, lambda n: n > closed)
        # The fault itself: the client's event loop reads the goodbye (loopback: at once).
        await asyncio.sleep(0.1)

    async with aiohotload.create_pool(watch_url(path), min_size=1, max_size=1) as pool:
        # Idle in the pool: the next query on it fails, as a connection error.
        assert await pool.fetchval("SELECT 1") == 1
        await server_ends_the_session()
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await pool.fetchval("SELECT 1")
        assert await pool.fetchval("SELECT 2") == 2  # replaced by a new connection

        # Checked out, after its query succeeded: the release fails, and must not turn the
        # finished work into an error.
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 3") == 3
            await server_ends_the_session()
        assert await pool.fetchval("SELECT 4") == 4
        # Closing waits for the server to close each connection: let those closes through.
        proxy_a.hold_server_close = False
