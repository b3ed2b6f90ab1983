"""A FastAPI app on a HotPool: ``AIOHOTLOAD_URL=watchfiles://postgres/etc/app/dsn uvicorn
examples.fastapi_app:app``.

Change the DSN file while it serves: ``/`` shows the server that answered and the pool's
generation; ``/healthz`` answers 503 until the pool can serve (a readiness probe).
Needs ``pip install aiohotload[fastapi] uvicorn``.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from aiohotload.fastapi import PoolDep, PoolHealth, lifespan, pool_ready

# So the pool's swaps and drains show in the server's log (passwords are always redacted).
logging.basicConfig(format="%(levelname)s:     %(name)s: %(message)s")
logging.getLogger("aiohotload").setLevel(logging.INFO)


def url() -> str:
    """The hotload URL, read at startup, so importing this module needs no configuration."""
    try:
        return os.environ["AIOHOTLOAD_URL"]
    except KeyError:
        raise RuntimeError(
            "set AIOHOTLOAD_URL, e.g. AIOHOTLOAD_URL=watchfiles://postgres/etc/app/dsn"
        ) from None


app = FastAPI(title="aiohotload example", lifespan=lifespan(url, min_size=2, max_size=10))


@app.get("/")
async def index(pool: PoolDep) -> dict[str, Any]:
    """Which server answered (its port) and for which generation of the pool."""
    row = await pool.fetchrow("SELECT inet_server_port() AS port, current_user AS user")
    assert row is not None  # the query always returns one row
    return {"port": row["port"], "user": row["user"], "generation": pool.generation}


@app.get("/healthz")
async def healthz(report: Annotated[PoolHealth, Depends(pool_ready)]) -> PoolHealth:
    """Readiness: 200 with the pool's state, or 503 while it is closing or not open."""
    return report
