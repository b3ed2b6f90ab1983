"""Reload events: what a :class:`~aiohotload.HotPool` reports to its listeners.

Every field is safe to log or export: targets are redacted DSNs and errors are redacted
messages. Subscribe with :meth:`HotPool.add_listener` or ``async for event in pool.events()``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

__all__ = [
    "Event",
    "ForceKillDone",
    "PoolDrained",
    "ReloadFailed",
    "ReloadStarted",
    "SwapDone",
    "deliver",
    "run_listener",
]

logger = logging.getLogger("aiohotload")


@dataclass(frozen=True)
class _Base:
    pool: str
    """The pool's name (``create_pool(..., name=...)``, by default the URL's path)."""
    at: float = field(default_factory=time.time, kw_only=True)
    """When it happened (seconds since the epoch)."""


@dataclass(frozen=True)
class ReloadStarted(_Base):
    """A new DSN arrived (or is retried) and a pool is being opened on it."""

    target: str
    attempt: int
    generation: int
    """The generation still serving."""


@dataclass(frozen=True)
class SwapDone(_Base):
    """New work now goes to the new generation."""

    old_generation: int
    new_generation: int
    old_target: str
    new_target: str
    open_seconds: float
    """How long the new pool took to open."""


@dataclass(frozen=True)
class ReloadFailed(_Base):
    """A pool could not be opened on the new DSN; the current one keeps serving."""

    target: str
    error: str
    attempt: int
    retry_in: float
    """Seconds until the next attempt (a newer DSN is tried at once)."""
    generation: int


@dataclass(frozen=True)
class PoolDrained(_Base):
    """An old generation is closed: gracefully, or with stragglers terminated at the timeout."""

    generation: int
    target: str
    seconds: float
    terminated: int
    """Connections still in use at ``drain_timeout``, cancelled and terminated."""


@dataclass(frozen=True)
class ForceKillDone(_Base):
    """An old generation was terminated at once (``force_kill``)."""

    generation: int
    target: str
    cancelled: int
    """Queries that were running on it, cancelled on the server."""


Event = ReloadStarted | SwapDone | ReloadFailed | PoolDrained | ForceKillDone


def deliver(
    listeners: Iterable[Callable[[Event], object]],
    event: Event,
    spawn: Callable[[Awaitable[object]], None],
) -> None:
    """Call each of *listeners* with *event*; an awaitable result is handed to *spawn* (to run
    it as a task). A listener that raises is logged and never affects the caller."""
    for callback in list(listeners):
        try:
            result = callback(event)
            if inspect.isawaitable(result):
                spawn(result)
        except Exception:
            logger.exception("aiohotload event listener %r failed", callback)


async def run_listener(awaitable: Awaitable[object]) -> None:
    """Await what an ``async def`` listener returned, logging its error instead of raising."""
    try:
        await awaitable
    except Exception:
        logger.exception("aiohotload event listener failed")
