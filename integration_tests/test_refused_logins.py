"""A login the server refuses, on real servers: the pool asks its strategy to look again now
(a password rotated on the server a little before the new secret is published is followed
at once, not at the next poll), one request at a time, and a password that never becomes
right does not turn into a storm of failed logins."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import quote

import pytest

import aiohotload
from aiohotload import RefreshRequested, SwapDone
from aiohotload.strategies import Feedback
from aiohotload.testing import PgServer, RoleFactory, wait_until, watch_url, write_dsn

from .faults import EventLog, LogWatch

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /bin/sh"),
]

# A poll that would not come during the test: only a refresh can explain a quick swap.
NEVER = "600s"


def failed_logins(server: PgServer, user: str, since: int) -> int:
    """Logins of *user* the server refused since byte *since* of its log."""
    text = server.log_path.read_bytes()[since:].decode("utf-8", "replace")
    return len(re.findall(rf'password authentication failed for user "{re.escape(user)}"', text))


def log_mark(server: PgServer) -> int:
    return server.log_path.stat().st_size


async def rotate_on_server(server: PgServer, user: str, password: str) -> None:
    """The rotation's first step: the server's password changes and its sessions end, so the
    pool must log in again (with the DSN it has, which is now wrong)."""
    await server.alter_password(user, password)
    await server.terminate(usename=user)


async def new_login(pool: aiohotload.HotPool) -> None:
    """A query that needs a new login (its connections were ended): refused until the pool
    has the new password. asyncpg 0.32 may log in first, to restore min_size."""
    with contextlib.suppress(Exception):  # asyncpg's refusal, whatever its type
        await pool.fetchval("SELECT 1")


async def test_the_file_strategy_reads_the_file_again_when_a_login_is_refused(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    """A change the watcher cannot see (a network filesystem that sends no events, a poller
    that compares times) is read when the server refuses the old password."""
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    url = watch_url(path, polling="true", poll_delay="600000", recheck="0")
    with LogWatch() as logs:
        async with aiohotload.create_pool(url, min_size=1, max_size=4) as pool:
            # A new watcher has every file re-read once, soon after it starts: let that pass.
            await logs.wait("re-read", "unchanged", timeout=10)
            await _refresh_finds_the_unseen_change(pg_a, pool, path, user, password)


async def _refresh_finds_the_unseen_change(
    pg_a: PgServer, pool: aiohotload.HotPool, path: Path, user: str, password: str
) -> None:
    log = EventLog(pool)
    rotated = password[:-1] + ("x" if password[-1] != "x" else "y")  # same length
    await rotate_on_server(pg_a, user, rotated)
    write_unseen(path, pg_a.dsn(user, rotated))
    await new_login(pool)
    await log.wait(SwapDone, timeout=20)
    assert log.of(RefreshRequested)[0].reason == "login refused"
    assert log.of(SwapDone)[0].reason == "refresh"
    assert await pool.fetchval("SELECT current_user") == user


def write_unseen(path: Path, text: str) -> None:
    """Rewrite *path* in place, same size, then put its times back: a poller comparing times
    and sizes sees nothing."""
    before = path.stat()
    data = (text + "\n").encode()
    assert len(data) == before.st_size
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


async def test_the_exec_strategy_runs_the_program_again_when_a_login_is_refused(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    secret = tmp_path / "secret"
    secret.write_text(pg_a.dsn(user, password))
    program = tmp_path / "dsn.sh"
    program.write_text(f'#!/bin/sh\ncat "{secret}"\n')
    program.chmod(0o755)
    url = f"exec://postgres{quote(str(program))}?interval={NEVER}"
    async with aiohotload.create_pool(url, min_size=1, max_size=4) as pool:
        log = EventLog(pool)
        await rotate_on_server(pg_a, user, "new-" + password)
        secret.write_text(pg_a.dsn(user, "new-" + password))
        await new_login(pool)
        await log.wait(SwapDone, timeout=20)
        assert log.of(SwapDone)[0].reason == "refresh"
        assert await pool.fetchval("SELECT 1") == 1


class CountingStrategy:
    """A strategy that hands out a DSN it is given, and counts the refresh requests it gets."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.refreshes = 0

    async def watch(
        self, path: str, options: Mapping[str, str], *, feedback: Feedback
    ) -> AsyncIterator[str]:
        yield self.dsn
        while True:
            news = await feedback.wait()
            if news.refresh:
                self.refreshes += 1
                await asyncio.sleep(0.05)  # a source that takes a while to read


@pytest.fixture
async def counting(
    pg_a: PgServer, role: RoleFactory
) -> AsyncIterator[tuple[CountingStrategy, str]]:
    user, password = await role(pg_a)
    strategy = CountingStrategy(pg_a.dsn(user, password))
    aiohotload.register_strategy("counting", strategy)
    try:
        yield strategy, user
    finally:
        aiohotload.unregister_strategy("counting")


async def test_a_wrong_password_under_load_is_no_login_storm(
    pg_a: PgServer, counting: tuple[CountingStrategy, str]
) -> None:
    """The password changes on the server and never in the source: 50 callers keep trying
    for 6 s. Refresh requests stay one at a time, spaced; the server sees a handful of
    failed logins, not one per caller and attempt."""
    strategy, user = counting
    async with aiohotload.create_pool("counting://postgres/x", min_size=2, max_size=10) as pool:
        log = EventLog(pool)
        mark = log_mark(pg_a)
        await rotate_on_server(pg_a, user, "never-published")
        attempts = 0
        stop = asyncio.Event()

        async def caller() -> None:
            nonlocal attempts
            while not stop.is_set():
                attempts += 1
                try:
                    await pool.fetchval("SELECT 1")
                except Exception:  # an application's retry loop
                    await asyncio.sleep(0.005)

        callers = [asyncio.ensure_future(caller()) for _ in range(50)]
        await asyncio.sleep(6.0)  # the load itself: callers retrying for a while
        stop.set()
        await asyncio.gather(*callers)
        refused = failed_logins(pg_a, user, mark)
        requests = len(log.of(RefreshRequested))
        print(  # the figures behind the README (-s shows them)
            f"wrong password, 50 callers, 6 s: {attempts} attempts, {refused} logins refused "
            f"by the server, {requests} refresh requests"
        )
        assert attempts > 1000
        # The first burst may try every slot of the pool at once (max_size 10, as any cold
        # pool does); after the first refusal, pauses of 1, 2, 4 s (+-10%) let at most one
        # login through each: 4 in 6 s. Refresh requests are spaced the same way.
        assert 1 <= refused <= 10 + 4
        assert 1 <= requests <= 4
        assert strategy.refreshes == requests


async def test_refresh_requests_stay_one_at_a_time(
    pg_a: PgServer, counting: tuple[CountingStrategy, str]
) -> None:
    """Refused logins from many callers at once make one request, not one each."""
    strategy, user = counting
    async with aiohotload.create_pool("counting://postgres/x", min_size=0, max_size=50) as pool:
        await rotate_on_server(pg_a, user, "never-published")
        results = await asyncio.gather(
            *(pool.fetchval("SELECT 1") for _ in range(50)), return_exceptions=True
        )
        assert all(isinstance(r, Exception) for r in results)
        await wait_until(lambda: strategy.refreshes, lambda n: n >= 1, timeout=10)
        assert strategy.refreshes == 1
