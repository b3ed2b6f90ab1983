"""Retry pacing and failure reporting shared by the vault strategy's parts."""

from __future__ import annotations

import logging
import math

from ..toolkit import Backoff

__all__ = ["BACKOFF", "FailureLog", "Retries"]

MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0
#: Delays after failures in a row: doubling from 1 s to 60 s, each drawn from the upper half
#: (so replicas that failed together do not retry together, and no delay is longer than its
#: nominal value: the retries before a lease ends are counted on that).
BACKOFF = Backoff(first=MIN_BACKOFF, maximum=MAX_BACKOFF, jitter=0.5, below=True)


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


class Retries:
    """One kind of operation retried after failures: when it may run again
    (:attr:`retry_at`, monotonic seconds; 0 when not failing), on :data:`BACKOFF`, each
    failure logged once (:class:`FailureLog`)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.retry_at = 0.0
        self.failures = 0  # in a row
        self._log = FailureLog(logger, what)

    @property
    def trouble(self) -> str | None:
        """What fails now (safe to show), or None."""
        return self._log.trouble

    def failed(self, now: float, reason: str, consequence: str, *, cap: float = math.inf) -> float:
        """Log a failure at *now* and set :attr:`retry_at`, at most *cap* seconds away (but
        at least :data:`MIN_BACKOFF`); the delay."""
        self.failures += 1
        delay = min(BACKOFF.delay(self.failures), max(MIN_BACKOFF, cap))
        self.retry_at = now + delay
        self._log.failed(reason, consequence, delay)
        return delay

    def succeeded(self) -> None:
        """It worked: no more backoff."""
        self.failures = 0
        self.retry_at = 0.0
        self._log.recovered()
