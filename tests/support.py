"""What the unit tests share: one way to wait, a fake driver and its pools, a queue strategy.

The fixtures that register them are in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio

import aiohotload


async def until(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Wait until *condition()* is true, checking at each turn of the loop, for at most
    *timeout* seconds (then :class:`TimeoutError` naming *what*)."""
    try:
        with anyio.fail_after(timeout):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise TimeoutError(f"not true within {timeout}s: {what or condition}") from None


def write_dsn(path: Path, value: str) -> None:
    """Replace *path*'s content with *value* atomically, as config tools do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value)
    os.replace(tmp, path)


class FakeConnection:
    """A connection of a :class:`FakePool`: ``fetchval`` returns the pool's DSN."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def fetchval(self, query: str, *args: object, **kwargs: Any) -> str:
        return self.dsn


class _Acquired:
    """What ``FakePool.acquire()`` returns: awaitable, or an async context manager."""

    def __init__(self, pool: FakePool) -> None:
        self._pool = pool

    def __await__(self) -> Generator[Any, None, FakeConnection]:
        return self._pool.checkout().__await__()

    async def __aenter__(self) -> FakeConnection:
        return await self._pool.checkout()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pool.in_use -= 1


class FakePool:
    """Enough of :class:`asyncpg.Pool` for HotPool's lifecycle, from a third-party driver's
    point of view (public API only). Clear the driver's ``closing`` to hold ``close()``."""

    def __init__(self, dsn: str, driver: FakeDriver) -> None:
        self.dsn = dsn
        self.closed = False
        self.terminated = False
        self.in_use = 0
        self._driver = driver

    def acquire(self, *, timeout: float | None = None) -> _Acquired:
        return _Acquired(self)

    async def checkout(self) -> FakeConnection:
        """What ``acquire()`` gives, awaited or entered."""
        self.in_use += 1
        return FakeConnection(self.dsn)

    async def release(self, con: FakeConnection, *, timeout: float | None = None) -> None:
        self.in_use -= 1

    async def close(self) -> None:
        await self._driver.closing.wait()
        self.closed = True

    def terminate(self) -> None:
        self.terminated = True

    async def expire_connections(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed or self.terminated

    def get_size(self) -> int:
        return 0 if self.is_closing() else 2

    def get_idle_size(self) -> int:
        return 0 if self.is_closing() else 1


class FakeDriver:
    """Opens :class:`FakePool` s: a DSN starting with ``bad`` (or naming a host starting with
    ``bad``) fails, one starting with ``slow`` waits for ``release_slow``, one in
    ``fail_times`` fails that many times first."""

    def __init__(self) -> None:
        self.opened: list[FakePool] = []
        self.attempts: list[str] = []
        self.release_slow = asyncio.Event()
        self.fail_times: dict[str, int] = {}
        self.closing = asyncio.Event()
        self.closing.set()

    async def __call__(self, dsn: str, **kwargs: Any) -> FakePool:
        self.attempts.append(dsn)
        if dsn.startswith("bad") or "@bad" in dsn or "//bad" in dsn:
            raise ConnectionRefusedError(f"cannot reach {dsn}")
        if self.fail_times.get(dsn, 0) > 0:
            self.fail_times[dsn] -= 1
            raise OSError("not up yet")
        if dsn.startswith("slow"):
            await self.release_slow.wait()
        pool = FakePool(dsn, self)
        self.opened.append(pool)
        return pool


class QueueStrategy:
    """A strategy fed by hand: put DSNs (or an exception to raise) in ``queue``, or, with
    *per_path*, in ``queues[path]`` for the watches of one URL path. The option ``bogus`` is
    refused, as a real strategy refuses an unknown option."""

    def __init__(self, *, per_path: bool = False) -> None:
        self.queue: asyncio.Queue[str | BaseException] = asyncio.Queue()
        self.queues: collections.defaultdict[str, asyncio.Queue[str | BaseException]] = (
            collections.defaultdict(asyncio.Queue)
        )
        self._per_path = per_path
        self.started = 0

    async def watch(self, path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        self.started += 1
        if "bogus" in options:
            raise aiohotload.InvalidOptionError("unknown option 'bogus'")
        queue = self.queues[path] if self._per_path else self.queue
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
