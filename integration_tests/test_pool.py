"""HotPool against real PostgreSQL servers: swaps, rotation, drains, force kill, failures."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import aiohotload
from aiohotload import HotPool
from aiohotload.testing import PgServer, RoleFactory, port_of, wait_until, watch_url, write_dsn

from .faults import backends

pytestmark = pytest.mark.timeout(90)


async def test_switches_servers_when_the_file_changes(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=4) as pool:
        assert await port_of(pool) == pg_a.port
        assert pool.generation == 0
        swapped = asyncio.ensure_future(pool.wait_for_swap(timeout=10))
        write_dsn(dsn_path, pg_b.dsn(user, password))
        assert await swapped == 1
        assert await port_of(pool) == pg_b.port
        assert pool.generation == 1
        assert pool.target is not None and str(pg_b.port) in pool.target
        await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)


async def test_key_value_dsn(pg_a: PgServer, role: RoleFactory, dsn_path: Path) -> None:
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.kv_dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=2) as pool:
        assert await pool.fetchval("SELECT current_user") == user
        assert pool.target is not None and password not in pool.target


async def test_password_rotation_with_alter_role(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, old_password = await role(pg_a)
    new_password = old_password[::-1] + "-rotated"
    write_dsn(dsn_path, pg_a.dsn(user, old_password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=2, max_size=4) as pool:
        assert await pool.fetchval("SELECT current_user") == user
        await pg_a.alter_password(user, new_password)
        # Connections opened with the old password stay valid; new ones need the new one.
        assert await pool.fetchval("SELECT 1") == 1
        write_dsn(dsn_path, pg_a.dsn(user, new_password))
        await pool.wait_for_swap(timeout=10)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT current_user") == user
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(pg_a.dsn(user, old_password))


async def test_bad_dsn_keeps_the_old_pool_then_recovers(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=2) as pool:
        for bad in (
            pg_b.dsn(user, "wrong-password"),
            "postgresql://nobody@127.0.0.1:1/nowhere",
            "this is not a DSN at all",
        ):
            write_dsn(dsn_path, bad)
            await wait_until(lambda: pool.last_error, lambda e: e is not None, timeout=10)
            assert pool.generation == 0
            assert await port_of(pool) == pg_a.port
            write_dsn(dsn_path, pg_a.dsn(user, password))
            await wait_until(lambda: pool.last_error, lambda e: e is None, timeout=10)
        assert "wrong-password" not in str(pool.last_error)
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        assert await port_of(pool) == pg_b.port


async def test_late_server_is_picked_up_by_retry(
    pg_a: PgServer, pg_disposable: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_a)
    await role(pg_disposable, name=user, password=password)
    await pg_disposable.stop("fast")
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=2) as pool:
        write_dsn(dsn_path, pg_disposable.dsn(user, password))
        await wait_until(lambda: pool.last_error, lambda e: e is not None, timeout=10)
        assert await port_of(pool) == pg_a.port
        await pg_disposable.start()
        # No further file event: the retry loop finds the server.
        await pool.wait_until(lambda p: p.generation == 1, timeout=30)
        assert await port_of(pool) == pg_disposable.port


async def test_graceful_drain_lets_an_open_transaction_commit_on_the_old_server(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    user, password = user_ab
    table = f"t_{user}"
    for server in (pg_a, pg_b):
        admin = await server.admin()
        try:
            await admin.execute(f'CREATE TABLE "{table}" (v int)')
            await admin.execute(f'GRANT ALL ON "{table}" TO "{user}"')
        finally:
            await admin.close()
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=2, max_size=4) as pool:
        conn = await pool.acquire()
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f'INSERT INTO "{table}" VALUES (1)')
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        assert await port_of(pool) == pg_b.port
        # The old connection still works and its transaction commits on A.
        await conn.execute(f'INSERT INTO "{table}" VALUES (2)')
        await tx.commit()
        assert await conn.fetchval("SELECT inet_server_port()") == pg_a.port
        assert await backends(pg_a, user) >= 1
        await pool.release(conn)
        await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
        await pool.execute(f'INSERT INTO "{table}" VALUES (3)')
    for server, expected in ((pg_a, [1, 2]), (pg_b, [3])):
        admin = await server.admin()
        try:
            rows = await admin.fetch(f'SELECT v FROM "{table}" ORDER BY v')
            await admin.execute(f'DROP TABLE "{table}"')
        finally:
            await admin.close()
        assert [r["v"] for r in rows] == expected


async def test_drain_timeout_terminates_stragglers(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    url = watch_url(dsn_path, drain_timeout="300ms")
    async with aiohotload.create_pool(url, min_size=1, max_size=4) as pool:
        conn = await pool.acquire()
        slow = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(60)"))
        await wait_until(
            lambda: pg_a.backends(usename=user),
            lambda rows: any(
                "pg_sleep" in (r["query"] or "") and r["state"] == "active" for r in rows
            ),
            timeout=10,
        )
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await asyncio.wait_for(slow, timeout=10)
        # The query was cancelled on the server, not just abandoned by the client.
        await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
        await pool.release(conn)
        assert await port_of(pool) == pg_b.port


async def test_force_kill_stops_server_query(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    url = watch_url(dsn_path, forceKill="true")
    async with aiohotload.create_pool(url, min_size=1, max_size=4) as pool:
        slow = asyncio.ensure_future(pool.fetchval("SELECT pg_sleep(60)"))
        await wait_until(
            lambda: pg_a.backends(usename=user),
            lambda rows: any(
                "pg_sleep" in (r["query"] or "") and r["state"] == "active" for r in rows
            ),
            timeout=10,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await asyncio.wait_for(slow, timeout=10)
        assert loop.time() - started < 10
        await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
        assert await port_of(pool) == pg_b.port


async def test_server_dies_then_switch(
    pg_disposable: PgServer, pg_b: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_disposable)
    await role(pg_b, name=user, password=password)
    write_dsn(dsn_path, pg_disposable.dsn(user, password))
    url = watch_url(dsn_path, drain_timeout="2s")
    async with aiohotload.create_pool(url, min_size=2, max_size=4) as pool:
        assert await port_of(pool) == pg_disposable.port
        await pg_disposable.stop("immediate")
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        for _ in range(10):
            assert await port_of(pool) == pg_b.port


async def test_no_failed_queries_across_many_swaps(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], role: RoleFactory, dsn_path: Path
) -> None:
    user, password = user_ab
    targets = [pg_a.dsn(user, password), pg_b.dsn(user, password), pg_a.kv_dsn(user, password)]
    write_dsn(dsn_path, targets[0])
    failures: list[BaseException] = []
    done = 0
    stop = asyncio.Event()

    async def worker(pool: HotPool, n: int) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                if n % 3 == 0:
                    assert await pool.fetchval("SELECT $1::int", n) == n
                elif n % 3 == 1:
                    async with pool.acquire() as conn, conn.transaction():
                        await conn.execute("SELECT pg_sleep(0.002)")
                        assert await conn.fetchval("SELECT 1") == 1
                else:
                    conn = await pool.acquire(timeout=30)
                    try:
                        await conn.fetch("SELECT generate_series(1, 10)")
                    finally:
                        await pool.release(conn)
                done += 1
            except Exception as exc:
                failures.append(exc)

    async with aiohotload.create_pool(watch_url(dsn_path), min_size=2, max_size=8) as pool:
        tasks = [asyncio.ensure_future(worker(pool, n)) for n in range(36)]
        for i in range(1, 31):
            write_dsn(dsn_path, targets[i % len(targets)])
            assert await pool.wait_for_swap(timeout=10) == i
            target = done + 20
            await wait_until(lambda target=target: done >= target, timeout=10)
        stop.set()
        await asyncio.gather(*tasks)
    assert failures == []
    assert done > 600
    for server in (pg_a, pg_b):
        assert await backends(server, user) == 0


async def test_close_leaves_no_server_connections_and_no_tasks(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    tasks_before = asyncio.all_tasks()
    pool = await aiohotload.create_pool(watch_url(dsn_path), min_size=3, max_size=6)
    held = await pool.acquire()
    write_dsn(dsn_path, pg_b.dsn(user, password))
    await pool.wait_for_swap(timeout=10)
    assert await pool.fetchval("SELECT 1") == 1
    assert await backends(pg_a, user) >= 1 and await backends(pg_b, user) >= 1
    closing = asyncio.ensure_future(pool.close())
    await wait_until(pool.is_closing, lambda c: c, timeout=5)
    with pytest.raises(asyncpg.InterfaceError):
        await pool.fetchval("SELECT 1")
    await pool.release(held)
    await asyncio.wait_for(closing, timeout=10)
    await pool.close()  # idempotent
    for server in (pg_a, pg_b):
        await wait_until(lambda server=server: backends(server, user), lambda n: n == 0, timeout=10)
    await wait_until(
        lambda: asyncio.all_tasks() - tasks_before - {asyncio.current_task()},
        lambda left: not left,
        timeout=5,
    )
    with pytest.raises(asyncpg.InterfaceError):
        await pool.acquire()


async def test_terminate_is_immediate_and_idempotent(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    pool = await aiohotload.create_pool(watch_url(dsn_path), min_size=2, max_size=2)
    conn = await pool.acquire()
    pool.terminate()
    pool.terminate()
    assert pool.is_closing()
    with pytest.raises(asyncpg.InterfaceError):
        await conn.fetchval("SELECT 1")
    await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
    await pool.close()


async def test_release_returns_connection_to_its_own_pool_after_swap(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=2) as pool:
        conns = [await pool.acquire() for _ in range(2)]
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        new = await pool.acquire()
        assert await new.fetchval("SELECT inet_server_port()") == pg_b.port
        for conn in conns:
            assert await conn.fetchval("SELECT inet_server_port()") == pg_a.port
            await pool.release(conn)
            await pool.release(conn)  # a second release is a no-op, as in asyncpg
        await pool.release(new)
        await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
        assert pool.draining == 0


async def test_no_password_in_logs_errors_or_repr(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    dsn_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    seen: list[str] = []
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=2) as pool:
        write_dsn(dsn_path, pg_b.kv_dsn(user, password + "-wrong"))
        await wait_until(lambda: pool.last_error, lambda e: e is not None, timeout=10)
        seen += [str(pool.last_error), repr(pool.last_error), repr(pool), str(pool.target)]
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        seen += [repr(pool), str(pool.target)]
    write_dsn(dsn_path, pg_a.dsn(user, password + "-wrong"))
    # Raised as asyncpg raises it (its text holds no password); last_error names the target.
    failing = aiohotload.create_pool(watch_url(dsn_path))
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await failing
    seen += [str(info.value), repr(info.value), str(failing.last_error), repr(failing)]
    assert "could not open a pool on" in str(failing.last_error)
    seen += [r.getMessage() for r in caplog.records]
    seen += [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert any("swapped" in s for s in seen)
    for text in seen:
        assert password not in text


async def test_bad_input_fails_fast_with_clear_errors(dsn_path: Path) -> None:
    with pytest.raises(aiohotload.UnknownStrategyError, match="nosuch"):
        aiohotload.create_pool(f"nosuch://postgres{dsn_path}")
    with pytest.raises(aiohotload.UnknownDriverError, match="mysql"):
        aiohotload.create_pool(f"watchfiles://mysql{dsn_path}")
    with pytest.raises(aiohotload.SourceError, match=r"dsn\.txt"):
        await asyncio.wait_for(aiohotload.create_pool(watch_url(dsn_path)), timeout=5)
    write_dsn(dsn_path, "postgresql://u@127.0.0.1:1/db")
    with pytest.raises(aiohotload.InvalidOptionError, match="debounse"):
        await asyncio.wait_for(aiohotload.create_pool(watch_url(dsn_path, debounse="5")), timeout=5)
    with pytest.raises(aiohotload.InvalidOptionError, match="drain_timeout"):
        aiohotload.create_pool(watch_url(dsn_path, drain_timeout="soon"))
    # An unreachable server: the error asyncpg raises (here the connection refused, which
    # names the address); the pool's last_error names the DSN, redacted.
    unreachable = aiohotload.create_pool(watch_url(dsn_path))
    with pytest.raises(ConnectionRefusedError, match=r"127\.0\.0\.1"):
        await asyncio.wait_for(unreachable, timeout=15)
    assert "postgresql://u@127.0.0.1:1/db" in str(unreachable.last_error)


async def test_copy_and_executemany_follow_the_swap(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], dsn_path: Path
) -> None:
    user, password = user_ab
    table = f"c_{user}"
    for server in (pg_a, pg_b):
        await server.execute(f'CREATE TABLE "{table}" (id int, name text)')
        await server.execute(f'GRANT ALL ON "{table}" TO "{user}"')
    write_dsn(dsn_path, pg_a.dsn(user, password))
    try:
        async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=2) as pool:
            await pool.copy_records_to_table(table, records=[(1, "a"), (2, "b")])
            write_dsn(dsn_path, pg_b.dsn(user, password))
            await pool.wait_for_swap(timeout=10)
            await pool.executemany(f'INSERT INTO "{table}" VALUES ($1, $2)', [(3, "c")])
            buf = io.BytesIO(b"4\td\n")
            await pool.copy_to_table(table, source=buf)
            out = io.BytesIO()
            await pool.copy_from_query(f'SELECT id FROM "{table}" ORDER BY id', output=out)
            assert out.getvalue() == b"3\n4\n"
            out = io.BytesIO()
            await pool.copy_from_table(table, output=out, columns=["name"], format="csv")
            assert sorted(out.getvalue().split()) == [b"c", b"d"]
            rows = await pool.fetchmany(f'SELECT $1::int FROM "{table}" LIMIT 1', [(5,), (6,)])
            assert [r[0] for r in rows] == [5, 6]
        assert await pg_a.fetchval(f'SELECT count(*) FROM "{table}"') == 2
    finally:
        for server in (pg_a, pg_b):
            await server.execute(f'DROP TABLE "{table}"')


async def test_draining_pool_does_not_reconnect_to_the_old_server(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    user, old_password = await role(pg_a)
    new_password = old_password + "-next"
    write_dsn(dsn_path, pg_a.dsn(user, old_password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=3, max_size=4) as pool:
        held = [await pool.acquire() for _ in range(2)]
        await pg_a.alter_password(user, new_password)
        write_dsn(dsn_path, pg_a.dsn(user, new_password))
        await pool.wait_for_swap(timeout=10)
        for conn in held:
            await pool.release(conn)
        await wait_until(lambda: pool.draining, lambda n: n == 0, timeout=10)
        assert await pool.fetchval("SELECT 1") == 1
    # asyncpg's min_size refill would have tried the rotated-away password and logged it.
    assert not [r for r in caplog.records if "floor" in r.getMessage() or r.exc_info]


@pytest.mark.parametrize("outcome", ["fails", "is cancelled"])
async def test_a_pool_that_did_not_open_leaves_no_connection(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path, outcome: str
) -> None:
    """Opening a pool that fails or is cancelled halfway through leaves no connection behind,
    whatever asyncpg does with a pool whose initialisation failed (before 0.32 it keeps
    them open)."""
    user, password = await role(pg_a)
    made: list[asyncpg.Connection] = []
    second = asyncio.Event()
    never = asyncio.Event()

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        if made:  # the second connection of min_size 3
            second.set()
            if outcome == "fails":
                raise ConnectionRefusedError("refused by the test")
            await never.wait()
        conn: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
        made.append(conn)
        return conn

    write_dsn(dsn_path, pg_a.dsn(user, password))
    opening = asyncio.ensure_future(
        aiohotload.create_pool(watch_url(dsn_path), min_size=3, max_size=3, connect=connect)
    )
    await asyncio.wait_for(second.wait(), 10)
    if outcome == "fails":
        with pytest.raises(ConnectionRefusedError):
            await opening
    else:
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
    assert len(made) == 1
    assert made[0].is_closed()
    await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
