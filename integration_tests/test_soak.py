"""Soak: dozens of workers running queries, transactions and COPY while the DSN swaps
hundreds of times between two servers and two rotating users.

Bounded by ``AIOHOTLOAD_SOAK_SECONDS`` (default 60; ``nox -s soak`` runs it longer). It shows:
no failed operation; every row written lands exactly once, on the server that was current
when its transaction began; and afterwards no leaked task, file descriptor, thread or server
backend, with memory flat across rounds.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
import secrets
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import aiohotload
from aiohotload import HotPool, SwapDone
from aiohotload.testing import PgServer, RoleFactory, wait_until, watch_url, write_dsn

from .faults import no_new_tasks

SECONDS = float(os.environ.get("AIOHOTLOAD_SOAK_SECONDS", "60"))
WORKERS = 24
ROUNDS = 6  # memory is sampled at the end of each

pytestmark = pytest.mark.timeout(SECONDS + 120)

_PORT = re.compile(r"@[^/@]*:(\d+)/")


@dataclass
class Written:
    """Rows whose transaction committed, each with the port it reported from inside the
    transaction and the window in which its connection was checked out."""

    ports: dict[int, int]  # each server's port, as one int object (see record)
    rows: dict[int, tuple[int, float, float]] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**9)))

    def record(self, row_id: int, port: int, began: float, acquired: float) -> None:
        # The port as read is a new int made by asyncpg's protocol each time; keeping those
        # would show up as memory growing in asyncpg, drowning the measurement.
        self.rows[row_id] = (self.ports[port], began, acquired)


@dataclass
class Timeline:
    """Which server was current from when: (monotonic time, port), from SwapDone events
    (listeners run inside the swap, so the time is the swap's)."""

    changes: list[tuple[float, int]]

    def on_swap(self, event: object) -> None:
        if isinstance(event, SwapDone):
            match = _PORT.search(event.new_target)
            assert match is not None, event.new_target
            self.changes.append((time.monotonic(), int(match.group(1))))

    def current_during(self, start: float, end: float) -> set[int]:
        """Ports current at some moment in [start, end]."""
        ports = set()
        for i, (since, port) in enumerate(self.changes):
            until = self.changes[i + 1][0] if i + 1 < len(self.changes) else float("inf")
            if since <= end and until >= start:
                ports.add(port)
        return ports


async def _worker(
    pool: HotPool, rng: random.Random, stop: asyncio.Event, written: Written, failures: list[str]
) -> int:
    done = 0
    while not stop.is_set():
        kind = rng.random()
        try:
            if kind < 0.4:
                assert await pool.fetchval("SELECT $1::int + 1", 41) == 42
            else:
                ids = [next(written.ids) for _ in range(1 if kind < 0.8 else 3)]
                began = time.monotonic()
                async with pool.acquire() as con:
                    acquired = time.monotonic()
                    async with con.transaction():
                        port = await con.fetchval("SELECT inet_server_port()")
                        if len(ids) == 1:
                            await con.execute(
                                "INSERT INTO soak (id, port) VALUES ($1, $2)", ids[0], port
                            )
                        else:
                            await con.copy_records_to_table(
                                "soak", records=[(i, port) for i in ids], columns=["id", "port"]
                            )
                for i in ids:
                    written.record(i, port, began, acquired)
            done += 1
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
    return done


async def _swapper(
    pool: HotPool,
    path: Path,
    servers: tuple[PgServer, PgServer],
    users: list[list[str]],
    *,
    rng: random.Random,
    stop: asyncio.Event,
) -> int:
    """Move the pool to the other server on each step; every fifth, switch to the other user
    too, giving it a fresh password first (alternating-users rotation: the password of the
    user in use never changes under it)."""
    swaps = 0
    user = 0
    while not stop.is_set():
        swaps += 1
        if swaps % 5 == 0:
            user = 1 - user
            name, _ = users[user]
            users[user][1] = f"pw-{secrets.token_hex(8)}/@:%é"
            for server in servers:
                await server.alter_password(name, users[user][1])
        server = servers[swaps % 2]
        write_dsn(path, server.dsn(*users[user]))
        await pool.wait_until(_generation_at_least(swaps), timeout=15)
        await asyncio.sleep(rng.choice([0, 0.005, 0.02, 0.05]))
    return swaps


def _generation_at_least(number: int) -> Callable[[HotPool], bool]:
    return lambda pool: pool.generation >= number


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _library_memory(test_file: str) -> int:
    """Bytes traced outside this test module (whose bookkeeping grows by design)."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, test_file), tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts fds through /proc")
async def test_soak_swaps_under_load_lose_nothing_and_leak_nothing(
    pg_a: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    servers = (pg_a, pg_b)
    users: list[list[str]] = []
    for _ in range(2):
        name, password = await role(pg_a)
        await role(pg_b, name=name, password=password)
        users.append([name, password])
    for server in servers:
        grants = ", ".join(f'"{name}"' for name, _ in users)
        await server.execute(
            "DROP TABLE IF EXISTS soak; CREATE TABLE soak (id bigint NOT NULL, port int NOT NULL);"
            f"GRANT SELECT, INSERT ON soak TO {grants}"
        )
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(*users[0]))

    gc.collect()
    tasks_before = asyncio.all_tasks()
    fds_before = _open_fds()
    threads_before = threading.active_count()
    tracemalloc.start()
    rng = random.Random(2026)
    written = Written({server.port: server.port for server in servers})
    failures: list[str] = []
    memory: list[int] = []
    stop = asyncio.Event()
    try:
        async with aiohotload.create_pool(watch_url(path), min_size=4, max_size=12) as pool:
            timeline = Timeline([(time.monotonic(), pg_a.port)])
            pool.add_listener(timeline.on_swap)
            workers = [
                asyncio.ensure_future(
                    _worker(pool, random.Random(rng.random()), stop, written, failures)
                )
                for _ in range(WORKERS)
            ]
            swapper = asyncio.ensure_future(
                _swapper(pool, path, servers, users, rng=random.Random(rng.random()), stop=stop)
            )
            for _ in range(ROUNDS):
                done, _ = await asyncio.wait([swapper], timeout=SECONDS / ROUNDS)
                if done:  # the swapper failed: stop now and report it
                    break
                gc.collect()
                memory.append(_library_memory(__file__))
            stop.set()
            swaps = await swapper
            operations = sum(await asyncio.gather(*workers))
            await wait_until(lambda: pool.draining, lambda n: n == 0, timeout=15)
    finally:
        stop.set()
        tracemalloc.stop()

    print(  # shown with -s: the figures behind the README's Guarantees
        f"soak: {SECONDS:g}s, {swaps} swaps, {operations} operations, {len(written.rows)} rows,"
        f" traced memory per round (KiB): {[m >> 10 for m in memory]}"
    )
    assert failures == []
    # Enough swaps for the checks below to mean something (not a speed check: a slow machine
    # still makes dozens in 20 s).
    assert swaps >= 20, f"only {swaps} swaps"
    assert operations > 0

    # Every committed row is on exactly one server: the one its transaction reported, which
    # was current while its connection was being checked out.
    found: dict[int, list[int]] = {}
    for server in servers:
        async with server.admin_connection() as conn:
            for row in await conn.fetch("SELECT id, port FROM soak"):
                assert row["port"] == server.port
                found.setdefault(row["id"], []).append(server.port)
    assert set(found) == set(written.rows)
    assert all(len(ports) == 1 for ports in found.values())
    for row_id, (port, began, acquired) in written.rows.items():
        assert found[row_id] == [port]
        assert port in timeline.current_during(began, acquired), row_id

    # Nothing left behind.
    await no_new_tasks(tasks_before)
    await wait_until(_open_fds, lambda n: n <= fds_before, what="file descriptors back")
    await wait_until(threading.active_count, lambda n: n <= threads_before, what="threads back")
    for server in servers:
        for name, _ in users:
            await wait_until(lambda s=server, u=name: s.backends(usename=u), lambda r: not r)
    # Flat memory: the later rounds hold no more than the first full round, give or take
    # 1 MiB of allocator and cache noise (a leak per swap would add ~30 KiB x hundreds).
    assert len(memory) == ROUNDS
    assert max(memory[ROUNDS // 2 :]) - memory[1] < 1 << 20, memory
