"""One OS watch over fixed directories, read by a thread of its own, reporting to its loop.

The pieces the directory watcher hub (``_watch_hub``) is built from: its settings, a batch of
changes, and :class:`DirWatcher`, which knows nothing of subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from watchfiles import Change

# Documented for direct use (watchfiles.helpmanual.io/api/rust_backend/), unchanged since 0.21.
# Unlike watch(), its constructor returns once the OS watch is installed, or raises.
from watchfiles._rust_notify import RustNotify

from .toolkit import describe_error

__all__ = ["WATCH_ERRORS", "Changes", "DirWatcher", "WatchSettings", "identity", "try_watch"]

# What RustNotify raises when it cannot watch, and what starting a thread may raise.
WATCH_ERRORS = (OSError, RuntimeError)


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


def _open_notify(dirs: Iterable[str], settings: WatchSettings) -> RustNotify:
    """A RustNotify over *dirs*, installed; OSError or RuntimeError if it cannot be."""
    # In the order of its signature: watch_paths, debug, force_polling, poll_delay_ms,
    # recursive, ignore_permission_denied.
    return RustNotify(list(dirs), False, settings.polling, settings.poll_delay, False, False)


def try_watch(directory: str, settings: WatchSettings) -> str | None:
    """Why *directory* cannot be watched on its own, or None if it can."""
    try:
        _open_notify([directory], settings).close()
    except WATCH_ERRORS as exc:
        return describe_error(exc)
    return None


def identity(directory: str) -> tuple[int, int] | None:
    """What tells *directory* from another put in its place; None if it is gone."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class DirWatcher:
    """One RustNotify over fixed directories (non-recursive), read by a thread of its own.

    Its own thread rather than a pool's: it holds the thread for good, and waiting for a free
    thread in a shared pool (anyio's has 40) is how changes used to go unseen. Each batch of
    changes, and the error that ends the thread if any, is passed to the callbacks in the
    loop; :attr:`done` resolves once the OS watch is closed.
    """

    def __init__(
        self,
        dirs: tuple[str, ...],
        settings: WatchSettings,
        loop: asyncio.AbstractEventLoop,
        *,
        on_changes: Callable[[DirWatcher, Changes], None],
        on_error: Callable[[DirWatcher, BaseException], None],
    ) -> None:
        """Install the OS watch and start the thread; OSError or RuntimeError if it cannot."""
        self.dirs = dirs
        # Taken before the watch is installed: a directory replaced meanwhile shows as lost.
        self.ids = {d: identity(d) for d in dirs}
        self.done: asyncio.Future[None] = loop.create_future()
        self._settings = settings
        self._loop = loop
        self._on_changes = on_changes
        self._on_error = on_error
        self._stop_requested = False
        self._notify = _open_notify(dirs, settings)
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
        self._stop_requested = True

    def is_set(self) -> bool:
        """The stop event RustNotify polls every ``step``."""
        return self._stop_requested or self._loop.is_closed()

    def lost(self, changes: Changes, places: set[str]) -> bool:
        """True if a watched directory that *changes* touch was deleted or replaced."""
        # The inode number may be reused at once, so identity alone would miss a deletion.
        return any(d in changes.deleted or self.replaced(d) for d in places.intersection(self.ids))

    def replaced(self, directory: str) -> bool:
        """True if watched *directory* is no longer the one the OS watch is on."""
        return identity(directory) != self.ids[directory]

    def _run(self) -> None:
        s = self._settings
        try:
            while True:
                # Timeout 0: wait for changes indefinitely; is_set() ends the wait.
                raw = self._notify.watch(s.debounce, s.step, 0, self)
                if raw == "stop":
                    return
                if isinstance(raw, str):  # "signal" or "timeout": neither is expected here
                    raise RuntimeError(f"unexpected watcher result {raw!r}")
                self._post(self._on_changes, self, Changes(raw))
        except Exception as exc:
            self._post(self._on_error, self, exc)
        finally:
            self._notify.close()
            self._post(self._finish)

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        # RuntimeError: the loop is closed, nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _finish(self) -> None:
        self.done.set_result(None)
