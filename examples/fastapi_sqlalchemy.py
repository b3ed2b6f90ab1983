"""A FastAPI app on a SQLAlchemy engine that follows its DSN:
``AIOHOTLOAD_URL=watchfiles://postgres/etc/app/dsn uvicorn examples.fastapi_sqlalchemy:app``.

Each request gets its own ``AsyncSession`` (the ``SessionDep`` dependency). Change the DSN
file while it serves: ``/`` shows the server that answered and the engine's generation,
``/healthz`` the reload state (503 until the engine follows a DSN). Needs
``pip install 'aiohotload[fastapi,sqlalchemy]' uvicorn``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aiohotload.sqlalchemy import HotEngine, create_async_engine

# So the engine's swaps and drains show in the server's log (passwords are always redacted).
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


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """The engine for the app's lifetime, in the lifespan state (``request.state``)."""
    engine = create_async_engine(url(), pool_size=5, max_overflow=5)
    await engine.start()  # a bad URL or an unreachable first DSN fails the startup
    try:
        yield {"engine": engine, "sessions": async_sessionmaker(engine, expire_on_commit=False)}
    finally:
        await engine.dispose()


app = FastAPI(title="aiohotload SQLAlchemy example", lifespan=lifespan)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, closed (its connection returned) after the response."""
    async with request.state.sessions() as session:
        yield session


def get_engine(request: Request) -> HotEngine:
    engine: HotEngine = request.state.engine
    return engine


SessionDep = Annotated[AsyncSession, Depends(get_session)]
EngineDep = Annotated[HotEngine, Depends(get_engine)]


@app.get("/")
async def index(session: SessionDep, engine: EngineDep) -> dict[str, Any]:
    """Which server answered (its port), as whom, and for which generation of the engine."""
    query = select(func.inet_server_port().label("port"), func.current_user().label("user"))
    row = (await session.execute(query)).one()
    return {"port": row.port, "user": row.user, "generation": engine.generation}


@app.get("/healthz")
async def healthz(engine: EngineDep) -> dict[str, Any]:
    """Readiness: the engine's reload state, or 503 while it follows no DSN."""
    report = {
        "generation": engine.generation,
        "target": engine.target,  # password redacted
        "last_error": None if engine.last_error is None else str(engine.last_error),
        "draining": engine.draining,
    }
    if engine.target is None:
        raise HTTPException(status_code=503, detail=report)
    return report
