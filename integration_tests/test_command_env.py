"""The exec and env strategies driving a real HotPool against real PostgreSQL servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

import aiohotload
from aiohotload import SourceError
from aiohotload.testing import PgServer, RoleFactory, port_of, wait_until, write_dsn

pytestmark = [
    pytest.mark.source,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /bin/sh and /proc"),
]

VAR = "AIOHOTLOAD_TEST_ENV_DSN"


def script(directory: Path, body: str, name: str = "dsn.sh") -> Path:
    """An executable /bin/sh script; $DIR in *body* is *directory*."""
    path = directory / name
    path.write_text(f'#!/bin/sh\nDIR="{directory}"\n{body}\n')
    path.chmod(0o755)
    return path


def exec_url(program: Path, **options: str) -> str:
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in options.items())
    return f"exec://postgres{quote(str(program))}" + (f"?{query}" if query else "")


def assert_never_logged(log: pytest.LogCaptureFixture, password: str) -> None:
    for form in (password, quote(password, safe="")):
        assert form not in log.text


def warnings_of(log: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [
        r.getMessage() for r in log.records if r.name == logger and r.levelno >= logging.WARNING
    ]


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="aiohotload")
    return caplog


# ---------------------------------------------------------------------------- exec


async def test_exec_pool_follows_what_the_program_prints(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    tmp_path: Path,
    log: pytest.LogCaptureFixture,
) -> None:
    user, password = user_ab
    dsn_file = tmp_path / "dsn"
    write_dsn(dsn_file, pg_a.dsn(user, password))
    program = script(tmp_path, 'cat "$DIR/dsn"')
    url = exec_url(program, interval="100ms", timeout="5s")
    async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
        assert await port_of(pool) == pg_a.port
        swapped = asyncio.ensure_future(pool.wait_for_swap(timeout=10))
        write_dsn(dsn_file, pg_b.dsn(user, password))
        assert await swapped == 1
        assert await port_of(pool) == pg_b.port
        assert await pool.fetchval("SELECT current_user") == user
    assert_never_logged(log, password)


async def test_exec_pool_reads_json_of_the_aws_shape(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path, log: pytest.LogCaptureFixture
) -> None:
    user, password = await role(pg_a)
    secret = {
        "engine": "postgres",
        "host": pg_a.host,
        "port": pg_a.port,
        "username": user,
        "password": password,
        "dbname": "postgres",
    }
    (tmp_path / "secret.json").write_text(json.dumps(secret))
    program = script(tmp_path, 'cat "$DIR/secret.json"')
    async with aiohotload.create_pool(exec_url(program), min_size=1, max_size=2) as pool:
        assert await pool.fetchval("SELECT current_user") == user
    assert_never_logged(log, password)


async def test_exec_failing_program_keeps_the_pool_serving(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    tmp_path: Path,
    log: pytest.LogCaptureFixture,
) -> None:
    user, password = user_ab
    dsn_file = tmp_path / "dsn"
    write_dsn(dsn_file, pg_a.dsn(user, password))
    # A failing helper that echoes the DSN it could not refresh: the warning, shown as asked,
    # must not.
    program = script(
        tmp_path,
        'if [ -e "$DIR/fail" ]; then echo "refresh failed for $(cat "$DIR/dsn")" >&2; exit 1; fi\n'
        'cat "$DIR/dsn"',
    )
    url = exec_url(program, interval="100ms", show_stderr="true")
    async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
        (tmp_path / "fail").touch()
        logger = "aiohotload.strategies.command"
        (warning,) = await wait_until(lambda: warnings_of(log, logger), what="a warning")
        assert "exited with status 1; stderr: refresh failed for postgresql://" in warning
        assert await port_of(pool) == pg_a.port
        assert pool.last_error is None

        swapped = asyncio.ensure_future(pool.wait_for_swap(timeout=10))
        write_dsn(dsn_file, pg_b.dsn(user, password))
        (tmp_path / "fail").unlink()
        assert await swapped == 1
        assert await port_of(pool) == pg_b.port
    assert_never_logged(log, password)


async def test_closing_the_pool_kills_a_running_program(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    (tmp_path / "dsn").write_text(pg_a.dsn(user, password))
    script(tmp_path, "sleep 30", "helper.sh")
    program = script(
        tmp_path,
        'if [ -e "$DIR/started" ]; then echo $$ > "$DIR/pid"; "$DIR/helper.sh" & wait; fi\n'
        'touch "$DIR/started"; cat "$DIR/dsn"',
    )
    pid_file = tmp_path / "pid"
    async with aiohotload.create_pool(
        exec_url(program, interval="50ms"), min_size=1, max_size=2
    ) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        await wait_until(lambda: pid_file.exists() and helpers(tmp_path), what="a hanging run")
    # Closed: the program was killed and waited for, its helper killed with it.
    assert not Path(f"/proc/{int(pid_file.read_text())}").exists()
    await wait_until(lambda: helpers(tmp_path), lambda found: not found, what="helper killed")


def helpers(directory: Path) -> list[int]:
    """Running (not zombie) processes of *directory*'s helper.sh."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(directory / "helper.sh").encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found


@pytest.mark.parametrize(
    ("options", "stderr"),
    [
        ({}, "1 line, not shown (may hold secrets; show_stderr=true shows them)"),
        ({"show_stderr": "true"}, "vault: permission denied"),
    ],
)
async def test_exec_start_failure_fails_create_pool(
    tmp_path: Path, options: dict[str, str], stderr: str
) -> None:
    program = script(tmp_path, "echo 'vault: permission denied' >&2; exit 2")
    with pytest.raises(SourceError) as info:
        await aiohotload.create_pool(exec_url(program, **options))
    assert str(info.value) == f"command {str(program)!r} exited with status 2; stderr: {stderr}"


# ---------------------------------------------------------------------------- env


@pytest.mark.parametrize("form", ["url", "key=value"])
async def test_env_pool_uses_the_variable(
    pg_a: PgServer,
    role: RoleFactory,
    monkeypatch: pytest.MonkeyPatch,
    log: pytest.LogCaptureFixture,
    form: str,
) -> None:
    user, password = await role(pg_a)
    dsn = pg_a.dsn(user, password) if form == "url" else pg_a.kv_dsn(user, password)
    monkeypatch.setenv(VAR, dsn)
    async with aiohotload.create_pool(f"env://postgres/{VAR}", min_size=1, max_size=2) as pool:
        assert await pool.fetchval("SELECT current_user") == user
        # The strategy has ended (it yields once); the pool goes on with the DSN it has.
        await wait_until(
            lambda: any("'env' finished" in m for m in log.messages),
            what="the strategy to finish",
        )
        monkeypatch.setenv(VAR, "postgresql://nobody@127.0.0.1:1/nowhere")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT inet_server_port()") == pg_a.port
        assert pool.generation == 0
    assert_never_logged(log, password)


async def test_env_missing_variable_fails_create_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    with pytest.raises(SourceError, match=f"environment variable '{VAR}' is not set"):
        await aiohotload.create_pool(f"env://postgres/{VAR}")
