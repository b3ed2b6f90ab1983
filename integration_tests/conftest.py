"""Fixtures for the integration tests: real PostgreSQL servers and throwaway roles.

- ``pg_servers``: the session's :class:`PgServerPool`, which starts servers on demand.
- ``pg_a``, ``pg_b``: two distinct running servers shared by the whole session. Don't stop
  them; create roles (``role`` fixture) rather than changing the superuser.
- ``pg_disposable``: a fresh server for one test, which may stop, kill or restart it.
- ``pg_disposable_factory``: ``pg_disposable_factory(n)`` gives n fresh servers, started
  together.
- ``role``: ``await role(server)`` creates a login role with a hostile password, dropped
  after the test.

``AIOHOTLOAD_TEST_DSNS`` (comma-separated superuser URL DSNs) points the tests at servers that
already run instead: the first two become ``pg_a`` and ``pg_b``; tests that need a disposable
server, or that stop one, are skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import pytest

from integration_tests.pgserver import (
    NotSupported,
    PgServer,
    PgServerError,
    PgTemplate,
    Role,
    find_bindir,
    remove_stale_shm,
    running,
)

ENV_DSNS = "AIOHOTLOAD_TEST_DSNS"
ENV_TMPDIR = "AIOHOTLOAD_PG_TMPDIR"
#: Characters that break naive DSN building: URL delimiters, quotes, space, backslash, non-ASCII.
HOSTILE = "@:/%?#'\" \\&=+;é€日本"


def hostile_password() -> str:
    """A random password holding every character of :data:`HOSTILE`."""
    return f"p{HOSTILE}{secrets.token_hex(4)}"


class PgServerPool:
    """Starts servers for the session from one ``initdb`` template and stops them all at the end.

    Every session gets its own directory under :func:`_base_dir`; directories left by a
    session that died are reaped on start.
    """

    def __init__(self, existing_dsns: list[str]) -> None:
        self.existing = [PgServer.existing(dsn) for dsn in existing_dsns]
        self._shared: list[PgServer] = []
        self._owned: list[PgServer] = []
        self._template: PgTemplate | None = None
        self._dir: Path | None = None
        self._count = 0

    def shared(self, count: int) -> list[PgServer]:
        """The session's first *count* shared servers; any not yet running start together."""
        if self.existing:
            if len(self.existing) < count:
                pytest.skip(f"needs {count} servers; {ENV_DSNS} names {len(self.existing)}")
            return self.existing[:count]
        missing = count - len(self._shared)
        if missing > 0:
            self._shared += self.new(missing)
        return self._shared[:count]

    def new(self, count: int = 1) -> list[PgServer]:
        """*count* fresh running servers; they stop at the end of the session at the latest."""
        if self.existing:
            pytest.skip(f"needs a server of its own, but {ENV_DSNS} is set")
        template = self._ensure_template()
        servers = []
        for _ in range(count):
            self._count += 1
            servers.append(PgServer(self._session_dir() / f"pg{self._count}", template=template))
        self._owned += servers
        # Copy the templates and launch the postmasters side by side, then wait for each.
        with ThreadPoolExecutor(max_workers=max(1, count)) as pool:
            list(pool.map(PgServer.launch, servers))
        for server in servers:
            server.wait_ready()
        return servers

    def discard(self, server: PgServer) -> None:
        """Stop *server* and remove its directory."""
        server.cleanup()
        with contextlib.suppress(ValueError):
            self._owned.remove(server)

    def close(self) -> None:
        """Stop every server this pool started and remove the session directory."""
        for server in self._owned:
            server.cleanup()
        self._owned.clear()
        self._shared.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._template = None

    def _ensure_template(self) -> PgTemplate:
        if self._template is None:
            bindir = find_bindir()
            if bindir is None:
                message = (
                    "no PostgreSQL server binaries (initdb, postgres) found: install the "
                    f"postgresql package, set AIOHOTLOAD_PG_BINDIR, or set {ENV_DSNS}"
                )
                if os.environ.get("CI"):
                    pytest.fail(message)
                pytest.skip(message)
            self._template = PgTemplate.create(self._session_dir() / "template", bindir=bindir)
        return self._template

    def _session_dir(self) -> Path:
        if self._dir is None:
            base = _base_dir()
            base.mkdir(parents=True, exist_ok=True)
            # Sticky and world-writable like /tmp: root's servers run as 'postgres', and
            # ordinary users may share the base directory.
            with contextlib.suppress(PermissionError):
                base.chmod(0o1777)
            _reap_stale_sessions(base)
            self._dir = Path(tempfile.mkdtemp(prefix="session-", dir=base))
            # The 'postgres' user must be able to pass through to its own server directories.
            self._dir.chmod(0o711)
            (self._dir / "owner.pid").write_text(str(os.getpid()))
        return self._dir


def _base_dir() -> Path:
    """``$AIOHOTLOAD_PG_TMPDIR``, else ``/dev/shm/aiohotload-pg`` (RAM: copying the template
    there takes 0.06s instead of about 0.9s on this kind of machine's disk), else the temp dir."""
    if env := os.environ.get(ENV_TMPDIR):
        return Path(env)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if os.access(shm, os.W_OK | os.X_OK) and shutil.disk_usage(shm).free > 1 << 30:
            return shm / "aiohotload-pg"
    return Path(tempfile.gettempdir()) / "aiohotload-pg"


def _reap_stale_sessions(base: Path) -> None:
    """Kill the servers of, and remove, session directories whose pytest process is gone.

    A session killed hard (pytest-timeout, SIGKILL) runs no teardown and leaves postmasters.
    """
    for session in base.glob("session-*"):
        try:
            owner = int((session / "owner.pid").read_text())
            if running([owner]):
                continue
        except (OSError, ValueError):
            # A session that is just starting has not written it yet: leave young ones be.
            with contextlib.suppress(OSError):
                if time.time() - session.stat().st_mtime < 3600:
                    continue
        for pidfile in session.glob("*/data/postmaster.pid"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(pidfile.read_text().splitlines()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"postgres" in cmdline and str(pidfile.parent).encode() in cmdline:
                    # Its backends notice the postmaster's death and exit.
                    os.kill(pid, signal.SIGKILL)
            remove_stale_shm(pidfile.parent)
        shutil.rmtree(session, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """Report :class:`NotSupported` (stopping an existing server) as a skip, not a failure."""
    try:
        return (yield)
    except NotSupported as exc:
        pytest.skip(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Report :class:`NotSupported` raised by a test as a skip."""
    try:
        return (yield)
    except NotSupported as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def pg_servers() -> Iterator[PgServerPool]:
    """The session's server pool (see :class:`PgServerPool`)."""
    dsns = [d.strip() for d in os.environ.get(ENV_DSNS, "").split(",") if d.strip()]
    pool = PgServerPool(dsns)
    # Teardown does not run if pytest is interrupted hard; atexit still does on most exits.
    atexit.register(pool.close)
    try:
        yield pool
    finally:
        pool.close()
        atexit.unregister(pool.close)


@pytest.fixture(scope="session")
def _pg_pair(pg_servers: PgServerPool) -> tuple[PgServer, PgServer]:
    # pg_a and pg_b start together: two postmasters start in about the time of one.
    a, b = pg_servers.shared(2)
    return a, b


@pytest.fixture
def pg_a(_pg_pair: tuple[PgServer, PgServer]) -> PgServer:
    """A running server shared by the session (distinct from ``pg_b``). Don't stop it."""
    return _check_running(_pg_pair[0])


@pytest.fixture
def pg_b(_pg_pair: tuple[PgServer, PgServer]) -> PgServer:
    """A second running server shared by the session. Don't stop it."""
    return _check_running(_pg_pair[1])


def _check_running(server: PgServer) -> PgServer:
    if not server.is_external and not server.is_running:
        # A test stopped a shared server: restart it so one bad test does not fail the rest.
        with contextlib.suppress(PgServerError):
            server.start_sync()
    return server


@pytest.fixture
def pg_disposable(pg_servers: PgServerPool) -> Iterator[PgServer]:
    """A fresh running server for this test alone; it may be stopped, killed or restarted."""
    (server,) = pg_servers.new(1)
    yield server
    pg_servers.discard(server)


class ServerFactory(Protocol):
    def __call__(self, count: int = 1) -> list[PgServer]: ...


@pytest.fixture
def pg_disposable_factory(pg_servers: PgServerPool) -> Iterator[ServerFactory]:
    """``pg_disposable_factory(n)``: n fresh running servers, started together, for this test."""
    made: list[PgServer] = []

    def make(count: int = 1) -> list[PgServer]:
        servers = pg_servers.new(count)
        made.extend(servers)
        return servers

    yield make
    for server in made:
        pg_servers.discard(server)


class RoleFactory(Protocol):
    async def __call__(
        self,
        server: PgServer,
        *,
        name: str | None = None,
        password: str | None = None,
        superuser: bool = False,
    ) -> Role: ...


@pytest.fixture
async def role() -> AsyncIterator[RoleFactory]:
    """``name, password = await role(server)``: a new login role ``hl_<hex>`` whose password
    is full of URL-hostile and non-ASCII characters (:data:`HOSTILE`).

    Pass *name* and *password* to make the same role on a second server. Every role is
    dropped after the test, its sessions terminated first.
    """
    made: list[tuple[PgServer, Role]] = []

    async def make(
        server: PgServer,
        *,
        name: str | None = None,
        password: str | None = None,
        superuser: bool = False,
    ) -> Role:
        created = await server.create_role(
            name or f"hl_{secrets.token_hex(6)}",
            hostile_password() if password is None else password,
            superuser=superuser,
        )
        made.append((server, created))
        return created

    yield make
    for server, created in reversed(made):
        # A disposable server may be down by now, and its roles are gone with it.
        if server.is_running:
            await server.drop_role(created.name)
