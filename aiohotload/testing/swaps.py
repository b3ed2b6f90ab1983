"""Watching a pool follow a change: wait for its next swap, ask which server serves it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Queryable", "Swap", "Swappable", "next_swap", "port_of"]


class Swappable(Protocol):
    """What :func:`next_swap` needs: a ``HotPool`` or a ``HotEngine``."""

    @property
    def generation(self) -> int: ...

    async def wait_for_swap(self, timeout: float | None = None) -> int: ...


class Queryable(Protocol):
    """What :func:`port_of` needs: a ``HotPool``, an ``asyncpg`` pool or connection."""

    async def fetchval(self, query: str, *args: Any) -> Any: ...


@dataclass
class Swap:
    """The generation a pool served when the block began, and (after it) the one it swapped to."""

    before: int
    after: int | None = None


@contextlib.asynccontextmanager
async def next_swap(pool: Swappable, timeout: float = 10.0) -> AsyncIterator[Swap]:
    """``async with next_swap(pool): <change the DSN>``: after the block, wait until the pool
    has swapped to a newer generation than it had when the block began.

    Started before the change, so a swap that comes fast is not missed. Raises
    :class:`TimeoutError` if no swap comes within *timeout* seconds of the block's end.
    """
    swap = Swap(before=pool.generation)
    yield swap
    deadline = time.monotonic() + timeout
    while pool.generation <= swap.before:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no swap within {timeout}s: still generation {pool.generation}")
        # wait_for_swap takes the pool's next-swap waiter before it first suspends, so a swap
        # between the check above and this call is still seen.
        await pool.wait_for_swap(timeout=remaining)
    swap.after = pool.generation


async def port_of(pool: Queryable) -> int:
    """The port of the server that serves the pool's next query (``inet_server_port()``)."""
    port = await pool.fetchval("SELECT inet_server_port()")
    if not isinstance(port, int):
        raise TypeError(f"inet_server_port() gave {port!r}: is the connection over TCP?")
    return port
