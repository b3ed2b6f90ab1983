"""aiohotload.fastapi in process: lifespan, dependencies, health; a fake driver, no server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, Request, WebSocket
from starlette.types import ASGIApp, Receive, Scope, Send

import aiohotload
from aiohotload import HotPool
from aiohotload.fastapi import (
    PoolDep,
    PoolHealth,
    combine_lifespans,
    get_pool,
    health,
    health_dependency,
    lifespan,
    pool_dependency,
    pool_health,
    pool_ready,
)
from tests.support import FakeDriver, QueueStrategy


@pytest.fixture
def strategy() -> Iterator[QueueStrategy]:
    """The queue strategy with a queue per URL path (one app may open several pools)."""
    queue = QueueStrategy(per_path=True)
    aiohotload.register_strategy("queue", queue)
    yield queue
    aiohotload.unregister_strategy("queue")


# At module level: with postponed annotations FastAPI resolves them in the module's globals.
Orders = Annotated[HotPool, Depends(pool_dependency("orders"))]
Users = Annotated[HotPool, Depends(pool_dependency("users"))]
DSN_A = "postgresql://app:s3cr%40t%2Fpw@db-a:5432/app"
DSN_B = "postgresql://app:s3cr%40t%2Fpw@db-b:5432/app"


@contextlib.asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    """Run *app*'s lifespan as an ASGI server does (state included) and yield a client."""
    state: dict[str, Any] = {}
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send_to_test(message: dict[str, Any]) -> None:
        await from_app.put(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}
    task = asyncio.ensure_future(app(scope, to_app.get, send_to_test))  # type: ignore[arg-type]
    await to_app.put({"type": "lifespan.startup"})
    started = asyncio.ensure_future(from_app.get())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():  # the app failed before answering: its exception tells why
        started.cancel()
        await task
    if started.result()["type"] != "lifespan.startup.complete":
        await task  # Starlette re-raises the startup error after reporting it
        raise AssertionError(started.result())

    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        # Servers give each request a shallow copy of the lifespan state.
        await app({**scope, "state": dict(state)}, receive, send)

    try:
        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        stopped = await from_app.get()
        await task
        assert stopped["type"] == "lifespan.shutdown.complete", stopped


def make_app(*lifespans: Any) -> tuple[FastAPI, list[HotPool]]:
    """An app with ``/`` (the answering DSN), ``/health``, ``/ready``; pools seen are listed."""
    seen: list[HotPool] = []
    app = FastAPI(lifespan=lifespans[0] if len(lifespans) == 1 else combine_lifespans(*lifespans))

    @app.get("/")
    async def index(pool: PoolDep, request: Request) -> dict[str, Any]:
        seen.append(pool)
        assert request.state.pool is pool
        return {"dsn": await pool.fetchval("SELECT 1"), "generation": pool.generation}

    @app.get("/health")
    async def healthz(report: Annotated[PoolHealth, Depends(pool_health)]) -> PoolHealth:
        return report

    @app.get("/ready")
    async def ready(report: Annotated[PoolHealth, Depends(pool_ready)]) -> PoolHealth:
        return report

    return app, seen


async def test_lifespan_opens_the_pool_for_requests_and_closes_it(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    strategy.queues["/main"].put_nowait(DSN_A)
    app, seen = make_app(lifespan("queue://fake/main", min_size=1))
    async with serving(app) as client:
        first = await client.get("/")
        assert first.status_code == 200
        assert first.json() == {"dsn": DSN_A, "generation": 0}
        pool = seen[0]
        strategy.queues["/main"].put_nowait(DSN_B)
        await pool.wait_for_swap(timeout=5)
        assert (await client.get("/")).json() == {"dsn": DSN_B, "generation": 1}
        assert seen[1] is pool
    assert pool.is_closing()
    assert all(p.closed for p in driver.opened)


async def test_url_may_be_a_callable_read_at_startup(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    calls: list[int] = []

    def url() -> str:
        calls.append(1)
        return "queue://fake/late"

    app, _ = make_app(lifespan(url))
    assert calls == []
    strategy.queues["/late"].put_nowait(DSN_A)
    async with serving(app) as client:
        assert (await client.get("/")).json()["dsn"] == DSN_A
    assert calls == [1]


async def test_health_reports_the_state_with_the_password_redacted(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    strategy.queues["/main"].put_nowait(DSN_A)
    app, _ = make_app(lifespan("queue://fake/main", name="orders"))
    async with serving(app) as client:
        response = await client.get("/ready")
        assert response.status_code == 200
        assert response.json() == {
            "name": "orders",
            "generation": 0,
            "target": "postgresql://app:********@db-a:5432/app",
            "last_error": None,
            "draining": 0,
            "size": 2,
            "idle": 1,
            "closing": False,
            "ready": True,
        }

        # A failing reload: still ready (the current DSN serves), the error is reported.
        strategy.queues["/main"].put_nowait("bad://app:s3cr@t/pw@nowhere/app")
        report = (await client.get("/health")).json()
        with anyio.fail_after(5):
            while report["last_error"] is None:
                await asyncio.sleep(0.001)
                report = (await client.get("/health")).json()
        assert report["ready"] is True
        assert report["generation"] == 0
        assert "cannot reach" in report["last_error"]
        assert "s3cr" not in response.text + str(report)


async def test_ready_answers_503_once_the_pool_is_closing(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    strategy.queues["/main"].put_nowait(DSN_A)
    app, seen = make_app(lifespan("queue://fake/main"))
    async with serving(app) as client:
        await client.get("/")
        await seen[0].close()
        ready = await client.get("/ready")
        assert ready.status_code == 503
        detail = ready.json()["detail"]
        assert detail["closing"] is True
        assert detail["ready"] is False
        assert detail["target"] is None
        # The plain health endpoint still answers 200 with the same facts.
        plain = await client.get("/health")
        assert plain.status_code == 200
        assert plain.json() == detail
        assert health(seen[0]) == detail


async def test_named_pools_and_an_app_lifespan_combined(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    order: list[str] = []

    @contextlib.asynccontextmanager
    async def warm_cache(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Entered after the pools, so it can use them; the state of earlier lifespans is
        # not passed in, so it uses its own resources here.
        order.append("enter cache")
        yield {"cache": {"warm": True}}
        order.append("exit cache")

    @contextlib.asynccontextmanager
    async def no_state(app: FastAPI) -> AsyncIterator[None]:
        order.append("enter plain")
        yield
        order.append("exit plain")

    strategy.queues["/orders"].put_nowait(DSN_A)
    strategy.queues["/users"].put_nowait(DSN_B)
    app = FastAPI(
        lifespan=combine_lifespans(
            lifespan("queue://fake/orders", state_key="orders"),
            lifespan("queue://fake/users", state_key="users"),
            warm_cache,
            no_state,
        )
    )

    @app.get("/")
    async def both(orders: Orders, users: Users, request: Request) -> dict[str, Any]:
        return {
            "orders": await orders.fetchval("SELECT 1"),
            "users": await users.fetchval("SELECT 1"),
            "cache": request.state.cache,
        }

    @app.get("/users/ready")
    async def users_ready(
        report: Annotated[PoolHealth, Depends(health_dependency("users"))],
    ) -> PoolHealth:
        return report

    async with serving(app) as client:
        assert (await client.get("/")).json() == {
            "orders": DSN_A,
            "users": DSN_B,
            "cache": {"warm": True},
        }
        assert (
            (await client.get("/users/ready"))
            .json()["target"]
            .startswith("postgresql://app:********@db-b")
        )
    assert order == ["enter cache", "enter plain", "exit plain", "exit cache"]
    assert pool_dependency("orders") is pool_dependency("orders")
    assert all(p.closed for p in driver.opened)


async def test_a_pool_opened_in_the_apps_own_lifespan_works_with_the_dependencies(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    @contextlib.asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with aiohotload.create_pool("queue://fake/own") as pool:
            yield {"pool": pool, "settings": {"debug": False}}

    strategy.queues["/own"].put_nowait(DSN_A)
    app, seen = make_app(app_lifespan)
    async with serving(app) as client:
        assert (await client.get("/")).json()["dsn"] == DSN_A
        assert (await client.get("/ready")).status_code == 200
    assert seen[0].is_closing()


async def test_duplicate_state_keys_fail_the_startup(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    strategy.queues["/a"].put_nowait(DSN_A)
    strategy.queues["/b"].put_nowait(DSN_B)
    app, _ = make_app(lifespan("queue://fake/a"), lifespan("queue://fake/b"))
    with pytest.raises(ValueError, match="'pool'"):
        async with serving(app):
            pass  # pragma: no cover
    assert all(p.closed for p in driver.opened)  # the first pool was closed again


async def test_a_bad_url_fails_the_startup() -> None:
    app, _ = make_app(lifespan("nosuch://postgres/x"))
    with pytest.raises(aiohotload.UnknownStrategyError, match="nosuch"):
        async with serving(app):
            pass  # pragma: no cover


async def test_without_the_lifespan_the_dependency_says_what_is_missing() -> None:
    app = FastAPI()

    @app.get("/")
    async def index(pool: Annotated[HotPool, Depends(get_pool)]) -> str:
        return "unreachable"  # pragma: no cover

    async with serving(app) as client:
        with pytest.raises(RuntimeError, match=r"no HotPool under 'pool'.*lifespan"):
            await client.get("/")


def test_the_dependency_works_for_websockets_too(
    driver: FakeDriver, strategy: QueueStrategy
) -> None:
    pool = aiohotload.create_pool("queue://fake/x")  # not opened: only its identity counts
    noop: Any = None

    def websocket(state: dict[str, Any]) -> WebSocket:
        return WebSocket({"type": "websocket", "state": state}, receive=noop, send=noop)

    assert get_pool(websocket({"pool": pool})) is pool
    assert pool_dependency("orders")(websocket({"orders": pool})) is pool
    with pytest.raises(RuntimeError, match="no HotPool under 'pool'"):
        get_pool(websocket({"pool": "not a pool"}))
