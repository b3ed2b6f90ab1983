"""KV version 2 secrets (``<mount>/data/<path>``): a field holding a DSN, or the JSON shape
of the ``awssm`` strategy, or the secret's fields in that shape. New versions are found by
polling the secret's metadata (its ``current_version``) every ``interval``."""

from __future__ import annotations

import json
import logging
from typing import Any

from .._secret import SecretFormatError, dsn_from_secret, passwords_in_secret
from ._auth import Authenticator
from ._client import Unavailable, VaultClient, VaultDenied, VaultError, VaultRejected
from ._options import SecretPath, VaultOptions
from ._source import PolledSource, with_token

__all__ = ["KvSecret", "dsn_from_kv"]

logger = logging.getLogger("aiohotload.strategies.vault")


class KvSecret(PolledSource):
    """The :class:`~._source.Source` for ``<mount>/data/<path>``."""

    def __init__(
        self, client: VaultClient, auth: Authenticator, path: SecretPath, opts: VaultOptions
    ) -> None:
        super().__init__(client, auth, path, opts)
        self._version = 0
        self._metadata = True  # False once the token may not read the metadata

    async def start(self) -> str:
        now = self._auth.clock()
        version, data = await self._read()
        try:
            self._dsn = dsn_from_kv(data, self._opts.field)
        except SecretFormatError as exc:
            raise VaultRejected(f"version {version} {exc.reason}") from None
        self._version = version
        self._pacing.read_done(now)
        self._next_read = now + self._opts.interval
        return self._dsn

    async def step(self, now: float) -> str | None:
        if now < self.due():
            return None
        try:
            read = await self._poll(now)
        except VaultError as exc:
            self._pacing.failed(now, exc.reason, "keeping the current DSN")
            return None
        return None if read is None else self._accept(*read)

    async def _poll(self, now: float) -> tuple[int, dict[str, Any]] | None:
        """The secret's version and fields, read unless its metadata shows the version we
        have (and no refresh is asked for): then None. Raises VaultError."""
        refresh = now >= self._pacing.refresh_at
        if not refresh and await self._current_version() == self._version:
            self._next_read = now + self._opts.interval
            self._pacing.succeeded()
            return None
        version, data = await self._read()
        self._pacing.read_done(now)
        self._next_read = now + self._opts.interval
        return version, data

    def _accept(self, version: int, data: dict[str, Any]) -> str | None:
        """The DSN of *version* if it is new and differs from the current one."""
        if version == self._version:
            return None
        self._version = version  # an unusable version is reported once, not at every poll
        try:
            dsn = dsn_from_kv(data, self._opts.field)
        except SecretFormatError as exc:
            logger.warning(
                "%s version %d %s; keeping the current DSN", self._path, version, exc.reason
            )
            return None
        if dsn == self._dsn:
            return None
        logger.info("new version %d of %s", version, self._path)
        self._dsn = dsn
        return dsn

    async def _current_version(self) -> int | None:
        """The secret's current version from its metadata; None if it may not be read."""
        if not self._metadata:
            return None
        path = f"{self._path.mount}/metadata/{self._path.name}"
        try:
            data = await with_token(self._auth, lambda: self._client.get(path))
        except VaultDenied:
            # Policies often grant the data path only; reading the data shows the version too.
            logger.debug("no read access to %s; polling the data instead", path)
            self._metadata = False
            return None
        meta = data.get("data")
        version = meta.get("current_version") if isinstance(meta, dict) else None
        return version if isinstance(version, int) else None

    async def _read(self) -> tuple[int, dict[str, Any]]:
        path = str(self._path)
        try:
            data = await with_token(self._auth, lambda: self._client.get(path))
        except VaultRejected as exc:
            if exc.status == 404:
                raise VaultRejected(
                    "no such secret, or its current version is deleted", 404
                ) from None
            raise
        body = data.get("data")
        secret = body.get("data") if isinstance(body, dict) else None
        meta = body.get("metadata") if isinstance(body, dict) else None
        if not isinstance(secret, dict) or not isinstance(meta, dict):
            raise Unavailable(f"{path} is not a KV version 2 secret")
        version = meta.get("version")
        for value in secret.values():
            if isinstance(value, str):
                self._auth.remember(*passwords_in_secret(value), password=True)
        password = secret.get("password")
        if isinstance(password, str) and password:
            self._auth.remember(password, password=True)
        return version if isinstance(version, int) else 0, secret


def dsn_from_kv(data: dict[str, Any], field: str | None) -> str:
    """The DSN in a KV secret's fields: *field* (default ``dsn``, if present) holds a DSN or
    the ``awssm`` JSON shape; else the fields themselves are that shape (``host``,
    ``username``, ``password``, ...). Raises SecretFormatError, never quoting a value."""
    name = field or ("dsn" if "dsn" in data else None)
    if name is None:
        return dsn_from_secret(json.dumps(data))
    value = data.get(name)
    if value is None:
        raise SecretFormatError(f"has no field {name!r}")
    if not isinstance(value, str):
        raise SecretFormatError(f"has field {name!r} that is not a string")
    return dsn_from_secret(value)
