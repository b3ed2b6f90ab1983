"""HotPool as a drop-in for asyncpg.Pool, on real servers: what code written for asyncpg's
pool (its own tests, shutdown hooks, startup error handling, type annotations) relies on."""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import aiohotload
from aiohotload import HotPool
from aiohotload.testing import (
    HOSTILE,
    PgServer,
    RoleFactory,
    port_of,
    wait_until,
    watch_url,
    write_dsn,
)

from .faults import backends

pytestmark = pytest.mark.timeout(90)

ASYNCPG_VERSION = tuple(int(part) for part in asyncpg.__version__.split(".")[:2])


async def test_is_an_asyncpg_pool(pg_a: PgServer, role: RoleFactory, dsn_path: Path) -> None:
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password))

    async def typed_for_asyncpg(pool: asyncpg.Pool) -> int:  # as application code annotates
        value = await pool.fetchval("SELECT 1")
        assert isinstance(value, int)
        return value

    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1) as pool:
        assert isinstance(pool, asyncpg.Pool)
        assert await typed_for_asyncpg(pool) == 1


def test_every_public_asyncpg_pool_method_is_hotpools_own() -> None:
    """Nothing of asyncpg.Pool is inherited as is: its methods would touch state a HotPool
    does not have."""
    public = [n for n in dir(asyncpg.Pool) if not n.startswith("_")]
    public += ["__await__", "__aenter__", "__aexit__"]
    inherited = [n for n in public if getattr(HotPool, n) is getattr(asyncpg.Pool, n)]
    assert inherited == []


def test_terminate_from_synchronous_code_outside_the_loop(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    """asyncpg's own test teardown, atexit handlers and frameworks' sync shutdown hooks call
    terminate() while the loop is not running: the connections close and no task is left
    once the loop runs again (fails on a version that needs a running loop)."""
    dsn_path = tmp_path / "dsn.txt"
    loop = asyncio.new_event_loop()
    try:
        user, password = loop.run_until_complete(pg_a.create_role(f"sync_{os.getpid()}", "pw1"))
        write_dsn(dsn_path, pg_a.dsn(user, password))
        pool = loop.run_until_complete(
            aiohotload.create_pool(watch_url(dsn_path), min_size=2).__aenter__()
        )
        assert loop.run_until_complete(backends(pg_a, user)) == 2
        pool.terminate()  # no running loop here
        assert pool.is_closing()

        async def settle() -> None:
            await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
            await wait_until(
                lambda: asyncio.all_tasks() - {asyncio.current_task()},
                lambda left: not left,
                timeout=10,
                what="no task left",
            )

        loop.run_until_complete(settle())
        pool.terminate()  # again: a no-op
    finally:
        loop.run_until_complete(pg_a.drop_role(f"sync_{os.getpid()}"))
        loop.close()
    pool.terminate()  # and once the loop is closed


async def test_sizes_are_the_configured_ones_before_init_and_after_close(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    pool = aiohotload.create_pool(watch_url(dsn_path), min_size=2, max_size=7)
    assert (pool.get_min_size(), pool.get_max_size(), pool.get_init_size()) == (2, 7, 2)
    await pool
    assert (pool.get_min_size(), pool.get_max_size(), pool.get_init_size()) == (2, 7, 2)
    await pool.close()
    assert (pool.get_min_size(), pool.get_max_size(), pool.get_init_size()) == (2, 7, 2)
    assert pool.get_size() == 0 and pool.get_idle_size() == 0
    default = aiohotload.create_pool(watch_url(dsn_path))
    assert (default.get_min_size(), default.get_max_size(), default.get_init_size()) == (
        10,
        10,
        10,
    )


async def test_set_connect_args_applies_to_this_and_every_later_generation(
    pg_a: PgServer, pg_b: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=2) as pool:
        pool.set_connect_args(server_settings={"application_name": "after-set"})
        await pool.expire_connections()  # as with asyncpg: existing connections keep theirs
        assert await pool.fetchval("SHOW application_name") == "after-set"
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        assert await port_of(pool) == pg_b.port
        assert await pool.fetchval("SHOW application_name") == "after-set"
        with pytest.raises(aiohotload.InvalidOptionError, match="source"):
            pool.set_connect_args(pg_a.dsn(user, password))


async def test_first_open_errors_are_asyncpgs_own(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    """Code that catches asyncpg's errors at startup works unchanged with a HotPool."""
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password, database="no_such_db"))
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await aiohotload.create_pool(watch_url(dsn_path), min_size=1)
    write_dsn(dsn_path, pg_a.dsn(user, password + "x"))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await aiohotload.create_pool(watch_url(dsn_path), min_size=1)
    # A user name that shares a piece with the password: asyncpg's class still, redacted.
    shared = secrets.token_hex(3)
    user, password = await role(pg_a, name=f"hl_{shared}_app", password=f"pw-{shared}-{HOSTILE}")
    write_dsn(dsn_path, pg_a.dsn(user, password + "x"))
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await aiohotload.create_pool(watch_url(dsn_path), min_size=0)
    assert info.value.sqlstate == "28P01" and "password authentication failed" in str(info.value)
    assert shared not in str(info.value) and info.value.__context__ is None

    async def not_a_connection(*args: Any, **kwargs: Any) -> object:
        return object()

    write_dsn(dsn_path, pg_a.dsn(user, password))
    with pytest.raises(asyncpg.InterfaceError, match="connect callback"):
        await aiohotload.create_pool(watch_url(dsn_path), connect=not_a_connection)
    # Bad pool arguments: ValueError at once, as asyncpg.create_pool raises them.
    with pytest.raises(ValueError, match="min_size is greater than max_size"):
        aiohotload.create_pool(watch_url(dsn_path), min_size=5, max_size=2)
    if ASYNCPG_VERSION >= (0, 32):
        with pytest.raises(ValueError, match="init_size is smaller than min_size"):
            aiohotload.create_pool(watch_url(dsn_path), min_size=3, init_size=1)


async def test_release_timeout_raises_as_asyncpg(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=1) as pool:
        con = await pool.acquire()
        await con.execute("SELECT pg_advisory_lock(1)")
        # The reset at release runs a query; with no time for it, asyncpg raises.
        with pytest.raises(asyncio.TimeoutError):
            await pool.release(con, timeout=1e-9)
        await pool.release(con)  # released (terminated) already: a no-op
        assert await pool.fetchval("SELECT 1") == 1


async def test_use_while_initialising_says_what_asyncpg_says(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    pool = aiohotload.create_pool(watch_url(dsn_path), min_size=1)
    with pytest.raises(asyncpg.InterfaceError, match="pool is not initialized"):
        await pool.fetchval("SELECT 1")
    opening = asyncio.ensure_future(pool.__aenter__())
    await asyncio.sleep(0)
    with pytest.raises(asyncpg.InterfaceError, match="being initialized, but not yet ready"):
        await pool.fetchval("SELECT 1")
    await opening
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await pool.fetchval("SELECT 1")


async def test_a_pool_dropped_without_close_is_collected_and_closes_its_connections(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    """As asyncpg does for an abandoned pool: a ResourceWarning, and the connections close
    (fails on a version whose background task keeps the pool alive)."""
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    pool: HotPool | None = await aiohotload.create_pool(watch_url(dsn_path), min_size=2)
    assert await backends(pg_a, user) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del pool
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
    await wait_until(
        lambda: [t for t in asyncio.all_tasks() if t.get_name().startswith("aiohotload")],
        lambda left: not left,
        timeout=10,
        what="no aiohotload task left",
    )


async def test_a_forked_child_never_touches_the_parents_connections(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    """gunicorn --preload and multiprocessing fork a process that inherits the pool: the
    child fails clearly on first use, and closing it there (a worker's shutdown hook) does
    not end the parent's session on the server (fails on a version where the child closes
    the shared connection gracefully)."""
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=1) as pool:
        pid_before = await pool.fetchval("SELECT pg_backend_pid()")
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # the child: runs on this same event loop until it exits
            code = 1
            try:
                os.close(reader)
                try:
                    await pool.fetchval("SELECT 1")
                except aiohotload.PoolClosedError as exc:
                    code = 0 if "fork" in str(exc) else 2
                await asyncio.wait_for(pool.close(), timeout=5)
            finally:
                os.write(writer, bytes([code]))
                os._exit(code)
        os.close(writer)
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, os.read, reader, 1)
        os.close(reader)
        await loop.run_in_executor(None, os.waitpid, child, 0)
        assert answer == b"\x00"
        # The parent's one connection is the same session, alive.
        assert await pool.fetchval("SELECT pg_backend_pid()") == pid_before
        assert await backends(pg_a, user) == 1


async def test_close_cut_short_by_a_timeout_then_terminate(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    """asyncpg's own pattern: ``wait_for(pool.close(), timeout)`` while a connection is held,
    then ``terminate()``: nothing is left running."""
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    pool = await aiohotload.create_pool(watch_url(dsn_path), min_size=1, max_size=1)
    held = await pool.acquire()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.close(), timeout=0.1)
    pool.terminate()
    await wait_until(
        lambda: [t for t in asyncio.all_tasks() if "aiohotload" in repr(t)],
        lambda left: not left,
        timeout=10,
        what="no aiohotload task left",
    )
    await wait_until(lambda: backends(pg_a, user), lambda n: n == 0, timeout=10)
    with pytest.raises(asyncpg.InterfaceError):  # the held connection went with the pool
        await held.fetchval("SELECT 1")


@pytest.mark.parametrize("min_size", [0, 2])
async def test_the_first_open_runs_init_and_setup_as_asyncpg_does(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path, min_size: int
) -> None:
    """Opening runs ``init`` on the connections asyncpg opens (none with ``min_size=0``: one
    login proves the DSN instead) and ``setup`` only for callers; an ``init`` that fails once
    fails the first acquire, not ``create_pool`` (asyncpg's test_pool_06, _07 and
    test_pool_exception_in_setup_and_init, which failed on a version proving by acquire)."""
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    calls = {"init": 0, "setup": 0, "reset": 0}

    async def init(con: asyncpg.Connection) -> None:
        calls["init"] += 1
        if calls["init"] == 1 and min_size == 0:
            raise RuntimeError("init failed once")

    async def setup(con: object) -> None:
        calls["setup"] += 1

    async def reset(con: asyncpg.Connection) -> None:
        calls["reset"] += 1

    async with aiohotload.create_pool(
        watch_url(dsn_path), min_size=min_size, max_size=2, init=init, setup=setup, reset=reset
    ) as pool:
        assert calls == {"init": min_size, "setup": 0, "reset": 0}
        assert pool.get_idle_size() == min_size
        if min_size == 0:
            with pytest.raises(RuntimeError, match="init failed once"):
                await pool.fetchval("SELECT 1")
        assert await pool.fetchval("SELECT 1") == 1
        assert calls["setup"] == 1 and calls["reset"] == 1
    # A wrong password still fails create_pool, whatever min_size.
    write_dsn(dsn_path, pg_a.dsn(user, password + "x"))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await aiohotload.create_pool(watch_url(dsn_path), min_size=min_size, init=init)


async def test_asyncpgs_private_attributes_read_the_current_inner_pool(
    pg_a: PgServer, pg_b: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    """Monitoring code and asyncpg's own test harness read ``pool._holders``, ``pool._queue``
    and ``pool._maintenance_task``: they are the current inner pool's, after a swap too."""
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    write_dsn(dsn_path, pg_a.dsn(user, password))
    pool = aiohotload.create_pool(watch_url(dsn_path), min_size=2, max_size=3)

    def private(name: str) -> Any:  # asyncpg declares no types for them
        return getattr(pool, name)

    if ASYNCPG_VERSION >= (0, 32):  # asyncpg 0.32's floor upkeep
        assert private("_maintenance_task") is None  # before init, as asyncpg's
    with pytest.raises(AttributeError, match="no attribute '_no_such'"):
        private("_no_such")
    async with pool:
        assert len(private("_holders")) == 3 and private("_queue").qsize() == 3
        async with pool.acquire():
            assert private("_queue").qsize() == 2
        before = private("_holders")
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await pool.wait_for_swap(timeout=10)
        assert private("_holders") is not before and len(private("_holders")) == 3
        assert private("_maxsize") == 3
    if ASYNCPG_VERSION >= (0, 32):
        assert private("_maintenance_task") is None  # after close
