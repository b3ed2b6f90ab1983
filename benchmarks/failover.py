"""Failover: how long writes fail when a primary is replaced by its standby, for a HotPool with
``follow_primary`` against a bare asyncpg pool, on the same setup, in one run.

Each trial builds a primary and a streaming standby (``pg_basebackup -R``) behind one name (a
loopback TCP proxy, as DNS or a cloud endpoint would be), runs writers flat out, then:

1. stops the primary and promotes the standby;
2. brings the old primary back as a read-only standby of the new one, and leaves the name on
   it for ``--trap`` seconds (the demoted-primary trap: DNS not updated yet);
3. points the name at the new primary.

Reported per pool: writes failed, and seconds from the promotion to the first write that
succeeded after the name moved (``never`` if none within ``--settle`` seconds). A bare asyncpg
pool keeps the connections it made to the demoted server, so its writes keep failing with
25006 after the name moved, until those connections die.

    python benchmarks/failover.py [--trials 3] [--trap 2] [--settle 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from common import ROOT, PgServer, PgTemplate, median

import aiohotload

sys.path.insert(0, str(ROOT))
from integration_tests.tcpproxy import TcpProxy

USER, PASSWORD = "failover", "failover-pw"
WORKERS = 4


class Writers:
    """Workers inserting rows flat out; when each write succeeded or failed."""

    def __init__(self, execute: Callable[[str], Awaitable[object]]) -> None:
        self.ok: list[float] = []
        self.failed: list[float] = []
        self._execute = execute
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._work()) for _ in range(WORKERS)]

    async def _work(self) -> None:
        while not self._stop.is_set():
            try:
                await self._execute("INSERT INTO w VALUES (inet_server_port())")
                self.ok.append(time.monotonic())
            except Exception:  # an application's retry loop
                self.failed.append(time.monotonic())
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def trial(
    kind: str, template: PgTemplate, tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One failover under *kind* (``hotpool`` or ``asyncpg``) writers."""
    primary = PgServer(tmp / f"{kind}-primary", template=template)
    standby: PgServer | None = None
    try:
        await primary.start()
        await primary.create_role(USER, PASSWORD)
        await primary.execute(f"CREATE TABLE w (port int); GRANT INSERT ON w TO {USER}")
        standby = primary.standby(tmp / f"{kind}-standby")
        await standby.start()
        async with TcpProxy(primary.host, primary.port) as proxy:
            dsn = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/postgres"
            pool: Any
            if kind == "hotpool":
                path = tmp / f"{kind}.dsn"
                path.write_text(dsn)
                pool = await aiohotload.create_pool(
                    f"watchfiles://postgres{path}?follow_primary=true&drain_timeout=5s",
                    min_size=2,
                    max_size=4,
                )
            else:
                pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
            writers = Writers(pool.execute)
            await asyncio.sleep(1.0)  # steady writes first
            await primary.stop("fast")
            await standby.promote()
            promoted = time.monotonic()
            primary.follow(standby)
            await primary.start()
            await asyncio.sleep(args.trap)  # the name still leads to the demoted primary
            proxy.target = (standby.host, standby.port)
            moved = time.monotonic()
            await asyncio.sleep(args.settle)
            await writers.stop()
            await pool.close()
        first = next((t for t in writers.ok if t > moved), None)
        return {
            "failed_writes": len(writers.failed),
            "first_write_after_promotion_s": None if first is None else first - promoted,
            "first_write_after_name_moved_s": None if first is None else first - moved,
            "failed_after_name_moved": sum(1 for t in writers.failed if t > moved + 1.0),
        }
    finally:
        for server in (standby, primary):
            if server is not None:
                server.cleanup()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--trap", type=float, default=2.0, help="seconds on the demoted primary")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds watched afterwards")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # asyncpg's pool logs each failed refill of its min_size with a traceback: not news here.
    logging.getLogger("asyncpg").setLevel(logging.CRITICAL)
    results: dict[str, list[dict[str, Any]]] = {"hotpool": [], "asyncpg": []}
    with tempfile.TemporaryDirectory(prefix="aiohotload-failover-") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o777)
        template = PgTemplate.create(tmp / "template")
        for n in range(args.trials):
            for kind in ("hotpool", "asyncpg") if n % 2 == 0 else ("asyncpg", "hotpool"):
                results[kind].append(await trial(kind, template, tmp / f"t{n}", args))
                print(kind, results[kind][-1], flush=True)
    print(f"\nfailover (trap {args.trap:g}s, watched {args.settle:g}s after the name moved)")
    print(f"{'pool':<10} {'failed writes':>14} {'first write after promotion':>28} "
          f"{'failing after the move':>23}")  # fmt: skip
    for kind, runs in results.items():
        firsts = [r["first_write_after_promotion_s"] for r in runs]
        shown = (
            "never"
            if any(f is None for f in firsts)
            else f"{median([f for f in firsts if f is not None]):.2f} s"
        )
        print(
            f"{kind:<10} {median([r['failed_writes'] for r in runs]):>14.0f} {shown:>28} "
            f"{median([r['failed_after_name_moved'] for r in runs]):>23.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
