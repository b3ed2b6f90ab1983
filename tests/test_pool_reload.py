"""The reload state machine with a fake driver and strategy: no server needed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

import pytest

import aiohotload
from aiohotload import HotPool
from tests.support import FakeDriver, QueueStrategy, until


async def open_pool(strategy: QueueStrategy, first: str, url: str = "queue://fake/x") -> HotPool:
    await strategy.queue.put(first)
    return await asyncio.wait_for(aiohotload.create_pool(url), timeout=5)


async def test_swap_retires_old_pool(driver: FakeDriver, strategy: QueueStrategy) -> None:
    pool = await open_pool(strategy, "postgresql://a")
    await strategy.queue.put("postgresql://b")
    assert await pool.wait_for_swap(timeout=5) == 1
    assert pool.target == "postgresql://b"
    await until(lambda: pool.draining == 0)
    assert driver.opened[0].closed
    await pool.close()
    assert driver.opened[1].closed


async def test_force_kill_terminates_old_pool(driver: FakeDriver, strategy: QueueStrategy) -> None:
    pool = await open_pool(strategy, "postgresql://a", "queue://fake/x?forceKill=1")
    await strategy.queue.put("postgresql://b")
    await pool.wait_for_swap(timeout=5)
    await until(lambda: driver.opened[0].terminated)
    assert not driver.opened[0].closed
    await pool.close()


async def test_newer_dsn_supersedes_a_pending_attempt(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    pool = await open_pool(strategy, "postgresql://a")
    await strategy.queue.put("slow://never")
    await until(lambda: "slow://never" in driver.attempts)
    await strategy.queue.put("postgresql://c")
    assert await pool.wait_for_swap(timeout=5) == 1
    assert pool.target == "postgresql://c"
    assert [p.dsn for p in driver.opened] == ["postgresql://a", "postgresql://c"]
    await pool.close()


async def test_failed_reload_keeps_serving_and_retries(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    pool = await open_pool(strategy, "postgresql://a")
    driver.fail_times["postgresql://late"] = 2
    await strategy.queue.put("postgresql://late")
    # Picked up by the retry loop, with no further change from the strategy.
    assert await pool.wait_for_swap(timeout=10) == 1
    assert driver.attempts.count("postgresql://late") == 3
    assert pool.last_error is None
    await pool.close()


async def test_bad_dsn_records_error_and_reverting_clears_it(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    pool = await open_pool(strategy, "postgresql://a")
    await strategy.queue.put("bad://x")
    await until(lambda: pool.last_error is not None)
    assert isinstance(pool.last_error, aiohotload.DriverError)
    assert pool.generation == 0
    await strategy.queue.put("postgresql://a")
    await until(lambda: pool.last_error is None)
    assert pool.generation == 0
    await pool.close()


async def test_strategy_failure_after_start_restarts_it(
    driver: FakeDriver, strategy: QueueStrategy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aiohotload")
    pool = await open_pool(strategy, "postgresql://a")
    await strategy.queue.put(RuntimeError("watcher died"))
    await until(lambda: strategy.started >= 2)
    assert any("watcher died" in r.getMessage() for r in caplog.records)
    assert isinstance(pool.last_error, aiohotload.StrategyError)
    await strategy.queue.put("postgresql://a")  # the restarted strategy yields again
    await until(lambda: pool.last_error is None)
    await strategy.queue.put("postgresql://b")
    assert await pool.wait_for_swap(timeout=5) == 1
    await pool.close()


async def test_strategy_errors_reach_create_pool(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    with pytest.raises(aiohotload.InvalidOptionError, match="bogus"):
        await asyncio.wait_for(aiohotload.create_pool("queue://fake/x?bogus=1"), timeout=5)
    # The first DSN's error is raised as the driver raised it (code catching asyncpg's
    # errors at startup keeps working); the pool's last_error names the target.
    pool = aiohotload.create_pool("queue://fake/x")
    await strategy.queue.put("postgresql://badhost/db")
    with pytest.raises(ConnectionRefusedError, match="cannot reach"):
        await asyncio.wait_for(pool, timeout=5)
    assert "could not open a pool on postgresql://badhost/db" in str(pool.last_error)
    # Unless its text would show the password: then a copy of the same class, redacted.
    pool = aiohotload.create_pool("queue://fake/x")
    await strategy.queue.put("bad://u:s3cret@h/db")
    with pytest.raises(ConnectionRefusedError, match="cannot reach") as info:
        await asyncio.wait_for(pool, timeout=5)
    assert "s3cret" not in str(info.value) and "cannot reach" in str(info.value)
    assert "s3cret" not in str(pool.last_error)
    assert info.value.__cause__ is None and info.value.__context__ is None


async def test_first_value_timeout_is_bounded(driver: FakeDriver, strategy: QueueStrategy) -> None:
    with pytest.raises(aiohotload.StrategyError, match="connect_timeout"):
        await asyncio.wait_for(
            aiohotload.create_pool("queue://fake/x?connect_timeout=100ms"), timeout=5
        )


async def test_strategy_ending_without_value_is_an_error(driver: FakeDriver) -> None:
    async def nothing(path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        return
        yield  # pragma: no cover

    aiohotload.register_strategy("nothing", nothing)
    try:
        with pytest.raises(aiohotload.StrategyError, match="ended without a DSN"):
            await asyncio.wait_for(aiohotload.create_pool("nothing://fake/x"), timeout=5)
    finally:
        aiohotload.unregister_strategy("nothing")


async def test_close_leaves_no_tasks(driver: FakeDriver, strategy: QueueStrategy) -> None:
    before = asyncio.all_tasks()
    pool = await open_pool(strategy, "postgresql://a")
    await strategy.queue.put("slow://pending")  # an attempt in flight at close
    await until(lambda: "slow://pending" in driver.attempts)
    await pool.close()
    await pool.close()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before - {asyncio.current_task()} == set()
    assert all(p.closed or p.terminated for p in driver.opened)
    with pytest.raises(Exception, match="closed"):
        await pool.fetchval("SELECT 1")


async def test_close_while_opening_ends_the_open_at_once(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    """A pool closed before its first DSN arrives stops waiting for it (not after
    connect_timeout) and raises as a closed pool."""
    pool = aiohotload.create_pool("queue://fake/x?connect_timeout=30s")
    opening = asyncio.ensure_future(pool.__aenter__())
    await until(lambda: strategy.started == 1)
    await asyncio.wait_for(pool.close(), timeout=5)
    with pytest.raises(aiohotload.PoolClosedError):
        await asyncio.wait_for(opening, timeout=5)
