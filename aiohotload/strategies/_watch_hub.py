"""Directory watchers shared by every subscriber on an event loop.

A watchfiles watcher holds an OS thread and an inotify instance (often limited to 128 per
user), so a process with many pools cannot afford one each. Instead each event loop has one
watcher per :class:`WatchSettings`, over the union of the directories its subscribers want,
and each batch of changes wakes the subscribers it may concern.

A subscriber needing a directory not yet watched gets a new watcher over the new union,
installed before the old one stops. A stopping watcher drops the changes it was still
grouping, so soon after a replacement (or a burst of them) each subscriber re-reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from watchfiles import Change

# Documented for direct use (watchfiles.helpmanual.io/api/rust_backend/), unchanged since 0.21.
# Unlike watch(), its constructor returns once the OS watch is installed, or raises.
from watchfiles._rust_notify import RustNotify

from .toolkit import describe_error

__all__ = [
    "Changes",
    "Interest",
    "Subscription",
    "UnwatchableError",
    "WatchSettings",
    "subscribe",
]

logger = logging.getLogger(__name__)

# Bounds the wait for watcher threads to end; each sees its stop within one `step`.
_STOP_TIMEOUT = 5.0
# Longest pause between attempts to watch a directory that exists but cannot be watched.
_MAX_RETRY = 10.0


@dataclass(frozen=True)
class WatchSettings:
    """watchfiles' options (milliseconds); subscribers with equal settings share a watcher."""

    debounce: int
    step: int
    polling: bool
    poll_delay: int


class Changes:
    """One batch of changes, its paths normalised and indexed for cheap per-subscriber tests."""

    __slots__ = ("deleted", "dotted", "paths")

    def __init__(self, raw: Iterable[tuple[int, str]]) -> None:
        # watchfiles joins the watched path and the name; normalise to compare with ours.
        pairs = [(change, os.path.normpath(path)) for change, path in raw]
        self.paths = frozenset(path for _, path in pairs)
        self.deleted = frozenset(path for change, path in pairs if change == Change.deleted)
        # Directories in which a ``..name`` changed: Kubernetes' AtomicWriter swaps those.
        self.dotted = frozenset(
            os.path.dirname(p) for p in self.paths if os.path.basename(p).startswith("..")
        )

    def places(self) -> set[str]:
        """Directories the changes happened in, and the changed paths (a watched dir itself)."""
        return {os.path.dirname(p) for p in self.paths} | self.paths


class Interest(Protocol):
    """What a subscriber watches: directories, the first one essential, and a filter."""

    @property
    def dirs(self) -> tuple[str, ...]: ...

    def wants(self, changes: Changes) -> bool:
        """True if *changes* may concern the subscriber."""
        ...


class UnwatchableError(Exception):
    """A subscriber's first directory cannot be watched; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def subscribe(interest: Interest, settings: WatchSettings) -> Subscription:
    """Watch *interest*'s directories; returns once they are watched, so no later change is missed.

    Raises :class:`UnwatchableError` if its first directory cannot be watched.
    """
    hub = _hub_for(settings)
    sub = Subscription(hub, interest)
    try:
        await hub.join(sub)
    except BaseException:
        with anyio.move_on_after(_STOP_TIMEOUT, shield=True):
            await sub.aclose()
        raise
    return sub


class Subscription:
    """A subscriber's hold on its directories; :meth:`wait` returns when they may have changed."""

    def __init__(self, hub: _Hub, interest: Interest) -> None:
        self.interest = interest
        self.dirs: tuple[str, ...] = ()  # as held in the hub's index
        self.joined = False  # past its first wait for its directories
        self.ready: asyncio.Future[None] | None = None  # while waiting for directories
        self._hub = hub
        self._signal = _Signal()
        self._closed = False

    def wake(self) -> None:
        self._signal.set()

    async def wait(self, timeout: float | None) -> bool:
        """Wait for a reason to re-read, or *timeout* seconds; False on timeout.

        The reasons: a change that may concern the subscriber, a new watcher (which may have
        missed changes), or a failed hub replaced by a new one.
        """
        woken = await self._signal.wait(timeout)
        if self._hub.dead:
            await self._rejoin()
            return True
        if not woken:
            # No event for a while: make sure that is not because a directory was replaced.
            self._hub.verify(self)
        return woken

    async def update(self, interest: Interest) -> None:
        """Follow *interest* from now on; returns once its new directories are watched or tried."""
        self.interest = interest
        if interest.dirs != self.dirs:
            await self._hub.move(self, interest.dirs)

    async def aclose(self) -> None:
        """Let go of the directories; the last subscriber out waits for the watcher to stop."""
        if not self._closed:
            self._closed = True
            await self._hub.leave(self)

    async def _rejoin(self) -> None:
        old = self._hub
        # Whatever broke the hub may break a new one at once: pause rather than spin.
        await asyncio.sleep(old.settings.poll_delay / 1000)
        self._hub = _hub_for(old.settings)
        self.dirs = ()  # held by the old hub, which is gone
        logger.debug("subscribing again to %s", ", ".join(self.interest.dirs))
        await self._hub.join(self)


class _Signal:
    """A flag that one task waits on, with a timeout, and others set."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until set or *timeout* seconds pass; True (and cleared) if it was set."""
        if not self._set:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait([self._waiter], timeout=timeout)
            finally:
                self._waiter = None
        was_set, self._set = self._set, False
        return was_set


@dataclass
class _Retry:
    """A wanted directory not watched for now, and when to try it again."""

    at: float
    delay: float
    reason: str


class _Hub:
    """The watcher for one event loop and one :class:`WatchSettings`, and its subscribers.

    Only :meth:`_run`, one task, starts and stops watchers. The other methods record who wants
    which directory and wake that task, which ends, stopping the watcher, when the last
    subscriber leaves.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: WatchSettings) -> None:
        self.loop = loop
        self.settings = settings
        self.dead = False
        self._subs: set[Subscription] = set()
        self._by_dir: dict[str, set[Subscription]] = {}
        self._pending: set[Subscription] = set()  # waiting for their directories
        self._watcher: _Watcher | None = None
        self._stopping: set[_Watcher] = set()
        self._unwatched: dict[str, _Retry] = {}
        self._resume_at = 0.0  # after a watcher failed, no new one before this
        self._reread_at: float | None = None  # when subscribers re-read after a replacement
        self._wakeup = _Signal()
        self._idle: list[asyncio.Future[None]] = []  # last subscribers out, waiting for the stop
        # A fresh context: the task outlives the subscriber that happened to start it.
        self._task = contextvars.Context().run(
            loop.create_task, self._run(), name="aiohotload-watch-hub"
        )

    # ------------------------------------------------------------------ subscribers' side

    async def join(self, sub: Subscription) -> None:
        self._subs.add(sub)
        self._index(sub, sub.interest.dirs)
        await self._until_watched(sub)
        sub.joined = True

    async def move(self, sub: Subscription, dirs: tuple[str, ...]) -> None:
        self._index(sub, dirs)
        await self._until_watched(sub)

    async def leave(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        self._index(sub, ())
        if self._subs or self._task.done():
            return
        self._wakeup.set()
        # The last one out waits, so that no thread outlives the last subscription.
        idle = self.loop.create_future()
        self._idle.append(idle)
        await idle

    def verify(self, sub: Subscription) -> None:
        """Replace the watcher if one of *sub*'s directories is no longer the one it watches."""
        w = self._watcher
        if w is not None and not w.stale and any(w.replaced(d) for d in sub.dirs if d in w.ids):
            w.stale = True
            self._wakeup.set()

    async def _until_watched(self, sub: Subscription) -> None:
        w = self._watcher
        if self.dead or (w is not None and not w.stale and all(d in w.ids for d in sub.dirs)):
            return  # a dead hub: the subscriber's next wait() joins a new one
        for d in sub.dirs:
            if w is None or d not in w.ids:
                # Try afresh: the subscriber just saw the directory, an old failure is stale.
                self._unwatched.pop(d, None)
        ready = sub.ready = self.loop.create_future()
        self._pending.add(sub)
        self._wakeup.set()
        try:
            await ready
        finally:
            self._pending.discard(sub)
            sub.ready = None
            if ready.done() and not ready.cancelled():
                ready.exception()  # retrieved even when we were cancelled meanwhile

    def _index(self, sub: Subscription, dirs: tuple[str, ...]) -> None:
        for d in sub.dirs:
            if d not in dirs:
                subs = self._by_dir.get(d, set())
                subs.discard(sub)
                if not subs:
                    # No longer wanted: a later watcher leaves it out.
                    self._by_dir.pop(d, None)
                    self._unwatched.pop(d, None)
        for d in dirs:
            self._by_dir.setdefault(d, set()).add(sub)
        sub.dirs = dirs

    # ------------------------------------------------------------------ watchers' side

    def deliver(self, watcher: _Watcher, changes: Changes) -> None:
        """Wake the subscribers *changes* may concern (called in the loop, for each batch)."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("changes seen: %s", ", ".join(sorted(changes.paths)))
        places = changes.places()
        if not watcher.stale and not watcher.stopping and watcher.lost(changes, places):
            watcher.stale = True
            self._wakeup.set()
        for place in places:
            for sub in self._by_dir.get(place, ()):
                if sub.interest.wants(changes):
                    sub.wake()

    def failed(self, watcher: _Watcher, exc: BaseException) -> None:
        """*watcher*'s thread ended with *exc* (called in the loop)."""
        if watcher.stopping:
            logger.debug("watching %s failed while stopping: %s", watcher, describe_error(exc))
            return
        logger.warning("watching %s failed: %s; restarting", watcher, describe_error(exc))
        watcher.stale = True
        # It may fail again at once: pause rather than spin.
        self._resume_at = time.monotonic() + self.settings.poll_delay / 1000
        self._wakeup.set()

    # ------------------------------------------------------------------ the task

    async def _run(self) -> None:
        try:
            while self._subs:
                self._release_idle()  # subscribers came back: the last one out need not wait
                self._update()
                self._settle()
                self._reread_if_due()
                await self._wakeup.wait(self._next_deadline())
        except Exception:
            # A bug, not a watcher failure: subscribers notice the dead hub and join a new one.
            logger.exception("directory watcher hub failed; subscribers will start another")
        finally:
            await self._shut_down()

    def _update(self) -> None:
        """Start, replace or stop the watcher to cover what subscribers want, as far as it can."""
        now = time.monotonic()
        current = self._watcher
        if current is not None and current.stale and now < self._resume_at:
            return
        healthy = current is not None and not current.stale
        covered = current.ids if current is not None and healthy else {}
        target = self._targets(covered, now)
        if healthy and all(d in covered for d in target):
            return  # directories nobody wants any more are dropped at the next replacement
        if target:
            self._replace_with(target)
        elif current is not None:
            self._switch(None)

    def _targets(self, covered: Mapping[str, object], now: float) -> tuple[str, ...]:
        """The wanted directories worth watching now: watched already, or due for a try."""
        target = []
        for d in self._by_dir:
            retry = self._unwatched.get(d)
            if d in covered:
                target.append(d)
            elif retry is not None and now < retry.at:
                continue
            elif os.path.isdir(d):
                target.append(d)
            else:
                # Cheap to look for, so no backoff: a recreated directory is seen soon.
                delay = self.settings.poll_delay / 1000
                self._unwatched[d] = _Retry(now + delay, delay, "does not exist")
        return tuple(sorted(target))

    def _replace_with(self, dirs: tuple[str, ...]) -> None:
        current = self._watcher
        trusted = set(current.ids) if current is not None and not current.stale else set()
        watcher, reason = self._start(dirs)
        if watcher is None:
            suspects = [d for d in dirs if d not in trusted] or list(dirs)
            bad = self._culprits(suspects, reason)
            for d, why in bad.items():
                self._retry_later(d, why)
            rest = tuple(d for d in dirs if d not in bad)
            if any(d not in trusted for d in rest):
                watcher, reason = self._start(rest)
                if watcher is None:
                    for d in rest:
                        if d not in trusted:
                            self._retry_later(d, reason)
        if watcher is not None:
            self._switch(watcher)
        elif current is not None and current.stale:
            self._switch(None)

    def _start(self, dirs: tuple[str, ...]) -> tuple[_Watcher | None, str]:
        """A new watcher over *dirs*, installed; or None and why it could not start."""
        try:
            return _Watcher(dirs, self), ""
        except (OSError, RuntimeError) as exc:  # watchfiles' errors, or no thread to be had
            return None, describe_error(exc)

    def _culprits(self, suspects: list[str], reason: str) -> dict[str, str]:
        """Which of *suspects* cannot be watched, given that all of them failed with *reason*."""
        if len(suspects) == 1:
            return {suspects[0]: reason}
        bad = {}
        s = self.settings
        for d in suspects:
            try:
                RustNotify([d], False, s.polling, s.poll_delay, False, False).close()
            except (OSError, RuntimeError) as exc:
                bad[d] = describe_error(exc)
        # Each works alone but not all together (a limit on watches): give up on all for now.
        return bad or dict.fromkeys(suspects, reason)

    def _retry_later(self, d: str, reason: str) -> None:
        base = self.settings.poll_delay / 1000
        previous = self._unwatched.get(d)
        delay = min(_MAX_RETRY, max(base, previous.delay * 2) if previous else base)
        logger.debug("cannot watch %s yet: %s; trying again in %.1fs", d, reason, delay)
        self._unwatched[d] = _Retry(time.monotonic() + delay, delay, reason)

    def _switch(self, watcher: _Watcher | None) -> None:
        """Make *watcher*, installed already, the current one, and stop the old one."""
        old, self._watcher = self._watcher, watcher
        if watcher is not None:
            for d in watcher.dirs:
                self._unwatched.pop(d, None)
            logger.debug("watching %s", watcher)
        if old is not None:
            self._stop(old)
        # The old watcher drops the changes it was still grouping, so every subscriber re-reads;
        # a little later, so that a burst of replacements (pools opening) costs one re-read.
        if self._reread_at is None:
            self._reread_at = time.monotonic() + self.settings.debounce / 1000

    def _stop(self, watcher: _Watcher) -> None:
        watcher.stop()
        self._stopping.add(watcher)
        watcher.done.add_done_callback(lambda _: self._stopping.discard(watcher))

    def _settle(self) -> None:
        """Let subscribers waiting for their directories go, once each directory was tried."""
        w = self._watcher
        covered = w.ids if w is not None and not w.stale else {}
        for sub in list(self._pending):
            if not all(d in covered or d in self._unwatched for d in sub.dirs):
                continue
            self._pending.discard(sub)
            if sub.ready is None or sub.ready.done():
                continue
            first = sub.dirs[0] if sub.dirs else ""
            if not sub.joined and first and first not in covered:
                sub.ready.set_exception(UnwatchableError(self._unwatched[first].reason))
            else:
                sub.ready.set_result(None)

    def _reread_if_due(self) -> None:
        if self._reread_at is not None and time.monotonic() >= self._reread_at:
            self._reread_at = None
            for sub in self._subs:
                if sub.joined:
                    sub.wake()

    def _next_deadline(self) -> float | None:
        """Seconds until the task has something to do; None for nothing."""
        now = time.monotonic()
        times = [r.at for r in self._unwatched.values()]
        if self._watcher is not None and self._watcher.stale and now < self._resume_at:
            times = [self._resume_at]  # nothing is retried before then
        if self._reread_at is not None:
            times.append(self._reread_at)
        return max(0.0, min(times) - now) if times else None

    def _release_idle(self) -> None:
        idle, self._idle = self._idle, []
        for f in idle:
            if not f.done():
                f.set_result(None)

    async def _shut_down(self) -> None:
        self.dead = True
        hubs = _hubs.get(self.loop, {})
        if hubs.get(self.settings) is self:
            del hubs[self.settings]  # new subscribers start a new hub from now on
            if not hubs:
                _hubs.pop(self.loop, None)
        if self._watcher is not None:
            self._stop(self._watcher)
            self._watcher = None
        if self._stopping:
            done = [w.done for w in self._stopping]
            with anyio.move_on_after(_STOP_TIMEOUT, shield=True):
                await asyncio.wait(done)
        # Left behind only if this task failed or was cancelled: they will join a new hub.
        for sub in self._subs:
            sub.wake()
        for sub in self._pending:
            if sub.ready is not None and not sub.ready.done():
                sub.ready.set_result(None)
        self._release_idle()


class _Watcher:
    """One RustNotify over fixed directories (non-recursive), read by a thread of its own.

    Its own thread rather than a pool's: it holds the thread for good, and waiting for a free
    thread in a shared pool (anyio's has 40) is how changes used to go unseen.
    """

    def __init__(self, dirs: tuple[str, ...], hub: _Hub) -> None:
        """Install the OS watch and start the thread; OSError or RuntimeError if it cannot."""
        self.dirs = dirs
        # Taken before the watch is installed: a directory replaced meanwhile shows as lost.
        self.ids = {d: _identity(d) for d in dirs}
        self.stale = False  # lost a directory or failed: to be replaced
        self.stopping = False
        self.done: asyncio.Future[None] = hub.loop.create_future()
        self._hub = hub
        self._loop = hub.loop
        s = hub.settings
        self._notify = RustNotify(list(dirs), False, s.polling, s.poll_delay, False, False)
        thread = threading.Thread(target=self._run, name="aiohotload-watch", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._notify.close()
            raise

    def __str__(self) -> str:
        return ", ".join(self.dirs)

    def stop(self) -> None:
        """Ask the thread to end; it does within one ``step``."""
        self.stopping = True

    def is_set(self) -> bool:
        """The stop event RustNotify polls every ``step``."""
        return self.stopping or self._loop.is_closed()

    def lost(self, changes: Changes, places: set[str]) -> bool:
        """True if a watched directory that *changes* touch was deleted or replaced."""
        # The inode number may be reused at once, so identity alone would miss a deletion.
        return any(d in changes.deleted or self.replaced(d) for d in places.intersection(self.ids))

    def replaced(self, d: str) -> bool:
        return _identity(d) != self.ids[d]

    def _run(self) -> None:
        s = self._hub.settings
        try:
            while True:
                # Timeout 0: wait for changes indefinitely; is_set() ends the wait.
                raw = self._notify.watch(s.debounce, s.step, 0, self)
                if raw == "stop":
                    return
                if isinstance(raw, str):  # "signal" or "timeout": neither is expected here
                    raise RuntimeError(f"unexpected watcher result {raw!r}")
                self._post(self._hub.deliver, self, Changes(raw))
        except Exception as exc:
            self._post(self._hub.failed, self, exc)
        finally:
            self._notify.close()
            self._post(self._on_done)

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        # RuntimeError: the loop is closed, nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_done(self) -> None:
        self.done.set_result(None)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[WatchSettings, _Hub]] = (
    weakref.WeakKeyDictionary()
)


def _hub_for(settings: WatchSettings) -> _Hub:
    loop = asyncio.get_running_loop()
    hubs = _hubs.setdefault(loop, {})
    hub = hubs.get(settings)
    if hub is None:
        hub = hubs[settings] = _Hub(loop, settings)
    return hub


def _identity(directory: str) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
