"""The "switch under load" row of ``benchmarks/run.py``: how long a HotPool takes to move to a
new server while 16 workers run a tiny query flat out, next to the same pool idle.

Each switch is timed from the write of the DSN file to the first answer from the new server
(``SELECT inet_server_port()``), and split into steps with timestamps taken from outside the
pool: the watcher's read of the file, :class:`~aiohotload.ReloadStarted`, the new pool's
connects (a timing ``connect=`` passed through to asyncpg), :class:`~aiohotload.SwapDone`, and
the first answer. Idle and loaded segments, graceful and ``force_kill``, are interleaved round
by round so load drift hits all four alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from common import PASSWORD, ROLE, PgServer, median, pct, write_atomic

import aiohotload
from aiohotload import HotPool, ReloadStarted, SwapDone

#: The workers' query: tiny, and its answer names the server.
QUERY = "SELECT inet_server_port()"
POOL_SIZE = 8
#: Seconds between two DSN changes under load (the old generation drains meanwhile).
LOADED_SPACING = 2.0
IDLE_SPACING = 0.5
#: Settling time before a segment's first switch (workers warm up, old drains end).
SETTLE = 0.5


@dataclass
class _Switch:
    """Timestamps (``time.perf_counter()``) of one switch."""

    dsn: str
    port: int
    write: float
    read: float | None = None
    started: float | None = None
    connects: list[tuple[float, float]] = field(default_factory=list)
    old_connects: int = 0  # connections opened to the old server after the swap
    swap: float | None = None
    open_seconds: float | None = None
    first: float | None = None
    first_began: float | None = None  # when the query that gave the first answer began

    def ms(self, end: float | None, start: float | None = None) -> float | None:
        start = self.write if start is None else start
        return None if end is None or start is None else (end - start) * 1000


class _Probe:
    """Times the steps of the switch in progress of one pool."""

    def __init__(self, path: Path) -> None:
        self.paths = {str(path), os.path.realpath(path)}
        self.current: _Switch | None = None

    def on_event(self, event: object) -> None:
        cur = self.current
        if cur is None:
            return
        now = time.perf_counter()
        if isinstance(event, ReloadStarted) and cur.started is None:
            cur.started = now
        elif isinstance(event, SwapDone) and cur.swap is None:
            cur.swap = now
            cur.open_seconds = event.open_seconds

    def on_read(self, path: str, value: str | None) -> None:
        cur = self.current
        if cur is not None and cur.read is None and path in self.paths and value == cur.dsn:
            cur.read = time.perf_counter()

    async def connect(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """asyncpg.connect, timed while a switch is in progress."""
        started = time.perf_counter()
        con: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
        cur = self.current
        if cur is not None:
            if cur.swap is None:
                cur.connects.append((started, time.perf_counter()))
            elif args and isinstance(args[0], str) and urlsplit(args[0]).port != cur.port:
                cur.old_connects += 1
        return con


@contextlib.contextmanager
def _watching_reads(probes: list[_Probe]) -> Iterator[None]:
    """Report each read of a DSN file by the watchfiles strategy to *probes*.

    Instrumentation from outside: it wraps the strategy's private file reader and silently
    does nothing if that is gone (the read step then shows as n/a).
    """
    from aiohotload.strategies import files

    original: Callable[[str], str | None] | None = getattr(files, "_try_read", None)
    if original is None:
        yield
        return

    def timed(path: str) -> str | None:
        value = original(path)
        for probe in probes:
            probe.on_read(path, value)
        return value

    setattr(files, "_try_read", timed)  # noqa: B010
    try:
        yield
    finally:
        setattr(files, "_try_read", original)  # noqa: B010


class _Load:
    """16 workers running :data:`QUERY` flat out on a pool, noting the first answer from the
    port of the switch in progress."""

    def __init__(self, pool: HotPool, probe: _Probe, workers: int) -> None:
        self.pool = pool
        self.probe = probe
        self.workers = workers
        self.answered = 0
        self.failed: list[str] = []
        self.arrived = asyncio.Event()
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []

    async def _work(self) -> None:
        pool, probe = self.pool, self.probe
        while not self._stop:
            began = time.perf_counter()
            try:
                port = await pool.fetchval(QUERY)
            except Exception as exc:  # counted: must stay 0
                self.failed.append(type(exc).__name__)
                continue
            self.answered += 1
            cur = probe.current
            if cur is not None and cur.first is None and port == cur.port:
                cur.first = time.perf_counter()
                cur.first_began = began
                self.arrived.set()

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)


async def _loop_lag(samples: list[float], stop: asyncio.Event) -> None:
    """How late a 1 ms sleep wakes up: the delay any step of the reload waits for its turn."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        samples.append((time.perf_counter() - t0 - 0.001) * 1000)


async def _segment(
    pool: HotPool,
    probe: _Probe,
    path: Path,
    dsns: dict[int, str],
    *,
    loaded: bool,
    switches: int,
    workers: int,
) -> tuple[list[_Switch], dict[str, Any]]:
    load = _Load(pool, probe, workers) if loaded else None
    lag: list[float] = []
    stop_lag = asyncio.Event()
    lag_task = asyncio.ensure_future(_loop_lag(lag, stop_lag))
    if load is not None:
        load.start()
    await asyncio.sleep(SETTLE)
    spacing = LOADED_SPACING if loaded else IDLE_SPACING
    done: list[_Switch] = []
    port = await pool.fetchval(QUERY)
    t_start = time.perf_counter()
    try:
        for _ in range(switches):
            port = next(p for p in dsns if p != port)
            if load is not None:
                load.arrived.clear()
            switch = _Switch(dsns[port], port, time.perf_counter())
            probe.current = switch
            write_atomic(path, dsns[port])
            switch.write = time.perf_counter()
            if load is not None:
                await asyncio.wait_for(load.arrived.wait(), 10)
            else:
                # One caller querying as fast as it can, as the idle "switch" row does.
                while True:
                    began = time.perf_counter()
                    if await pool.fetchval(QUERY) == port:
                        switch.first = time.perf_counter()
                        switch.first_began = began
                        break
                    await asyncio.sleep(0.0005)
            # SwapDone comes before the first answer; wait a little for it anyway.
            for _ in range(100):
                if switch.swap is not None:
                    break
                await asyncio.sleep(0.001)
            probe.current = None
            done.append(switch)
            await asyncio.sleep(max(0.0, switch.write + spacing - time.perf_counter()))
    finally:
        probe.current = None
        elapsed = time.perf_counter() - t_start
        if load is not None:
            await load.stop()
        stop_lag.set()
        await lag_task
    extra = {
        "failed": len(load.failed) if load else 0,
        "failures": sorted(set(load.failed)) if load else [],
        "queries_per_s": load.answered / elapsed if load else 0.0,
        "loop_lag_ms": lag,
    }
    return done, extra


def _summary(switches: list[_Switch], extras: list[dict[str, Any]]) -> dict[str, Any]:
    def steps(f: Callable[[_Switch], float | None]) -> list[float]:
        return [v for s in switches if (v := f(s)) is not None]

    total = steps(lambda s: s.ms(s.first))
    connect = [(e - b) * 1000 for s in switches for b, e in s.connects]
    lag = [v for e in extras for v in e["loop_lag_ms"]]
    out: dict[str, Any] = {
        "switches": len(switches),
        "failed_queries": sum(e["failed"] for e in extras),
        "failures": sorted({f for e in extras for f in e["failures"]}),
        "queries_per_s": median([e["queries_per_s"] for e in extras]),
        "p50_ms": median(total),
        "p95_ms": pct(total, 0.95),
        "max_ms": max(total, default=float("nan")),
        # Write to SwapDone: what the pool itself takes; the rest is the callers' way in.
        "swap_p50_ms": median(steps(lambda s: s.ms(s.swap))),
        "swap_p95_ms": pct(steps(lambda s: s.ms(s.swap)), 0.95),
        "breakdown_p50_ms": {
            "write_to_read": median(steps(lambda s: s.ms(s.read))),
            "read_to_reload_started": median(steps(lambda s: s.ms(s.started, s.read))),
            "reload_started_to_first_connect": median(
                steps(lambda s: s.ms(s.connects[0][0], s.started) if s.connects else None)
            ),
            "connects_first_start_to_last_end": median(
                steps(
                    lambda s: (
                        s.ms(max(e for _, e in s.connects), s.connects[0][0])
                        if s.connects
                        else None
                    )
                )
            ),
            "one_connect": median(connect),
            "last_connect_to_swap": median(
                steps(lambda s: s.ms(s.swap, max(e for _, e in s.connects)) if s.connects else None)
            ),
            "open_seconds_as_reported": median(
                [s.open_seconds * 1000 for s in switches if s.open_seconds is not None]
            ),
            "swap_to_first_answer": median(steps(lambda s: s.ms(s.first, s.swap))),
            # Split of the above: the answering query began (after the swap, or before it
            # if it waited for the new pool) and took this long.
            "swap_to_answering_query_began": median(steps(lambda s: s.ms(s.first_began, s.swap))),
            "answering_query": median(steps(lambda s: s.ms(s.first, s.first_began))),
        },
        "connects_per_switch": median([float(len(s.connects)) for s in switches]),
        "old_server_connects_after_swap": median([float(s.old_connects) for s in switches]),
        "loop_lag_p50_ms": median(lag),
        "loop_lag_p99_ms": pct(lag, 0.99),
        "samples_ms": total,
        "swap_samples_ms": steps(lambda s: s.ms(s.swap)),
    }
    return out


async def bench_switch_under_load(
    a: PgServer, b: PgServer, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """Idle and loaded switches, graceful and force_kill, interleaved; returns the summaries."""
    dsns = {a.port: a.dsn(ROLE, PASSWORD), b.port: b.dsn(ROLE, PASSWORD)}
    modes = ("graceful", "force_kill")
    paths = {m: tmp / f"under-load-{m}" / "dsn" for m in modes}
    probes = {m: _Probe(paths[m]) for m in modes}
    # Knobs to try a change without editing this file (run.py --url-options, --min-size).
    options = getattr(args, "sul_url_options", "") or ""
    min_size = getattr(args, "sul_min_size", None) or POOL_SIZE
    pools: dict[str, HotPool] = {}
    samples: dict[str, list[_Switch]] = {}
    extras: dict[str, list[dict[str, Any]]] = {}
    configs = [(loaded, m) for m in modes for loaded in (False, True)]
    with _watching_reads(list(probes.values())):
        try:
            for m in modes:
                paths[m].parent.mkdir()
                write_atomic(paths[m], dsns[a.port])
                query = "&".join(
                    o for o in ("force_kill=true" if m == "force_kill" else "", options) if o
                )
                url = f"watchfiles://postgres{paths[m]}" + (f"?{query}" if query else "")
                pools[m] = await aiohotload.create_pool(
                    url, min_size=min_size, max_size=POOL_SIZE, connect=probes[m].connect
                )
                pools[m].add_listener(probes[m].on_event)
            for rnd in range(args.sul_rounds):
                for loaded, m in configs if rnd % 2 == 0 else reversed(configs):
                    key = f"{'loaded' if loaded else 'idle'}_{m}"
                    done, extra = await _segment(
                        pools[m],
                        probes[m],
                        paths[m],
                        dsns,
                        loaded=loaded,
                        switches=args.sul_switches,
                        workers=args.workers,
                    )
                    samples.setdefault(key, []).extend(done)
                    extras.setdefault(key, []).append(extra)
        finally:
            await asyncio.gather(*(p.close() for p in pools.values()))
    out = {key: _summary(samples[key], extras[key]) for key in samples}
    for key, r in out.items():
        bd = r["breakdown_p50_ms"]
        print(
            f"  {key:20s} switch p50 {r['p50_ms']:6.1f} ms p95 {r['p95_ms']:6.1f} ms "
            f"(SwapDone p50 {r['swap_p50_ms']:5.1f}) failed {r['failed_queries']} "
            f"n={r['switches']}; steps p50: read {bd['write_to_read']:.1f}, "
            f"->started {bd['read_to_reload_started']:.1f}, "
            f"->connect {bd['reload_started_to_first_connect']:.1f}, "
            f"connects {bd['connects_first_start_to_last_end']:.1f} "
            f"(one {bd['one_connect']:.1f} x{r['connects_per_switch']:.0f}), "
            f"->swap {bd['last_connect_to_swap']:.1f}, "
            f"->answer {bd['swap_to_first_answer']:.1f} (query began "
            f"{bd['swap_to_answering_query_began']:+.1f}, took {bd['answering_query']:.1f}; "
            f"old-server connects after swap "
            f"{r['old_server_connects_after_swap']:.0f}); loop lag p50 "
            f"{r['loop_lag_p50_ms']:.2f} p99 {r['loop_lag_p99_ms']:.2f} ms"
        )
    return out
