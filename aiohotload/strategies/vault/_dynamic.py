"""Dynamic database credentials (``<mount>/creds/<role>``): a new user per lease, renewed
while it can be, replaced before it ends, revoked once the pool has drained it."""

from __future__ import annotations

import logging
import math
from typing import Any

import anyio

from ._auth import Authenticator
from ._client import Unavailable, VaultClient, VaultDenied, VaultError, VaultRejected
from ._faults import Retries
from ._leases import Lease, Term, margin, replace_at
from ._options import SecretPath, VaultOptions
from ._source import SourceBase, with_token

__all__ = ["DynamicCredentials"]

logger = logging.getLogger("aiohotload.strategies.vault")


class DynamicCredentials(SourceBase):
    """The :class:`~._source.Source` for ``<mount>/creds/<role>``."""

    def __init__(
        self, client: VaultClient, auth: Authenticator, path: SecretPath, opts: VaultOptions
    ) -> None:
        super().__init__(
            client, auth, path, opts, what=f"renew or replace the credentials from {path}"
        )
        self.current: Lease | None = None
        self._leases: dict[str, Lease] = {}  # by DSN: every lease yielded, not yet released
        self._released: list[Lease] = []  # to revoke
        self._revoking = Retries(logger, "revoke leases")
        self._revoke_denied = False

    @property
    def leases(self) -> list[Lease]:
        """Leases yielded and not yet released."""
        return list(self._leases.values())

    async def start(self) -> str:
        return (await self._fetch(self._auth.clock(), "first credentials")).dsn

    def due(self) -> float:
        when = self._pacing.refresh_at
        lease = self.current
        if lease is not None:
            when = min(when, lease.term.renew_at, self._replace_at(lease))
        when = max(when, self._pacing.retry_at)
        if self._released:
            when = min(when, self._revoking.retry_at)
        return when

    def release(self, dsn: str) -> None:
        lease = self._leases.pop(dsn, None)
        if lease is None:
            return
        if lease is self.current:
            self.current = None  # the pool is closing: nothing to renew or replace
        self._released.append(lease)

    async def step(self, now: float) -> str | None:
        if self._released and now >= self._revoking.retry_at:
            await self._revoke_released(now)
        lease = self.current
        if now < self._pacing.retry_at:
            return None
        try:
            return await self._renew_or_replace(lease, now)
        except VaultError as exc:
            self._retry_later(lease, now, exc.reason)
        return None

    async def _renew_or_replace(self, lease: Lease | None, now: float) -> str | None:
        """Fetch new credentials if asked for or due, else renew *lease* if due; the new
        DSN, or None. Raises VaultError."""
        if now >= self._pacing.refresh_at:
            return (await self._fetch(now, "the pool asked for them")).dsn
        if lease is None:
            return None
        if now >= self._replace_at(lease):
            return (await self._replace(lease, now)).dsn
        if now >= lease.term.renew_at:
            await self._renew(lease, now)
        return None

    def _retry_later(self, lease: Lease | None, now: float, reason: str) -> None:
        """Back off after a failure with *lease* current, retrying in time for its end."""
        cap = math.inf
        if lease is not None and lease.term.final:
            left = min(lease.term.expires, lease.owner.ends or math.inf) - now
            consequence = f"keeping the current DSN; its lease ends in {left:.0f}s"
            if left > 0:  # several more tries before the end, whatever the backoff
                cap = left / 4
        else:
            consequence = "keeping the current DSN"
        delay = self._pacing.failed(now, reason, consequence, cap=cap)
        if lease is not None and not lease.term.final:
            # A renewal that keeps failing gives up once the lease would end before the
            # pool could switch: then new credentials are due.
            end = lease.term.expires
            last_chance = end - margin(lease.term, self._opts.rotate_before, end)
            if now + delay >= last_chance:
                lease.term = lease.term.finalized()
                self._pacing.retry_at = max(now, min(self._pacing.retry_at, last_chance))
            else:
                lease.term = lease.term.retry_renewal(now + delay)

    async def close(self) -> bool:
        released, self._released = self._released, []
        if released and not self._revoke_denied:
            async with anyio.create_task_group() as tg:
                for lease in released:
                    tg.start_soon(self._revoke_quietly, lease)
        return not self._leases

    # ------------------------------------------------------------------ lease lifecycle

    def _replace_at(self, lease: Lease) -> float:
        return replace_at(lease.term, self._opts.rotate_before, ends=lease.owner.ends)

    async def _replace(self, lease: Lease, now: float) -> Lease:
        owner = lease.owner
        if (
            owner is self._auth.current
            and owner.ends is not None
            and owner.ends < (lease.term.expires)
        ):
            # The lease ends with the token that leased it: the next lease needs a new token.
            await self._auth.replace(reason="the token holding the lease ends soon")
        end = min(lease.term.expires, owner.ends or math.inf)
        return await self._fetch(now, f"lease {lease.lease_id} ends in {end - now:.0f}s")

    async def _fetch(self, now: float, why: str) -> Lease:
        path = f"{self._path.mount}/creds/{self._path.name}"
        data = await with_token(self._auth, lambda: self._client.get(path))
        # Issued no earlier than the request: a lease's end is never thought later than it is.
        lease = self._lease(data, now)
        self._pacing.read_done(now)
        self._leases[lease.dsn] = lease
        self.current = lease
        logger.info(
            "new database credentials from %s: user %r, lease %s for %.0fs (%s)",
            self._path,
            lease.username,
            lease.lease_id,
            lease.term.expires - lease.term.issued,
            why,
        )
        return lease

    def _lease(self, data: dict[str, Any], now: float) -> Lease:
        creds = data.get("data")
        lease_id = data.get("lease_id")
        if not isinstance(creds, dict) or not isinstance(lease_id, str):
            raise Unavailable(f"{self._path} returned no credentials")
        username, password = creds.get("username"), creds.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            raise Unavailable(f"{self._path} returned no username and password")
        self._auth.remember(password, password=True)
        ttl = data.get("lease_duration")
        term = Term.new(
            now,
            float(ttl) if isinstance(ttl, (int, float)) else 0.0,
            renewable=bool(data.get("renewable")),
            fraction=self._opts.renew_fraction,
        )
        assert self._opts.recipe is not None
        dsn = self._opts.recipe.dsn(username, password)
        owner = self._auth.current
        assert owner is not None
        return Lease(lease_id, username, dsn, term, owner)

    async def _renew(self, lease: Lease, now: float) -> None:
        body = {"lease_id": lease.lease_id, "increment": max(1, round(lease.term.duration))}
        try:
            data = await with_token(self._auth, lambda: self._client.post("sys/leases/renew", body))
        except VaultRejected as exc:
            # "past the max TTL": it ends as planned. "lease not found", "invalid lease":
            # revoked behind our back (its user dropped): replace it now.
            if "max ttl" not in exc.reason.lower():
                lease.term = Term.ended(now)
            else:
                lease.term = lease.term.finalized()
            logger.info("lease %s cannot be renewed: %s", lease.lease_id, exc.reason)
            return
        ttl = data.get("lease_duration")
        granted = float(ttl) if isinstance(ttl, (int, float)) else 0.0
        lease.term = lease.term.renewed(now, granted, fraction=self._opts.renew_fraction)
        self._pacing.succeeded()
        if lease.term.final:
            logger.info(
                "lease %s renewed for %.0fs, capped by its max TTL: new credentials due in %.0fs",
                lease.lease_id,
                granted,
                max(0.0, self._replace_at(lease) - now),
            )
        else:
            logger.debug("lease %s renewed for %.0fs", lease.lease_id, granted)

    # ------------------------------------------------------------------ revocation

    async def _revoke_released(self, now: float) -> None:
        pending: list[Lease] = []
        for lease in self._released:
            if lease.term.expires <= now or self._revoke_denied:
                continue  # Vault has ended it already, or will at its TTL
            try:
                await self._revoke(lease)
            except VaultDenied as exc:
                self._revoke_denied = True
                logger.warning(
                    "cannot revoke lease %s: %s; the token needs 'update' on "
                    "sys/leases/revoke. Leases no longer used will end at their TTL",
                    lease.lease_id,
                    exc.reason,
                )
            except VaultError as exc:
                pending.append(lease)
                self._revoking.failed(now, exc.reason, "retrying")
        if not pending:
            self._revoking.succeeded()
        self._released = pending

    async def _revoke(self, lease: Lease) -> None:
        body = {"lease_id": lease.lease_id}
        await with_token(self._auth, lambda: self._client.post("sys/leases/revoke", body))
        logger.info(
            "revoked lease %s (user %r): the pool no longer uses it", lease.lease_id, lease.username
        )

    async def _revoke_quietly(self, lease: Lease) -> None:
        try:
            await self._revoke(lease)
        except VaultError as exc:
            logger.warning("could not revoke lease %s at close: %s", lease.lease_id, exc.reason)
