"""Servers that stop, die, restart or come up late, around and during swaps.

The pool cannot save work that was running on a server that went away, but everything that
starts after a swap succeeds, old generations drain without waiting for ``drain_timeout``,
and a DSN whose server is not there yet is picked up as soon as it is, without another change.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Literal

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

from .faults import CONNECTION_ERRORS, EventLog, Load
from .tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(60)

Fault = Literal["fast", "immediate", "kill"]


async def short_query(pool: HotPool) -> None:
    await pool.fetchval("SELECT pg_sleep(0.002)")


async def take_down(server: PgServer, fault: Fault) -> None:
    if fault == "kill":
        await server.kill()  # SIGKILL, postmaster and backends: a crash
    else:
        await server.stop(fault)


@pytest.mark.parametrize("fault", ["fast", "immediate", "kill"])
async def test_current_server_goes_down_and_a_new_dsn_moves_the_pool_away(
    fault: Fault, pg_disposable: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_disposable)
    await role(pg_b, name=user, password=password)
    path = tmp_path / "dsn"
    write_dsn(path, pg_disposable.dsn(user, password))
    # drain_timeout far beyond the deadlines: the dead generation must drain on its own.
    url = watch_url(path, drain_timeout="60")
    async with aiohotload.create_pool(url, min_size=2, max_size=4) as pool:
        log = EventLog(pool)
        async with Load(pool, workers=6, work=short_query) as load:
            await load.progress()
            await take_down(pg_disposable, fault)
            write_dsn(path, pg_b.dsn(user, password))
            await pool.wait_until(lambda p: p.generation == 1, timeout=10)
            swapped = time.monotonic()
            await load.progress(100)
            (drained,) = await log.wait(PoolDrained, timeout=10)
        assert drained.generation == 0
        assert drained.terminated == 0
        assert await port_of(pool) == pg_b.port
        assert pool.last_error is None
    # What failed was running on, or sent to, the server that went down, and failed as a
    # connection error; nothing that started after the swap failed.
    assert [e for e in load.failures if not isinstance(e, CONNECTION_ERRORS)] == []
    assert load.failed_since(swapped) == []


async def test_old_server_restarts_while_draining(
    pg_disposable: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_disposable)
    await role(pg_b, name=user, password=password)
    path = tmp_path / "dsn"
    write_dsn(path, pg_disposable.dsn(user, password))
    url = watch_url(path, drain_timeout="60")
    async with aiohotload.create_pool(url, min_size=2, max_size=4) as pool:
        log = EventLog(pool)
        held = await pool.acquire()
        tx = held.transaction()
        await tx.start()
        write_dsn(path, pg_b.dsn(user, password))
        await pool.wait_until(lambda p: p.generation == 1, timeout=10)
        async with Load(pool, work=short_query) as load:
            await pg_disposable.restart("fast")
            with pytest.raises(CONNECTION_ERRORS):
                await held.fetchval("SELECT 1")
            await asyncio.wait_for(pool.release(held), timeout=10)
            (drained,) = await log.wait(PoolDrained, timeout=10)
            assert drained.terminated == 0
            await load.progress()
        # The drained generation did not reconnect to the restarted server.
        assert await pg_disposable.backends(usename=user) == []
        assert await port_of(pool) == pg_b.port
    assert load.failures == []


async def test_current_server_restarts_and_the_pool_reconnects_without_a_swap(
    pg_disposable: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_disposable)
    path = tmp_path / "dsn"
    write_dsn(path, pg_disposable.dsn(user, password))
    async with aiohotload.create_pool(watch_url(path), min_size=2, max_size=4) as pool:
        async with Load(pool, workers=4, work=short_query) as load:
            await load.progress()
            await pg_disposable.restart("fast")
            restarted = time.monotonic()
            await load.progress(100)
        assert pool.generation == 0
        assert pool.last_error is None
    assert [e for e in load.failures if not isinstance(e, CONNECTION_ERRORS)] == []
    # Only queries from before the server was back failed (each at most once per connection).
    assert len(load.failed_since(restarted)) <= 4
    await wait_until(
        lambda: pg_disposable.backends(usename=user), lambda rows: not rows, timeout=10
    )


@pytest.mark.parametrize("missing", ["server", "role"])
async def test_new_dsn_that_works_only_later_is_picked_up_by_retry(
    missing: Literal["server", "role"],
    pg_a: PgServer,
    pg_disposable: PgServer,
    role: RoleFactory,
    tmp_path: Path,
) -> None:
    """The new DSN arrives before its server is up, or before its role exists (a secret
    rotated ahead of the database); it works seconds later, with no new file event."""
    user, password = await role(pg_a)
    if missing == "server":
        await role(pg_disposable, name=user, password=password)
        await pg_disposable.stop("fast")
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(path), min_size=1, max_size=2) as pool:
        log = EventLog(pool)
        async with Load(pool) as load:
            write_dsn(path, pg_disposable.dsn(user, password))
            failed = await log.wait(ReloadFailed, 3, timeout=20)
            assert [e.attempt for e in failed[:3]] == [1, 2, 3]
            assert pool.generation == 0
            assert pool.last_error is not None
            assert password not in str(pool.last_error)
            await load.progress()
            if missing == "server":
                await pg_disposable.start()
            else:
                await role(pg_disposable, name=user, password=password)
            await pool.wait_until(lambda p: p.generation == 1, timeout=30)
            assert await port_of(pool) == pg_disposable.port
            assert pool.last_error is None
            await load.progress()
    assert load.failures == []


async def test_new_server_dies_and_comes_back_while_the_pool_opens_on_it(
    pg_a: PgServer, pg_disposable: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    await role(pg_disposable, name=user, password=password)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    async with (
        TcpProxy(pg_disposable.host, pg_disposable.port) as proxy,
        aiohotload.create_pool(watch_url(path, connect_timeout="60"), min_size=2) as pool,
        Load(pool) as load,
    ):
        log = EventLog(pool)
        proxy.mode = "blackhole"  # holds the attempt in the middle of connecting
        write_dsn(path, url_dsn("127.0.0.1", proxy.port, user, password))
        await log.wait(ReloadStarted)
        await wait_until(lambda: proxy.accepted, lambda n: n >= 1, what="the attempt connecting")
        await pg_disposable.kill()
        proxy.mode = "pass"  # the attempt reaches a dead server: it fails, and is retried
        await log.wait(ReloadFailed)
        assert pool.generation == 0
        await pg_disposable.start()  # crash recovery, then up: a retry swaps
        await pool.wait_until(lambda p: p.generation == 1, timeout=30)
        assert await port_of(pool) == pg_disposable.port
        await load.progress()
    assert load.failures == []
