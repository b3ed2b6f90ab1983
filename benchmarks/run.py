"""aiohotload benchmarks: HotPool against a bare asyncpg pool (and the SQLAlchemy engine
against a plain one), side by side in one process.

Each comparison runs the two interleaved round by round (A, B, A, B, ...) against the same
throwaway PostgreSQL servers and reports medians and the ratio, because this machine is
noisy and absolute numbers mean little. Run ``python benchmarks/run.py`` (``--quick`` for a
short run); it prints a table and writes ``benchmarks/results/results.json`` and
``benchmarks/results/results.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PASSWORD,
    ROLE,
    PgServer,
    median,
    pct,
    two_servers,
    write_atomic,
    write_in_place,
)

import aiohotload
from aiohotload import HotPool

RESULTS = Path(__file__).resolve().parent / "results"
#: Every row, in the order they run; ``--only`` picks some.
ROWS = (
    "overhead",
    "sqlalchemy",
    "switch",
    "switch_under_load",
    "during",
    "many",
    "alternatives",
)


# --------------------------------------------------------------------------- helpers


class K8sVolume:
    """A Secret volume laid out like the kubelet's AtomicWriter: dsn -> ..data/dsn."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.n = 0

    @property
    def path(self) -> Path:
        return self.dir / "dsn"

    def write(self, dsn: str) -> None:
        self.n += 1
        stamp = self.dir / f"..2026_11_28_00_00_{self.n:02d}.{self.n:09d}"
        stamp.mkdir()
        (stamp / "dsn").write_text(dsn)
        old = os.readlink(self.dir / "..data") if (self.dir / "..data").is_symlink() else None
        tmp = self.dir / "..data_tmp"
        os.symlink(stamp.name, tmp)
        os.replace(tmp, self.dir / "..data")
        if not self.path.is_symlink():
            os.symlink("..data/dsn", self.path)
        if old:
            for f in (self.dir / old).iterdir():
                f.unlink()
            (self.dir / old).rmdir()


async def throughput(
    pool: Any, op: Callable[[Any], Awaitable[object]], workers: int, seconds: float
) -> float:
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await op(pool)
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return count / (time.perf_counter() - start)


async def interleaved(
    bare: Any,
    hot: Any,
    op: Callable[[Any], Awaitable[object]],
    *,
    workers: int,
    rounds: int,
    seconds: float,
) -> dict[str, float]:
    a: list[float] = []
    b: list[float] = []
    await throughput(bare, op, workers, seconds / 2)  # warm up both
    await throughput(hot, op, workers, seconds / 2)
    for i in range(rounds):
        # Alternate which goes first so drift in machine load hits both equally.
        if i % 2 == 0:
            a.append(await throughput(bare, op, workers, seconds))
            b.append(await throughput(hot, op, workers, seconds))
        else:
            b.append(await throughput(hot, op, workers, seconds))
            a.append(await throughput(bare, op, workers, seconds))
    ratios = [h / r for h, r in zip(b, a, strict=True)]
    return {
        "bare_ops_s": median(a),
        "hot_ops_s": median(b),
        "ratio": median(b) / median(a),
        "ratio_of_pairs_median": median(ratios),
    }


async def op_select1(pool: Any) -> object:
    return await pool.fetchval("SELECT 1")


async def op_small_fetch(pool: Any) -> object:
    return await pool.fetch("SELECT g, g::text FROM generate_series(1, 10) g")


async def op_acquire(pool: Any) -> object:
    async with pool.acquire():
        pass
    return None


async def wait_port(pool: HotPool, port: int, deadline: float) -> float:
    """Query until the answer comes from *port*; return the time it happened."""
    while True:
        if await pool.fetchval("SELECT inet_server_port()") == port:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"pool did not move to port {port}")
        await asyncio.sleep(0.0005)


async def backends_of(admin: asyncpg.Connection, user: str) -> int:
    n = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()",
        user,
    )
    return int(n)


# --------------------------------------------------------------------------- benchmarks


async def bench_overhead(a: PgServer, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    dsn = a.dsn(ROLE, PASSWORD)
    path = tmp / "overhead.dsn"
    write_atomic(path, dsn)
    size = 8
    bare = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
    hot = await aiohotload.create_pool(f"watchfiles://postgres{path}", min_size=size, max_size=size)
    out: dict[str, Any] = {}
    try:
        for name, op in (
            ("select1", op_select1),
            ("small_fetch", op_small_fetch),
            ("acquire_release", op_acquire),
        ):
            out[name] = await interleaved(
                bare, hot, op, workers=args.workers, rounds=args.rounds, seconds=args.seconds
            )
            print(
                f"  {name:16s} bare {out[name]['bare_ops_s']:9.0f}/s  "
                f"hot {out[name]['hot_ops_s']:9.0f}/s  ratio {out[name]['ratio']:.3f}"
            )
    finally:
        await hot.close()
        await bare.close()
    return out


async def op_session_select1(engine: Any) -> object:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import AsyncSession

    async with AsyncSession(engine) as session:
        return (await session.execute(select(1))).scalar_one()


async def op_engine_begin(engine: Any) -> object:
    from sqlalchemy import text

    async with engine.begin() as conn:
        return (await conn.execute(text("SELECT 1"))).scalar_one()


async def bench_sqlalchemy(a: PgServer, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """aiohotload.sqlalchemy's engine against a plain create_async_engine, same server."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from aiohotload.sqlalchemy import create_async_engine as create_hot_engine

    path = tmp / "sqlalchemy.dsn"
    write_atomic(path, a.dsn(ROLE, PASSWORD))
    size = 8
    bare = create_async_engine(
        f"postgresql+asyncpg://{ROLE}:{PASSWORD}@{a.host}:{a.port}/postgres",
        pool_size=size,
        max_overflow=0,
    )
    hot = create_hot_engine(f"watchfiles://postgres{path}", pool_size=size, max_overflow=0)
    out: dict[str, Any] = {}
    try:
        for name, op in (
            ("session_select1", op_session_select1),
            ("begin_select1", op_engine_begin),
        ):
            out[name] = await interleaved(
                bare, hot, op, workers=args.workers, rounds=args.rounds, seconds=args.seconds
            )
            print(
                f"  {name:16s} plain {out[name]['bare_ops_s']:8.0f}/s  "
                f"hot {out[name]['hot_ops_s']:9.0f}/s  ratio {out[name]['ratio']:.3f}"
            )
    finally:
        await hot.dispose()
        await bare.dispose()
    return out


async def bench_switch(
    a: PgServer, b: PgServer, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    dsns = {a.port: a.dsn(ROLE, PASSWORD), b.port: b.dsn(ROLE, PASSWORD)}
    out: dict[str, Any] = {}
    for method in ("in_place", "atomic_rename", "k8s_symlink"):
        d = tmp / f"switch-{method}"
        d.mkdir()
        vol = K8sVolume(d)
        path = vol.path if method == "k8s_symlink" else d / "dsn"
        write = {
            "in_place": lambda s, p=path: write_in_place(p, s),
            "atomic_rename": lambda s, p=path: write_atomic(p, s),
            "k8s_symlink": vol.write,
        }[method]
        write(dsns[a.port])
        latencies: list[float] = []
        async with aiohotload.create_pool(
            f"watchfiles://postgres{path}", min_size=1, max_size=4
        ) as pool:
            port = a.port
            for _ in range(args.switches):
                port = b.port if port == a.port else a.port
                t0 = time.perf_counter()
                write(dsns[port])
                t1 = await wait_port(pool, port, t0 + 10)
                latencies.append((t1 - t0) * 1000)
        out[method] = {
            "median_ms": median(latencies),
            "max_ms": max(latencies),
            "p90_ms": pct(latencies, 0.9),
            "samples_ms": latencies,
        }
        print(
            f"  switch {method:14s} median {median(latencies):6.1f} ms  "
            f"max {max(latencies):6.1f} ms  (n={len(latencies)})"
        )
    # How long until the old server has no backends after a graceful switch (idle pool).
    path = tmp / "drain.dsn"
    write_atomic(path, dsns[a.port])
    admin_a = await a.admin()
    drains: list[float] = []
    try:
        async with aiohotload.create_pool(
            f"watchfiles://postgres{path}", min_size=4, max_size=4
        ) as pool:
            for i in range(min(args.switches, 20)):
                old, new = (a, b) if i % 2 == 0 else (b, a)
                admin_old = admin_a if old is a else await old.admin()
                try:
                    t0 = time.perf_counter()
                    write_atomic(path, dsns[new.port])
                    await pool.wait_for_swap(timeout=10)
                    while True:
                        if await backends_of(admin_old, ROLE) == 0:
                            break
                        await asyncio.sleep(0.001)
                    drains.append((time.perf_counter() - t0) * 1000)
                finally:
                    if admin_old is not admin_a:
                        await admin_old.close()
    finally:
        await admin_a.close()
    out["old_server_empty_after_switch"] = {"median_ms": median(drains), "max_ms": max(drains)}
    print(
        f"  old server without backends after switch: median {median(drains):.1f} ms, "
        f"max {max(drains):.1f} ms"
    )
    return out


async def bench_during_switch(
    a: PgServer, b: PgServer, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    dsns = [a.dsn(ROLE, PASSWORD), b.dsn(ROLE, PASSWORD)]
    path = tmp / "during.dsn"
    write_atomic(path, dsns[0])
    events: list[tuple[float, float]] = []  # (finish time, latency)
    failures: list[str] = []
    swaps: list[float] = []
    stop = asyncio.Event()
    async with aiohotload.create_pool(
        f"watchfiles://postgres{path}", min_size=8, max_size=8
    ) as pool:

        async def worker() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    await pool.fetchval("SELECT 1")
                except Exception as exc:  # counted, must stay zero
                    failures.append(type(exc).__name__)
                t1 = time.perf_counter()
                events.append((t1, t1 - t0))

        tasks = [asyncio.ensure_future(worker()) for _ in range(args.workers)]
        await asyncio.sleep(1.0)
        for i in range(args.during_swaps):
            write_atomic(path, dsns[(i + 1) % 2])
            await pool.wait_for_swap(timeout=10)
            swaps.append(time.perf_counter())
            await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
    near: list[float] = []
    steady: list[float] = []
    near_windows = 0.0
    for t, lat in events:
        if any(abs(t - s) <= 0.5 for s in swaps):
            near.append(lat)
        else:
            steady.append(lat)
    near_windows = len(swaps) * 1.0
    t_first, t_last = events[0][0], events[-1][0]
    steady_seconds = (t_last - t_first) - near_windows
    out = {
        "swaps": len(swaps),
        "failed_queries": len(failures),
        "steady_ops_s": len(steady) / steady_seconds,
        "around_swap_ops_s": len(near) / near_windows,
        "steady_p99_ms": pct(steady, 0.99) * 1000,
        "around_swap_p99_ms": pct(near, 0.99) * 1000,
    }
    out["throughput_ratio"] = out["around_swap_ops_s"] / out["steady_ops_s"]
    print(
        f"  around a swap: {out['around_swap_ops_s']:.0f}/s vs steady {out['steady_ops_s']:.0f}/s "
        f"(ratio {out['throughput_ratio']:.3f}); p99 {out['around_swap_p99_ms']:.2f} ms vs "
        f"{out['steady_p99_ms']:.2f} ms; failed {len(failures)}"
    )
    return out


async def bench_many_pools(
    a: PgServer, b: PgServer, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dsn_a, dsn_b = a.dsn(ROLE, PASSWORD), b.dsn(ROLE, PASSWORD)
    for n in args.pool_counts:
        d = tmp / f"many-{n}"
        d.mkdir()
        paths = [d / f"tenant-{i}.dsn" for i in range(n)]
        for p in paths:
            write_atomic(p, dsn_a)
        gc.collect()
        threads0 = threading.active_count()
        tracemalloc.start()
        m0 = tracemalloc.get_traced_memory()[0]
        pools = []
        t0 = time.perf_counter()
        for p in paths:
            # min_size=0: measure the pool and its watcher, not PostgreSQL connections.
            pools.append(
                await aiohotload.create_pool(f"watchfiles://postgres{p}", min_size=0, max_size=1)
            )
        t_open = time.perf_counter() - t0
        gc.collect()
        m1 = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        threads1 = threading.active_count()
        t0 = time.perf_counter()
        waits = [asyncio.ensure_future(p.wait_for_swap(timeout=60)) for p in pools]
        for p in paths:
            write_atomic(p, dsn_b)
        await asyncio.gather(*waits)
        t_switch = time.perf_counter() - t0
        await asyncio.gather(*(p.close() for p in pools))
        # The same number of bare pools, for comparison.
        gc.collect()
        tracemalloc.start()
        b0 = tracemalloc.get_traced_memory()[0]
        bare = [await asyncpg.create_pool(dsn_a, min_size=0, max_size=1) for _ in range(n)]
        gc.collect()
        b1 = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        await asyncio.gather(*(p.close() for p in bare))
        out[str(n)] = {
            "threads_added": threads1 - threads0,
            "kib_per_pool": (m1 - m0) / n / 1024,
            "bare_kib_per_pool": (b1 - b0) / n / 1024,
            "open_s": t_open,
            "all_switched_s": t_switch,
        }
        r = out[str(n)]
        print(
            f"  {n:5d} pools: +{r['threads_added']} threads, {r['kib_per_pool']:.1f} KiB/pool "
            f"(bare {r['bare_kib_per_pool']:.1f}), open {t_open:.2f}s, "
            f"all switched in {t_switch:.3f}s"
        )
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    panels = [k for k in ("overhead", "switch", "switch_under_load") if k in results]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        {"overhead": _plot_overhead, "switch": _plot_switch, "switch_under_load": _plot_load}[key](
            ax, results[key]
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _plot_overhead(ax: Any, ov: dict[str, Any]) -> None:
    names = list(ov)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [ov[n]["bare_ops_s"] for n in names], 0.4, label="asyncpg.Pool")
    ax.bar([i + 0.2 for i in x], [ov[n]["hot_ops_s"] for n in names], 0.4, label="HotPool")
    for i, n in enumerate(names):
        ax.text(
            i,
            max(ov[n]["bare_ops_s"], ov[n]["hot_ops_s"]),
            f"{ov[n]['ratio']:.3f}",
            ha="center",
            va="bottom",
        )
    ax.set_xticks(list(x), names)
    ax.set_ylabel("operations / s (median)")
    ax.set_title("Throughput, same process, interleaved rounds")
    ax.legend()


def _plot_switch(ax: Any, sw: dict[str, Any]) -> None:
    methods = [m for m in ("in_place", "atomic_rename", "k8s_symlink") if m in sw]
    ax.boxplot([sw[m]["samples_ms"] for m in methods])
    ax.set_xticks(range(1, len(methods) + 1), methods)
    ax.set_ylabel("ms from file write to first query on the new server")
    ax.set_title("Switch latency (idle pool)")


def _plot_load(ax: Any, sul: dict[str, Any]) -> None:
    keys = [
        k
        for k in ("idle_graceful", "loaded_graceful", "idle_force_kill", "loaded_force_kill")
        if k in sul
    ]
    ax.boxplot([sul[k]["samples_ms"] for k in keys])
    swaps = [median(sul[k]["swap_samples_ms"]) for k in keys]
    ax.plot(range(1, len(keys) + 1), swaps, "x", label="SwapDone (median)")
    ax.set_xticks(range(1, len(keys) + 1), [k.replace("_", "\n", 1) for k in keys])
    ax.set_ylabel("ms from file write to first answer from the new server")
    ax.set_title("Switch with 16 workers flat out vs idle")
    ax.legend()


def _arguments() -> argparse.Namespace:
    """The command line, and the sizes of a full or --quick run."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=ROWS,
        default=None,
        metavar="ROW",
        help=f"run only these rows ({', '.join(ROWS)}); their results replace the same rows "
        "in an existing results.json, the others are kept",
    )
    parser.add_argument(
        "--url-options",
        dest="sul_url_options",
        default="",
        help="extra hotload URL options for the switch_under_load pools (e.g. step=1), "
        "to try a change",
    )
    parser.add_argument(
        "--min-size",
        dest="sul_min_size",
        type=int,
        default=None,
        help="min_size of the switch_under_load pools (default: 8, their max_size)",
    )
    args = parser.parse_args()
    args.workers = 16
    args.rounds = 4 if args.quick else 12
    args.seconds = 0.5 if args.quick else 1.5
    args.switches = 10 if args.quick else 50
    args.during_swaps = 3 if args.quick else 10
    args.pool_counts = [1, 10, 100] if args.quick else [1, 10, 100, 1000]
    args.sul_rounds = 1 if args.quick else 4
    args.sul_switches = 3 if args.quick else 5
    args.alt_changes = 4 if args.quick else 12
    return args


async def main() -> None:
    args = _arguments()
    only = set(args.only or ROWS)

    results: dict[str, Any] = {}
    out_file = args.out / "results.json"
    if args.only and out_file.exists():
        results = json.loads(out_file.read_text())
    with two_servers() as (tmp, a, b):
        for s in (a, b):
            await s.create_role(ROLE, PASSWORD)
        results["machine"] = {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "asyncpg": asyncpg.__version__,
            "aiohotload": aiohotload.__version__,
        }
        results["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if "overhead" in only:
            print("1-2. overhead against a bare asyncpg pool (16 workers, pools of 8)")
            results["overhead"] = await bench_overhead(a, args, tmp)
        if "sqlalchemy" in only:
            print("2b. sqlalchemy engine against a plain create_async_engine (pools of 8)")
            results["sqlalchemy_engine"] = await bench_sqlalchemy(a, args, tmp)
        if "switch" in only:
            print("3. switch latency")
            results["switch"] = await bench_switch(a, b, args, tmp)
        if "switch_under_load" in only:
            from switch_under_load import bench_switch_under_load

            print("3b. switch under load (16 workers flat out) against idle, pools of 8")
            results["switch_under_load"] = await bench_switch_under_load(a, b, args, tmp)
        if "during" in only:
            print("4. queries during a switch")
            results["during_switch"] = await bench_during_switch(a, b, args, tmp)
        if "many" in only:
            print("5. many pools")
            results["many_pools"] = await bench_many_pools(a, b, args, tmp)
        if "alternatives" in only:
            from alternatives import bench_alternatives

            print("6. rotation side by side with the alternatives")
            results["alternatives"] = await bench_alternatives(a, b, args, tmp)
    args.out.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2))
    print(f"results: {out_file}")
    plot(results, args.out / "results.png")


if __name__ == "__main__":
    asyncio.run(main())
