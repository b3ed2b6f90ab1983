"""When to renew and when to replace: the timing of leases and tokens, kept free of I/O.

Times are ``time.monotonic()`` seconds. A lease (or token) is renewed at a fraction of its TTL
(Vault's own clients use 2/3), with jitter. Once no renewal can extend it (Vault capped the
TTL at ``max_ttl``, it is not renewable, or a renewal failed until too late), it is *final*:
its replacement is due ``margin`` seconds before it ends, so that the pool has opened the new
credentials and drained the old ones by then.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._auth import Token

__all__ = ["Lease", "Term", "margin", "replace_at"]

# Renewals are spread over +-10% of the nominal time, so replicas do not renew in lockstep.
_JITTER = 0.1
# A renewal is never scheduled later than this fraction of the TTL.
_LATEST = 0.95


@dataclass(frozen=True)
class Term:
    """The life of a lease or token as Vault last granted it."""

    issued: float  # when it was issued (or first seen)
    duration: float  # what a full renewal grants: the TTL at issue (0: never expires)
    expires: float  # when it ends as last granted (inf: never)
    renew_at: float  # when to renew it next (inf: never)
    final: bool  # no renewal can extend it any more

    @classmethod
    def new(
        cls, now: float, ttl: float, *, renewable: bool, fraction: float, duration: float = 0.0
    ) -> Term:
        """A term of *ttl* seconds from *now* (*duration*: its full TTL, if *ttl* is what is
        left of it)."""
        if ttl <= 0:
            return cls(now, 0.0, math.inf, math.inf, final=True)
        return cls(
            issued=now,
            duration=max(duration, ttl),
            expires=now + ttl,
            renew_at=_renew_at(now, ttl, fraction) if renewable else math.inf,
            final=not renewable,
        )

    @classmethod
    def ended(cls, now: float) -> Term:
        """A term that ended at *now* (revoked)."""
        return cls(now, 0.0, now, math.inf, final=True)

    def renewed(self, now: float, ttl: float, *, fraction: float) -> Term:
        """The term after a renewal at *now* that granted *ttl* seconds."""
        expires = now + ttl
        # Capped: Vault granted less than a full TTL (max_ttl is near), or nothing more.
        final = ttl < self.duration or expires <= self.expires
        return replace(
            self,
            expires=max(expires, self.expires) if final else expires,
            renew_at=math.inf if final else _renew_at(now, ttl, fraction),
            final=final,
        )

    def finalized(self) -> Term:
        """The same term, known to be unextendable (a renewal failed for good)."""
        return replace(self, renew_at=math.inf, final=True)

    def retry_renewal(self, at: float) -> Term:
        """Renew again at *at* (after a failure), unless it is final."""
        return self if self.final else replace(self, renew_at=at)


def margin(term: Term, rotate_before: float, end: float) -> float:
    """How long before *end* a replacement for *term* is due: *rotate_before*, at most half
    the whole life from issue to *end* (else short leases would be replaced as soon as they
    were issued, and a replacement leased under a token about to end, at once again)."""
    return min(rotate_before, (end - term.issued) / 2)


def replace_at(term: Term, rotate_before: float, *, ends: float | None = None) -> float:
    """When to replace what *term* describes: never while it can still be renewed; else
    :func:`margin` before it ends (or before *ends*, if something ends it earlier)."""
    end = term.expires if ends is None else min(ends, term.expires)
    if not math.isfinite(end) or (not term.final and end == term.expires):
        return math.inf
    return end - margin(term, rotate_before, end)


@dataclass(eq=False)
class Lease:
    """A database credential lease, and the DSN built from it."""

    lease_id: str
    username: str
    dsn: str = field(repr=False)
    term: Term
    owner: Token  # the token that leased it: Vault revokes the lease when the token ends


def _renew_at(now: float, ttl: float, fraction: float) -> float:
    delay = ttl * fraction * random.uniform(1 - _JITTER, 1 + _JITTER)
    return now + min(delay, ttl * _LATEST)
