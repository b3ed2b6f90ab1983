"""Feedback: what a pool tells the strategy that feeds it. Optional for strategies.

A strategy hears from its pool by declaring a keyword-only ``feedback`` parameter in
``watch``; one that does not is called as before, ``watch(path, options)``::

    async def watch(self, path, options, *, feedback: Feedback) -> AsyncIterator[str]:
        yield await read()
        while True:
            news = await feedback.wait(interval)  # sleeps, or returns early with news
            for dsn in news.released:
                await revoke(dsn)                  # e.g. a lease nobody uses any more
            value = await read()                   # on news.refresh, or at the interval
            ...

The news comes in two kinds:

- ``refresh``: look again *now* rather than at the next poll. The pool asks when the server
  refuses a login with the DSN in use (a password rotated on the server before the new secret
  was published). The pool bounds how often it asks (one request pending at a time, with a
  growing pause between requests), so a strategy may act on each one.
- ``released``: DSNs this watch yielded that no generation of the pool uses any more: drained
  after a swap, failed to open, superseded before opening, or the pool closed. Each DSN is
  released once per time it went from unused to used; a strategy holding a resource per DSN
  (a Vault lease) frees it then. At close, every DSN is released before the watch is closed,
  and :meth:`Feedback.take` in the strategy's ``finally`` collects what is still pending.

The strategy may also tell the pool about trouble it works around (:meth:`Feedback.trouble`:
its source cannot be read for now, so it keeps the DSN it has): the pool shows it as its
``last_error`` until the strategy clears it, so health checks and the
``hotload_reload_failing`` alert see it.

Released DSNs carry passwords: never log them (:func:`aiohotload.redact_dsn` does).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Feedback", "News", "wants_feedback"]


@dataclass(frozen=True)
class News:
    """What the pool said since the strategy last looked; false when it said nothing."""

    refresh: bool = False
    """Look at the source again now."""
    released: tuple[str, ...] = field(default=(), repr=False)
    """DSNs no longer in use, oldest first (hidden from ``repr``: they hold passwords)."""

    def __bool__(self) -> bool:
        return self.refresh or bool(self.released)

    def __repr__(self) -> str:
        return f"News(refresh={self.refresh!r}, released=<{len(self.released)} DSN(s)>)"


class Feedback:
    """The channel from one pool to the strategy watch feeding it.

    The strategy calls :meth:`wait` or :meth:`take`; the pool calls :meth:`request_refresh`
    and :meth:`release`. Both sides run on the same event loop.
    """

    __slots__ = ("_refresh", "_released", "_trouble", "_wake", "on_trouble")

    def __init__(self) -> None:
        self._refresh = False
        self._released: list[str] = []
        self._wake = asyncio.Event()
        self._trouble: str | None = None
        self.on_trouble: Callable[[str | None], None] = lambda reason: None
        """Called by :meth:`trouble` when the strategy's trouble changes (the pool's side)."""

    # ------------------------------------------------------------------ the strategy's side

    def take(self) -> News:
        """The news pending now (possibly none), and forget it."""
        news = News(self._refresh, tuple(self._released))
        self._refresh = False
        self._released.clear()
        self._wake.clear()
        return news

    def trouble(self, reason: str | None) -> None:
        """Report what keeps the strategy from reading its source now, or None once it can
        again. *reason* must be safe to show: no secret, no DSN."""
        if reason != self._trouble:
            self._trouble = reason
            self.on_trouble(reason)

    async def wait(self, timeout: float | None = None) -> News:
        """Wait up to *timeout* seconds (None: no limit) for news and return it; an empty
        :class:`News` when the time ran out first."""
        if not self._wake.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                return News()
        return self.take()

    # ------------------------------------------------------------------ the pool's side

    def request_refresh(self) -> None:
        """Ask the strategy to look at its source again now."""
        self._refresh = True
        self._wake.set()

    def release(self, dsn: str) -> None:
        """Tell the strategy that *dsn* is no longer in use."""
        self._released.append(dsn)
        self._wake.set()

    @property
    def pending(self) -> bool:
        """Whether news waits to be taken (the pool uses it to keep one refresh in flight)."""
        return self._wake.is_set()

    def __repr__(self) -> str:
        return f"<Feedback pending={News(self._refresh, tuple(self._released))!r}>"


def wants_feedback(watch: object) -> bool:
    """Whether a strategy's ``watch`` (or async generator function) takes ``feedback``."""
    try:
        parameters = inspect.signature(watch).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    parameter = parameters.get("feedback")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
