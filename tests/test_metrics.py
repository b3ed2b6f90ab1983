"""HotloadCollector with a fake driver and strategy: no server needed."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable
from typing import TypeVar, cast

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import aiohotload
from aiohotload import (
    ConnectionExpired,
    Event,
    FailoverDetected,
    ForceKillDone,
    HotPool,
    PoolDrained,
    RefreshRequested,
    ReloadFailed,
    SwapDone,
)
from aiohotload.metrics import HotloadCollector
from tests.support import FakeDriver, QueueStrategy, until

COUNTERS = ("hotload_change_total", "hotload_reload_failures_total")


E = TypeVar("E", bound=Event)


def next_event(pool: HotPool, kind: type[E]) -> asyncio.Future[E]:
    """A future for *pool*'s next event of type *kind*; subscribed from this call on."""
    future: asyncio.Future[E] = asyncio.get_running_loop().create_future()

    def listener(event: Event) -> None:
        if isinstance(event, kind) and not future.done():
            future.set_result(event)

    pool.add_listener(listener)
    future.add_done_callback(lambda _: pool.remove_listener(listener))
    return future


class Scrape:
    """One text exposition of a registry, parsed back: ``scrape(name, pool=..., ...)``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.text = generate_latest(registry).decode()
        self.samples = [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(self.text)
            for s in family.samples
        ]

    def __call__(self, name: str, **labels: str) -> float | None:
        found = [v for n, ls, v in self.samples if n == name and labels.items() <= ls.items()]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
        return found[0] if found else None

    def pools(self) -> set[str]:
        return {ls["pool"] for _, ls, _ in self.samples if "pool" in ls}


class StubPool:
    """The public surface the collector reads, with events emitted by hand."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.generation = 0
        self.last_error: Exception | None = None
        self.draining = 0
        self.listeners: list[Callable[[Event], object]] = []

    def add_listener(self, callback: Callable[[Event], object]) -> None:
        self.listeners.append(callback)

    def remove_listener(self, callback: Callable[[Event], object]) -> None:
        self.listeners.remove(callback)

    def emit(self, event: Event) -> None:
        for callback in self.listeners:
            callback(event)

    def is_closing(self) -> bool:
        return False

    def get_size(self) -> int:
        return 0

    def get_idle_size(self) -> int:
        return 0


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def collector(registry: CollectorRegistry) -> HotloadCollector:
    c = HotloadCollector()
    registry.register(c)
    return c


async def open_pool(strategy: QueueStrategy, first: str, *, name: str = "orders") -> HotPool:
    await strategy.queue.put(first)
    return await asyncio.wait_for(aiohotload.create_pool("queue://fake/x", name=name), 5)


def test_importing_registers_nothing() -> None:
    assert "hotload_" not in generate_latest(REGISTRY).decode()


async def test_series_of_a_fresh_pool(
    driver: FakeDriver,
    strategy: QueueStrategy,
    registry: CollectorRegistry,
    collector: HotloadCollector,
) -> None:
    async with await open_pool(strategy, "postgresql://a") as pool:
        collector.track(pool)
        scrape = Scrape(registry)
        for name in COUNTERS:
            assert scrape(name, pool="orders") == 0
        assert scrape("hotload_reload_failing", pool="orders") == 0
        assert scrape("hotload_epoch", pool="orders") == 0
        assert scrape("hotload_draining_generations", pool="orders") == 0
        assert scrape("hotload_connections_killed_total", pool="orders", reason="timeout") == 0
        assert scrape("hotload_connections_killed_total", pool="orders", reason="force_kill") == 0
        assert scrape("hotload_reload_seconds_count", pool="orders") == 0
        assert scrape("hotload_pool_connections", pool="orders") == 2
        assert scrape("hotload_pool_idle_connections", pool="orders") == 1
        # As in Go hotload, there is no "last changed" before a change.
        assert scrape("hotload_last_changed_timestamp_seconds", pool="orders") is None


async def test_swap_counts_and_times_the_new_pool(
    driver: FakeDriver,
    strategy: QueueStrategy,
    registry: CollectorRegistry,
    collector: HotloadCollector,
) -> None:
    async with await open_pool(strategy, "postgresql://a") as pool:
        collector.track(pool)
        swapped, drained = next_event(pool, SwapDone), next_event(pool, PoolDrained)
        before = time.time()
        await strategy.queue.put("postgresql://b")
        swap = await asyncio.wait_for(swapped, 5)
        await asyncio.wait_for(drained, 5)

        scrape = Scrape(registry)
        assert scrape("hotload_change_total", pool="orders") == 1
        assert scrape("hotload_epoch", pool="orders") == 1
        changed = scrape("hotload_last_changed_timestamp_seconds", pool="orders")
        assert changed is not None
        assert before <= changed <= time.time()
        assert scrape("hotload_reload_seconds_count", pool="orders") == 1
        assert scrape("hotload_reload_seconds_bucket", pool="orders", le="+Inf") == 1
        assert scrape("hotload_reload_seconds_sum", pool="orders") == swap.open_seconds
        assert scrape("hotload_epoch_drain_seconds_count", pool="orders") == 1
        assert scrape("hotload_reload_failures_total", pool="orders") == 0


async def test_failed_reloads_count_and_failing_follows_last_error(
    driver: FakeDriver,
    strategy: QueueStrategy,
    registry: CollectorRegistry,
    collector: HotloadCollector,
) -> None:
    async with await open_pool(strategy, "postgresql://a") as pool:
        collector.track(pool)
        failures: list[ReloadFailed] = []
        pool.add_listener(lambda e: failures.append(e) if isinstance(e, ReloadFailed) else None)
        failed = next_event(pool, ReloadFailed)
        await strategy.queue.put("bad://x")
        await asyncio.wait_for(failed, 5)

        scrape = Scrape(registry)  # synchronous: no event can arrive between the two reads
        assert scrape("hotload_reload_failures_total", pool="orders") == len(failures)
        assert scrape("hotload_reload_failing", pool="orders") == 1
        assert scrape("hotload_epoch", pool="orders") == 0
        assert scrape("hotload_change_total", pool="orders") == 0

        # Going back to the DSN in use clears the error without a swap (and without an event).
        await strategy.queue.put("postgresql://a")
        await until(lambda: pool.last_error is None)
        scrape = Scrape(registry)
        assert scrape("hotload_reload_failing", pool="orders") == 0
        assert scrape("hotload_reload_failures_total", pool="orders") == len(failures) >= 1


async def test_draining_generation_is_counted_until_closed(
    driver: FakeDriver,
    strategy: QueueStrategy,
    registry: CollectorRegistry,
    collector: HotloadCollector,
) -> None:
    async with await open_pool(strategy, "postgresql://a") as pool:
        collector.track(pool)
        driver.closing.clear()  # the old pool cannot close until set again
        try:
            await strategy.queue.put("postgresql://b")
            await pool.wait_for_swap(timeout=5)
            scrape = Scrape(registry)
            assert scrape("hotload_draining_generations", pool="orders") == 1
            assert scrape("hotload_pool_connections", pool="orders") == 4  # old 2 + new 2
            assert scrape("hotload_epoch_drain_seconds_count", pool="orders") == 0
        finally:
            drained = next_event(pool, PoolDrained)
            driver.closing.set()
        await asyncio.wait_for(drained, 5)
        scrape = Scrape(registry)
        assert scrape("hotload_draining_generations", pool="orders") == 0
        assert scrape("hotload_pool_connections", pool="orders") == 2
        assert scrape("hotload_epoch_drain_seconds_count", pool="orders") == 1
        assert scrape("hotload_connections_killed_total", pool="orders", reason="timeout") == 0


def test_killed_connections_by_reason(
    registry: CollectorRegistry, collector: HotloadCollector
) -> None:
    stub = StubPool("orders")
    collector.track(cast(HotPool, stub))
    stub.emit(PoolDrained("orders", generation=0, target="t", seconds=0.2, terminated=2))
    stub.emit(PoolDrained("orders", generation=1, target="t", seconds=0.3, terminated=1))
    stub.emit(ForceKillDone("orders", generation=2, target="t", cancelled=4))

    scrape = Scrape(registry)
    assert scrape("hotload_connections_killed_total", pool="orders", reason="timeout") == 3
    assert scrape("hotload_connections_killed_total", pool="orders", reason="force_kill") == 4
    # Drain durations come from graceful drains only: a force kill has none.
    assert scrape("hotload_epoch_drain_seconds_count", pool="orders") == 2
    assert scrape("hotload_epoch_drain_seconds_sum", pool="orders") == pytest.approx(0.5)
    assert scrape("hotload_epoch_drain_seconds_bucket", pool="orders", le="0.1") == 0
    assert scrape("hotload_epoch_drain_seconds_bucket", pool="orders", le="0.5") == 2


async def test_untracked_and_closed_pools_disappear(
    driver: FakeDriver,
    strategy: QueueStrategy,
    registry: CollectorRegistry,
    collector: HotloadCollector,
) -> None:
    pool = await open_pool(strategy, "postgresql://a")
    collector.track(pool)
    assert Scrape(registry).pools() == {"orders"}

    collector.untrack(pool)
    collector.untrack(pool)  # no error the second time
    assert Scrape(registry).pools() == set()
    await strategy.queue.put("postgresql://b")
    await pool.wait_for_swap(timeout=5)

    collector.track(pool)  # counting starts afresh
    assert Scrape(registry)("hotload_change_total", pool="orders") == 0
    await pool.close()
    assert Scrape(registry).pools() == set()


def test_tracking_does_not_keep_a_pool_alive(
    registry: CollectorRegistry, collector: HotloadCollector
) -> None:
    pool = aiohotload.create_pool("watchfiles://postgres/tmp/nowhere", name="gone")
    ref = weakref.ref(pool)
    collector.track(pool)
    assert Scrape(registry).pools() == {"gone"}
    del pool
    gc.collect()
    assert ref() is None
    assert Scrape(registry).pools() == set()


def test_pools_must_have_distinct_names(
    registry: CollectorRegistry, collector: HotloadCollector
) -> None:
    first = aiohotload.create_pool("watchfiles://postgres/tmp/a", name="orders")
    collector.track(first)
    collector.track(first)  # the same pool again: a no-op
    with pytest.raises(aiohotload.RegistryError, match="'orders'"):
        collector.track(aiohotload.create_pool("watchfiles://postgres/tmp/b", name="orders"))
    second = aiohotload.create_pool("watchfiles://postgres/tmp/b")  # named /tmp/b
    collector.track(second)
    assert Scrape(registry).pools() == {"orders", "/tmp/b"}
    assert Scrape(registry)("hotload_epoch", pool="orders") == 0


def test_hostile_pool_names_round_trip(
    registry: CollectorRegistry, collector: HotloadCollector
) -> None:
    name = 'we"ird\\ name\nwith é€日本 } ='
    pool = aiohotload.create_pool("watchfiles://postgres/tmp/a", name=name)
    collector.track(pool)
    assert Scrape(registry).pools() == {name}


def test_a_registry_sees_the_names_without_collecting(
    registry: CollectorRegistry, collector: HotloadCollector
) -> None:
    # describe() gives the names, so a second collector on the same registry is refused.
    with pytest.raises(ValueError, match="hotload_change_total"):
        registry.register(HotloadCollector())


def test_buckets_are_checked() -> None:
    with pytest.raises(ValueError, match="reload_buckets"):
        HotloadCollector(reload_buckets=(1.0, 0.5))
    with pytest.raises(ValueError, match="drain_buckets"):
        HotloadCollector(drain_buckets=(1.0, float("inf")))


async def test_refreshes_failovers_expiries_and_swap_reasons_are_counted(
    driver: FakeDriver,
    strategy: QueueStrategy,
    registry: CollectorRegistry,
    collector: HotloadCollector,
) -> None:
    async with await open_pool(strategy, "postgresql://a") as pool:
        collector.track(pool)
        emit = pool._events.emit
        emit(RefreshRequested("orders", generation=0, reason="login refused"))
        emit(FailoverDetected("orders", generation=0, target="postgresql://a", reason="25006"))
        emit(ConnectionExpired("orders", generation=0, age=3600.0))
        emit(ConnectionExpired("orders", generation=0, age=3601.0))
        await strategy.queue.put("postgresql://b")
        await pool.wait_for_swap(timeout=5)
        scrape = Scrape(registry)
        assert scrape("hotload_refresh_requests_total", pool="orders") == 1
        assert scrape("hotload_failovers_detected_total", pool="orders") == 1
        assert scrape("hotload_connections_expired_total", pool="orders") == 2
        assert scrape("hotload_swaps_total", pool="orders", reason="changed") == 1
