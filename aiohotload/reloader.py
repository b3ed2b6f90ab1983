"""Reloader: follows the DSN source of a hotload URL and puts each new DSN in use.

It runs the strategy (restarting it with backoff if it fails), ignores repeated DSNs, opens
each new DSN through its owner (bounded by ``connect_timeout``, abandoned if a newer DSN
arrives), retries a failure with backoff, keeps :attr:`Reloader.last_error`, emits
:class:`~aiohotload.ReloadStarted` and :class:`~aiohotload.ReloadFailed`, logs each step
with passwords redacted, and finally hands what opened to its owner's ``swap``. It also
carries the strategy's feedback (see :mod:`aiohotload.strategies.feedback`): refresh requests
and the DSNs no longer in use. What a swap does (generations, drains) is the owner's business:
the owner is the generation lifecycle (``_lifecycle.py``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import anyio

from .errors import DriverError, HotloadError, StrategyError
from .events import Event, ReloadFailed, ReloadStarted
from .redact import (
    describe_error,
    error_text,
    redact_dsn,
    redact_text,
    redacted_error,
    shows_secret,
)
from .strategies import Feedback, get_strategy, open_watch, takes_feedback
from .strategies.toolkit import Backoff
from .url import HotloadURL

__all__ = ["Owner", "Reloader", "Serving", "opening_error"]

logger = logging.getLogger("aiohotload")

T = TypeVar("T")

# Retry delays after a failed reload: doubling from the first, capped, with jitter.
_RETRY = Backoff(first=0.25, maximum=15.0, jitter=0.2)
# Refresh requests to the strategy (a login was refused): at most one pending, and a pause
# doubling from the first to the cap while they bring nothing new.
_REFRESH = Backoff(first=1.0, maximum=60.0, jitter=0.0)
# Bound on letting a strategy release its resources when it is stopped.
_ACLOSE_TIMEOUT = 5.0


class Serving(Protocol):
    """What the owner serves now, as the reloader needs to know it."""

    @property
    def number(self) -> int:
        """The generation."""
        ...

    @property
    def dsn(self) -> str:
        """Its DSN (a new DSN equal to it needs no reload)."""
        ...

    @property
    def target(self) -> str:
        """Its DSN, password redacted (for events and logs)."""
        ...


class Owner(Protocol[T]):
    """What the reloader puts DSNs in use through."""

    async def open(self, dsn: str) -> T:
        """Open what serving *dsn* needs, proven to work (raises if it does not)."""
        ...

    def discard(self, opened: T) -> None:
        """Dispose of something opened too late to be used."""
        ...

    def swap(self, opened: T, seconds: float, reason: str) -> None:
        """Put *opened* in use (it took *seconds* to open)."""
        ...

    def serving(self) -> Serving | None:
        """What is served now; None before the first DSN is in use and once closing."""
        ...


class Reloader(Generic[T]):
    """Runs a hotload URL's strategy and puts each new DSN in use through its *owner*.

    The owner runs :meth:`run` in its task group, awaits :meth:`first` for the initial DSN,
    calls :meth:`started` once it serves it, :meth:`done_with` when a generation ends,
    :meth:`stop` when it starts closing and :meth:`close` at the very end. *action* completes
    "could not ..." in errors (``"open a pool on"``).
    """

    def __init__(
        self,
        url: HotloadURL,
        *,
        name: str,
        owner: Owner[T],
        emit: Callable[[Event], None],
        action: str = "open a pool on",
    ) -> None:
        self._url = url
        self._strategy = get_strategy(url.strategy)
        self._name = name
        self._owner = owner
        self._emit = emit
        self._action = action
        self.last_error: HotloadError | None = None
        """Why the newest DSN is not in use yet (redacted), or None if it is."""
        self._wanted: str | None = None  # newest DSN from the strategy
        self._reopen: str | None = None  # open the DSN in use again, for this reason
        self._wake = asyncio.Event()
        self._first: asyncio.Future[str] | None = None
        self._scope: anyio.CancelScope | None = None
        self._reload_scope: anyio.CancelScope | None = None
        self._stopped = False
        self._closed = False
        # What the strategy hears from us, if it listens (see strategies.feedback).
        self._feedback = Feedback() if takes_feedback(self._strategy) else None
        if self._feedback is not None:
            self._feedback.on_trouble = self._strategy_trouble
        self._trouble: StrategyError | None = None  # what the strategy reported, if any
        self._refreshes = 0  # refresh requests since the strategy last brought a new DSN
        self._next_refresh = 0.0
        self._refreshed = False  # a refresh was requested since the last new DSN
        self._found_by_refresh = False  # the newest DSN came after a refresh request
        # DSNs in use, with how many generations use each: the strategy hears when one is
        # no longer used.
        self._in_use: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ the owner's calls

    async def run(self) -> None:
        """Watch and reload until :meth:`close`; meant for the owner's task group."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self._closed:
                scope.cancel()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                tg.start_soon(self._reload_loop)

    async def first(self) -> tuple[str, T, float]:
        """The strategy's first DSN (awaited at most ``connect_timeout``), opened: ``(dsn,
        opened, seconds to open)``.

        Raises what the strategy raised, or what opening raised as the driver raised it
        (``asyncpg.InvalidPasswordError``, ...) unless its text would reveal a secret.
        """
        first = self._first_future()
        try:
            with anyio.fail_after(self._url.connect_timeout):
                dsn = await asyncio.shield(first)
        except TimeoutError:
            raise StrategyError(
                f"strategy {self._url.strategy!r} gave no DSN for {self._url.path!r} "
                f"within {self._url.connect_timeout:g}s (connect_timeout)"
            ) from None
        try:
            opened, opened_in = await self._open(dsn)
        except Exception as exc:
            self.last_error = opening_error(exc, dsn, self._action)
            error = _as_raised(exc, dsn, self.last_error)
        else:
            return dsn, opened, opened_in
        # Raised out of the except block: a redacted copy must not carry the original (its
        # __context__), which still shows the password.
        raise error from None

    def started(self, dsn: str) -> None:
        """The owner serves *dsn*, its first DSN: reload at once if the strategy offered
        another one while it was opening."""
        self._in_use[dsn] += 1
        self.last_error = None
        if self._wanted != dsn:
            self._wake.set()

    def done_with(self, dsn: str) -> None:
        """A generation that used *dsn* is gone (drained, killed, closed)."""
        self._in_use[dsn] -= 1
        self._release_if_unused(dsn)

    def request_refresh(self) -> bool:
        """Ask the strategy to look at its source again now (a login was refused).

        At most one request is pending, and while requests bring nothing new they are spaced
        by a pause doubling from 1 s to 60 s, so a wrong password cannot turn into a storm of
        reads of the source. Returns whether a request was made.
        """
        feedback = self._feedback
        if feedback is None or self._stopped or feedback.pending:
            return False
        now = time.monotonic()
        if now < self._next_refresh:
            return False
        self._refreshes += 1
        self._next_refresh = now + _REFRESH.delay(self._refreshes)
        self._refreshed = True
        logger.info("asking strategy %r to look again now", self._url.strategy)
        feedback.request_refresh()
        return True

    def reopen(self, reason: str) -> bool:
        """Open the DSN in use again and swap to it (a failover: the same name now leads to
        another server). While one such reopen is pending (opening, or waiting to retry after
        a failure) more requests change nothing: the retries keep their own pace. Returns
        whether a reopen was started."""
        if self._stopped or self._reopen is not None:
            return False
        self._reopen = reason
        self._wake.set()
        return True

    def stop(self) -> None:
        """Stop reloading; an open in progress is abandoned. The strategy keeps running, to
        hear about the DSNs released until :meth:`close`. Idempotent."""
        self._stopped = True
        if self._first is not None and self._first.done() and not self._first.cancelled():
            self._first.exception()  # mark retrieved
        if self._reload_scope is not None:
            self._reload_scope.cancel()
        wanted, self._wanted = self._wanted, None
        if wanted is not None:
            self._release_if_unused(wanted)

    def close(self) -> None:
        """Stop reloading and watching: the strategy is closed. Idempotent."""
        self.stop()
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    # ------------------------------------------------------------------ background work

    def _first_future(self) -> asyncio.Future[str]:
        if self._first is None:
            self._first = asyncio.get_running_loop().create_future()
        return self._first

    def _strategy_trouble(self, reason: str | None) -> None:
        """The strategy keeps its DSN but cannot read its source: show it as last_error."""
        if reason is not None:
            self._trouble = StrategyError(f"strategy {self._url.strategy!r}: {reason}")
            self.last_error = self._trouble
        elif self.last_error is self._trouble:
            self.last_error = self._trouble = None

    def _release_if_unused(self, dsn: str) -> None:
        if self._in_use[dsn] > 0 or dsn == self._wanted:
            return
        del self._in_use[dsn]
        if self._feedback is not None:
            self._feedback.release(dsn)

    async def _watch(self) -> None:
        """Run the strategy; restart it with backoff if it fails after the first value."""
        first = self._first_future()
        failures = 0
        while True:
            try:
                iterator = open_watch(
                    self._strategy, self._url.path, self._url.options, self._feedback
                )
                try:
                    async for dsn in iterator:
                        if failures and isinstance(self.last_error, StrategyError):
                            self.last_error = None  # the restarted strategy works again
                        failures = 0
                        self._offer(dsn)
                finally:
                    aclose = getattr(iterator, "aclose", None)
                    if aclose is not None:
                        # Shielded so the strategy can release its resources even when
                        # cancelled.
                        with anyio.move_on_after(_ACLOSE_TIMEOUT, shield=True):
                            await aclose()
                if not first.done():
                    first.set_exception(
                        StrategyError(f"strategy {self._url.strategy!r} ended without a DSN")
                    )
                logger.debug("strategy %r finished; keeping the current DSN", self._url.strategy)
                return
            except Exception as exc:
                if not first.done():
                    first.set_exception(exc)
                    return
                failures += 1
                delay = _retry_delay(failures)
                self.last_error = StrategyError(
                    f"strategy {self._url.strategy!r} failed: {_describe(exc, '')}"
                )
                logger.warning(
                    "strategy %r failed (attempt %d): %s; restarting in %.1fs",
                    self._url.strategy,
                    failures,
                    _describe(exc, ""),
                    delay,
                )
                await anyio.sleep(delay)

    def _offer(self, dsn: str) -> None:
        dsn = dsn.strip()
        if not dsn:
            return
        first = self._first_future()
        if not first.done():
            self._wanted = dsn
            first.set_result(dsn)
            return
        if self._stopped:  # closing: nothing will use it
            if self._feedback is not None and self._in_use[dsn] == 0:
                self._feedback.release(dsn)
            return
        if dsn != self._wanted:
            logger.debug("strategy offered a new DSN: %s", redact_dsn(dsn))
            previous, self._wanted = self._wanted, dsn
            self._refreshes = 0  # the source moved: refresh requests may come at once again
            self._next_refresh = 0.0
            self._found_by_refresh, self._refreshed = self._refreshed, False
            if previous is not None:
                self._release_if_unused(previous)
            self._wake.set()

    async def _reload_loop(self) -> None:
        with anyio.CancelScope() as scope:
            self._reload_scope = scope
            if self._stopped:
                scope.cancel()
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._reload()

    async def _reload(self) -> None:
        """Put the newest DSN in use, retrying until it works or a newer one arrives."""
        failures = 0
        tried: str | None = None
        while (dsn := self._wanted) is not None and (current := self._owner.serving()) is not None:
            if dsn != tried:  # a newer DSN: its attempts count from one
                failures, tried = 0, dsn
            reason = self._reopen
            if dsn == current.dsn and reason is None:
                self.last_error = None
                return
            if dsn != current.dsn or reason is None:
                reason = "refresh" if self._found_by_refresh else "changed"
            self._emit(
                ReloadStarted(
                    self._name,
                    target=redact_dsn(dsn),
                    attempt=failures + 1,
                    generation=current.number,
                )
            )
            try:
                opened = await self._open_unless_superseded(dsn)
            except Exception as exc:
                failures += 1
                await self._failed(exc, dsn, current, failures)
                continue
            if opened is None:
                continue  # a newer DSN arrived while opening; go again with it
            if self._owner.serving() is None:  # the owner closed while it opened
                self._owner.discard(opened[0])
                return
            self.last_error = None
            self._reopen = None
            self._in_use[dsn] += 1
            self._owner.swap(opened[0], opened[1], reason)
            return

    async def _failed(self, exc: Exception, dsn: str, current: Serving, failures: int) -> None:
        """Report a failed attempt and wait before the next (a newer DSN ends the wait)."""
        delay = _retry_delay(failures)
        error = opening_error(exc, dsn, self._action)
        self.last_error = error
        self._emit(
            ReloadFailed(
                self._name,
                target=redact_dsn(dsn),
                error=str(error),
                attempt=failures,
                retry_in=delay,
                generation=current.number,
            )
        )
        logger.warning(
            "reload failed (attempt %d): %s; still serving generation %d (%s); retrying in %.1fs",
            failures,
            error,
            current.number,
            current.target,
            delay,
        )
        with anyio.move_on_after(delay):
            await self._wake.wait()
        self._wake.clear()

    async def _open(self, dsn: str) -> tuple[T, float]:
        """Open *dsn* through the owner, bounded by ``connect_timeout``; returns what opened
        and how long it took."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(self._url.connect_timeout):
                opened = await self._owner.open(dsn)
        except TimeoutError:
            raise DriverError(
                f"could not {self._action} {redact_dsn(dsn)} within "
                f"{self._url.connect_timeout:g}s (connect_timeout)"
            ) from None
        return opened, time.perf_counter() - started

    async def _open_unless_superseded(self, dsn: str) -> tuple[T, float] | None:
        """Open *dsn*, or return None if a different DSN arrives meanwhile."""
        opening = asyncio.ensure_future(self._open(dsn))
        while True:
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({opening, waker}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                waker.cancel()
                await self._cancel_and_discard(opening)
                raise
            waker.cancel()
            if opening.done():
                return opening.result()
            self._wake.clear()
            if self._wanted != dsn:
                logger.info("reload to %s superseded by a newer DSN", redact_dsn(dsn))
                await self._cancel_and_discard(opening)
                return None

    async def _cancel_and_discard(self, opening: asyncio.Future[tuple[T, float]]) -> None:
        """Stop an attempt to open; discard what it opened if it opened anyway."""
        if not opening.done():
            opening.cancel()
        with anyio.CancelScope(shield=True):
            results = await asyncio.gather(opening, return_exceptions=True)
        result = results[0]
        if isinstance(result, tuple):
            self._owner.discard(result[0])


def _retry_delay(failures: int) -> float:
    return _RETRY.delay(failures)


def _describe(exc: BaseException, dsn: str) -> str:
    """*exc* as text safe to show: no piece of *dsn*'s password (see
    :func:`~aiohotload.describe_error`), or of anything shaped like a password."""
    if dsn:
        return describe_error(exc, dsn)
    return redact_text(error_text(exc))


def opening_error(exc: BaseException, dsn: str, action: str) -> HotloadError:
    """What failed opening *dsn* as a :class:`HotloadError` whose text is safe to show."""
    if isinstance(exc, HotloadError):
        return exc
    return DriverError(f"could not {action} {redact_dsn(dsn)}: {_describe(exc, dsn)}")


def _as_raised(exc: Exception, dsn: str, safe: HotloadError) -> Exception:
    """The error to raise from a first open, of *exc*'s class so that ``except
    asyncpg.InvalidPasswordError`` works as with asyncpg: *exc* itself when its text reveals
    nothing of *dsn*'s password, else a redacted copy of it (a user name that shares a few
    characters with the password is enough), else *safe*."""
    if isinstance(exc, HotloadError) or not shows_secret(exc, dsn):
        return exc
    clone = redacted_error(exc, dsn)
    return clone if clone is not None and not shows_secret(clone, dsn) else safe
