"""``max_lifetime`` on real servers: a connection older than that is replaced when released (or
while idle), never in the middle of a query or a transaction, with no failed query."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import aiohotload
from aiohotload import ConnectionExpired
from aiohotload.testing import PgServer, RoleFactory, wait_until, write_dsn

from .faults import EventLog

pytestmark = pytest.mark.timeout(60)


async def test_connections_are_replaced_after_their_lifetime_never_while_in_use(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    url = f"watchfiles://postgres{path}"
    async with aiohotload.create_pool(
        url, min_size=2, max_size=4, max_lifetime=0.5, max_lifetime_jitter=0.2
    ) as pool:
        log = EventLog(pool)
        seen: set[int] = set()
        failed: list[BaseException] = []
        stop = asyncio.Event()

        async def worker() -> None:
            while not stop.is_set():
                try:
                    async with pool.acquire() as con, con.transaction():
                        pid = con.get_server_pid()
                        # A transaction longer than the lifetime: it is never cut short.
                        await con.execute("SELECT pg_sleep(0.3)")
                        await con.execute("SELECT pg_sleep(0.3)")
                        assert con.get_server_pid() == pid
                    seen.add(pid)
                except Exception as exc:  # counted: there must be none
                    failed.append(exc)

        workers = [asyncio.ensure_future(worker()) for _ in range(4)]
        await log.wait(ConnectionExpired, 6, timeout=30)
        stop.set()
        await asyncio.gather(*workers)
        assert failed == []
        expired = log.of(ConnectionExpired)
        # Each was at least (1 - jitter) x the lifetime old, and released after a transaction
        # that outlived it (so never closed in the middle of one).
        assert all(e.age >= 0.5 * 0.8 for e in expired)
        assert len(seen) > 4  # new backends replaced the expired ones
        assert pool.get_size() <= 4


async def test_idle_connections_past_their_lifetime_are_closed(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(
        f"watchfiles://postgres{path}", min_size=2, max_size=2, max_lifetime=0.3
    ) as pool:
        log = EventLog(pool)
        first = {r["pid"] for r in await pg_a.backends(usename=user)}
        assert len(first) == 2
        # Nobody uses the pool: its two idle connections are replaced all the same.
        await log.wait(ConnectionExpired, 2, timeout=15)
        await wait_until(
            lambda: pg_a.backends(usename=user),
            lambda rows: {r["pid"] for r in rows}.isdisjoint(first),
            timeout=15,
        )
        assert await pool.fetchval("SELECT 1") == 1


def test_bad_lifetimes_are_refused_at_once() -> None:
    with pytest.raises(aiohotload.InvalidOptionError, match="max_lifetime"):
        aiohotload.create_pool("watchfiles://postgres/x/dsn", max_lifetime=0)
    with pytest.raises(aiohotload.InvalidOptionError, match="max_lifetime_jitter"):
        aiohotload.create_pool(
            "watchfiles://postgres/x/dsn", max_lifetime=10, max_lifetime_jitter=1
        )
