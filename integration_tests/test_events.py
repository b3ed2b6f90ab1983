"""Reload events on real servers: a swap, a failed reload, a drain, a force kill."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import aiohotload
from aiohotload import (
    Event,
    ForceKillDone,
    HotPool,
    PoolDrained,
    ReloadFailed,
    ReloadStarted,
    SwapDone,
)
from aiohotload.testing import PgServer, RoleFactory, wait_until, write_dsn

pytestmark = pytest.mark.timeout(60)


async def test_swap_failure_and_drain_events(
    pg_a: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    seen: list[Event] = []
    async with aiohotload.create_pool(
        f"watchfiles://postgres{path}?drain_timeout=200ms", name="orders", min_size=1, max_size=2
    ) as pool:
        pool.add_listener(seen.append)
        pool.add_listener(lambda event: 1 / 0)  # a broken listener must not matter

        write_dsn(path, pg_b.dsn(user, "wrong" + password))
        failed = await wait_until(lambda: [e for e in seen if isinstance(e, ReloadFailed)])
        assert failed[0].attempt == 1
        assert failed[0].generation == 0
        assert failed[0].retry_in > 0
        assert str(pg_b.port) in failed[0].target

        held = await pool.acquire()  # straggler: terminated at the drain timeout
        write_dsn(path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        drained = await wait_until(lambda: [e for e in seen if isinstance(e, PoolDrained)])
        await pool.release(held)

    swap = next(e for e in seen if isinstance(e, SwapDone))
    assert (swap.old_generation, swap.new_generation) == (0, 1)
    assert str(pg_a.port) in swap.old_target
    assert str(pg_b.port) in swap.new_target
    assert swap.open_seconds > 0
    assert drained[0].generation == 0
    assert drained[0].terminated == 1
    assert any(isinstance(e, ReloadStarted) for e in seen)
    assert all(e.pool == "orders" for e in seen)
    for event in seen:
        assert password not in repr(event)


async def test_force_kill_event_and_async_iteration(
    pg_a: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    pool: HotPool = await aiohotload.create_pool(
        f"watchfiles://postgres{path}?forceKill=true", min_size=1, max_size=2
    )
    collected: list[Event] = []
    stream = pool.events()  # subscribed from here on

    async def consume() -> None:
        async for event in stream:
            collected.append(event)

    consumer = asyncio.ensure_future(consume())
    write_dsn(path, pg_b.dsn(user, password))
    await pool.wait_for_swap(timeout=10)
    await wait_until(lambda: any(isinstance(e, ForceKillDone) for e in collected))
    await pool.close()
    # The iterator ends when the pool closes.
    await asyncio.wait_for(consumer, timeout=5)
    assert [type(e) for e in collected][:2] == [ReloadStarted, SwapDone]
    assert pool.name == str(path)
