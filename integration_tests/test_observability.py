"""Metrics and traces of reloads on real servers: a swap, failed reloads, a timed-out drain.

Metrics are read back from the text exposition of a fresh registry, spans from the SDK's
in-memory exporter; neither, nor any event, may carry a password.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from aiohotload.testing import PgServer, RoleFactory, wait_until, write_dsn

pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import aiohotload
from aiohotload import Event, HotPool, PoolDrained, ReloadFailed, SwapDone
from aiohotload.metrics import HotloadCollector
from aiohotload.tracing import instrument

pytestmark = pytest.mark.timeout(60)

NAME = "orders"


class Scrape:
    """One text exposition of a registry, parsed back: ``scrape(name, **labels)``."""

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

    def label_values(self) -> list[str]:
        return [value for _, labels, _ in self.samples for value in labels.values()]


@dataclass
class Observed:
    """A pool with everything watching it: metrics, spans and the raw events."""

    pool: HotPool
    registry: CollectorRegistry
    exporter: InMemorySpanExporter
    events: list[Event]

    def scrape(self) -> Scrape:
        return Scrape(self.registry)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


@dataclass
class Setup:
    user: str
    password: str
    path: Path


@pytest.fixture
async def setup(pg_a: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path) -> Setup:
    """One role with the same name and password on both servers; the DSN file names pg_a."""
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    return Setup(user, password, path)


async def observe(setup: Setup, **options: str) -> AsyncIterator[Observed]:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    url = f"watchfiles://postgres{setup.path}" + (f"?{query}" if query else "")
    registry = CollectorRegistry()
    collector = HotloadCollector()
    registry.register(collector)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with aiohotload.create_pool(url, name=NAME, min_size=1, max_size=2) as pool:
        observed = Observed(pool, registry, exporter, [])
        pool.add_listener(observed.events.append)
        collector.track(pool)
        instrumentation = instrument(pool, tracer_provider=provider)
        yield observed
        instrumentation.uninstrument()
    provider.shutdown()


@pytest.fixture
async def graceful(setup: Setup) -> AsyncIterator[Observed]:
    async for observed in observe(setup):
        yield observed


@pytest.fixture
async def short_drain(setup: Setup) -> AsyncIterator[Observed]:
    async for observed in observe(setup, drain_timeout="200ms"):
        yield observed


def assert_no_secret(password: str, texts: Iterable[object]) -> None:
    """No text holds the password, encoded or not, or its random tail (a partial leak)."""
    forms = {password, quote(password, safe=""), quote_plus(password), password[-8:]}
    for text in texts:
        for form in forms:
            assert form not in str(text), f"secret {form!r} found in {text!r}"


def span_texts(spans: Iterable[ReadableSpan]) -> list[object]:
    texts: list[object] = []
    for span in spans:
        texts += [span.name, span.status.description, *(span.attributes or {}).values()]
        texts += [value for event in span.events for value in (event.attributes or {}).values()]
    return texts


def assert_nothing_leaks(observed: Observed, password: str) -> None:
    scrape = observed.scrape()
    assert_no_secret(password, [scrape.text, *scrape.label_values()])
    assert_no_secret(password, [repr(e) for e in observed.events])
    assert_no_secret(password, span_texts(observed.spans()))


async def test_swap_is_counted_timed_and_traced_once(
    pg_a: PgServer, pg_b: PgServer, setup: Setup, graceful: Observed
) -> None:
    pool = graceful.pool
    scrape = graceful.scrape()
    assert scrape("hotload_change_total", pool=NAME) == 0
    assert scrape("hotload_epoch", pool=NAME) == 0
    assert scrape("hotload_pool_connections", pool=NAME) == 1
    assert scrape("hotload_pool_idle_connections", pool=NAME) == 1

    held = await pool.acquire()  # keeps the old generation draining until released
    write_dsn(setup.path, pg_b.dsn(setup.user, setup.password))
    assert await pool.wait_for_swap(timeout=10) == 1
    scrape = graceful.scrape()
    assert scrape("hotload_change_total", pool=NAME) == 1
    assert scrape("hotload_epoch", pool=NAME) == 1
    assert scrape("hotload_draining_generations", pool=NAME) == 1
    assert scrape("hotload_pool_connections", pool=NAME) == 2  # the held one and the new one

    await pool.release(held)
    (drained,) = await wait_until(lambda: graceful.of(PoolDrained))
    (swap,) = graceful.of(SwapDone)
    assert isinstance(swap, SwapDone) and isinstance(drained, PoolDrained)
    scrape = graceful.scrape()
    assert scrape("hotload_draining_generations", pool=NAME) == 0
    assert scrape("hotload_pool_connections", pool=NAME) == 1
    assert scrape("hotload_pool_idle_connections", pool=NAME) == 1
    assert scrape("hotload_last_changed_timestamp_seconds", pool=NAME) == swap.at
    assert scrape("hotload_reload_seconds_count", pool=NAME) == 1
    assert scrape("hotload_reload_seconds_sum", pool=NAME) == swap.open_seconds
    assert scrape("hotload_epoch_drain_seconds_count", pool=NAME) == 1
    assert scrape("hotload_epoch_drain_seconds_sum", pool=NAME) == drained.seconds
    assert scrape("hotload_connections_killed_total", pool=NAME, reason="timeout") == 0
    assert scrape("hotload_reload_failures_total", pool=NAME) == 0
    assert scrape("hotload_reload_failing", pool=NAME) == 0

    (span,) = graceful.spans()
    assert span.status.status_code is StatusCode.OK
    attributes = dict(span.attributes or {})
    assert attributes["aiohotload.pool"] == NAME
    assert (attributes["aiohotload.old_generation"], attributes["aiohotload.new_generation"]) == (
        0,
        1,
    )
    assert attributes["aiohotload.open_seconds"] == swap.open_seconds
    assert f":{pg_b.port}/" in str(attributes["aiohotload.target"])
    assert_nothing_leaks(graceful, setup.password)


async def test_failed_reloads_are_counted_and_traced_as_errors(
    pg_b: PgServer, setup: Setup, graceful: Observed
) -> None:
    pool = graceful.pool
    write_dsn(setup.path, pg_b.dsn(setup.user, "wrong" + setup.password))
    # The first retry comes a quarter of a second after the first failure.
    await wait_until(lambda: len(graceful.of(ReloadFailed)) >= 2)

    # Read everything in one synchronous step, so that no attempt ends in between.
    failed, scrape, spans = graceful.of(ReloadFailed), graceful.scrape(), graceful.spans()
    assert scrape("hotload_reload_failures_total", pool=NAME) == len(failed)
    assert scrape("hotload_reload_failing", pool=NAME) == 1
    assert scrape("hotload_epoch", pool=NAME) == 0
    assert scrape("hotload_change_total", pool=NAME) == 0
    assert [s.status.status_code for s in spans] == [StatusCode.ERROR] * len(failed)
    assert [(s.attributes or {})["aiohotload.attempt"] for s in spans] == list(
        range(1, len(failed) + 1)
    )
    for span in spans:
        assert "InvalidPasswordError" in str(span.status.description)
        assert (span.attributes or {})["aiohotload.error"] == span.status.description

    write_dsn(setup.path, pg_b.dsn(setup.user, setup.password))
    await pool.wait_for_swap(timeout=10)
    scrape = graceful.scrape()
    assert scrape("hotload_reload_failing", pool=NAME) == 0
    assert scrape("hotload_change_total", pool=NAME) == 1
    assert scrape("hotload_reload_failures_total", pool=NAME) == len(graceful.of(ReloadFailed))
    assert graceful.spans()[-1].status.status_code is StatusCode.OK
    assert_nothing_leaks(graceful, setup.password)


async def test_straggler_at_drain_timeout_is_counted_as_killed(
    pg_b: PgServer, setup: Setup, short_drain: Observed
) -> None:
    pool = short_drain.pool
    held = await pool.acquire()  # still in use when the 200ms drain timeout ends
    scrape = short_drain.scrape()
    assert scrape("hotload_pool_connections", pool=NAME) == 1
    assert scrape("hotload_pool_idle_connections", pool=NAME) == 0

    write_dsn(setup.path, pg_b.dsn(setup.user, setup.password))
    await pool.wait_for_swap(timeout=10)
    (drained,) = await wait_until(lambda: short_drain.of(PoolDrained))
    assert isinstance(drained, PoolDrained)
    scrape = short_drain.scrape()
    assert scrape("hotload_connections_killed_total", pool=NAME, reason="timeout") == 1
    assert scrape("hotload_connections_killed_total", pool=NAME, reason="force_kill") == 0
    assert scrape("hotload_draining_generations", pool=NAME) == 0
    assert scrape("hotload_epoch_drain_seconds_sum", pool=NAME) == drained.seconds
    assert scrape("hotload_pool_connections", pool=NAME) == 1  # the new pool's
    assert scrape("hotload_epoch", pool=NAME) == 1
    await pool.release(held)  # terminated under the caller; releasing it is still fine
    assert_nothing_leaks(short_drain, setup.password)


async def test_closed_pool_leaves_the_exposition(setup: Setup) -> None:
    registry = CollectorRegistry()
    collector = HotloadCollector()
    registry.register(collector)
    async with aiohotload.create_pool(f"watchfiles://postgres{setup.path}", name=NAME) as pool:
        collector.track(pool)
        assert Scrape(registry)("hotload_epoch", pool=NAME) == 0
    assert Scrape(registry).samples == []
