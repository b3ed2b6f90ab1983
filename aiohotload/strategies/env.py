"""The ``env`` strategy: a fixed DSN from an environment variable, for development and tests.

``env://postgres/DATABASE_URL`` reads ``$DATABASE_URL`` once; the pool keeps that DSN for
its whole life. Nothing is watched: a process cannot see its own environment change.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncGenerator, Mapping

from ..errors import InvalidURLError, SourceError
from ..redact import redact_dsn
from .toolkit import check_options, quoted

__all__ = ["EnvStrategy"]

logger = logging.getLogger(__name__)


class EnvStrategy:
    """Yields the stripped value of the environment variable the URL's path names, once.

    Takes no options. The value is never put in an exception and is logged only redacted.
    It takes no feedback either: asked for a fresh value, it would have nothing new to read.
    """

    async def watch(self, path: str, options: Mapping[str, str]) -> AsyncGenerator[str, None]:
        """Yield the DSN in variable *path* (``/NAME``), then return.

        Raises :class:`~aiohotload.InvalidOptionError` for any option,
        :class:`~aiohotload.InvalidURLError` for a bad name, and
        :class:`~aiohotload.SourceError` if the variable is unset or empty.
        """
        check_options("env", options, known=())
        name = _variable(path)
        value = os.environ.get(name)
        if value is None:
            raise SourceError(f"environment variable {name!r} is not set")
        dsn = value.strip()
        if not dsn:
            raise SourceError(f"environment variable {name!r} is empty")
        logger.info("DSN from environment variable %s: %s", name, redact_dsn(dsn))
        yield dsn


def _variable(path: str) -> str:
    # parse_url keeps the path's leading '/': 'env://postgres/DATABASE_URL' -> '/DATABASE_URL'.
    name = path[1:] if path.startswith("/") else path
    if not name:
        raise InvalidURLError("the env strategy needs a variable name: 'env://postgres/NAME'")
    # '/' would mean the URL has a path where a name belongs; '=' and NUL cannot be in a name.
    if any(c in name for c in "/=\x00"):
        raise InvalidURLError(
            f"{quoted(name)} is not an environment variable name "
            "(no '/', '=' or NUL allowed): expected 'env://postgres/NAME'"
        )
    return name
