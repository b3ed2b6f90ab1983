"""Reloader: follows the DSN source of a hotload URL and puts each new DSN in use.

It is what :class:`~aiohotload.HotPool` and the SQLAlchemy engine share: it runs the strategy
(restarting it with backoff if it fails), ignores repeated DSNs, opens each new DSN through
its owner's *open* callback (bounded by ``connect_timeout``, abandoned if a newer DSN
arrives), retries a failure with backoff, keeps :attr:`Reloader.last_error`, emits
:class:`~aiohotload.ReloadStarted` and :class:`~aiohotload.ReloadFailed`, logs each step
with passwords redacted, and finally hands what opened to its owner's *swap*. What a swap
does (generations, drains) is the owner's business.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

import anyio

from .errors import DriverError, HotloadError, StrategyError
from .events import Event, ForceKillDone, PoolDrained, ReloadFailed, ReloadStarted
from .redact import describe_error, redact_dsn, redact_text
from .strategies import Feedback, Strategy, get_strategy, open_watch, takes_feedback
from .url import HotloadURL

__all__ = ["Reloader", "Serving", "report_drain"]

logger = logging.getLogger("aiohotload")

T = TypeVar("T")

# Retry delays after a failed reload: doubling from the first, capped, with jitter.
_RETRY_FIRST = 0.25
_RETRY_MAX = 15.0
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


class Reloader(Generic[T]):
    """Runs a hotload URL's strategy and puts each new DSN in use through its owner.

    *open(dsn)* opens what a swap needs (a pool, a validated connection); *close(opened)*
    disposes of one that opened too late to be used; *swap(dsn, opened, seconds)* puts it in
    use; *serving()* is what the owner serves now (None before the first DSN is in use and
    once closing: no swap then); *emit* delivers events. *action* completes "could not ..."
    in errors (``"open a pool on"``).

    The owner runs :meth:`run` in its task group, awaits :meth:`first` for the initial DSN,
    calls :meth:`started` once it serves it, and :meth:`stop` to end.
    """

    def __init__(
        self,
        url: HotloadURL,
        *,
        name: str,
        open: Callable[[str], Awaitable[T]],
        close: Callable[[T], object],
        swap: Callable[[str, T, float], None],
        serving: Callable[[], Serving | None],
        emit: Callable[[Event], None],
        action: str = "open a pool on",
    ) -> None:
        self._url = url
        self._strategy: Strategy = get_strategy(url.strategy)
        self._name = name
        self._open = open
        self._close = close
        self._swap = swap
        self._serving = serving
        self._emit = emit
        self._action = action
        self.last_error: HotloadError | None = None
        """Why the newest DSN is not in use yet (redacted), or None if it is."""
        self._wanted: str | None = None  # newest DSN from the strategy
        self._wake = asyncio.Event()
        self._first: asyncio.Future[str] | None = None
        self._scope: anyio.CancelScope | None = None
        self._reload_scope: anyio.CancelScope | None = None
        self._stopped = False
        self._closed = False
        # What the strategy hears from us, if it listens (see strategies.feedback).
        self._feedback = Feedback() if takes_feedback(self._strategy) else None
        # DSNs in use, with how many generations use each (the strategy hears when one is
        # no longer used).
        self._in_use: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ the owner's calls

    async def run(self) -> None:
        """Watch and reload until :meth:`stop`; meant for the owner's task group."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self._closed:
                scope.cancel()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                tg.start_soon(self._reload_loop)

    async def _reload_loop(self) -> None:
        with anyio.CancelScope() as scope:
            self._reload_scope = scope
            if self._stopped:
                scope.cancel()
            await self._reloads()

    async def first(self) -> tuple[str, T, float]:
        """The strategy's first DSN (awaited at most ``connect_timeout``), opened: ``(dsn,
        opened, seconds to open)``. Raises what the strategy or the open raised, redacted."""
        first = self._first_future()
        try:
            with anyio.fail_after(self._url.connect_timeout):
                dsn = await asyncio.shield(first)
        except TimeoutError:
            raise StrategyError(
                f"strategy {self._url.strategy!r} gave no DSN for {self._url.path!r} "
                f"within {self._url.connect_timeout:g}s (connect_timeout)"
            ) from None
        opened, opened_in = await self.open(dsn)
        return dsn, opened, opened_in

    def started(self, dsn: str) -> None:
        """The owner serves *dsn*, its first DSN: reload at once if the strategy offered
        another one while it was opening."""
        self._in_use[dsn] += 1
        if self._wanted != dsn:
            self._wake.set()

    def done_with(self, dsn: str) -> None:
        """A generation that used *dsn* is gone (drained, killed, closed)."""
        self._in_use[dsn] -= 1
        self._release_if_unused(dsn)

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

    def _release_if_unused(self, dsn: str) -> None:
        if self._in_use[dsn] > 0 or dsn == self._wanted:
            return
        del self._in_use[dsn]
        if self._feedback is not None:
            self._feedback.release(dsn)

    async def open(self, dsn: str) -> tuple[T, float]:
        """Open *dsn* through the owner, bounded by ``connect_timeout``, with errors redacted;
        returns what opened and how long it took."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(self._url.connect_timeout):
                opened = await self._open(dsn)
        except TimeoutError:
            raise DriverError(
                f"could not {self._action} {redact_dsn(dsn)} within "
                f"{self._url.connect_timeout:g}s (connect_timeout)"
            ) from None
        except HotloadError:
            raise
        except Exception as exc:
            raise _reload_error(exc, dsn, self._action) from None
        return opened, time.perf_counter() - started

    # ------------------------------------------------------------------ background work

    def _first_future(self) -> asyncio.Future[str]:
        if self._first is None:
            self._first = asyncio.get_running_loop().create_future()
        return self._first

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
                        # Shielded so the strategy can release its watcher even when cancelled.
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
                    f"strategy {self._url.strategy!r} failed: {_describe(exc, ())}"
                )
                logger.warning(
                    "strategy %r failed (attempt %d): %s; restarting in %.1fs",
                    self._url.strategy,
                    failures,
                    _describe(exc, ()),
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
            if previous is not None:
                self._release_if_unused(previous)
            self._wake.set()

    async def _reloads(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            failures = 0
            while (dsn := self._wanted) is not None and (current := self._serving()) is not None:
                if dsn == current.dsn:
                    self.last_error = None
                    break
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
                    delay = _retry_delay(failures)
                    error = _reload_error(exc, dsn, self._action)
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
                        "reload failed (attempt %d): %s; still serving generation %d (%s); "
                        "retrying in %.1fs",
                        failures,
                        error,
                        current.number,
                        current.target,
                        delay,
                    )
                    with anyio.move_on_after(delay):
                        await self._wake.wait()
                    if self._wake.is_set():
                        self._wake.clear()
                        if self._wanted != dsn:
                            failures = 0
                    continue
                if opened is None:
                    continue  # a newer DSN arrived while opening; go again with it
                if self._serving() is None:  # the owner closed while it opened
                    self._close(opened[0])
                    break
                self.last_error = None
                self._in_use[dsn] += 1
                self._swap(dsn, *opened)
                break

    async def _open_unless_superseded(self, dsn: str) -> tuple[T, float] | None:
        """Open *dsn*, or return None if a different DSN arrives meanwhile."""
        opening = asyncio.ensure_future(self.open(dsn))
        while True:
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({opening, waker}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                waker.cancel()
                await _cancel_and_close(opening, self._close)
                raise
            waker.cancel()
            if opening.done():
                return opening.result()
            self._wake.clear()
            if self._wanted != dsn:
                logger.info("reload to %s superseded by a newer DSN", redact_dsn(dsn))
                await _cancel_and_close(opening, self._close)
                return None


def _retry_delay(failures: int) -> float:
    base = min(_RETRY_MAX, _RETRY_FIRST * 2.0 ** min(failures - 1, 16))
    return base * random.uniform(0.8, 1.2)


def _describe(exc: BaseException, secrets: Sequence[str]) -> str:
    message = str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return redact_text(text, list(secrets))


def _reload_error(exc: BaseException, dsn: str, action: str) -> HotloadError:
    if isinstance(exc, HotloadError):
        return exc
    return DriverError(f"could not {action} {redact_dsn(dsn)}: {describe_error(exc, dsn)}")


async def _cancel_and_close(
    opening: asyncio.Future[tuple[T, float]], close: Callable[[T], object]
) -> None:
    """Stop an attempt to open; close what it opened if it opened anyway."""
    if not opening.done():
        opening.cancel()
    with anyio.CancelScope(shield=True):
        results = await asyncio.gather(opening, return_exceptions=True)
    result = results[0]
    if isinstance(result, tuple):
        close(result[0])


def report_drain(
    emit: Callable[[Event], None],
    name: str,
    old: Serving,
    *,
    force: bool,
    seconds: float,
    terminated: int,
    timed_out: float | None,
) -> None:
    """Log how the retired generation *old* ended and emit :class:`~aiohotload.ForceKillDone`
    or :class:`~aiohotload.PoolDrained`: the end of every drain, HotPool's and the engine's.

    timed_out: the ``drain_timeout`` if the drain ran into it (its *terminated* connections
    were still in use), else None.
    """
    if timed_out is not None:
        logger.warning(
            "generation %d (%s) did not drain within %gs: terminated %d connection(s) still in use",
            old.number,
            old.target,
            timed_out,
            terminated,
        )
    logger.info(
        "generation %d (%s) %s in %.0f ms",
        old.number,
        old.target,
        "terminated" if force else "drained",
        seconds * 1000,
    )
    if force:
        emit(ForceKillDone(name, generation=old.number, target=old.target, cancelled=terminated))
    else:
        emit(
            PoolDrained(
                name,
                generation=old.number,
                target=old.target,
                seconds=seconds,
                terminated=terminated,
            )
        )
