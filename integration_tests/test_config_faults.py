"""Faults in the DSN file, with a real pool: half-written, flapping, replaced by a directory,
unreadable, a symlink loop, its directory deleted, hostile contents.

In every case the pool keeps serving on the DSN it has, no query fails, it swaps only to a
DSN that works, and it follows the file again as soon as a good value is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import aiohotload
from aiohotload import HotPool, ReloadFailed, SwapDone, redact_dsn
from aiohotload.drivers import asyncpg_driver
from aiohotload.testing import PgServer, port_of, wait_until, watch_url, write_dsn

from .faults import EventLog, Load, LogWatch

pytestmark = pytest.mark.timeout(60)

# The watchfiles strategy logs "DSN file <path> <why>; keeping the current DSN" when it reads
# the file and cannot use what it finds.
KEEPING = "keeping the current DSN"


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    with LogWatch() as watch:
        yield watch


async def swapped_to(pool: HotPool, server: PgServer, generation: int) -> None:
    """Wait for the swap to *generation* and check the pool now reaches *server*."""
    await pool.wait_until(lambda p: p.generation == generation, timeout=10)
    assert await port_of(pool) == server.port


async def test_half_written_file_never_swaps_to_the_half(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], tmp_path: Path
) -> None:
    user, password = user_ab
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    full = pg_b.dsn(user, password)
    half = full[: full.rindex("@") - 4]  # cut inside the password
    async with (
        aiohotload.create_pool(watch_url(path), min_size=1, max_size=2) as pool,
        Load(pool) as load,
    ):
        events = EventLog(pool)
        with path.open("w") as file:  # in place, as `echo ... > dsn` writes
            file.write(half)
            file.flush()
            os.fsync(file.fileno())
            # The writer stalls. The pool reads the half and cannot open a pool on it.
            (failed,) = await events.wait(ReloadFailed)
            assert pool.generation == 0
            await load.progress()
            file.write(full[len(half) :] + "\n")
        await swapped_to(pool, pg_b, 1)
        assert [e.new_target for e in events.of(SwapDone)] == [redact_dsn(full)]
        assert pool.last_error is None
        assert password not in failed.error
    assert load.failures == []


async def test_flapping_file_ends_on_the_last_value_and_leaks_nothing(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], tmp_path: Path
) -> None:
    user, password = user_ab
    dsns = [pg_a.dsn(user, password), pg_b.dsn(user, password)]
    path = tmp_path / "dsn"
    write_dsn(path, dsns[0])
    opened: list[asyncpg.Pool] = []

    async def counting_driver(dsn: str, **kwargs: Any) -> asyncpg.Pool:
        pool = await asyncpg_driver(dsn, **kwargs)
        opened.append(pool)
        return pool

    aiohotload.register_driver("countingpg", counting_driver)
    rng = random.Random(3)
    writes = 300
    try:
        async with (
            aiohotload.create_pool(
                f"watchfiles://countingpg{path}", min_size=1, max_size=3
            ) as pool,
            Load(pool) as load,
        ):
            for i in range(1, writes + 1):
                write_dsn(path, dsns[i % 2])
                # Mostly back to back; now and then long enough for a swap to start or end.
                pause = rng.choice([0.0] * 6 + [0.002, 0.005, 0.02, 0.05])
                await asyncio.sleep(pause)
            final = dsns[writes % 2]
            # The watcher may still hold an older read of the file and be opening a pool on
            # it: settled means on the last value with every other inner pool closed.
            await wait_until(
                lambda: (
                    pool.target == redact_dsn(final)
                    and pool.draining == 0
                    and len([p for p in opened if not p.is_closing()]) == 1
                ),
                timeout=20,
                what="settled on the last value, every other inner pool closed",
            )
            assert await port_of(pool) == pg_a.port
            assert pool.last_error is None
            assert pool.generation <= writes
            # No connection is left on the other server, and no more than one pool's worth
            # on this one.
            await wait_until(lambda: pg_b.backends(usename=user), lambda rows: not rows)
            assert len(await pg_a.backends(usename=user)) <= 3
            await load.progress()
        assert all(p.is_closing() for p in opened)
    finally:
        aiohotload.unregister_driver("countingpg")
    assert load.failures == []
    await wait_until(lambda: pg_a.backends(usename=user), lambda rows: not rows)


async def test_file_replaced_by_a_directory(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    tmp_path: Path,
    logs: LogWatch,
) -> None:
    user, password = user_ab
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    async with (
        aiohotload.create_pool(watch_url(path), min_size=1, max_size=2) as pool,
        Load(pool) as load,
    ):
        mark = logs.mark()
        path.unlink()
        path.mkdir()
        await logs.wait(str(path), "directory", KEEPING, since=mark)
        await load.progress()
        assert (pool.generation, pool.last_error) == (0, None)
        path.rmdir()
        write_dsn(path, pg_b.dsn(user, password))
        await swapped_to(pool, pg_b, 1)
    assert load.failures == []


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Run as the ``nobody`` user (effective uid) meanwhile, so that file permissions apply
    to root too; a no-op when not root. Process-wide: no other test runs meanwhile."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)


async def test_unreadable_file(
    pg_a: PgServer, pg_b: PgServer, user_ab: tuple[str, str], logs: LogWatch
) -> None:
    user, password = user_ab
    # A directory 'nobody' may enter (pytest's tmp_path is under a 0700 one).
    directory = Path(tempfile.mkdtemp(prefix="aiohotload-perm-"))
    try:
        directory.chmod(0o755)
        path = directory / "dsn"
        write_dsn(path, pg_a.dsn(user, password))
        path.chmod(0o644)
        # min_size == max_size: no new connection is needed while running as nobody.
        async with (
            aiohotload.create_pool(watch_url(path), min_size=2, max_size=2) as pool,
            Load(pool, workers=2) as load,
        ):
            await load.progress()
            tmp = directory / "dsn.new"
            tmp.write_text(pg_b.dsn(user, password))
            tmp.chmod(0)
            mark = logs.mark()
            os.replace(tmp, path)
            # No await in between: the pool reads the new file only once this runs as nobody.
            with as_nobody():
                await logs.wait(str(path), "ermission denied", KEEPING, since=mark)
                await load.progress()
                assert (pool.generation, pool.last_error) == (0, None)
            path.chmod(0o644)  # readable again: the change is seen (an attribute event)
            await swapped_to(pool, pg_b, 1)
        assert load.failures == []
    finally:
        shutil.rmtree(directory)


async def test_symlink_loop(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    tmp_path: Path,
    logs: LogWatch,
) -> None:
    user, password = user_ab
    path = tmp_path / "dsn"
    other = tmp_path / "other"
    write_dsn(path, pg_a.dsn(user, password))
    async with (
        aiohotload.create_pool(watch_url(path), min_size=1, max_size=2) as pool,
        Load(pool) as load,
    ):
        mark = logs.mark()
        path.unlink()
        other.symlink_to(path)
        path.symlink_to(other)  # dsn -> other -> dsn
        await logs.wait(str(path), KEEPING, since=mark)
        await load.progress()
        assert (pool.generation, pool.last_error) == (0, None)
        other.unlink()
        write_dsn(path, pg_b.dsn(user, password))  # replaces the link with a file
        await swapped_to(pool, pg_b, 1)
    assert load.failures == []


async def test_watched_directory_deleted_and_recreated(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    tmp_path: Path,
    logs: LogWatch,
) -> None:
    user, password = user_ab
    directory = tmp_path / "conf"
    directory.mkdir()
    path = directory / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    async with (
        aiohotload.create_pool(watch_url(path), min_size=1, max_size=2) as pool,
        Load(pool) as load,
    ):
        for generation, server in enumerate([pg_b, pg_a], start=1):
            mark = logs.mark()
            shutil.rmtree(directory)
            await logs.wait(str(path), "does not exist", KEEPING, since=mark)
            await load.progress()
            assert (pool.generation, pool.last_error) == (generation - 1, None)
            directory.mkdir()
            write_dsn(path, server.dsn(user, password))
            await swapped_to(pool, server, generation)
    assert load.failures == []


async def test_hostile_contents_never_reach_the_pool(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    tmp_path: Path,
    logs: LogWatch,
) -> None:
    user, password = user_ab
    good = pg_a.dsn(user, password)
    secret = "S3cr3t-" + password
    path = tmp_path / "dsn"
    write_dsn(path, good)
    # Contents the strategy cannot use: read, then ignored.
    unreadable: dict[str, bytes] = {
        "empty": b"",
        "whitespace only": b"  \n\t \r\n",
        "not UTF-8": b"postgresql://u:\xff\xfe@127.0.0.1/db",
        "larger than a DSN can be": b"x" * 100_000,
    }
    # Contents read as a DSN that cannot open a pool: the reload fails, redacted.
    unusable: dict[str, str] = {
        "not a DSN": "this is not a DSN at all " + secret,
        "a bad port": f"postgresql://{user}:{secret}@127.0.0.1:99999/postgres",
        "a NUL byte": f"postgresql://{user}:{secret}@127.0.0.1\x00:1/postgres",
        "a line break inside": good.replace("@", "@\n", 1) + "&x=" + secret,
        "a wrong password": pg_a.dsn(user, secret),
        "a missing database": pg_a.dsn(user, password, "no_such_db_" + secret),
        "an unknown server setting": pg_a.dsn(user, password, no_such_setting=secret),
        "SSL required, none offered": pg_a.dsn(user, password, sslmode="require"),
        "an unbalanced key=value quote": f"host='127.0.0.1 user={user} password={secret}",
        "a host name too long to resolve": f"postgresql://{user}:{secret}@{'h' * 300}/db",
        "a hotload URL": f"watchfiles://postgres{path}?password={secret}",
    }
    async with (
        aiohotload.create_pool(watch_url(path), min_size=1, max_size=2) as pool,
        Load(pool) as load,
    ):
        events = EventLog(pool)
        for what, raw in unreadable.items():
            mark = logs.mark()
            path.write_bytes(raw)
            await logs.wait(str(path), KEEPING, since=mark)
            assert (pool.generation, pool.last_error) == (0, None), what
        for what, text in unusable.items():
            failures = len(events.of(ReloadFailed))
            path.write_text(text)
            await events.wait(ReloadFailed, failures + 1)
            error = pool.last_error
            assert error is not None, what
            assert secret not in str(error), what
            assert pool.generation == 0, what
            write_dsn(path, good)  # back to the DSN in use: nothing left to retry
            await wait_until(lambda: pool.last_error, lambda e: e is None, what=what)
        await load.progress()
        assert [e for e in events.events if secret in repr(e)] == []
        write_dsn(path, pg_b.dsn(user, password))
        await swapped_to(pool, pg_b, 1)
    assert load.failures == []
    assert [m for m in logs.messages if secret in m] == []


async def test_fifo_at_the_path_does_not_block_the_pool(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    tmp_path: Path,
    logs: LogWatch,
) -> None:
    user, password = user_ab
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    async with (
        aiohotload.create_pool(watch_url(path), min_size=1, max_size=2) as pool,
        Load(pool) as load,
    ):
        mark = logs.mark()
        path.unlink()
        os.mkfifo(path)  # reading it would wait for a writer forever
        await logs.wait(str(path), KEEPING, since=mark)
        assert stat.S_ISFIFO(path.stat().st_mode)
        await load.progress()
        path.unlink()
        write_dsn(path, pg_b.dsn(user, password))
        await swapped_to(pool, pg_b, 1)
    assert load.failures == []
