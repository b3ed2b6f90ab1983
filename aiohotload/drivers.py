"""Drivers: what builds an inner pool from a DSN. The built-in one is asyncpg.

A driver registered for another URL host gets the lifecycle every pool gets: validation
before the swap (one connection acquired and released), swaps, graceful drains bounded by
``drain_timeout`` (``close()``) and ``terminate()`` at the timeout or with ``force_kill``,
through the :class:`asyncpg.Pool` public API its pools must offer. What only asyncpg's own
pools get: callers waiting for a connection moved to the new generation at the swap, no new
connection opened for a retired generation, idle connections closed at the swap, cancel
requests for queries still running at a kill, ``max_lifetime`` and refused-login refreshes.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, runtime_checkable

import asyncpg

from ._registry import Registry
from .dsn import as_url
from .errors import RegistryError, UnknownDriverError

__all__ = [
    "Driver",
    "asyncpg_driver",
    "driver_names",
    "get_driver",
    "register_driver",
    "unregister_driver",
]


@runtime_checkable
class Driver(Protocol):
    """An async factory: ``await driver(dsn, **pool_kwargs)`` returns an open inner pool with
    the :class:`asyncpg.Pool` interface."""

    def __call__(self, dsn: str, **pool_kwargs: Any) -> Awaitable[asyncpg.Pool]: ...


async def asyncpg_driver(dsn: str, **pool_kwargs: Any) -> asyncpg.Pool:
    """Open an :class:`asyncpg.Pool` on *dsn* with *pool_kwargs*.

    asyncpg reads only URL DSNs; a libpq ``key=value`` DSN is converted first, and any DSN
    asyncpg would misread is refused with :class:`~aiohotload.InvalidDSNError`
    (:func:`~aiohotload.dsn.as_url`).
    """
    return await asyncpg.create_pool(as_url(dsn), **pool_kwargs)


def _coerce(item: object) -> Driver:
    if callable(item):
        return item
    raise RegistryError(
        "a driver must be an async callable (dsn, **pool_kwargs) -> pool; "
        f"got {type(item).__name__}"
    )


_registry: Registry[Driver] = Registry("driver", "aiohotload.drivers", UnknownDriverError, _coerce)


def register_driver(name: str, factory: object, *, replace: bool = False) -> None:
    """Register *factory* (``async (dsn, **pool_kwargs) -> pool``) as the URL host *name*.

    Raises :class:`~aiohotload.RegistryError` for an empty or already registered name
    unless ``replace=True``.
    """
    _registry.register(name, factory, replace=replace)


def unregister_driver(name: str) -> None:
    """Remove the driver registered under *name*, if any."""
    _registry.unregister(name)


def get_driver(name: str) -> Driver:
    """The driver registered under *name*; :class:`~aiohotload.UnknownDriverError` if none."""
    return _registry.get(name)


def driver_names() -> list[str]:
    """Names of every registered driver, entry-point plugins included."""
    return _registry.names()


register_driver("postgres", asyncpg_driver)
register_driver("postgresql", asyncpg_driver)
