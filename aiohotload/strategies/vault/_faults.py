"""Retry pacing and failure reporting shared by the vault strategy's parts."""

from __future__ import annotations

import logging
import random

__all__ = ["Backoff", "FailureLog"]

MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0


class Backoff:
    """Delays after consecutive failures: doubling from 1 s to 60 s, each drawn from the
    upper half (so replicas that failed together do not retry together)."""

    def __init__(self, first: float = MIN_BACKOFF, cap: float = MAX_BACKOFF) -> None:
        self.failures = 0
        self._first = first
        self._cap = cap

    def failed(self) -> float:
        """Count a failure; the seconds to wait before the next attempt."""
        self.failures += 1
        return self.nominal * random.uniform(0.5, 1.0)

    @property
    def nominal(self) -> float:
        """The delay before jitter after the failures so far."""
        if not self.failures:
            return 0.0
        return min(self._cap, self._first * 2.0 ** min(self.failures - 1, 30))

    def succeeded(self) -> None:
        self.failures = 0


class FailureLog:
    """Logs a failure at WARNING the first time, and at DEBUG while it repeats unchanged;
    INFO once it is over. One instance per kind of operation (renew, read, login...)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._last: str | None = None

    @property
    def failing(self) -> bool:
        return self._last is not None

    @property
    def trouble(self) -> str | None:
        """What fails now (safe to show), or None."""
        return None if self._last is None else f"cannot {self._what}: {self._last}"

    def failed(self, reason: str, consequence: str, retry_in: float) -> None:
        """*reason* (safe to log) and what it means, e.g. 'keeping the current DSN'."""
        level = logging.DEBUG if reason == self._last else logging.WARNING
        self._logger.log(
            level,
            "cannot %s: %s; %s; next attempt in %.1fs",
            self._what,
            reason,
            consequence,
            retry_in,
        )
        self._last = reason

    def recovered(self) -> None:
        if self._last is not None:
            self._logger.info("can %s again", self._what)
            self._last = None
