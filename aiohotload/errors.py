"""The exceptions aiohotload raises; every one derives from :class:`HotloadError`."""

from __future__ import annotations

import asyncpg

__all__ = [
    "DriverError",
    "HotloadError",
    "InvalidDSNError",
    "InvalidOptionError",
    "InvalidURLError",
    "PoolClosedError",
    "RegistryError",
    "SourceError",
    "StrategyError",
    "UnknownDriverError",
    "UnknownStrategyError",
]


class HotloadError(Exception):
    """Base class of every error aiohotload raises."""

    __module__ = "aiohotload"


class InvalidURLError(HotloadError, ValueError):
    """The hotload URL is malformed."""

    __module__ = "aiohotload"


class InvalidOptionError(HotloadError, ValueError):
    """An option in the URL's query is unknown or has a bad value."""

    __module__ = "aiohotload"


class InvalidDSNError(HotloadError, ValueError):
    """A DSN cannot be read; the message says what is wrong and where, never quoting it."""

    __module__ = "aiohotload"


class RegistryError(HotloadError, ValueError):
    """A strategy or driver could not be registered (empty or duplicate name)."""

    __module__ = "aiohotload"


class UnknownStrategyError(HotloadError, LookupError):
    """The URL's scheme names no registered strategy."""

    __module__ = "aiohotload"


class UnknownDriverError(HotloadError, LookupError):
    """The URL's host names no registered driver."""

    __module__ = "aiohotload"


class StrategyError(HotloadError):
    """A strategy failed to produce a DSN."""

    __module__ = "aiohotload"


class SourceError(StrategyError):
    """The DSN source (a file, a key, ...) is missing, empty or unreadable."""

    __module__ = "aiohotload"


class DriverError(HotloadError):
    """A driver failed to build an inner pool from a DSN."""

    __module__ = "aiohotload"


class PoolClosedError(HotloadError, asyncpg.InterfaceError):
    """The pool or engine is not open (closed, closing, or not yet initialised): it is an
    :class:`asyncpg.InterfaceError`, as asyncpg raises for its own pools."""

    __module__ = "aiohotload"
