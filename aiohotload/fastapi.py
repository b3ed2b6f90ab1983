"""FastAPI integration: a HotPool for the app's lifetime, handed to endpoints as a dependency.

::

    from fastapi import FastAPI
    from aiohotload.fastapi import PoolDep, lifespan

    app = FastAPI(lifespan=lifespan("watchfiles://postgres/etc/app/dsn", min_size=2))

    @app.get("/users/{user_id}")
    async def user(user_id: int, pool: PoolDep) -> dict[str, object]:
        return dict(await pool.fetchrow("SELECT * FROM users WHERE id = $1", user_id))

The pool travels in the ASGI lifespan *state* (not in a global), so ``request.state.pool``
works in endpoints and middleware, and several apps (or tests) in one process each get their
own pool. Install with ``pip install aiohotload[fastapi]``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

try:
    from fastapi import Depends, HTTPException
    from fastapi.requests import HTTPConnection

    # Not typing.TypedDict: pydantic (FastAPI's response models) needs this one before 3.12.
    from typing_extensions import TypedDict
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"aiohotload.fastapi needs FastAPI ({exc.name} is missing): "
        "pip install 'aiohotload[fastapi]'"
    ) from exc

from .pool import HotPool, create_pool

__all__ = [
    "Lifespan",
    "PoolDep",
    "PoolHealth",
    "combine_lifespans",
    "get_pool",
    "health",
    "health_dependency",
    "is_ready",
    "lifespan",
    "pool_dependency",
    "pool_health",
    "pool_ready",
]

#: What ``FastAPI(lifespan=...)`` takes: ``app -> async context manager`` yielding the state
#: (a mapping) or None.
Lifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]


def lifespan(
    url: str | Callable[[], str], *, state_key: str = "pool", **pool_kwargs: Any
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan that opens a :class:`~aiohotload.HotPool` at startup and closes it, drained,
    at shutdown: ``FastAPI(lifespan=lifespan(url, min_size=2))``.

    url: the hotload URL, or a callable returning it, called at startup (so an app module can
        be imported before its configuration exists).
    state_key: the name of the pool in the lifespan state: ``request.state.<state_key>``.
    pool_kwargs: go to :func:`~aiohotload.create_pool` (``name``, ``min_size``, ...).

    A bad URL or an unreachable first DSN fails the startup, so the server does not start.
    """

    @contextlib.asynccontextmanager
    async def hotpool_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        resolved = url() if callable(url) else url
        async with create_pool(resolved, **pool_kwargs) as pool:
            yield {state_key: pool}

    return hotpool_lifespan


def combine_lifespans(
    *lifespans: Lifespan,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """One lifespan made of several: entered in order, exited in reverse, their states merged.

    ``FastAPI(lifespan=combine_lifespans(lifespan(url), my_lifespan))``: a later lifespan
    can already use the pool, which is opened first and closed last. Two lifespans giving the
    same state key is an error (:class:`ValueError` at startup), not a silent override.
    """

    @contextlib.asynccontextmanager
    async def combined(app: Any) -> AsyncIterator[dict[str, Any]]:
        state: dict[str, Any] = {}
        async with contextlib.AsyncExitStack() as stack:
            for each in lifespans:
                part = await stack.enter_async_context(each(app))
                for key, value in (part or {}).items():
                    if key in state:
                        raise ValueError(f"two lifespans put {key!r} into the lifespan state")
                    state[key] = value
            yield state

    return combined


@functools.cache
def pool_dependency(state_key: str = "pool") -> Callable[[HTTPConnection], HotPool]:
    """A dependency returning the pool stored under *state_key* by :func:`lifespan`.

    For several pools: ``Orders = Annotated[HotPool, Depends(pool_dependency("orders"))]``,
    defined at module level (FastAPI resolves postponed annotations in the module's
    globals). Works for HTTP and WebSocket endpoints; the same *state_key* gives the same
    dependency, so FastAPI's per-request cache shares it.
    """

    def dependency(conn: HTTPConnection) -> HotPool:
        pool = getattr(conn.state, state_key, None)
        if not isinstance(pool, HotPool):
            # A programming error (the app was built without the lifespan): say how to fix it.
            raise RuntimeError(
                f"no HotPool under {state_key!r} in the lifespan state; create the app with "
                f"FastAPI(lifespan=aiohotload.fastapi.lifespan(url, state_key={state_key!r}))"
            )
        return pool

    dependency.__name__ = dependency.__qualname__ = f"get_pool_{state_key}"
    return dependency


get_pool = pool_dependency("pool")
"""The dependency for the default pool: ``pool: HotPool = Depends(get_pool)``."""

PoolDep = Annotated[HotPool, Depends(get_pool)]
"""``async def endpoint(pool: PoolDep)``: the default pool, as an annotation."""


class PoolHealth(TypedDict):
    """What :func:`health` reports; safe to expose (the target's password is redacted)."""

    name: str
    generation: int
    target: str | None
    last_error: str | None
    draining: int
    size: int
    idle: int
    closing: bool
    ready: bool


def is_ready(pool: HotPool) -> bool:
    """Whether *pool* can serve: it is open and has a current generation."""
    return not pool.is_closing() and pool.target is not None


def health(pool: HotPool) -> PoolHealth:
    """The pool's state for a ``/healthz`` endpoint.

    ``last_error`` set while ``ready`` is true means a reload is failing but the current DSN
    still serves: worth an alert, not a restart.
    """
    error = pool.last_error
    return PoolHealth(
        name=pool.name,
        generation=pool.generation,
        target=pool.target,
        last_error=str(error) if error is not None else None,
        draining=pool.draining,
        size=pool.get_size(),
        idle=pool.get_idle_size(),
        closing=pool.is_closing(),
        ready=is_ready(pool),
    )


@functools.cache
def health_dependency(
    state_key: str = "pool", *, require_ready: bool = True
) -> Callable[[HTTPConnection], PoolHealth]:
    """A dependency returning :func:`health` of the pool under *state_key*.

    With *require_ready* (the default) it raises ``HTTPException(503)``, the health as its
    ``detail``, when the pool is closing or has no current generation.
    """
    get = pool_dependency(state_key)

    def dependency(conn: HTTPConnection) -> PoolHealth:
        report = health(get(conn))
        if require_ready and not report["ready"]:
            raise HTTPException(status_code=503, detail=report)
        return report

    dependency.__name__ = dependency.__qualname__ = f"{state_key}_health"
    return dependency


pool_health = health_dependency("pool", require_ready=False)
"""Dependency: the default pool's :func:`health`, always answered with 200."""

pool_ready = health_dependency("pool")
"""Dependency: the default pool's :func:`health`; HTTP 503 unless the pool is ready."""
