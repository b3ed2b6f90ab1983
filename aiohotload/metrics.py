"""Prometheus metrics for :class:`~aiohotload.HotPool` (and the SQLAlchemy engine): a
collector you register yourself.

Install the extra (``pip install 'aiohotload[prometheus]'``), then::

    from prometheus_client import REGISTRY
    from aiohotload.metrics import HotloadCollector

    collector = HotloadCollector()
    REGISTRY.register(collector)  # or any CollectorRegistry
    collector.track(pool)  # a HotPool, or an aiohotload.sqlalchemy engine

Importing this module registers nothing. Every series carries the label ``pool`` (the pool's
:attr:`~aiohotload.HotPool.name`) and never a DSN. A pool's series disappear when it is
untracked, closed or garbage-collected; tracking does not keep a pool alive.
"""

from __future__ import annotations

import bisect
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

try:
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:
    raise ImportError(
        "aiohotload.metrics needs prometheus-client: pip install 'aiohotload[prometheus]'"
    ) from exc

from .errors import HotloadError, RegistryError
from .events import (
    ConnectionExpired,
    Event,
    FailoverDetected,
    ForceKillDone,
    PoolDrained,
    RefreshRequested,
    ReloadFailed,
    SwapDone,
)

__all__ = ["DEFAULT_DRAIN_BUCKETS", "DEFAULT_RELOAD_BUCKETS", "HotloadCollector", "Trackable"]

#: Histogram buckets (seconds) for opening the new inner pool of a swap; connect_timeout is 10s
#: by default.
DEFAULT_RELOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Histogram buckets (seconds) for draining an old inner pool; drain_timeout is 30s by default.
DEFAULT_DRAIN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Values of the 'reason' label of hotload_connections_killed_total. Go hotload uses 'timeout'
# for connections still busy at its drain timeout, so that value keeps its meaning here.
_DRAIN_TIMEOUT = "timeout"
_FORCE_KILL = "force_kill"


class Trackable(Protocol):
    """What the collector reads from a pool: :class:`~aiohotload.HotPool` and
    :class:`~aiohotload.sqlalchemy.HotEngine` both are."""

    @property
    def name(self) -> str: ...
    @property
    def generation(self) -> int: ...
    @property
    def draining(self) -> int: ...
    @property
    def last_error(self) -> HotloadError | None: ...
    def add_listener(self, callback: Callable[[Event], object]) -> None: ...
    def remove_listener(self, callback: Callable[[Event], object]) -> None: ...
    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    def is_closing(self) -> bool: ...


class _Histogram:
    """Bucket counts and a sum, kept from events and exposed cumulatively."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "<=").
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        result = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            # The same spelling prometheus_client gives its own buckets: 1.0, 0.005, +Inf.
            result.append(("+Inf" if bound == math.inf else repr(float(bound)), float(cumulative)))
        return result


class _Tracked:
    """One tracked pool: a weak reference to it and the counters its events fed."""

    __slots__ = (
        "changes",
        "drains",
        "expired",
        "failovers",
        "failures",
        "killed",
        "last_changed",
        "listener",
        "ref",
        "refreshes",
        "reloads",
        "swaps",
    )

    def __init__(
        self,
        pool: Trackable,
        reload_buckets: Sequence[float],
        drain_buckets: Sequence[float],
        lock: threading.Lock,
    ) -> None:
        self.ref = weakref.ref(pool)
        self.changes = 0
        self.last_changed: float | None = None
        self.failures = 0
        self.killed = {_DRAIN_TIMEOUT: 0, _FORCE_KILL: 0}
        self.reloads = _Histogram(reload_buckets)
        self.drains = _Histogram(drain_buckets)
        self.swaps: dict[str, int] = {}
        self.refreshes = 0
        self.failovers = 0
        self.expired = 0

        # The pool holds this closure; it must not hold the pool (only the counters).
        def listener(event: Event) -> None:
            with lock:  # a scrape may be reading the counters from another thread
                self.record(event)

        self.listener = listener

    def record(self, event: Event) -> None:
        if isinstance(event, SwapDone):
            self.changes += 1
            self.last_changed = event.at
            self.reloads.observe(event.open_seconds)
            self.swaps[event.reason] = self.swaps.get(event.reason, 0) + 1
        elif isinstance(event, ReloadFailed):
            self.failures += 1
        elif isinstance(event, PoolDrained):
            self.drains.observe(event.seconds)
            self.killed[_DRAIN_TIMEOUT] += event.terminated
        elif isinstance(event, ForceKillDone):
            self.killed[_FORCE_KILL] += event.cancelled
        elif isinstance(event, RefreshRequested):
            self.refreshes += 1
        elif isinstance(event, FailoverDetected):
            self.failovers += 1
        elif isinstance(event, ConnectionExpired):
            self.expired += 1


class HotloadCollector(Collector):
    """A Prometheus collector for any number of pools.

    Register it on a registry (``registry.register(collector)``) and :meth:`track` each pool.
    Counters come from the pools' reload events; gauges are read from the pools at scrape
    time. Scraping from another thread (``prometheus_client.start_http_server``) is safe.

    reload_buckets: histogram buckets (seconds) for ``hotload_reload_seconds``.
    drain_buckets: histogram buckets (seconds) for ``hotload_epoch_drain_seconds``.
    """

    def __init__(
        self,
        *,
        reload_buckets: Sequence[float] = DEFAULT_RELOAD_BUCKETS,
        drain_buckets: Sequence[float] = DEFAULT_DRAIN_BUCKETS,
    ) -> None:
        for name, buckets in (("reload_buckets", reload_buckets), ("drain_buckets", drain_buckets)):
            if list(buckets) != sorted(set(buckets)) or not all(map(math.isfinite, buckets)):
                raise ValueError(f"{name} must be finite, increasing and distinct: {buckets!r}")
        self._reload_buckets = tuple(reload_buckets)
        self._drain_buckets = tuple(drain_buckets)
        self._lock = threading.Lock()
        self._tracked: list[_Tracked] = []

    def track(self, pool: Trackable) -> None:
        """Export *pool*'s metrics from now on; a no-op if it is tracked already.

        Raises :class:`~aiohotload.RegistryError` if another open tracked pool has the same
        name: their series would collide (give them distinct ``name=``).
        """
        with self._lock:
            self._prune()
            for tracked in self._tracked:
                other = tracked.ref()
                if other is pool:
                    return
                if other is not None and other.name == pool.name:
                    raise RegistryError(
                        f"a pool named {pool.name!r} is tracked already; pools need distinct "
                        "names (create_pool(..., name=...)) to be told apart in metrics"
                    )
            tracked = _Tracked(pool, self._reload_buckets, self._drain_buckets, self._lock)
            self._tracked.append(tracked)
            pool.add_listener(tracked.listener)

    def untrack(self, pool: Trackable) -> None:
        """Stop exporting *pool*'s metrics and drop its counters; no error if not tracked."""
        with self._lock:
            found = [t for t in self._tracked if t.ref() is pool]
            self._tracked = [t for t in self._tracked if t not in found]
        for tracked in found:
            pool.remove_listener(tracked.listener)

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples, so a registry can check for name clashes
        without collecting."""
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        """The metric families with one series per open tracked pool."""
        f = _families()
        with self._lock:
            self._prune()
            for tracked in self._tracked:
                pool = tracked.ref()
                if pool is None:
                    continue
                labels = [pool.name]
                f.changes.add_metric(labels, tracked.changes)
                if tracked.last_changed is not None:  # like Go hotload: absent until a change
                    f.last_changed.add_metric(labels, tracked.last_changed)
                f.failures.add_metric(labels, tracked.failures)
                f.failing.add_metric(labels, 0 if pool.last_error is None else 1)
                f.epoch.add_metric(labels, pool.generation)
                f.reloads.add_metric(labels, tracked.reloads.buckets(), tracked.reloads.total)
                f.drains.add_metric(labels, tracked.drains.buckets(), tracked.drains.total)
                f.draining.add_metric(labels, pool.draining)
                for reason, count in tracked.killed.items():
                    f.killed.add_metric([*labels, reason], count)
                f.size.add_metric(labels, pool.get_size())
                f.idle.add_metric(labels, pool.get_idle_size())
                for reason, count in tracked.swaps.items():
                    f.swaps.add_metric([*labels, reason], count)
                f.refreshes.add_metric(labels, tracked.refreshes)
                f.failovers.add_metric(labels, tracked.failovers)
                f.expired.add_metric(labels, tracked.expired)
        return iter(f)

    def _prune(self) -> None:
        """Forget pools that were closed or garbage-collected (the lock is held)."""
        keep = []
        for tracked in self._tracked:
            pool = tracked.ref()
            if pool is not None and pool.is_closing():
                pool.remove_listener(tracked.listener)
            elif pool is not None:
                keep.append(tracked)
        self._tracked = keep

    def __repr__(self) -> str:
        names = [p.name for t in self._tracked if (p := t.ref()) is not None]
        return f"<aiohotload.metrics.HotloadCollector tracking {names!r}>"


class _Families(NamedTuple):
    """One scrape's metric families. Names follow Go hotload where it has the metric (its
    label is ``url`` or ``driver`` where ours is ``pool``)."""

    changes: CounterMetricFamily
    last_changed: GaugeMetricFamily
    failures: CounterMetricFamily
    failing: GaugeMetricFamily
    epoch: GaugeMetricFamily
    reloads: HistogramMetricFamily
    drains: HistogramMetricFamily
    draining: GaugeMetricFamily
    killed: CounterMetricFamily
    size: GaugeMetricFamily
    idle: GaugeMetricFamily
    swaps: CounterMetricFamily
    refreshes: CounterMetricFamily
    failovers: CounterMetricFamily
    expired: CounterMetricFamily


def _families() -> _Families:
    """Fresh, empty metric families."""
    pool = ["pool"]
    return _Families(
        changes=CounterMetricFamily(
            "hotload_change_total",
            "DSN changes put in use (swaps), by pool.",
            labels=pool,
        ),
        last_changed=GaugeMetricFamily(
            "hotload_last_changed_timestamp_seconds",
            "When the pool last swapped to a new DSN (unix time), by pool.",
            labels=pool,
        ),
        failures=CounterMetricFamily(
            "hotload_reload_failures_total",
            "Failed attempts to open a pool on a new DSN, by pool.",
            labels=pool,
        ),
        failing=GaugeMetricFamily(
            "hotload_reload_failing",
            "1 while the newest DSN is not in use because of an error (pool.last_error), "
            "else 0, by pool.",
            labels=pool,
        ),
        epoch=GaugeMetricFamily(
            "hotload_epoch",
            "The generation serving new work: 0 at start, +1 per swap, by pool.",
            labels=pool,
        ),
        reloads=HistogramMetricFamily(
            "hotload_reload_seconds",
            "Time to open the new inner pool of each swap, by pool.",
            labels=pool,
        ),
        drains=HistogramMetricFamily(
            "hotload_epoch_drain_seconds",
            "Time from a swap until the old inner pool was closed (drains, not force kills), "
            "by pool.",
            labels=pool,
        ),
        draining=GaugeMetricFamily(
            "hotload_draining_generations",
            "Old inner pools still draining, by pool.",
            labels=pool,
        ),
        killed=CounterMetricFamily(
            "hotload_connections_killed_total",
            "Connections in use that were cancelled and terminated, by pool and reason "
            "(timeout: still busy at drain_timeout; force_kill: at a force-kill swap).",
            labels=[*pool, "reason"],
        ),
        size=GaugeMetricFamily(
            "hotload_pool_connections",
            "Open connections: the current inner pool's plus those still draining, by pool.",
            labels=pool,
        ),
        idle=GaugeMetricFamily(
            "hotload_pool_idle_connections",
            "Idle connections in the current inner pool, by pool.",
            labels=pool,
        ),
        swaps=CounterMetricFamily(
            "hotload_swaps",
            "Swaps by pool and reason (changed: a new DSN; refresh: a new DSN found when a "
            "refused login made the pool ask; failover: the same DSN on the server that takes "
            "writes).",
            labels=[*pool, "reason"],
        ),
        refreshes=CounterMetricFamily(
            "hotload_refresh_requests",
            "Requests to the strategy to look at its source now (a login was refused), by pool.",
            labels=pool,
        ),
        failovers=CounterMetricFamily(
            "hotload_failovers_detected",
            "Times the server stopped taking writes (follow_primary), by pool.",
            labels=pool,
        ),
        expired=CounterMetricFamily(
            "hotload_connections_expired",
            "Connections closed because they reached max_lifetime, by pool.",
            labels=pool,
        ),
    )
