"""Helpers shared by the fault-injection tests: event logs, background load, log watching."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import asyncpg

from aiohotload import Event, HotPool
from aiohotload.testing import PgServer, wait_until

__all__ = [
    "CONNECTION_ERRORS",
    "EventLog",
    "Load",
    "LogWatch",
    "backends",
    "no_new_tasks",
]

E = TypeVar("E", bound=Event)

#: What a query may fail with when its own connection breaks (server stopped, connection cut,
#: terminated at a drain timeout): asyncpg's errors. Anything else (AttributeError,
#: AssertionError, InternalClientError, ...) is a bug.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError among them
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.QueryCanceledError,  # a drain timeout's cancel request reached the query
    ConnectionError,
    OSError,
)


async def no_new_tasks(before: set[asyncio.Task[Any]], *, timeout: float = 5.0) -> None:
    """Wait until every task started since *before* was taken has ended (the proxy's own
    tasks, named ``tcpproxy:...``, and the calling task aside)."""

    def left() -> set[asyncio.Task[Any]]:
        return {
            t
            for t in asyncio.all_tasks() - before - {asyncio.current_task()}
            if not t.get_name().startswith("tcpproxy:")
        }

    await wait_until(left, lambda tasks: not tasks, timeout=timeout, what="no task left")


class EventLog:
    """Every reload event of a pool, in order (a listener added at construction)."""

    def __init__(self, pool: HotPool) -> None:
        self.events: list[Event] = []
        pool.add_listener(self.events.append)

    def of(self, kind: type[E]) -> list[E]:
        """The events of one kind."""
        return [e for e in self.events if isinstance(e, kind)]

    async def wait(self, kind: type[E], count: int = 1, *, timeout: float = 10.0) -> list[E]:
        """Wait until at least *count* events of *kind* happened; returns them all."""
        return await wait_until(
            lambda: self.of(kind),
            lambda found: len(found) >= count,
            timeout=timeout,
            what=f"{count} {kind.__name__} event(s)",
        )


class Load:
    """Background callers running a short query in a loop on a pool, as an app does.

    ``async with Load(pool) as load:`` starts them; leaving stops them. ``load.ok`` counts the
    queries that succeeded, ``load.failures`` holds what the others raised and
    ``load.failed_at`` when each of those started (``time.monotonic()``). :meth:`progress`
    waits until *n* more queries succeeded, which shows the pool is serving.
    """

    def __init__(
        self,
        pool: HotPool,
        workers: int = 4,
        work: Callable[[HotPool], Awaitable[object]] | None = None,
    ) -> None:
        self.pool = pool
        self.workers = workers
        self.work = work or (lambda p: p.fetchval("SELECT 1"))
        self.ok = 0
        self.failed_at: list[tuple[float, BaseException]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self.work(self.pool)
                self.ok += 1
            except Exception as exc:
                self.failed_at.append((started, exc))
                # A failing pool must not turn the load into a busy loop.
                await asyncio.sleep(0.01)

    @property
    def failures(self) -> list[BaseException]:
        """What the failed queries raised, in order."""
        return [exc for _, exc in self.failed_at]

    def failed_since(self, moment: float) -> list[BaseException]:
        """What the queries started at or after *moment* (``time.monotonic()``) raised."""
        return [exc for started, exc in self.failed_at if started >= moment]

    async def progress(self, n: int = 20, *, timeout: float = 10.0) -> None:
        """Wait until *n* more queries succeeded."""
        target = self.ok + n
        await wait_until(lambda: self.ok >= target, timeout=timeout, what=f"{n} more queries")

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(self.workers)]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


class LogWatch(logging.Handler):
    """Collects the messages of the ``aiohotload`` loggers, DEBUG included, while in use
    (``with LogWatch() as logs:``), so a test can wait until the pool has seen something."""

    def __init__(self, name: str = "aiohotload") -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.messages: list[str] = []
        self._level = self.logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def mark(self) -> int:
        """A position: :meth:`wait` looks only at messages logged after it."""
        return len(self.messages)

    async def wait(self, *words: str, since: int = 0, timeout: float = 10.0) -> str:
        """Wait for a message logged after *since* that holds every one of *words*."""

        def found() -> str | None:
            for message in self.messages[since:]:
                if all(word in message for word in words):
                    return message
            return None

        message = await wait_until(found, timeout=timeout, what=f"a log message with {words}")
        assert message is not None
        return message

    def __enter__(self) -> LogWatch:
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)


async def backends(server: PgServer, user: str) -> int:
    """How many sessions *user* has on *server*."""
    return len(await server.backends(usename=user))
