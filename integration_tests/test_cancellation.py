"""Callers cancelled at random points during acquire, query, release and swap leak nothing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

import aiohotload
from aiohotload import HotPool
from aiohotload.testing import PgServer, RoleFactory, wait_until, write_dsn

pytestmark = pytest.mark.timeout(120)


def generation_is(number: int) -> Callable[[HotPool], bool]:
    return lambda pool: pool.generation == number


async def churn(pool: HotPool, rng: random.Random) -> None:
    """One caller doing a random kind of work."""
    kind = rng.randrange(4)
    if kind == 0:
        await pool.fetchval("SELECT pg_sleep($1)", rng.random() / 100)
    elif kind == 1:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_sleep($1)", rng.random() / 100)
    elif kind == 2:
        conn = await pool.acquire()
        try:
            await conn.fetch("SELECT generate_series(1, 50)")
        finally:
            await pool.release(conn)
    else:
        await pool.execute("SELECT 1")


@pytest.mark.parametrize("seed", range(8))
async def test_random_cancellation_during_swaps_leaks_nothing(
    seed: int, pg_a: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    dsns = [pg_a.dsn(user, password), pg_b.dsn(user, password)]
    path = tmp_path / "dsn"
    write_dsn(path, dsns[0])
    tasks_before = asyncio.all_tasks()
    force = "true" if seed % 2 else "false"
    pool = await aiohotload.create_pool(
        f"watchfiles://postgres{path}?force_kill={force}&drain_timeout=2s", min_size=1, max_size=4
    )
    unexpected: list[BaseException] = []
    completed = 0

    async def caller() -> None:
        nonlocal completed
        try:
            await churn(pool, rng)
            completed += 1
        except asyncio.CancelledError:
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # force_kill may fail work that was in flight on the old server; nothing else may.
            if force == "false":
                unexpected.append(exc)
        except Exception as exc:
            unexpected.append(exc)

    for round_ in range(6):
        callers = [asyncio.ensure_future(caller()) for _ in range(24)]
        # Cancel a random subset at random moments while a swap happens.
        write_dsn(path, dsns[(round_ + 1) % 2])
        for task in rng.sample(callers, 12):
            await asyncio.sleep(rng.random() / 200)
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await pool.wait_until(generation_is(round_ + 1), timeout=10)

    assert unexpected == []
    assert completed > 0
    await asyncio.wait_for(pool.close(), timeout=15)
    for server in (pg_a, pg_b):
        await wait_until(
            lambda s=server: s.backends(usename=user), lambda rows: not rows, timeout=10
        )
    await wait_until(
        lambda: asyncio.all_tasks() - tasks_before - {asyncio.current_task()},
        lambda left: not left,
        timeout=5,
    )


async def test_close_during_swaps_and_queries(
    pg_a: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    pool = await aiohotload.create_pool(f"watchfiles://postgres{path}", min_size=2, max_size=4)
    stop = asyncio.Event()
    outcomes: list[str] = []

    async def worker() -> None:
        while not stop.is_set():
            try:
                await pool.fetchval("SELECT pg_sleep(0.005)")
                outcomes.append("ok")
            except asyncpg.InterfaceError:
                outcomes.append("closed")  # asyncpg's own error for a closing pool
                return

    workers = [asyncio.ensure_future(worker()) for _ in range(16)]
    await wait_until(lambda: len(outcomes) > 20)
    write_dsn(path, pg_b.dsn(user, password))
    swap = asyncio.ensure_future(pool.wait_for_swap(timeout=10))
    await swap
    write_dsn(path, pg_a.dsn(user, password))  # another swap on its way while closing
    await asyncio.gather(pool.close(), pool.close())
    stop.set()
    await asyncio.gather(*workers)
    assert set(outcomes) <= {"ok", "closed"}
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError):
        await pool.fetchval("SELECT 1")
    with pytest.raises(asyncpg.InterfaceError):
        async with pool.acquire():
            pass
    for server in (pg_a, pg_b):
        await wait_until(
            lambda s=server: s.backends(usename=user), lambda rows: not rows, timeout=10
        )
