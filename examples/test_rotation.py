"""Testing your service against rotations, with aiohotload.testing's pytest plugin.

Enable the plugin in your top-level conftest.py (it is never loaded on its own):

    pytest_plugins = ["aiohotload.testing.pytest_plugin"]

aiohotload's own test suite runs this file.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

import aiohotload
from aiohotload import HotPool
from aiohotload.testing import DsnFile, PgServer, Role, next_swap, port_of

pytestmark = pytest.mark.asyncio


class Greeter:
    """Stands in for your service: it is given a pool and queries through it."""

    def __init__(self, pool: HotPool) -> None:
        self.pool = pool

    async def greet(self, name: str) -> str:
        greeting: str = await self.pool.fetchval("SELECT 'hello, ' || $1::text", name)
        return greeting


async def test_no_request_fails_while_credentials_rotate_and_the_server_moves(
    dsn_file: DsnFile,
    rotate_password: Callable[[], Awaitable[Role]],
    move_to: Callable[[PgServer], Awaitable[None]],
    pg_b: PgServer,
) -> None:
    failures: list[Exception] = []
    async with aiohotload.create_pool(dsn_file.url(), min_size=2, max_size=4) as pool:
        greeter = Greeter(pool)
        stop = anyio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                try:
                    assert await greeter.greet("world") == "hello, world"
                except Exception as exc:
                    failures.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(traffic)
            async with next_swap(pool):  # returns once the pool uses the new password
                await rotate_password()  # ALTER ROLE ... PASSWORD, then the new DSN in the file
            async with next_swap(pool):
                await move_to(pg_b)  # the same role on pg_b, then the file points there
            stop.set()

        assert await port_of(pool) == pg_b.port
    assert failures == []
