"""The ``aiohotload`` command against real servers: check, and the demo end to end."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from urllib.parse import quote

import anyio
import pytest

from aiohotload.testing import PgServer, RoleFactory, ServerSet, write_dsn

from .apps import ROOT, child_env, run_aiohotload

pytestmark = pytest.mark.timeout(90)

# A DSN whose password is not the redaction mark: "scheme://user:<not ********>@".
UNREDACTED = re.compile(r"postgres(?:ql)?://[^:/@\s]+:(?!\*{8}@)[^@\s]*@")


def url_of(path: Path) -> str:
    return f"watchfiles://postgres{quote(str(path))}"


def assert_no_password(text: str, password: str) -> None:
    assert password not in text
    assert quote(password, safe="") not in text
    assert not UNREDACTED.search(text), UNREDACTED.search(text)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args.replace("\0", " "))
    return found


async def demo_roles(server: PgServer) -> list[str]:
    async with server.admin_connection() as conn:
        rows = await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'aiohotload_demo%'"
        )
    return [row["rolname"] for row in rows]


async def test_check_connects_and_prints_the_server_version(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password))
    result = await asyncio.to_thread(run_aiohotload, "check", url_of(path))
    assert result.returncode == 0, result.stderr
    assert f"ok: connected to postgresql://{user}:********@127.0.0.1:{pg_a.port}/" in result.stdout
    assert re.search(r"^server_version: \d+", result.stdout, re.MULTILINE), result.stdout
    assert_no_password(result.stdout + result.stderr, password)


async def test_check_with_a_wrong_password_fails_without_showing_it(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    wrong = password + "-wrong"
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, wrong))
    result = await asyncio.to_thread(run_aiohotload, "check", url_of(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "password authentication failed" in result.stderr
    assert_no_password(result.stderr, wrong)


async def test_demo_runs_to_the_end_without_a_failed_query_and_cleans_up(
    pg_servers: ServerSet,
) -> None:
    install = pg_servers.install  # the demo finds the same PostgreSQL (or the test skips)
    result = await asyncio.to_thread(
        run_aiohotload, "demo", "--duration", "6", "--workers", "4", timeout=80
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"PostgreSQL {install.version} ({install.origin}, " in output
    assert re.search(r"^done: \d+ queries in .*, 0 failed, [1-9]\d* swaps$", output, re.M), output
    answered = re.findall(r"server [AB] 127\.0\.0\.1:(\d+): (\d+) queries answered", output)
    assert len({port for port, _ in answered}) == 2, output
    assert all(int(count) > 0 for _, count in answered), output
    assert "rotated on both servers" in output
    assert_no_password(output, "no password known here")
    workdir = re.search(r"servers of PostgreSQL .* in (\S+)$", output, re.M)
    assert workdir is not None, output
    assert not Path(workdir[1]).exists()
    assert processes_mentioning(workdir[1]) == []


async def test_demo_on_existing_servers_stops_on_ctrl_c_and_drops_its_role(
    pg_a: PgServer, pg_b: PgServer
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiohotload",
        "demo",
        *("--duration", "120", "--interval", "0.3", "--workers", "2"),
        *("--dsn-a", pg_a.admin_dsn, "--dsn-b", pg_b.admin_dsn),
        cwd=ROOT,
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        with anyio.fail_after(30):
            # Interrupt once the pool has moved to B and back to A.
            while not any("swap: generation 3 " in line for line in lines):
                line = (await proc.stdout.readline()).decode()
                assert line, "".join(lines)
                lines.append(line)
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = "".join(lines) + rest.decode()
    assert proc.returncode == 130, output
    assert re.search(r"^interrupted: \d+ queries .*, 0 failed", output, re.M), output
    for pg in (pg_a, pg_b):
        assert re.search(rf"server [AB] 127\.0\.0\.1:{pg.port}: [1-9]\d* queries", output), output
        assert await demo_roles(pg) == []
    assert_no_password(output, pg_a.password)
