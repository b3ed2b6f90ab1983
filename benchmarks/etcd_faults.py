"""The etcd strategy under two faults: a hung member, and many pools on one key.

- Hung member: a 3-member cluster; the watch runs through the first member, which is then
  frozen (SIGSTOP: alive for TCP, answering nothing) while a new value is put through another.
  Reports the time from the freeze to the strategy yielding the new value, for the given
  ``--keepalive`` and ``--timeout`` options (each round on a fresh cluster).
- Many pools: ``--pools`` watches of one key (one per pool, as HotPool opens them), then the
  watch streams etcd counts (its ``etcd_debugging_mvcc_watch_stream_total`` metric) and the
  TCP connections this process holds to etcd.

Run ``python benchmarks/etcd_faults.py`` (needs the ``etcd`` binary; Linux, for the counts).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncGenerator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohotload.strategies.etcd import EtcdStrategy  # noqa: E402
from integration_tests.etcd_server import EtcdServer, connections_to, find_etcd  # noqa: E402

KEY = "bench/dsn"


async def put_until_accepted(server: EtcdServer, value: str, deadline: float) -> None:
    """Put *value*, retrying while the remaining members elect a leader."""
    while True:
        try:
            await asyncio.wait_for(server.put(KEY, value), 2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def hung_member_round(tmp: Path, binary: str, options: dict[str, str]) -> float:
    members = EtcdServer.cluster(tmp, binary=binary, size=3)
    hung, other, _ = members
    EtcdServer.start_all(members)
    gen: AsyncGenerator[str, None] | None = None
    try:
        await other.put(KEY, "postgresql://u@db1/app")
        endpoints = ",".join(m.endpoint for m in members)
        gen = EtcdStrategy().watch("/" + KEY, {"endpoints": endpoints, **options})
        await anext(gen)
        following = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.5)  # let the watch settle on the first member
        frozen_at = time.monotonic()
        hung.freeze()
        await put_until_accepted(other, "postgresql://u@db2/app", frozen_at + 30)
        await asyncio.wait_for(following, 120)
        return time.monotonic() - frozen_at
    finally:
        if gen is not None:
            await gen.aclose()
        for member in members:
            member.kill()
            member.cleanup()


async def many_pools(tmp: Path, binary: str, pools: int) -> None:
    server = EtcdServer(tmp / "shared", binary=binary)
    server.start()
    gens = [EtcdStrategy().watch("/" + KEY, {"endpoints": server.endpoint}) for _ in range(pools)]
    try:
        await server.put(KEY, "postgresql://u@db1/app")
        await asyncio.gather(*(anext(g) for g in gens))
        following = [asyncio.ensure_future(anext(g)) for g in gens]
        await asyncio.sleep(6)  # past httpx's keep-alive expiry: only lasting connections
        streams = await server.metric("etcd_debugging_mvcc_watch_stream_total")
        connections = connections_to(server.port)
        await server.put(KEY, "postgresql://u@db2/app")
        values = await asyncio.wait_for(asyncio.gather(*following), 10)
        assert set(values) == {"postgresql://u@db2/app"}
        print(
            f"{pools} pools on one key: {streams:.0f} watch stream(s), {connections} connection(s)"
        )
    finally:
        for g in gens:
            await g.aclose()
        server.cleanup()


async def run(args: argparse.Namespace, tmp: Path, binary: str) -> None:
    await many_pools(tmp, binary, args.pools)
    options = {"keepalive": args.keepalive, "timeout": args.timeout}
    times = [await hung_member_round(tmp / f"hung{i}", binary, options) for i in range(args.rounds)]
    print(
        f"hung member (keepalive={args.keepalive}, timeout={args.timeout}), {args.rounds} rounds: "
        f"new value seen {statistics.median(times):.2f} s after the freeze (median), "
        f"max {max(times):.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keepalive", default="10s")
    parser.add_argument("--timeout", default="5s")
    args = parser.parse_args()
    binary = find_etcd()
    if binary is None:
        sys.exit("no etcd binary on PATH")
    with tempfile.TemporaryDirectory(prefix="aiohotload-etcd-faults-") as tmpdir:
        asyncio.run(run(args, Path(tmpdir), binary))


if __name__ == "__main__":
    main()
