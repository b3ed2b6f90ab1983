"""Waiting for a condition with a deadline: the one way tests wait, instead of sleeping."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

__all__ = ["wait_until"]

T = TypeVar("T")


@overload
async def wait_until(
    fn: Callable[..., Awaitable[T]],
    check: Callable[..., object] | None = ...,
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str | None = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


@overload
async def wait_until(
    fn: Callable[..., T],
    check: Callable[..., object] | None = ...,
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str | None = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


async def wait_until(
    fn: Callable[..., object],
    check: Callable[..., object] | None = None,
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> object:
    """Call *fn* (sync or async) every *interval* seconds until its value passes *check*
    (default: is truthy), and return that value; raise :class:`TimeoutError` after *timeout*
    seconds, naming the condition and the last value seen.

    check: a sync test of the value, e.g. ``lambda n: n == 0``.
    what: describes the condition in the error (default: the callables' names).
    ignore: exception types from *fn* that count as "not yet" rather than failing at once.

    Use it instead of ``sleep``::

        await wait_until(lambda: pg.backends(usename=user), lambda rows: not rows)
    """
    deadline = time.monotonic() + timeout
    attempts = 0
    last: object = None
    last_error: BaseException | None = None
    while True:
        attempts += 1
        try:
            value = fn()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:
            last_error = exc
        else:
            if check(value) if check is not None else value:
                return value
            last, last_error = value, None
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    name = what or " ".join(_name(f) for f in (fn, check) if f is not None)
    outcome = f"last error: {last_error!r}" if last_error else f"last value: {last!r}"
    raise TimeoutError(f"{name} not met within {timeout}s ({attempts} tries; {outcome})")


def _name(fn: Callable[..., object]) -> str:
    code = getattr(fn, "__code__", None)
    where = f" at {code.co_filename.rpartition('/')[2]}:{code.co_firstlineno}" if code else ""
    return f"{getattr(fn, '__qualname__', repr(fn))}{where}"
