"""Getting and keeping a Vault token: a given token, AppRole or Kubernetes login, renewal,
and a new login before the token ends.

A token given to us (``VAULT_TOKEN``, a token file, the CLI's ``~/.vault-token``) is renewed
while renewable but never revoked; a token we logged in for is ours, and is revoked at close.
Vault revokes the leases a token created when the token ends, so the strategy replaces
database credentials before the token that leased them ends (see :mod:`._leases`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ._client import VaultClient, VaultDenied, VaultError, VaultRejected
from ._faults import Retries
from ._leases import Term, replace_at
from ._options import AuthMethod, VaultOptions

__all__ = ["Authenticator", "Token", "UnreadableFile"]

logger = logging.getLogger("aiohotload.strategies.vault")

_HELPER_FILES = ("~/.vault-token", "~/.bao-token")
# Secrets remembered for scrubbing error text, of each kind (credentials for Vault, database
# passwords): the newest ones, so a pool that rotates for months does not grow the list
# without end, and a stream of passwords never pushes the token out.
_REMEMBERED = 64
_MAX_FILE = 64 * 1024


class UnreadableFile(VaultError):
    """A file the login needs (token, secret id, JWT) cannot be read."""


@dataclass(eq=False)
class Token:
    """A Vault token and its life; *own* if we logged in for it."""

    value: str = field(repr=False)
    term: Term
    own: bool
    source: str  # where it came from, for messages: 'VAULT_TOKEN', 'AppRole login', ...

    @property
    def ends(self) -> float | None:
        """When it ends for sure (it can no longer be renewed), else None."""
        return self.term.expires if self.term.final and math.isfinite(self.term.expires) else None


class Authenticator:
    """Holds the current token of a :class:`VaultClient` and keeps it valid."""

    def __init__(
        self,
        client: VaultClient,
        opts: VaultOptions,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        """The time source of the strategy's schedule (monotonic seconds)."""
        self._client = client
        self._opts = opts
        self._environ = os.environ if environ is None else environ
        self.current: Token | None = None
        self._tokens: list[Token] = []  # every token we logged in for, not yet revoked
        # For scrubbing error text, oldest first: credentials for Vault, database passwords.
        self._secrets: tuple[dict[str, None], dict[str, None]] = ({}, {})
        self._retries = Retries(logger, "renew the Vault token")
        self._warned_end = False

    @property
    def trouble(self) -> str | None:
        """What keeps the token from being renewed now (safe to show), or None."""
        return self._retries.trouble

    @property
    def method(self) -> str:
        """How we log in, for messages."""
        if self._opts.auth is AuthMethod.TOKEN:
            return "token"
        return f"{self._opts.auth.value} login at auth/{self._opts.auth_mount}"

    def secrets(self) -> list[str]:
        """The newest tokens, secret ids, JWTs and passwords seen, to scrub from error text."""
        return [*self._secrets[0], *self._secrets[1]]

    def remember(self, *secrets: str, password: bool = False) -> None:
        """Scrub *secrets* (database passwords if *password*) from error text from now on."""
        store = self._secrets[password]
        for secret in secrets:
            if secret:
                store.pop(secret, None)
                store[secret] = None
        while len(store) > _REMEMBERED:
            del store[next(iter(store))]

    async def start(self) -> None:
        """Get the first token; raises VaultError."""
        self._use(await self._obtain())

    def due(self) -> float:
        """When :meth:`step` has work: a renewal, or a login before the token ends."""
        token = self.current
        if token is None:
            return self._retries.retry_at
        if token.term.final:
            when = replace_at(token.term, self._opts.rotate_before)
        else:
            when = token.term.renew_at
        return max(when, self._retries.retry_at)

    async def step(self, now: float) -> None:
        """Renew the token, or replace it, if due; failures are logged and retried."""
        if now < self.due():
            return
        token = self.current
        try:
            if token is None or token.term.final:
                if not await self.replace(reason="it ends soon" if token else "there is none"):
                    # The same token from its source: look there again later.
                    self._retries.retry_at = now + self._opts.interval
                    return
            else:
                await self._renew(token, now)
        except VaultError as exc:
            if token is not None and not token.term.final and isinstance(exc, VaultDenied):
                token.term = token.term.finalized()  # expired or revoked: log in again
            self._retries.failed(self.clock(), exc.reason, "keeping the current token")
        else:
            self._retries.succeeded()

    async def replace(self, *, reason: str) -> bool:
        """Get a new token now (log in again, or re-read the token's source); False if the
        source gives the same token. Raises VaultError."""
        token = await self._obtain()
        current = self.current
        if current is not None and token.value == current.value:
            if not self._warned_end and current.ends is not None:
                logger.warning(
                    "the Vault token from %s ends in %.0fs and cannot be renewed; database "
                    "leases it created end with it. Give a new token there in time",
                    current.source,
                    current.ends - self.clock(),
                )
                self._warned_end = True
            return False
        logger.info("new Vault token from %s (%s)", token.source, reason)
        self._use(token)
        return True

    async def close(self, *, revoke: bool) -> None:
        """Revoke the tokens we logged in for (and so every lease they hold) if *revoke*."""
        tokens, self._tokens = self._tokens, []
        if not revoke:
            return
        async with anyio.create_task_group() as tg:
            for token in tokens:
                tg.start_soon(self._revoke, token)

    async def _revoke(self, token: Token) -> None:
        try:
            await self._client.post("auth/token/revoke-self", token=token.value)
        except VaultError as exc:
            logger.debug("could not revoke a Vault token from %s: %s", token.source, exc.reason)

    def _use(self, token: Token) -> None:
        self.current = token
        self._client.token = token.value
        self._warned_end = False
        if token.own:
            now = self.clock()
            # Tokens that ended are gone from Vault: nothing to revoke at close.
            self._tokens = [t for t in self._tokens if t.term.expires > now] + [token]

    async def _renew(self, token: Token, now: float) -> None:
        body = {"increment": f"{max(1, round(token.term.duration))}s"}
        try:
            data = await self._client.post("auth/token/renew-self", body, token=token.value)
        except VaultError as exc:
            # A server error here, not a 4xx as for a lease: the text is what tells.
            if "past the max ttl" not in exc.reason.lower():
                raise
            # It ends as last granted: log in again now, not after retrying a renewal that
            # cannot succeed, so that the pool moves to leases of the new token before
            # Vault revokes this one's with it. (A grant capped to a whole TTL by max_ttl
            # does not look capped, so this is where such a token is seen to be final.)
            token.term = token.term.finalized()
            logger.info("the Vault token from %s cannot be renewed: %s", token.source, exc.reason)
            return
        auth = _auth_of(data)
        ttl = _number(auth.get("lease_duration"))
        token.term = token.term.renewed(now, ttl, fraction=self._opts.renew_fraction)
        logger.debug(
            "renewed the Vault token from %s for %.0fs%s",
            token.source,
            ttl,
            " (capped: it ends then)" if token.term.final else "",
        )

    async def _obtain(self) -> Token:
        if self._opts.auth is AuthMethod.TOKEN:
            return await self._given_token()
        if self._opts.auth is AuthMethod.APPROLE:
            body = {"role_id": self._role_id()}
            if self._opts.secret_id_file:
                body["secret_id"] = self._read("secret_id_file", self._opts.secret_id_file)
            return await self._login(body, "AppRole login")
        assert self._opts.role is not None
        body = {"role": self._opts.role, "jwt": self._read("jwt_file", self._opts.jwt_file)}
        return await self._login(body, "Kubernetes login")

    async def _login(self, body: dict[str, str], source: str) -> Token:
        path = f"auth/{self._opts.auth_mount}/login"
        self.remember(*(v for k, v in body.items() if k in ("secret_id", "jwt")))
        now = self.clock()
        try:
            data = await self._client.request("POST", path, body, auth=False)
        except VaultError as exc:
            exc.reason = f"{self.method}: {exc.reason}"
            raise
        auth = _auth_of(data)
        value = auth.get("client_token")
        if not isinstance(value, str) or not value:
            raise VaultRejected(f"{self.method}: Vault returned no client token")
        self.remember(value)
        ttl = _number(auth.get("lease_duration"))
        term = Term.new(
            now, ttl, renewable=bool(auth.get("renewable")), fraction=self._opts.renew_fraction
        )
        return Token(value, term, own=True, source=source)

    async def _given_token(self) -> Token:
        value, source = self._token_source()
        self.remember(value)
        now = self.clock()
        try:
            data = await self._client.get("auth/token/lookup-self", token=value)
        except VaultDenied:
            raise VaultDenied(
                f"Vault refused the token from {source} (expired or revoked?)", 403
            ) from None
        # lookup-self echoes the token as "id": nothing of it is logged.
        info = data.get("data") if isinstance(data.get("data"), dict) else {}
        assert isinstance(info, dict)
        term = Term.new(
            now,
            _number(info.get("ttl")),
            renewable=bool(info.get("renewable")),
            fraction=self._opts.renew_fraction,
            duration=_number(info.get("creation_ttl")),
        )
        return Token(value, term, own=False, source=source)

    def _token_source(self) -> tuple[str, str]:
        if self._opts.token_file:
            return self._read("token_file", self._opts.token_file), self._opts.token_file
        for name in ("VAULT_TOKEN", "BAO_TOKEN"):
            value = self._environ.get(name, "").strip()
            if value:
                return value, name
        for helper in _HELPER_FILES:
            path = os.path.expanduser(helper)
            if os.path.isfile(path):
                return self._read("token helper file", path), helper
        raise UnreadableFile(
            "no Vault token: set VAULT_TOKEN, option 'token_file', or log in with the vault "
            "CLI (~/.vault-token); or use auth=approle or auth=kubernetes"
        )

    def _role_id(self) -> str:
        if self._opts.role_id is not None:
            return self._opts.role_id
        assert self._opts.role_id_file is not None
        return self._read("role_id_file", self._opts.role_id_file)

    def _read(self, option: str, path: str) -> str:
        try:
            with Path(path).open(encoding="utf-8") as file:
                text = file.read(_MAX_FILE + 1).strip()
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
            raise UnreadableFile(f"cannot read {option} {path!r}: {detail}") from None
        if not text or len(text) > _MAX_FILE:
            raise UnreadableFile(f"{option} {path!r} is {'empty' if not text else 'too large'}")
        self.remember(text)
        return text


def _auth_of(data: Mapping[str, Any]) -> Mapping[str, Any]:
    auth = data.get("auth")
    return auth if isinstance(auth, dict) else {}


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
