"""The ``connect=`` callback of each inner asyncpg pool: what the pool needs to know about the
connections it opens, and the means to stop opening them.

- It can be *stopped* (the generation is retired): attempts in progress are abandoned and new
  ones refused at once. Terminating an asyncpg pool closes the connections it has, not those
  it is opening: a caller waiting for a new connection to an old server that stopped answering
  would wait for asyncpg's connect timeout (60 s), long after the swap.
- It reports a login the server refused (wrong password, unknown role), so the pool can ask
  its strategy to look again; and after a refusal it refuses new logins itself for a while
  (1 s, doubling to 60 s while the server keeps refusing), raising the server's last answer,
  so that a wrong password under load cannot turn into a storm of failed logins that locks
  the account where the server counts them (LDAP, PAM). One login at a time gets through to
  learn whether the password works again.
- It gives each connection a deadline when the pool has a ``max_lifetime``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from .strategies.toolkit import Backoff

__all__ = ["Connector", "abandon", "refused_login"]

# SQLSTATEs of a login the server refused: invalid_authorization_specification (also an
# unknown role) and invalid_password.
_REFUSED = frozenset({"28000", "28P01"})
# How long logins are refused here after the server refused one, by refusals in a row.
_REFUSED_PAUSE = Backoff(first=1.0, maximum=60.0, jitter=0.1)


def refused_login(exc: BaseException) -> bool:
    """Whether *exc* is the server refusing a login (not a network or server failure)."""
    return getattr(exc, "sqlstate", None) in _REFUSED


class Connector:
    """``connect=`` for one inner pool: *connect* (``asyncpg.connect`` or the user's own),
    until :meth:`stop`. *on_refused* is called when the server refuses a login,
    *on_not_writable* when asyncpg finds the server does not take writes
    (``target_session_attrs=read-write``: a standby, a demoted primary)."""

    __slots__ = (
        "_connect",
        "_lifetime",
        "_on_not_writable",
        "_on_refused",
        "_refusals",
        "_refused",
        "_retry_at",
        "_stop",
        "_stopped",
        "lifetimes",
        "made",
    )

    def __init__(
        self,
        connect: Callable[..., Awaitable[asyncpg.Connection]],
        on_refused: Callable[[], None],
        lifetime: tuple[float, float] | None = None,
        on_not_writable: Callable[[], None] = lambda: None,
    ) -> None:
        self._connect = connect
        self._on_refused = on_refused
        self._on_not_writable = on_not_writable
        self._lifetime = lifetime  # (max_lifetime, jitter fraction)
        self._stopped = False
        self._stop: asyncio.Future[None] | None = None  # made on first use, in the loop
        self._refused: BaseException | None = None  # the server's last refusal, if any
        self._refusals = 0  # in a row
        self._retry_at = 0.0  # loop.time() before which logins are refused here
        self.lifetimes: weakref.WeakKeyDictionary[asyncpg.Connection, tuple[float, float]] = (
            weakref.WeakKeyDictionary()
        )
        """When each connection was opened and when its lifetime ends (``loop.time()``),
        with a ``max_lifetime``."""
        self.made: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()
        """Every connection made and not yet collected (closed with a pool that failed to
        open: asyncpg before 0.32 leaves them open)."""

    def stop(self) -> None:
        """Abandon the connections being opened and open no more. Needs no running loop."""
        self._stopped = True
        if self._stop is not None and not self._stop.done():
            # RuntimeError: the loop is closed, nothing is being opened any more.
            with contextlib.suppress(RuntimeError):
                self._stop.set_result(None)

    async def __call__(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        if self._stopped:
            raise asyncpg.InterfaceError("pool is closing: no new connections")
        loop = asyncio.get_running_loop()
        self._hold_back_after_refusal(loop.time())
        if self._stop is None:
            self._stop = loop.create_future()
        # A task of its own, so stop() can abandon it without cancelling the caller.
        opening = asyncio.ensure_future(self._connect(*args, **kwargs))
        try:
            await asyncio.wait((opening, self._stop), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller was cancelled
            abandon(opening)
            raise
        # Stopped wins even over a connection made in the same instant: the pool it would go
        # to is being retired, and would never close it.
        if self._stop.done():
            abandon(opening)
            raise asyncpg.InterfaceError("pool is closing: connection attempt abandoned")
        try:
            con = opening.result()
        except Exception as exc:
            self._failed(exc, loop.time())
            raise
        self._refused, self._refusals = None, 0
        if isinstance(con, asyncpg.Connection):  # else the user's connect=: asyncpg says so
            self._track(con, loop.time())
        return con

    def _hold_back_after_refusal(self, now: float) -> None:
        """Raise the server's last refusal again, without asking it, until the pause after
        it ends; then let one attempt through (the others keep failing fast until it is
        answered)."""
        if self._refused is None:
            return
        if now < self._retry_at:
            raise _copy(self._refused)
        self._retry_at = now + _REFUSED_PAUSE.delay(self._refusals + 1)

    def _failed(self, exc: Exception, now: float) -> None:
        if refused_login(exc):
            self._refusals += 1
            self._refused = exc
            self._retry_at = now + _REFUSED_PAUSE.delay(self._refusals)
            self._on_refused()
        elif isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
            self._on_not_writable()

    def _track(self, con: asyncpg.Connection, now: float) -> None:
        self.made.add(con)
        if self._lifetime is not None:
            lifetime, jitter = self._lifetime
            # Spread so connections opened together are not all replaced together.
            self.lifetimes[con] = (now, now + lifetime * (1.0 - jitter * random.random()))


def abandon(opening: asyncio.Future[asyncpg.Connection]) -> None:
    """Give up a connection attempt (a task running ``asyncpg.connect``): cancel it, or close
    the connection it made anyway, also when it completes in the same instant."""
    if not opening.done():
        opening.cancel()  # asyncpg closes the socket of a cancelled connect
    # Done now or later: a connection it made after all is closed, an error of its own is
    # retrieved, unlogged.
    opening.add_done_callback(_close_if_connected)


def _close_if_connected(opening: asyncio.Future[asyncpg.Connection]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().terminate()


def _copy(exc: BaseException) -> BaseException:
    """A fresh copy of *exc* to raise again (raising one object over and over would grow its
    traceback)."""
    again = copy.copy(exc)
    again.__traceback__ = None
    return again
