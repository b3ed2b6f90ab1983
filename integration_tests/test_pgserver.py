"""The test servers themselves: the fixtures give what the pool tests rely on."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import asyncpg
import pytest

from aiohotload.testing import HOSTILE, PgServer, RoleFactory, ServerSet, wait_until
from aiohotload.testing._process import running

pytestmark = pytest.mark.timeout(60)


async def login(dsn: str) -> tuple[str, int]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await conn.fetchrow("SELECT current_user, inet_server_port()")
        assert row is not None
        return row[0], row[1]
    finally:
        await conn.close()


async def test_two_servers_have_distinct_ports_and_both_answer(
    pg_a: PgServer, pg_b: PgServer
) -> None:
    assert pg_a.port != pg_b.port
    assert await pg_a.fetchval("SELECT inet_server_port()") == pg_a.port
    assert await pg_b.fetchval("SELECT inet_server_port()") == pg_b.port


async def test_wrong_password_is_refused(pg_a: PgServer, role: RoleFactory) -> None:
    user, password = await role(pg_a)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await login(pg_a.dsn(user, password + "x"))
    assert await login(pg_a.dsn(user, password)) == (user, pg_a.port)


async def test_alter_password_swaps_which_password_works(pg_a: PgServer, role: RoleFactory) -> None:
    user, old = await role(pg_a)
    new = "new-" + old
    await pg_a.alter_password(user, new)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await login(pg_a.dsn(user, old))
    assert await login(pg_a.dsn(user, new)) == (user, pg_a.port)


async def test_hostile_password_works_in_url_dsn(pg_a: PgServer, role: RoleFactory) -> None:
    user, password = await role(pg_a)
    assert set(HOSTILE) <= set(password)
    dsn = pg_a.dsn(user, password, application_name="hostile app/?#")
    assert await login(dsn) == (user, pg_a.port)
    parts = urlsplit(dsn)
    assert (parts.hostname, parts.port, parts.path) == (pg_a.host, pg_a.port, "/postgres")


async def test_hostile_password_works_in_kv_dsn(
    pg_a: PgServer, role: RoleFactory, pg_servers: ServerSet
) -> None:
    # asyncpg reads URL DSNs only, so psql (libpq, which defines the key=value form) checks it.
    psql = pg_servers.install.bindir / "psql"
    if not psql.exists():
        pytest.skip(f"needs psql beside the server binaries to read key=value DSNs: {psql}")
    user, password = await role(pg_a)
    proc = await asyncio.create_subprocess_exec(
        str(psql),
        "-XAtq",
        "-c",
        "SELECT current_user || ' ' || inet_server_port()",
        "-d",
        pg_a.kv_dsn(user, password, application_name="it's kv"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == [user, str(pg_a.port)]


async def test_backends_sees_an_app_named_connection(pg_a: PgServer, role: RoleFactory) -> None:
    user, password = await role(pg_a)
    conn = await asyncpg.connect(pg_a.dsn(user, password, application_name="probe-app"))
    try:
        rows = await pg_a.backends(application_name="probe-app")
        assert [(r["usename"], r["pid"]) for r in rows] == [(user, conn.get_server_pid())]
        assert await pg_a.backends(usename=user) == rows
        assert all(r["application_name"] != "pgserver-admin" for r in await pg_a.backends())
    finally:
        await conn.close()
    await wait_until(lambda: pg_a.backends(usename=user), lambda rows: not rows, timeout=5)


async def test_stop_immediate_refuses_connects_and_restart_brings_it_back(
    pg_disposable: PgServer, role: RoleFactory
) -> None:
    user, password = await role(pg_disposable)
    dsn = pg_disposable.dsn(user, password)
    conn = await asyncpg.connect(dsn)
    await pg_disposable.stop("immediate")
    assert not pg_disposable.is_running
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await login(dsn)
    await wait_until(conn.is_closed, timeout=5)
    port = pg_disposable.port
    await pg_disposable.start()
    assert pg_disposable.port == port
    assert await login(dsn) == (user, port)


async def test_restart_ends_sessions_and_keeps_the_port(
    pg_disposable: PgServer, role: RoleFactory
) -> None:
    user, password = await role(pg_disposable)
    dsn = pg_disposable.dsn(user, password)
    conn = await asyncpg.connect(dsn)
    await pg_disposable.restart()
    await wait_until(conn.is_closed, timeout=5)
    assert await login(dsn) == (user, pg_disposable.port)


async def test_kill_drops_connections_and_start_recovers(
    pg_disposable: PgServer, role: RoleFactory
) -> None:
    user, password = await role(pg_disposable)
    dsn = pg_disposable.dsn(user, password)
    conn = await asyncpg.connect(dsn)
    backend = conn.get_server_pid()
    await pg_disposable.kill()
    assert not pg_disposable.is_running
    assert running([backend]) == []
    await wait_until(conn.is_closed, timeout=5)
    await pg_disposable.start()
    assert await login(dsn) == (user, pg_disposable.port)


async def test_kill_postmaster_only_lets_backends_exit(
    pg_disposable: PgServer, role: RoleFactory
) -> None:
    user, password = await role(pg_disposable)
    conn = await asyncpg.connect(pg_disposable.dsn(user, password))
    await pg_disposable.kill(backends=False)
    await wait_until(conn.is_closed, timeout=5)
    await pg_disposable.start()
    assert await pg_disposable.fetchval("SELECT 1") == 1


async def test_wait_for_names_the_condition_on_timeout() -> None:
    with pytest.raises(TimeoutError, match=r"never.*last value: 0"):
        await wait_until(lambda: 0, timeout=0.05, what="never")
    assert await wait_until(lambda: asyncio.sleep(0, result=3), lambda n: n == 3) == 3
