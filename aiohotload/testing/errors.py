"""The errors of :mod:`aiohotload.testing`."""

from __future__ import annotations

__all__ = ["NotSupported", "PgServerError", "PostgresNotFound"]


class PgServerError(RuntimeError):
    """A server could not be set up, started or stopped; the message ends with its log tail."""

    __module__ = "aiohotload.testing"


class NotSupported(PgServerError):
    """The operation needs a server the tests started (not one from ``PgServer.existing``).

    The pytest plugin reports it as a skip.
    """

    __module__ = "aiohotload.testing"


class PostgresNotFound(PgServerError):
    """No PostgreSQL server binaries were found; the message says, in one line, what to install.

    The pytest plugin reports it as a skip, or as a failure where ``CI`` is set.
    """

    __module__ = "aiohotload.testing"
