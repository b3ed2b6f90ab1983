"""Static database roles (``<mount>/static-creds/<role>``): one user whose password Vault
rotates every ``rotation_period``. Each read says how long until the next rotation; the
strategy reads again then, and every :data:`POLL` seconds after it until the password has
changed, so the pool follows within about a second of Vault's change."""

from __future__ import annotations

import logging
import math
from typing import Any

from ._auth import Authenticator
from ._client import Unavailable, VaultClient, VaultError
from ._options import SecretPath, VaultOptions
from ._source import PolledSource, with_token

__all__ = ["StaticCredentials"]

logger = logging.getLogger("aiohotload.strategies.vault")

#: Seconds between reads once a rotation is due and not yet seen.
POLL = 0.25
#: How long after it was due a rotation is waited for at :data:`POLL`; then the normal pace.
WAIT = 15.0


class StaticCredentials(PolledSource):
    """The :class:`~._source.Source` for ``<mount>/static-creds/<role>``."""

    def __init__(
        self, client: VaultClient, auth: Authenticator, path: SecretPath, opts: VaultOptions
    ) -> None:
        super().__init__(client, auth, path, opts)
        self._rotation_due = math.inf  # when Vault will next rotate the password

    async def start(self) -> str:
        now = self._auth.clock()
        self._dsn = self._apply(await self._read(), now)
        self._pacing.read_done(now)
        return self._dsn

    async def step(self, now: float) -> str | None:
        if now < self.due():
            return None
        try:
            data = await self._read()
        except VaultError as exc:
            self._pacing.failed(now, exc.reason, "keeping the current DSN")
            return None
        self._pacing.read_done(now)
        dsn = self._apply(data, now)
        if dsn == self._dsn:
            return None
        self._dsn = dsn
        return dsn

    async def _read(self) -> dict[str, Any]:
        path = f"{self._path.mount}/static-creds/{self._path.name}"
        data = await with_token(self._auth, lambda: self._client.get(path))
        creds = data.get("data")
        if not isinstance(creds, dict):
            raise Unavailable(f"{self._path} returned no credentials")
        return creds

    def _apply(self, creds: dict[str, Any], now: float) -> str:
        """The DSN in *creds*, and when to read next."""
        username, password = creds.get("username"), creds.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            raise Unavailable(f"{self._path} returned no username and password")
        self._auth.remember(password, password=True)
        assert self._opts.recipe is not None
        dsn = self._opts.recipe.dsn(username, password)
        ttl = creds.get("ttl")
        changed = dsn != self._dsn
        if changed:
            self._rotation_due = now + float(ttl) if isinstance(ttl, (int, float)) else math.inf
            if self._dsn:
                logger.info(
                    "the password of %r from %s changed (Vault rotated it); next rotation in %ss",
                    username,
                    self._path,
                    ttl,
                )
        if not changed and now >= self._rotation_due and now < self._rotation_due + WAIT:
            self._next_read = now + POLL  # rotation due: Vault changes it any moment
        else:
            self._next_read = min(self._rotation_due, now + self._opts.interval)
        return dsn
