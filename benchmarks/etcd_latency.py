"""Latency of the etcd strategy: from a ``put`` of a new DSN to the pool serving from it.

Starts two throwaway PostgreSQL servers and one etcd, then switches a HotPool between the
servers ``--switches`` times by putting the other DSN into the watched key. For each switch
it reports when the put returned, when the strategy logged the change (the watch delivered
it) and when a query first answered from the new server. Run ``python
benchmarks/etcd_latency.py`` (needs the ``etcd`` binary and PostgreSQL's server binaries).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohotload  # noqa: E402
from aiohotload import HotPool  # noqa: E402
from aiohotload.strategies import register_strategy, strategy_names  # noqa: E402
from aiohotload.strategies.etcd import EtcdStrategy  # noqa: E402
from aiohotload.testing import PgServer, PgTemplate, start_all  # noqa: E402
from integration_tests.etcd_server import EtcdServer, find_etcd  # noqa: E402


class _ChangeTimes(logging.Handler):
    """Records when the strategy logged each change (the moment the watch delivered it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "changed" in record.getMessage():
            self.times.append(time.perf_counter())


async def wait_port(pool: HotPool, port: int, deadline: float) -> float:
    """Query until the answer comes from *port*; the time it first did."""
    while True:
        if await pool.fetchval("SELECT inet_server_port()") == port:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"pool did not move to port {port}")
        await asyncio.sleep(0.0005)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def summary(name: str, values: list[float]) -> str:
    q = statistics.quantiles(values, n=10) if len(values) > 1 else values
    return (
        f"  {name:28s} median {statistics.median(values):6.1f} ms   "
        f"p90 {q[-1]:6.1f} ms   max {max(values):6.1f} ms"
    )


async def run(switches: int, tmp: Path, etcd_binary: str) -> None:
    template = PgTemplate.create(tmp / "template")
    a, b = PgServer(tmp / "a", template=template), PgServer(tmp / "b", template=template)
    start_all([a, b])
    etcd = EtcdServer(tmp / "etcd", binary=etcd_binary)
    etcd.start()
    if "etcd" not in strategy_names():
        register_strategy("etcd", EtcdStrategy())
    handler = _ChangeTimes()
    logging.getLogger("aiohotload.strategies.etcd").addHandler(handler)
    logging.getLogger("aiohotload.strategies.etcd").setLevel(logging.INFO)
    try:
        for server in (a, b):
            await server.create_role("bench", "bench-pw")
        dsns = {a.port: a.dsn("bench", "bench-pw"), b.port: b.dsn("bench", "bench-pw")}
        await etcd.put("bench/dsn", dsns[a.port])
        put_done: list[float] = []
        seen: list[float] = []
        serving: list[float] = []
        url = f"etcd://postgres/bench/dsn?endpoints={etcd.endpoint}"
        async with (
            aiohotload.create_pool(url, min_size=1, max_size=4) as pool,
            # One client for every put: building one costs milliseconds (its TLS context).
            httpx.AsyncClient(base_url=etcd.url, trust_env=False) as client,
        ):
            port = a.port
            for _ in range(switches):
                port = b.port if port == a.port else a.port
                body = {"key": b64("bench/dsn"), "value": b64(dsns[port])}
                before = len(handler.times)
                t0 = time.perf_counter()
                (await client.post("/v3/kv/put", json=body)).raise_for_status()
                t1 = time.perf_counter()
                t3 = await wait_port(pool, port, t0 + 10)
                put_done.append((t1 - t0) * 1000)
                seen.append((handler.times[before] - t0) * 1000)
                serving.append((t3 - t0) * 1000)
        print(f"etcd strategy, {switches} switches (times from the start of each put):")
        print(summary("put returned", put_done))
        print(summary("watch delivered the change", seen))
        print(summary("pool served from new server", serving))
    finally:
        logging.getLogger("aiohotload.strategies.etcd").removeHandler(handler)
        etcd.cleanup()
        for server in (a, b):
            server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=20)
    args = parser.parse_args()
    binary = find_etcd()
    if binary is None:
        sys.exit("no etcd binary on PATH")
    with tempfile.TemporaryDirectory(prefix="aiohotload-etcd-bench-") as tmpdir:
        os.chmod(tmpdir, 0o777)  # root's PostgreSQL servers run as 'postgres'
        asyncio.run(run(args.switches, Path(tmpdir), binary))


if __name__ == "__main__":
    main()
