"""The reload state machine with a fake driver and strategy: no server needed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import anyio
import pytest

import aiohotload
from aiohotload import HotPool


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait for *condition* to hold, polling, with a deadline."""
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.001)


class FakePool:
    """Just enough of asyncpg.Pool for the swap machinery."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.closed = False
        self.terminated = False

    async def close(self) -> None:
        self.closed = True

    def terminate(self) -> None:
        self.terminated = True

    async def expire_connections(self) -> None:
        pass

    def get_size(self) -> int:
        return 0 if self.closed or self.terminated else 1

    def get_idle_size(self) -> int:
        return self.get_size()

    def get_min_size(self) -> int:
        return 1

    def get_max_size(self) -> int:
        return 1

    def is_closing(self) -> bool:
        return self.closed or self.terminated


class FakeDriver:
    """Opens FakePools; DSNs starting with 'bad' fail, 'slow' ones wait for a release."""

    def __init__(self) -> None:
        self.opened: list[FakePool] = []
        self.attempts: list[str] = []
        self.release_slow = asyncio.Event()
        self.fail_times: dict[str, int] = {}

    async def __call__(self, dsn: str, **kwargs: Any) -> FakePool:
        self.attempts.append(dsn)
        if dsn.startswith("bad"):
            raise ConnectionRefusedError(f"cannot reach {dsn}")
        if self.fail_times.get(dsn, 0) > 0:
            self.fail_times[dsn] -= 1
            raise OSError("not up yet")
        if dsn.startswith("slow"):
            await self.release_slow.wait()
        pool = FakePool(dsn)
        self.opened.append(pool)
        return pool


class QueueStrategy:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | BaseException] = asyncio.Queue()
        self.started = 0

    async def watch(self, path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        self.started += 1
        if "bogus" in options:
            raise aiohotload.InvalidOptionError("unknown option 'bogus'")
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item


@pytest.fixture
def driver() -> Iterator[FakeDriver]:
    d = FakeDriver()
    aiohotload.register_driver("fake", d)
    yield d
    aiohotload.unregister_driver("fake")


@pytest.fixture
def strategy() -> Iterator[QueueStrategy]:
    s = QueueStrategy()
    aiohotload.register_strategy("queue", s)
    yield s
    aiohotload.unregister_strategy("queue")


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
    with pytest.raises(aiohotload.DriverError, match="bad://x"):
        await open_pool(strategy, "bad://x")


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
