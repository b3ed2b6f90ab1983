"""The throwaway PostgreSQL servers the tests use live in the package (the demo and the
benchmarks start them too); this module keeps the tests' imports short."""

from aiohotload._pgserver import (
    ADMIN_APPLICATION_NAME,
    NotSupported,
    PgServer,
    PgServerError,
    PgTemplate,
    Role,
    find_bindir,
    kv_dsn,
    remove_stale_shm,
    running,
    start_all,
    url_dsn,
)

__all__ = [
    "ADMIN_APPLICATION_NAME",
    "NotSupported",
    "PgServer",
    "PgServerError",
    "PgTemplate",
    "Role",
    "find_bindir",
    "kv_dsn",
    "remove_stale_shm",
    "running",
    "start_all",
    "url_dsn",
]
