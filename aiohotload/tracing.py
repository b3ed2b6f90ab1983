"""OpenTelemetry tracing for :class:`~aiohotload.HotPool`: a span per reload attempt.

Install the extra (``pip install 'aiohotload[otel]'``), then::

    from aiohotload.tracing import instrument

    instrumentation = instrument(pool)  # the global tracer provider, or tracer_provider=...
    ...
    instrumentation.uninstrument()

Nothing is traced unless :func:`instrument` is called. Each attempt to reload becomes a root
span ``aiohotload.reload``, from :class:`~aiohotload.ReloadStarted` to
:class:`~aiohotload.SwapDone` (status OK) or :class:`~aiohotload.ReloadFailed` (status
ERROR). Its attributes come from the events, so targets and errors are redacted. The pool's
query path is untouched; :func:`annotate_current_span` tags your own spans on request.
"""

from __future__ import annotations

import weakref

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
except ImportError as exc:
    raise ImportError(
        "aiohotload.tracing needs opentelemetry-api: pip install 'aiohotload[otel]'"
    ) from exc

from . import __version__
from .events import Event, ReloadFailed, ReloadStarted, SwapDone
from .pool import HotPool

__all__ = ["SPAN_NAME", "PoolInstrumentation", "annotate_current_span", "instrument"]

#: The name of the span recorded for each reload attempt.
SPAN_NAME = "aiohotload.reload"

# Reloads run in the pool's background task, which inherited the context of whoever opened
# the pool; an empty context makes each reload a trace of its own instead of a late child
# of, say, the application's startup span.
_ROOT = Context()


class PoolInstrumentation:
    """What :func:`instrument` returns: records the pool's reload spans until
    :meth:`uninstrument`."""

    def __init__(self, pool: HotPool, tracer: trace.Tracer) -> None:
        self._pool: weakref.ref[HotPool] | None = weakref.ref(pool)
        self._tracer = tracer
        self._span: Span | None = None  # the attempt in flight; a pool reloads one at a time
        pool.add_listener(self._on_event)

    def uninstrument(self) -> None:
        """Stop recording spans; an attempt still in flight is ended as ``abandoned``.
        Idempotent."""
        pool = self._pool() if self._pool is not None else None
        self._pool = None
        if pool is not None:
            pool.remove_listener(self._on_event)
        self._end_open("abandoned", None)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, ReloadStarted):
            # A new attempt while one is open: the open one was dropped for a newer DSN.
            self._end_open("superseded", _ns(event.at))
            self._span = self._start(event.pool, event.at)
            self._span.set_attributes(
                {
                    "aiohotload.attempt": event.attempt,
                    "aiohotload.old_generation": event.generation,
                    "aiohotload.target": event.target,
                }
            )
        elif isinstance(event, SwapDone):
            span = self._take(event.pool, event.at - event.open_seconds)
            span.set_attributes(
                {
                    "aiohotload.outcome": "swapped",
                    "aiohotload.old_generation": event.old_generation,
                    "aiohotload.new_generation": event.new_generation,
                    "aiohotload.target": event.new_target,
                    "aiohotload.open_seconds": event.open_seconds,
                }
            )
            span.set_status(Status(StatusCode.OK))
            span.end(end_time=_ns(event.at))
        elif isinstance(event, ReloadFailed):
            span = self._take(event.pool, event.at)
            span.set_attributes(
                {
                    "aiohotload.outcome": "failed",
                    "aiohotload.attempt": event.attempt,
                    "aiohotload.old_generation": event.generation,
                    "aiohotload.target": event.target,
                    "aiohotload.error": event.error,
                    "aiohotload.retry_in": event.retry_in,
                }
            )
            span.set_status(Status(StatusCode.ERROR, event.error))
            span.end(end_time=_ns(event.at))

    def _start(self, pool: str, at: float) -> Span:
        return self._tracer.start_span(
            SPAN_NAME,
            context=_ROOT,
            kind=SpanKind.INTERNAL,
            start_time=_ns(at),
            attributes={"aiohotload.pool": pool},
        )

    def _take(self, pool: str, started: float) -> Span:
        """The open attempt's span, or (instrumented mid-attempt) one started at *started*."""
        span, self._span = self._span, None
        return span if span is not None else self._start(pool, started)

    def _end_open(self, outcome: str, end_time: int | None) -> None:
        span, self._span = self._span, None
        if span is not None:
            span.set_attribute("aiohotload.outcome", outcome)
            span.end(end_time=end_time)


def instrument(
    pool: HotPool, *, tracer_provider: TracerProvider | None = None
) -> PoolInstrumentation:
    """Record a span for each of *pool*'s reload attempts; call once per pool.

    tracer_provider: where spans go (default: the global one, ``trace.set_tracer_provider``).
    """
    tracer = trace.get_tracer("aiohotload", __version__, tracer_provider=tracer_provider)
    return PoolInstrumentation(pool, tracer)


def annotate_current_span(pool: HotPool) -> None:
    """Set ``aiohotload.pool`` and ``aiohotload.generation`` on the current span.

    Call it next to your query (after acquiring): the generation is the one serving new work
    at the time of the call. Costs a context lookup when no span is recording.
    """
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {"aiohotload.pool": pool.name, "aiohotload.generation": pool.generation}
        )


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)
