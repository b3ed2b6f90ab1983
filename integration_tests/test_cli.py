"""The ``aiohotload`` command against real servers: check, and the demo end to end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import anyio
import pytest

from aiohotload.testing import PgServer, RoleFactory, ServerSet, wait_until, write_dsn

from .apps import ROOT, child_env, run_aiohotload

pytestmark = [pytest.mark.timeout(90), pytest.mark.source]

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


@pytest.mark.parametrize(
    ("signum", "code", "ended"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
async def test_demo_on_existing_servers_stops_on_a_signal_and_drops_its_role(
    pg_a: PgServer, pg_b: PgServer, signum: int, code: int, ended: str
) -> None:
    proc = await start_cli(
        "demo",
        *("--duration", "120", "--interval", "0.3", "--workers", "2"),
        *("--dsn-a", pg_a.admin_dsn, "--dsn-b", pg_b.admin_dsn),
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
        proc.send_signal(signum)
        with anyio.fail_after(30):
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = "".join(lines) + rest.decode()
    assert proc.returncode == code, output
    assert re.search(rf"^{ended}: \d+ queries .*, 0 failed", output, re.M), output
    for pg in (pg_a, pg_b):
        assert re.search(rf"server [AB] 127\.0\.0\.1:{pg.port}: [1-9]\d* queries", output), output
        assert await demo_roles(pg) == []
    assert_no_password(output, pg_a.password)


# ------------------------------------------------------------------ signals and --wait

# A program for the exec strategy: its first run prints a DSN; every later run (or every run,
# with at_once) starts a helper that starts a sleep, and waits. Each writes its pid.
HANGING_PROGRAM = """#!/bin/sh
DIR="{dir}"
if [ -n "{at_once}" ] || [ -e "$DIR/started" ]; then
    echo $$ > "$DIR/program.pid"
    "$DIR/helper.sh" &
    wait
fi
touch "$DIR/started"
echo 'postgresql://app:pw@127.0.0.1:1/app'
"""
HELPER = """#!/bin/sh
echo $$ > "{dir}/helper.pid"
sleep 300 &
echo $! > "{dir}/sleep.pid"
wait
"""
PIDS = ("program.pid", "helper.pid", "sleep.pid")


def hanging_program(directory: Path, *, at_once: bool = False) -> Path:
    """The exec program above in *directory*, with its helper."""
    helper = directory / "helper.sh"
    helper.write_text(HELPER.format(dir=directory))
    helper.chmod(0o755)
    program = directory / "dsn.sh"
    program.write_text(HANGING_PROGRAM.format(dir=directory, at_once="1" if at_once else ""))
    program.chmod(0o755)
    return program


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def survivors(directory: Path) -> list[int]:
    """The program's processes (program, helper, sleep) still running."""
    pids = [int((directory / name).read_text()) for name in PIDS]
    return [pid for pid in pids if alive(pid)]


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[Path]:
    """A directory for :func:`hanging_program`; whatever of it still runs after the test (it
    failed) is killed."""
    yield tmp_path
    for name in PIDS:
        with contextlib.suppress(OSError, ValueError):
            pid = int((tmp_path / name).read_text())
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def start_cli(
    *args: str, stderr: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """``python -m aiohotload *args`` from the repository, its output piped (*stderr*: or
    ``STDOUT``, merged into it)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiohotload",
        *args,
        cwd=ROOT,
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )


async def helper_running(directory: Path) -> None:
    """Wait until the program, its helper and the helper's sleep all run."""
    await wait_until(
        lambda: survivors(directory),
        lambda running: len(running) == len(PIDS),
        timeout=30,
        what="the program, its helper and the sleep to run",
        ignore=(FileNotFoundError, ValueError),  # not written yet, or half
    )


async def stopped_by(proc: asyncio.subprocess.Process, signum: signal.Signals) -> str:
    """Send *signum* and wait for the command to exit; its standard error."""
    proc.send_signal(signum)
    try:
        with anyio.fail_after(30):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return err.decode()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_watch_stopped_by_a_signal_kills_the_running_program_and_its_helper(
    programs: Path, signum: signal.Signals, code: int
) -> None:
    program = hanging_program(programs)
    proc = await start_cli("watch", f"exec://postgres{program}?interval=50ms")
    assert proc.stdout is not None
    with anyio.fail_after(30):
        assert " current " in (await proc.stdout.readline()).decode()
    await helper_running(programs)  # a later run is in progress, its helper started
    err = await stopped_by(proc, signum)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    # Fails on main: SIGTERM ended the command at once, the program and helper lived on.
    assert survivors(programs) == []


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_check_stopped_by_a_signal_kills_the_running_program_and_its_helper(
    programs: Path, signum: signal.Signals, code: int
) -> None:
    program = hanging_program(programs, at_once=True)
    proc = await start_cli("check", f"exec://postgres{program}?timeout=300s", "--wait", "300")
    await helper_running(programs)
    err = await stopped_by(proc, signum)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert survivors(programs) == []


async def test_check_wait_cuts_an_attempt_short_at_its_deadline(programs: Path) -> None:
    # The program never answers and connect_timeout is far off: only --wait can end it.
    program = hanging_program(programs, at_once=True)
    url = f"exec://postgres{program}?timeout=300s&connect_timeout=300"
    result = await asyncio.to_thread(run_aiohotload, "check", url, "--wait", "1", timeout=60)
    assert result.returncode == 1, result.stderr
    # Fails on main: the attempt ran until connect_timeout.
    assert "cannot connect within --wait 1s (the attempt was cut short)" in result.stderr
    assert survivors(programs) == []


async def test_check_wait_retries_until_the_server_answers(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write_dsn(path, pg_a.dsn(user, password + "-not-yet"))
    proc = await start_cli("check", url_of(path), "--wait", "60")
    assert proc.stderr is not None
    with anyio.fail_after(30):
        first = (await proc.stderr.readline()).decode()
    assert first.startswith("not yet: "), first
    write_dsn(path, pg_a.dsn(user, password))  # the secret lands: the next attempt works
    with anyio.fail_after(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "ok: connected to" in out.decode()
    assert_no_password(first + out.decode() + err.decode(), password)
