"""Directory watchers shared by every subscriber on an event loop.

A watchfiles watcher holds an OS thread and an inotify instance (often limited to 128 per
user), so a process with many pools cannot afford one each. Instead each event loop has one
watcher per :class:`WatchSettings`, over the union of the directories its subscribers want,
and each batch of changes wakes the subscribers it may concern.

A subscriber needing a directory not yet watched gets a new watcher over the new union,
installed before the old one stops. A stopping watcher drops the changes it was still
grouping, so soon after a replacement (or a burst of them) each subscriber re-reads.

The hub's state has three parts, each changed only through its own class: who wants which
directory (:class:`_Members`), the watcher in use and the ones stopping (:class:`_Watchers`),
and the directories that could not be watched (:class:`_Unwatched`). One task,
:meth:`_Hub._run`, starts and stops watchers; everything else records what is wanted and
wakes it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import anyio

from ._dir_watcher import WATCH_ERRORS, Changes, DirWatcher, WatchSettings, try_watch
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
    """A subscriber's hold on its directories; :meth:`wait` returns when they may have changed.

    It holds what the subscriber wants and its wake-up; what the hub knows of it (the
    directories held, whether it waits for them) is the hub's.
    """

    def __init__(self, hub: _Hub, interest: Interest) -> None:
        self.interest = interest
        self._hub = hub
        self._woken = asyncio.Event()
        self._closed = False

    def wake(self) -> None:
        """Make the current or next :meth:`wait` return at once."""
        self._woken.set()

    async def wait(self, timeout: float | None) -> bool:
        """Wait for a reason to re-read, or *timeout* seconds; False on timeout.

        The reasons: a change that may concern the subscriber, a new watcher (which may have
        missed changes), a failed hub replaced by a new one, or :meth:`wake`.
        """
        woken = await _wait(self._woken, timeout)
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
        logger.debug("subscribing again to %s", ", ".join(self.interest.dirs))
        await self._hub.join(self)


async def _wait(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until *event* is set or *timeout* seconds pass; True (and cleared) if it was set."""
    if not event.is_set():
        with anyio.move_on_after(timeout):
            await event.wait()
    was_set = event.is_set()
    event.clear()
    return was_set


# ---------------------------------------------------------------------------- the hub's state


@dataclass
class _Member:
    """What the hub knows of one subscription."""

    dirs: tuple[str, ...] = ()  # as held in the index
    joined: bool = False  # past its first wait for its directories
    ready: asyncio.Future[None] | None = None  # while it waits for its directories


class _Members:
    """The subscriptions, the directories each holds (indexed by directory), and which of
    them wait for their directories to be watched."""

    def __init__(self) -> None:
        self._members: dict[Subscription, _Member] = {}
        self._by_dir: dict[str, set[Subscription]] = {}

    def __bool__(self) -> bool:
        return bool(self._members)

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._members))

    def add(self, sub: Subscription) -> None:
        self._members.setdefault(sub, _Member())

    def remove(self, sub: Subscription) -> list[str]:
        """Forget *sub*; the directories nobody wants any more."""
        dropped = self.hold(sub, ())
        self._members.pop(sub, None)
        return dropped

    def dirs_of(self, sub: Subscription) -> tuple[str, ...]:
        member = self._members.get(sub)
        return member.dirs if member is not None else ()

    def hold(self, sub: Subscription, dirs: tuple[str, ...]) -> list[str]:
        """Make *dirs* the directories *sub* holds; the directories nobody wants any more."""
        member = self._members[sub]
        dropped = []
        for d in member.dirs:
            if d not in dirs:
                subs = self._by_dir.get(d, set())
                subs.discard(sub)
                if not subs:
                    self._by_dir.pop(d, None)
                    dropped.append(d)
        for d in dirs:
            self._by_dir.setdefault(d, set()).add(sub)
        member.dirs = dirs
        return dropped

    def wanted(self) -> list[str]:
        """Every directory some subscription holds."""
        return list(self._by_dir)

    def concerned(self, changes: Changes, places: set[str]) -> set[Subscription]:
        """The subscriptions *changes*, which happened in *places*, may concern."""
        return {
            sub
            for place in places
            for sub in self._by_dir.get(place, ())
            if sub.interest.wants(changes)
        }

    def mark_joined(self, sub: Subscription) -> None:
        member = self._members.get(sub)
        if member is not None:
            member.joined = True

    def joined(self) -> list[Subscription]:
        return [sub for sub, member in self._members.items() if member.joined]

    def expect(self, sub: Subscription, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future :meth:`release` resolves once *sub*'s directories were all tried."""
        ready = self._members[sub].ready = loop.create_future()
        return ready

    def stop_expecting(self, sub: Subscription, ready: asyncio.Future[None]) -> None:
        member = self._members.get(sub)
        if member is not None and member.ready is ready:
            member.ready = None

    def waiting(self) -> list[tuple[Subscription, _Member]]:
        """Subscriptions waiting for their directories, with what the hub knows of them."""
        return [
            (sub, m)
            for sub, m in self._members.items()
            if m.ready is not None and not m.ready.done()
        ]

    def release(self, sub: Subscription, error: Exception | None = None) -> None:
        """Let *sub*, waiting for its directories, go; with *error* if it cannot be served."""
        member = self._members[sub]
        ready, member.ready = member.ready, None
        if ready is None or ready.done():
            return
        if error is None:
            ready.set_result(None)
        else:
            ready.set_exception(error)

    def release_all(self) -> None:
        for sub, _ in self.waiting():
            self.release(sub)


@dataclass
class _Retry:
    """A wanted directory not watched for now, and when to try it again."""

    at: float
    delay: float
    reason: str


class _Unwatched:
    """Wanted directories that could not be watched, and when to try each again."""

    def __init__(self) -> None:
        self._retries: dict[str, _Retry] = {}

    def __contains__(self, directory: object) -> bool:
        return directory in self._retries

    def reason(self, directory: str) -> str:
        return self._retries[directory].reason

    def waiting(self, directory: str, now: float) -> bool:
        """True if *directory* is not to be tried again yet."""
        retry = self._retries.get(directory)
        return retry is not None and now < retry.at

    def missing(self, directory: str, now: float, delay: float) -> None:
        # Cheap to look for, so no backoff: a recreated directory is seen soon.
        self._retries[directory] = _Retry(now + delay, delay, "does not exist")

    def failed(self, directory: str, reason: str, base: float) -> None:
        previous = self._retries.get(directory)
        delay = min(_MAX_RETRY, max(base, previous.delay * 2) if previous else base)
        logger.debug("cannot watch %s yet: %s; trying again in %.1fs", directory, reason, delay)
        self._retries[directory] = _Retry(time.monotonic() + delay, delay, reason)

    def forget(self, directory: str) -> None:
        self._retries.pop(directory, None)

    def next_try(self) -> list[float]:
        return [r.at for r in self._retries.values()]


class _Watchers:
    """The watcher in use, whether it is to be replaced, and the old ones still stopping."""

    def __init__(self) -> None:
        self._current: DirWatcher | None = None
        self._stale = False  # lost a directory or failed: to be replaced
        self._resume_at = 0.0  # after a watcher failed, no new one before this
        self._stopping: set[DirWatcher] = set()

    @property
    def current(self) -> DirWatcher | None:
        return self._current

    @property
    def healthy(self) -> DirWatcher | None:
        """The watcher in use, unless it is to be replaced."""
        return None if self._stale else self._current

    @property
    def covered(self) -> Mapping[str, object]:
        """The directories the healthy watcher watches."""
        w = self.healthy
        return w.ids if w is not None else {}

    def is_healthy(self, watcher: DirWatcher) -> bool:
        return watcher is self.healthy

    def resume_at(self, now: float) -> float | None:
        """When a failed watcher may be replaced, if not yet."""
        paused = self._current is not None and self._stale and now < self._resume_at
        return self._resume_at if paused else None

    def mark_stale(self, *, resume_at: float | None = None) -> None:
        """Have the watcher in use replaced (not before *resume_at*, if given)."""
        if resume_at is not None:
            self._resume_at = resume_at
        self._stale = True

    def switch(self, watcher: DirWatcher | None) -> None:
        """Put *watcher*, installed already, in use, and stop the old one."""
        old, self._current, self._stale = self._current, watcher, False
        if old is not None:
            self._stop(old)

    def _stop(self, watcher: DirWatcher) -> None:
        watcher.stop()
        self._stopping.add(watcher)
        watcher.done.add_done_callback(lambda _: self._stopping.discard(watcher))

    async def stop_all(self) -> None:
        """Stop every watcher and wait (a bounded time) for their threads to end."""
        self.switch(None)
        if self._stopping:
            with anyio.move_on_after(_STOP_TIMEOUT, shield=True):
                await asyncio.wait([w.done for w in self._stopping])


# ---------------------------------------------------------------------------- the hub


class _Hub:
    """The watcher for one event loop and one :class:`WatchSettings`, and its subscribers.

    Only :meth:`_run`, one task, starts and stops watchers. The other methods record who wants
    which directory and wake that task, which ends, stopping the watcher, when the last
    subscriber leaves.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: WatchSettings) -> None:
        self.loop = loop
        self.settings = settings
        self.dead = False  # its task ended: subscribers join a new hub
        self._members = _Members()
        self._watchers = _Watchers()
        self._unwatched = _Unwatched()
        self._reread_at: float | None = None  # when subscribers re-read after a replacement
        self._wakeup = asyncio.Event()
        self._idle: list[asyncio.Future[None]] = []  # last subscribers out, waiting for the stop
        # A fresh context: the task outlives the subscriber that happened to start it.
        self._task = contextvars.Context().run(
            loop.create_task, self._run(), name="aiohotload-watch-hub"
        )

    # ------------------------------------------------------------------ subscribers' side

    async def join(self, sub: Subscription) -> None:
        self._members.add(sub)
        await self._hold(sub, sub.interest.dirs)
        self._members.mark_joined(sub)

    async def move(self, sub: Subscription, dirs: tuple[str, ...]) -> None:
        if dirs != self._members.dirs_of(sub):
            await self._hold(sub, dirs)

    async def leave(self, sub: Subscription) -> None:
        for d in self._members.remove(sub):
            self._unwatched.forget(d)
        if self._members or self._task.done():
            return
        self._wakeup.set()
        # The last one out waits, so that no thread outlives the last subscription.
        idle = self.loop.create_future()
        self._idle.append(idle)
        await idle

    def verify(self, sub: Subscription) -> None:
        """Replace the watcher if one of *sub*'s directories is no longer the one it watches."""
        w = self._watchers.healthy
        if w is not None and any(w.replaced(d) for d in self._members.dirs_of(sub) if d in w.ids):
            self._mark_stale()

    async def _hold(self, sub: Subscription, dirs: tuple[str, ...]) -> None:
        """Make *dirs* the directories *sub* holds; returns once each is watched or tried."""
        for d in self._members.hold(sub, dirs):
            self._unwatched.forget(d)  # no longer wanted: a later watcher leaves it out
        healthy, w = self._watchers.healthy, self._watchers.current
        if self.dead or (healthy is not None and all(d in healthy.ids for d in dirs)):
            return  # a dead hub: the subscriber's next wait() joins a new one
        for d in dirs:
            if w is None or d not in w.ids:
                # Try afresh: the subscriber just saw the directory, an old failure is stale.
                self._unwatched.forget(d)
        ready = self._members.expect(sub, self.loop)
        self._wakeup.set()
        try:
            await ready
        finally:
            self._members.stop_expecting(sub, ready)
            if ready.done() and not ready.cancelled():
                ready.exception()  # retrieved even when we were cancelled meanwhile

    # ------------------------------------------------------------------ watchers' side

    def deliver(self, watcher: DirWatcher, changes: Changes) -> None:
        """Wake the subscribers *changes* may concern (called in the loop, for each batch)."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("changes seen: %s", ", ".join(sorted(changes.paths)))
        places = changes.places()
        if self._watchers.is_healthy(watcher) and watcher.lost(changes, places):
            self._mark_stale()
        for sub in self._members.concerned(changes, places):
            sub.wake()

    def failed(self, watcher: DirWatcher, exc: BaseException) -> None:
        """*watcher*'s thread ended with *exc* (called in the loop)."""
        if watcher is not self._watchers.current:
            logger.debug("watching %s failed while stopping: %s", watcher, describe_error(exc))
            return
        logger.warning("watching %s failed: %s; restarting", watcher, describe_error(exc))
        # It may fail again at once: pause rather than spin.
        self._mark_stale(resume_at=time.monotonic() + self.settings.poll_delay / 1000)

    def _mark_stale(self, *, resume_at: float | None = None) -> None:
        self._watchers.mark_stale(resume_at=resume_at)
        self._wakeup.set()

    # ------------------------------------------------------------------ the task

    async def _run(self) -> None:
        try:
            while self._members:
                self._release_idle()  # subscribers came back: the last one out need not wait
                self._update()
                self._settle()
                self._reread_if_due()
                await _wait(self._wakeup, self._next_deadline())
        except Exception:
            # A bug, not a watcher failure: subscribers notice the dead hub and join a new one.
            logger.exception("directory watcher hub failed; subscribers will start another")
        finally:
            await self._shut_down()

    def _update(self) -> None:
        """Start, replace or stop the watcher to cover what subscribers want, as far as it can."""
        now = time.monotonic()
        if self._watchers.resume_at(now) is not None:
            return
        covered = self._watchers.covered
        target = self._targets(covered, now)
        if self._watchers.healthy is not None and all(d in covered for d in target):
            return  # directories nobody wants any more are dropped at the next replacement
        if target:
            self._replace_with(target)
        elif self._watchers.current is not None:
            self._switch(None)

    def _targets(self, covered: Mapping[str, object], now: float) -> tuple[str, ...]:
        """The wanted directories worth watching now: watched already, or due for a try."""
        target = []
        for d in self._members.wanted():
            if d in covered:
                target.append(d)
            elif self._unwatched.waiting(d, now):
                continue
            elif os.path.isdir(d):
                target.append(d)
            else:
                self._unwatched.missing(d, now, self.settings.poll_delay / 1000)
        return tuple(sorted(target))

    def _replace_with(self, dirs: tuple[str, ...]) -> None:
        trusted = set(self._watchers.covered)
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
        elif self._watchers.current is not None and self._watchers.healthy is None:
            self._switch(None)

    def _start(self, dirs: tuple[str, ...]) -> tuple[DirWatcher | None, str]:
        """A new watcher over *dirs*, installed; or None and why it could not start."""
        try:
            watcher = DirWatcher(
                dirs, self.settings, self.loop, on_changes=self.deliver, on_error=self.failed
            )
        except WATCH_ERRORS as exc:  # watchfiles' errors, or no thread to be had
            return None, describe_error(exc)
        return watcher, ""

    def _culprits(self, suspects: list[str], reason: str) -> dict[str, str]:
        """Which of *suspects* cannot be watched, given that all of them failed with *reason*."""
        if len(suspects) == 1:
            return {suspects[0]: reason}
        bad = {d: why for d in suspects if (why := try_watch(d, self.settings)) is not None}
        # Each works alone but not all together (a limit on watches): give up on all for now.
        return bad or dict.fromkeys(suspects, reason)

    def _retry_later(self, d: str, reason: str) -> None:
        self._unwatched.failed(d, reason, self.settings.poll_delay / 1000)

    def _switch(self, watcher: DirWatcher | None) -> None:
        """Make *watcher*, installed already, the current one, and stop the old one."""
        self._watchers.switch(watcher)
        if watcher is not None:
            for d in watcher.dirs:
                self._unwatched.forget(d)
            logger.debug("watching %s", watcher)
        # The old watcher drops the changes it was still grouping, so every subscriber re-reads;
        # a little later, so that a burst of replacements (pools opening) costs one re-read.
        if self._reread_at is None:
            self._reread_at = time.monotonic() + self.settings.debounce / 1000

    def _settle(self) -> None:
        """Let subscribers waiting for their directories go, once each directory was tried."""
        covered = self._watchers.covered
        for sub, member in self._members.waiting():
            if not all(d in covered or d in self._unwatched for d in member.dirs):
                continue
            first = member.dirs[0] if member.dirs else ""
            if not member.joined and first and first not in covered:
                self._members.release(sub, UnwatchableError(self._unwatched.reason(first)))
            else:
                self._members.release(sub)

    def _reread_if_due(self) -> None:
        if self._reread_at is not None and time.monotonic() >= self._reread_at:
            self._reread_at = None
            for sub in self._members.joined():
                sub.wake()

    def _next_deadline(self) -> float | None:
        """Seconds until the task has something to do; None for nothing."""
        now = time.monotonic()
        resume_at = self._watchers.resume_at(now)
        # While a failed watcher may not be replaced, nothing is retried either.
        times = [resume_at] if resume_at is not None else self._unwatched.next_try()
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
        await self._watchers.stop_all()
        # Left behind only if this task failed or was cancelled: they will join a new hub.
        for sub in self._members:
            sub.wake()
        self._members.release_all()
        self._release_idle()


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
