"""Reload spans from events, with the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

import aiohotload
from aiohotload import Event, HotPool, ReloadFailed, ReloadStarted, SwapDone
from aiohotload.tracing import SPAN_NAME, annotate_current_span, instrument


class StubPool:
    """The listener API of a HotPool, with events emitted by hand."""

    name = "orders"
    generation = 3

    def __init__(self) -> None:
        self.listeners: list[Callable[[Event], object]] = []

    def add_listener(self, callback: Callable[[Event], object]) -> None:
        self.listeners.append(callback)

    def remove_listener(self, callback: Callable[[Event], object]) -> None:
        if callback in self.listeners:
            self.listeners.remove(callback)

    def emit(self, event: Event) -> None:
        for callback in list(self.listeners):
            callback(event)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    return p


@pytest.fixture
def stub() -> StubPool:
    return StubPool()


def started(attempt: int = 1, at: float = 100.0) -> ReloadStarted:
    target = "postgresql://u:********@b/db"
    return ReloadStarted("orders", target=target, attempt=attempt, generation=0, at=at)


def spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


def test_a_swap_is_one_ok_span(
    stub: StubPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    instrument(cast(HotPool, stub), tracer_provider=provider)
    stub.emit(started())
    assert spans(exporter) == []  # open until the outcome
    stub.emit(
        SwapDone(
            "orders",
            old_generation=0,
            new_generation=1,
            old_target="postgresql://u:********@a/db",
            new_target="postgresql://u:********@b/db",
            open_seconds=0.25,
            at=100.25,
        )
    )
    (span,) = spans(exporter)
    assert span.name == SPAN_NAME
    assert span.status.status_code is StatusCode.OK
    assert span.parent is None  # a trace of its own
    assert span.start_time == 100_000_000_000
    assert span.end_time == 100_250_000_000
    assert dict(span.attributes or {}) == {
        "aiohotload.pool": "orders",
        "aiohotload.attempt": 1,
        "aiohotload.outcome": "swapped",
        "aiohotload.old_generation": 0,
        "aiohotload.new_generation": 1,
        "aiohotload.target": "postgresql://u:********@b/db",
        "aiohotload.open_seconds": 0.25,
    }


def test_each_failed_attempt_is_an_error_span(
    stub: StubPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    instrument(cast(HotPool, stub), tracer_provider=provider)
    for attempt in (1, 2):
        stub.emit(started(attempt))
        stub.emit(
            ReloadFailed(
                "orders",
                target="postgresql://u:********@b/db",
                error="could not open a pool: InvalidPasswordError",
                attempt=attempt,
                retry_in=0.5,
                generation=0,
            )
        )
    assert [s.status.status_code for s in spans(exporter)] == [StatusCode.ERROR] * 2
    assert [(s.attributes or {})["aiohotload.attempt"] for s in spans(exporter)] == [1, 2]
    span = spans(exporter)[0]
    assert span.status.description == "could not open a pool: InvalidPasswordError"
    assert (span.attributes or {})["aiohotload.error"] == span.status.description
    assert (span.attributes or {})["aiohotload.outcome"] == "failed"


def test_superseded_and_abandoned_attempts_are_ended(
    stub: StubPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    instrumentation = instrument(cast(HotPool, stub), tracer_provider=provider)
    stub.emit(started(at=100.0))
    stub.emit(started(at=101.0))  # a newer DSN arrived while the first was opening
    (first,) = spans(exporter)
    assert (first.attributes or {})["aiohotload.outcome"] == "superseded"
    assert first.status.status_code is StatusCode.UNSET
    assert first.end_time == 101_000_000_000

    instrumentation.uninstrument()
    instrumentation.uninstrument()  # idempotent
    assert [(s.attributes or {})["aiohotload.outcome"] for s in spans(exporter)] == [
        "superseded",
        "abandoned",
    ]
    assert stub.listeners == []
    stub.emit(started())
    assert len(spans(exporter)) == 2


def test_an_outcome_without_its_start_still_makes_a_span(
    stub: StubPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    instrument(cast(HotPool, stub), tracer_provider=provider)  # instrumented mid-attempt
    stub.emit(
        SwapDone(
            "orders",
            old_generation=0,
            new_generation=1,
            old_target="a",
            new_target="b",
            open_seconds=2.0,
            at=10.0,
        )
    )
    (span,) = spans(exporter)
    assert (span.start_time, span.end_time) == (8_000_000_000, 10_000_000_000)


def test_annotate_current_span(
    stub: StubPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    pool = cast(HotPool, stub)
    annotate_current_span(pool)  # no span: nothing to do, no error
    with provider.get_tracer("app").start_as_current_span("handler"):
        annotate_current_span(pool)
    (span,) = spans(exporter)
    assert (span.attributes or {})["aiohotload.generation"] == 3
    assert (span.attributes or {})["aiohotload.pool"] == "orders"


def test_instrument_takes_a_real_pool(provider: TracerProvider) -> None:
    pool = aiohotload.create_pool("watchfiles://postgres/tmp/nowhere")
    instrument(pool, tracer_provider=provider).uninstrument()
