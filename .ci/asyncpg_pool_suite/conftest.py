"""Runs asyncpg's own ``tests/test_pool.py`` with a HotPool wherever it creates a pool
(``APG_POOL=hot``), or with asyncpg's pool (``APG_POOL=bare``) to compare. See run.py."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
from asyncpg import _testbase, pool

import aiohotload

_asyncpg_create_pool = _testbase.create_pool
_dsn_dir = Path(tempfile.mkdtemp(prefix="aiohotload-asyncpg-suite-"))
_numbers = itertools.count()


def _hot_create_pool(dsn: str | None = None, **kwargs: Any) -> Any:
    """What asyncpg's harness calls: its own pool for a custom ``pool_class``, else a HotPool
    whose DSN file holds where to connect (the rest stays connect arguments)."""
    if os.environ.get("APG_POOL") != "hot" or kwargs.get("pool_class", pool.Pool) is not pool.Pool:
        return _asyncpg_create_pool(dsn, **kwargs)
    kwargs.pop("pool_class", None)
    if dsn is None:
        params = {
            "host": kwargs.pop("host", os.environ["PGHOST"]),
            "port": str(kwargs.pop("port", os.environ["PGPORT"])),
            "user": kwargs.pop("user", os.environ["PGUSER"]),
            "dbname": kwargs.pop("database", "postgres"),
        }
        password = kwargs.pop("password", os.environ.get("PGPASSWORD"))
        if isinstance(password, str):
            params["password"] = password
        elif password is not None:  # a callable: asyncpg's own argument
            kwargs["password"] = password
        dsn = "postgresql:///?" + urlencode(params)
    path = _dsn_dir / f"dsn{next(_numbers)}"
    path.write_text(dsn + "\n")
    return aiohotload.create_pool(f"watchfiles://postgres{path}", **kwargs)


_testbase.create_pool = _hot_create_pool
assert asyncpg  # the harness imports it too
