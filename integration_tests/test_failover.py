"""Failover on real servers: a pool with ``follow_primary`` ends up writing to the server that
takes writes, with no operator action, also when the name it uses still leads to a server
that no longer does (the demoted-primary trap)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import aiohotload
from aiohotload import FailoverDetected, SwapDone
from aiohotload.testing import (
    PgServer,
    RoleFactory,
    ServerFactory,
    wait_until,
    watch_url,
    write_dsn,
)

from .faults import EventLog, backends
from .tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(180)


class Writes:
    """Workers inserting rows through a pool, flat out: which succeeded, which failed, when."""

    def __init__(self, pool: aiohotload.HotPool, table: str, workers: int = 4) -> None:
        self.pool = pool
        self.table = table
        self.ok: list[float] = []  # time.monotonic() of each successful write
        self.failed: list[tuple[float, str]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._work(n)) for n in range(workers)]

    async def _work(self, worker: int) -> None:
        while not self._stop.is_set():
            try:
                await self.pool.execute(
                    f'INSERT INTO "{self.table}" VALUES ($1, inet_server_port())', worker
                )
                self.ok.append(time.monotonic())
            except Exception as exc:  # an application's retry loop: any failure counts
                self.failed.append((time.monotonic(), type(exc).__name__))
                await asyncio.sleep(0.01)  # an application's retry pause

    async def succeeding(self, since: float, timeout: float = 60.0) -> float:
        """The time of the first write after *since* that succeeded."""

        def first() -> float | None:
            return next((t for t in self.ok if t > since), None)

        found = await wait_until(first, timeout=timeout, what="a successful write")
        assert found is not None
        return found

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    made = TcpProxy("127.0.0.1", 1)  # pointed at a server by each test
    async with made:
        yield made


async def test_a_server_turned_read_only_is_left_for_the_one_that_takes_writes(
    pg_disposable_factory: ServerFactory, role: RoleFactory, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Writes start failing with 25006 on live connections (the server was made read-only);
    the pool opens its DSN again, which finds no writable server until the name leads to
    one, then swaps there and drains the read-only one."""
    a, b = pg_disposable_factory(2)
    user, password = await role(a)
    await role(b, name=user, password=password)
    table = f"w_{user}"
    for server in (a, b):
        await server.execute(f'CREATE TABLE "{table}" (worker int, port int)')
        await server.execute(f'GRANT INSERT ON "{table}" TO "{user}"')
    proxy.target = (a.host, a.port)
    dsn_file = tmp_path / "dsn"
    write_dsn(dsn_file, a.dsn(user, password).replace(f":{a.port}/", f":{proxy.port}/"))
    try:
        await _follow_the_writable_server(a, b, user, table, proxy, dsn_file)
    finally:
        # Writable again (the role fixture drops its role there).
        async with a.admin_connection() as admin:
            await admin.execute("SET default_transaction_read_only = off")
            await admin.execute("ALTER SYSTEM RESET ALL")
            await admin.execute("SELECT pg_reload_conf()")
    assert await b.fetchval(f'SELECT count(*) FROM "{table}"') > 0


async def _follow_the_writable_server(  # noqa: PLR0917 (a test's steps, split in two)
    a: PgServer, b: PgServer, user: str, table: str, proxy: TcpProxy, dsn_file: Path
) -> None:
    async with aiohotload.create_pool(
        watch_url(dsn_file, follow_primary="true"), min_size=2, max_size=4
    ) as pool:
        log = EventLog(pool)
        writes = Writes(pool, table)
        await writes.succeeding(0.0)
        await a.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await a.execute("SELECT pg_reload_conf()")
        await log.wait(FailoverDetected, timeout=20)
        assert pool.generation == 0  # no writable server behind the name yet
        proxy.target = (b.host, b.port)
        moved_at = time.monotonic()
        swapped = await log.wait(SwapDone, timeout=30)
        assert swapped[0].reason == "failover"
        await writes.succeeding(moved_at)
        await wait_until(
            lambda: b.fetchval(f'SELECT count(*) FROM "{table}"'),
            lambda n: n > 0,
            timeout=20,
            what="writes on the server that takes them",
        )
        await writes.stop()
        await wait_until(lambda: backends(a, user), lambda n: n == 0, timeout=20)
        detected = log.of(FailoverDetected)
        assert "25006" in detected[0].reason
        assert len(detected) <= 2  # one reopen at a time, not one per failed query


async def test_a_real_failover_and_the_demoted_primary_trap(
    pg_disposable: PgServer, proxy: TcpProxy, tmp_path: Path
) -> None:
    """A primary and its streaming standby behind one name. The primary stops, the standby is
    promoted, the old primary comes back as a read-only standby of the new one and the name
    still leads to it for a while, then to the new primary. The pool writes to the new
    primary in the end, and keeps no connection to the old one."""
    primary = pg_disposable
    # A role of its own (thrown away with the server: the fixture could not drop it on a
    # demoted primary).
    user, password = await primary.create_role("failover", "failover-password")
    table = f"f_{user}"
    await primary.execute(f'CREATE TABLE "{table}" (worker int, port int)')
    await primary.execute(f'GRANT INSERT ON "{table}" TO "{user}"')
    standby = primary.standby()
    try:
        await standby.start()
        assert await standby.in_recovery()
        proxy.target = (primary.host, primary.port)
        dsn_file = tmp_path / "dsn"
        write_dsn(
            dsn_file,
            primary.dsn(user, password).replace(f":{primary.port}/", f":{proxy.port}/"),
        )
        async with aiohotload.create_pool(
            watch_url(dsn_file, follow_primary="true", drain_timeout="5s"), min_size=2, max_size=4
        ) as pool:
            log = EventLog(pool)
            writes = Writes(pool, table)
            await writes.succeeding(0.0)
            # The failover: the primary stops, the standby takes over, and the old primary
            # comes back read-only while the name still leads to it (the trap).
            await primary.stop("fast")
            await standby.promote()
            promoted_at = time.monotonic()
            primary.follow(standby)
            await primary.start()
            assert await primary.in_recovery()
            await log.wait(FailoverDetected, timeout=30)
            proxy.target = (standby.host, standby.port)
            first_write = await writes.succeeding(promoted_at, timeout=60)
            # The reopen started at the detection swaps once its retry reaches the new primary
            # (new connections of the old generation may get there first, through the name).
            await wait_until(
                lambda: [e for e in log.of(SwapDone) if e.reason == "failover"],
                timeout=30,
                what="a swap for the failover",
            )
            await writes.stop()
            await wait_until(lambda: backends(primary, user), lambda n: n == 0, timeout=20)
            written_after = await standby.fetchval(
                f'SELECT count(*) FROM "{table}" WHERE port = $1', standby.port
            )
            assert written_after > 0
            print(  # the figures behind the README's Failover section (-s shows them)
                f"failover: first write {first_write - promoted_at:.2f}s after the promotion, "
                f"{len(writes.failed)} failed writes, {len(writes.ok)} succeeded"
            )
    finally:
        await standby.stop("immediate")
        standby.cleanup()
