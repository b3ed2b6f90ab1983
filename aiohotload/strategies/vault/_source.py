"""What the three kinds of Vault secrets share: the interface the strategy drives, paced
refreshes, retries, and reading with a new token when Vault refuses the current one."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from ._auth import Authenticator
from ._client import VaultClient, VaultDenied
from ._faults import Retries
from ._options import SecretPath, VaultOptions

__all__ = ["REFRESH_GAP", "Pacing", "PolledSource", "Source", "SourceBase", "with_token"]

logger = logging.getLogger("aiohotload.strategies.vault")

T = TypeVar("T")

#: Shortest time between two reads asked for by the pool (a refused login): a refused login
#: right after new credentials came is most likely about the old ones.
REFRESH_GAP = 5.0


class Source(Protocol):
    """One secret in Vault, turned into DSNs (see :mod:`._dynamic`, :mod:`._static`,
    :mod:`._kv`). Only :meth:`start` raises :class:`~._client.VaultError`; later failures
    are logged and retried."""

    async def start(self) -> str:
        """The first DSN."""
        ...

    @property
    def trouble(self) -> str | None:
        """What keeps this source from reading Vault now (safe to show), or None."""
        ...

    def due(self) -> float:
        """When :meth:`step` has work to do (monotonic seconds; inf: only on news)."""
        ...

    async def step(self, now: float) -> str | None:
        """Do what is due: a new DSN to yield, or None."""
        ...

    def refresh(self, now: float) -> None:
        """The pool asks for a fresh look (a login with the current DSN was refused)."""
        ...

    def release(self, dsn: str) -> None:
        """The pool no longer uses *dsn*."""
        ...

    async def close(self) -> bool:
        """Free what is released; True if nothing this source made is still in use."""
        ...


class Pacing(Retries):
    """When a source may act: refreshes at most every :data:`REFRESH_GAP`, and retries
    after failures with backoff, each failure logged once."""

    def __init__(self, what: str) -> None:
        super().__init__(logger, what)
        self.refresh_at = math.inf
        self._last_read = -math.inf

    def request_refresh(self, now: float) -> None:
        self.refresh_at = min(self.refresh_at, max(now, self._last_read + REFRESH_GAP))

    def read_done(self, now: float) -> None:
        """A read succeeded: a refresh asked for before now is answered."""
        self._last_read = now
        self.refresh_at = math.inf
        self.succeeded()


class SourceBase:
    """What every :class:`Source` holds: the client, the authenticator, the secret's path,
    the options, and the :class:`Pacing` of its requests (*what* they do, for messages)."""

    def __init__(
        self,
        client: VaultClient,
        auth: Authenticator,
        path: SecretPath,
        opts: VaultOptions,
        *,
        what: str,
    ) -> None:
        self._client = client
        self._auth = auth
        self._path = path
        self._opts = opts
        self._pacing = Pacing(what)

    @property
    def trouble(self) -> str | None:
        """What keeps this source from reading Vault now (safe to show), or None."""
        return self._pacing.trouble

    def refresh(self, now: float) -> None:
        self._pacing.request_refresh(now)


class PolledSource(SourceBase):
    """A secret read again at :attr:`_next_read` (or on a refresh), that holds nothing to
    free: a static role's password, a KV secret."""

    def __init__(
        self, client: VaultClient, auth: Authenticator, path: SecretPath, opts: VaultOptions
    ) -> None:
        super().__init__(client, auth, path, opts, what=f"read {path}")
        self._dsn = ""
        self._next_read = math.inf

    def due(self) -> float:
        return max(min(self._next_read, self._pacing.refresh_at), self._pacing.retry_at)

    def release(self, dsn: str) -> None:
        """Nothing to free: the DSN's user outlives it."""

    async def close(self) -> bool:
        return True


async def with_token(auth: Authenticator, call: Callable[[], Awaitable[T]]) -> T:
    """*call*, and once more with a new token if Vault refused the current one (expired,
    revoked: a 403 is all Vault says) and a new one can be had."""
    try:
        return await call()
    except VaultDenied:
        if not await auth.replace(reason="Vault refused the current one"):
            raise
    return await call()
