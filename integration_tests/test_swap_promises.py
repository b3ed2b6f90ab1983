"""What a swap promises, on real servers: a new DSN is proven before it is used, whatever the
pool's sizes and callbacks, and after the swap nobody gets a connection to the old server,
not even the callers that were waiting for one when it happened."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import aiohotload
from aiohotload import SwapDone
from aiohotload.testing import PgServer, RoleFactory, port_of, wait_until, watch_url, write_dsn

from .faults import EventLog, backends

pytestmark = pytest.mark.timeout(90)


# --------------------------------------------------------------------------- validation


async def test_min_size_zero_still_proves_a_new_dsn_before_the_swap(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    """min_size=0 opens no connection when asyncpg creates the pool; the swap must still wait
    for one that works (fails on a version that trusts create_pool)."""
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=0, max_size=2) as pool:
        write_dsn(dsn_path, pg_b.dsn(user, password + "-wrong"))
        error = await wait_until(lambda: pool.last_error, timeout=10)
        assert "password authentication failed" in str(error)
        assert pool.generation == 0
        assert await port_of(pool) == pg_a.port  # the working pool keeps serving
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        assert await port_of(pool) == pg_b.port
    # The first DSN too: create_pool raises as asyncpg would, instead of returning a pool
    # that cannot connect.
    write_dsn(dsn_path, pg_a.dsn(user, password + "-wrong"))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await aiohotload.create_pool(watch_url(dsn_path), min_size=0)


@pytest.mark.parametrize("callback", ["init", "setup"])
async def test_a_dsn_whose_connections_fail_init_or_setup_is_not_swapped_in(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    dsn_path: Path,
    callback: str,
) -> None:
    """The user's init/setup runs on the new DSN's proving connection, as on any pool
    connection: a server where it fails (here a table it needs is missing) is not used."""
    user, password = user_ab
    table = f"needed_{user}"
    await pg_a.execute(f'CREATE TABLE "{table}" (id int)')
    await pg_a.execute(f'GRANT SELECT ON "{table}" TO "{user}"')

    async def needs_table(con: asyncpg.Connection) -> None:
        await con.execute(f'SELECT 1 FROM "{table}" LIMIT 1')

    write_dsn(dsn_path, pg_a.dsn(user, password))
    kwargs: dict[str, Any] = {callback: needs_table}
    try:
        async with aiohotload.create_pool(
            watch_url(dsn_path), min_size=1, max_size=2, **kwargs
        ) as pool:
            write_dsn(dsn_path, pg_b.dsn(user, password))
            error = await wait_until(lambda: pool.last_error, timeout=10)
            # Not the whole name: redaction may hide a piece of it that the password shares.
            assert "needed_" in str(error) and "does not exist" in str(error)
            assert pool.generation == 0 and await port_of(pool) == pg_a.port
            await pg_b.execute(f'CREATE TABLE "{table}" (id int)')
            await pg_b.execute(f'GRANT SELECT ON "{table}" TO "{user}"')
            await pool.wait_for_swap(timeout=15)  # the retry finds it now
            assert await port_of(pool) == pg_b.port
    finally:
        for server in (pg_a, pg_b):
            await server.execute(f'DROP TABLE IF EXISTS "{table}"')


# --------------------------------------------------------------------------- waiters


async def test_a_caller_waiting_at_the_swap_is_served_by_the_new_server_at_once(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    """max_size=1, the only connection held, one caller waiting: at the swap the caller gets
    a connection of the new pool at once, and the old pool opens nothing on the old server
    (fails on a version that leaves waiters queued on the retired asyncpg pool)."""
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(
        watch_url(dsn_path, drain_timeout="30s"), min_size=1, max_size=1
    ) as pool:
        holder = await pool.acquire()
        waiter = asyncio.ensure_future(port_of(pool))
        await asyncio.sleep(0.05)  # the waiter queues on the full pool (the fault itself)
        assert not waiter.done()
        write_dsn(dsn_path, pg_b.dsn(user, password))
        assert await asyncio.wait_for(waiter, timeout=10) == pg_b.port
        assert await holder.fetchval("SELECT inet_server_port()") == pg_a.port
        assert await backends(pg_a, user) == 1  # only the held one: nothing reopened
        await pool.release(holder)
        await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
        assert await backends(pg_a, user) == 0


async def test_saturated_pool_hands_out_no_old_connection_after_the_swap(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    """max_size=5 under 20 callers, moved between servers several times: every transaction
    runs on the server that was current when its connection was handed out, and every row
    lands there (fails on a version where waiters stay on the retired pool)."""
    user, password = user_ab
    table = f"rows_{user}"
    for server in (pg_a, pg_b):
        await server.execute(f'CREATE TABLE "{table}" (worker int, port int)')
        await server.execute(f'GRANT INSERT ON "{table}" TO "{user}"')
    ports = {pg_a.port: pg_a, pg_b.port: pg_b}
    mismatches: list[tuple[int, int]] = []
    written: dict[int, int] = {pg_a.port: 0, pg_b.port: 0}
    stop = asyncio.Event()

    async def worker(pool: aiohotload.HotPool, n: int) -> None:
        while not stop.is_set():
            async with pool.acquire() as con:
                # Read at once: nothing can swap between the hand-out and this line.
                target = pool.target
                async with con.transaction():
                    port = await con.fetchval("SELECT inet_server_port()")
                    await con.execute(f'INSERT INTO "{table}" VALUES ($1, $2)', n, port)
                    await asyncio.sleep(0.002)  # hold it: others queue
            if target is None or f":{port}/" not in target:
                mismatches.append((port, n))
            written[port] += 1

    write_dsn(dsn_path, pg_a.dsn(user, password))
    try:
        async with aiohotload.create_pool(watch_url(dsn_path), min_size=5, max_size=5) as pool:
            log = EventLog(pool)
            workers = [asyncio.ensure_future(worker(pool, n)) for n in range(20)]
            for swap, server in enumerate([pg_b, pg_a, pg_b, pg_a], start=1):
                start = sum(written.values())
                await wait_until(lambda s=start: sum(written.values()) >= s + 50, timeout=15)
                write_dsn(dsn_path, server.dsn(user, password))
                await log.wait(SwapDone, swap, timeout=15)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=15)
        assert mismatches == []
        for port, server in ports.items():
            assert await server.fetchval(f'SELECT count(*) FROM "{table}"') == written[port]
            assert (
                await server.fetchval(f'SELECT count(*) FROM "{table}" WHERE port <> $1', port) == 0
            )
        assert written[pg_a.port] > 0 and written[pg_b.port] > 0
    finally:
        for server in (pg_a, pg_b):
            await server.execute(f'DROP TABLE IF EXISTS "{table}"')


async def test_a_moved_waiter_keeps_its_remaining_timeout(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    """A caller moved to the new pool waits there only for what is left of its timeout."""
    user, password = user_ab
    swapped = asyncio.Event()

    async def setup(con: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]) -> None:
        # After the swap, handing out a connection of the new server takes forever.
        if swapped.is_set() and await con.fetchval("SELECT inet_server_port()") == pg_b.port:
            await asyncio.Event().wait()

    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(
        watch_url(dsn_path), min_size=1, max_size=1, setup=setup
    ) as pool:
        pool.add_listener(lambda event: swapped.set())  # runs in the swap, before the move
        old_holder = await pool.acquire()
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiter = asyncio.ensure_future(pool.acquire(timeout=1.5))
        await asyncio.sleep(0.05)  # queued on the full old pool
        write_dsn(dsn_path, pg_b.dsn(user, password))
        with pytest.raises(asyncio.TimeoutError):
            await waiter
        elapsed = loop.time() - started
        assert swapped.is_set()
        # Its own 1.5 s, not a fresh 1.5 s from the swap on (bounds generous for a slow box).
        assert 1.4 <= elapsed < 2.9
        await pool.release(old_holder)


async def test_a_key_value_dsn_connects_to_its_hostaddr(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    """``hostaddr`` is where libpq connects; ``host`` (here a name that resolves nowhere) only
    names the server (fails on a version that connected to ``host``)."""
    user, password = await role(pg_a)
    quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    write_dsn(
        dsn_path,
        f"host=db.invalid hostaddr={pg_a.host} port={pg_a.port} user={user} "
        f"password='{quoted}' dbname=postgres",
    )
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1) as pool:
        assert await port_of(pool) == pg_a.port


async def test_min_size_zero_keeps_no_connection_for_having_been_proven(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    """A pool with ``min_size=0`` (serverless, many tenants) proves each DSN with a connection,
    then keeps none, as it asked."""
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=0, max_size=2) as pool:
        assert await backends(pg_a, user) == 0
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        assert await backends(pg_b, user) == 0
        assert await port_of(pool) == pg_b.port  # connects when used


async def test_quick_swaps_log_nothing_from_asyncpg(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    dsn_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A new pool opens the rest of its min_size in the background; a swap coming while it
    does stops that quietly (no asyncpg warning with a traceback at every swap)."""
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=6, max_size=6) as pool:
        for n, server in enumerate([pg_b, pg_a] * 4, start=1):
            write_dsn(dsn_path, server.dsn(user, password))
            await pool.wait_until(lambda p, n=n: p.generation >= n, timeout=10)  # type: ignore[misc]
        assert await port_of(pool) == pg_a.port
    noisy = [r for r in caplog.records if r.name.startswith("asyncpg")]
    assert noisy == []
