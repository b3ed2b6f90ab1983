"""The ``watchfiles`` strategy: a DSN kept in a file, re-read whenever the file changes.

The parent directory is watched rather than the file, so atomic renames (editors, config
tools) and Kubernetes Secret volumes (a ``..data`` symlink swapped over a new timestamped
directory) are seen as well as in-place writes. The watching itself is shared by every file
on the event loop (see ``_watch_hub``), so many pools cost one watcher thread, not one each.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass

import anyio

from ..errors import InvalidURLError, SourceError
from ._watch_hub import Changes, Subscription, UnwatchableError, WatchSettings, subscribe
from .feedback import Feedback
from .toolkit import OptionReader, describe_error

__all__ = ["WatchfilesStrategy"]

logger = logging.getLogger(__name__)

# Upper bound of every millisecond option, so nothing overflows watchfiles' u64 maths.
_MAX_MS = 86_400_000
# A DSN is short; the cap stops a path pointed at a huge file from filling memory.
_MAX_BYTES = 64 * 1024
# Bounds the cleanup when the consumer stops; closing takes at most about one `step`.
_CLOSE_TIMEOUT = 5.0
_MS_OPTIONS = {"debounce": 1, "step": 1, "poll_delay": 1, "recheck": 0}  # name -> minimum
_KNOWN_OPTIONS = (*_MS_OPTIONS, "polling", "force_polling")


@dataclass(frozen=True)
class _Options:
    debounce: int = 200
    step: int = 2
    polling: bool = False
    poll_delay: int = 300
    recheck: int = 5000

    @property
    def reread(self) -> int:
        """Milliseconds after which the file is re-read even without events; 0 for never."""
        if self.polling:
            # watchfiles' poller compares modification times in whole seconds, so it misses
            # most quick writes; re-reading a small file each poll costs about as much as a stat.
            return min(self.poll_delay, self.recheck or self.poll_delay)
        return self.recheck

    @property
    def watcher(self) -> WatchSettings:
        """The options the shared watcher needs; ``recheck`` is each subscriber's own."""
        return WatchSettings(self.debounce, self.step, self.polling, self.poll_delay)


class WatchfilesStrategy:
    """Yields the stripped content of a file: its current value, then each real change.

    Options (all times in milliseconds):

    - ``debounce`` (default 200): longest time changes are grouped before a re-read.
    - ``step`` (default 2): quiet time after the last change before a re-read. A file read
      half-written is no danger (its DSN fails to open, or the next read supersedes it):
      the step only groups the events of one write.
    - ``polling`` or ``force_polling`` (default false): poll instead of using OS events,
      for network filesystems and some container mounts.
    - ``poll_delay`` (default 300): polling interval; when polling the file is also
      re-read this often. Also how often a vanished directory is looked for.
    - ``recheck`` (default 5000): re-read at least this often even without events;
      ``0`` disables it.

    The file's content is never logged nor put in an exception: it holds a password.
    """

    async def watch(
        self, path: str, options: Mapping[str, str], *, feedback: Feedback | None = None
    ) -> AsyncGenerator[str, None]:
        """Yield the DSN in *path* (an absolute path), then each new DSN, until closed.

        On the pool's request (*feedback*: a login with the current DSN was refused) the file
        is read again at once, should a change have gone unseen.

        Raises :class:`~aiohotload.InvalidOptionError`, :class:`~aiohotload.InvalidURLError`
        or, if the file cannot be read at start, :class:`~aiohotload.SourceError`.
        """
        opts = _parse_options(options)
        path = _absolute(path)
        _check_directory(path, os.path.dirname(path))
        layout = _Layout.of(path)
        try:
            sub = await subscribe(layout, opts.watcher)
        except UnwatchableError as exc:
            raise SourceError(
                f"cannot watch directory {layout.parent!r} of DSN file {path!r}: {exc.reason}"
            ) from None
        try:
            # Read only now that the directories are watched, so no change can slip in between.
            try:
                current = _read(path)
            except _UnreadableError as exc:
                raise SourceError(f"DSN file {path!r} {exc.reason}") from None
            last_read = time.monotonic()
            logger.debug("watching DSN file %s (directories: %s)", path, ", ".join(layout.dirs))
            yield current

            while True:
                timeout = None
                if opts.reread > 0:
                    timeout = max(0.0, last_read + opts.reread / 1000 - time.monotonic())
                asked = await _next_look(sub, feedback, timeout)
                # The file's links may point elsewhere now: follow them before reading.
                await sub.update(_Layout.of(path))
                last_read = time.monotonic()
                value = _try_read(path)
                if value is None:
                    continue
                if value == current:
                    why = " on the pool's request" if asked else ""
                    logger.debug("DSN file %s re-read%s, unchanged", path, why)
                    continue
                current = value
                logger.debug("DSN file %s changed", path)
                yield current
        finally:
            # Shielded: when an anyio scope cancels the consumer, the subscription must still end.
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await sub.aclose()


async def _next_look(sub: Subscription, feedback: Feedback | None, timeout: float | None) -> bool:
    """Wait for a reason to read the file again (see :meth:`Subscription.wait`) or for the
    pool to ask for it; True if the pool asked."""
    if feedback is None:
        await sub.wait(timeout)
        return False
    asked = asyncio.ensure_future(_refresh_requested(feedback))

    def wake(task: asyncio.Future[None]) -> None:
        if not task.cancelled():
            sub.wake()

    asked.add_done_callback(wake)
    try:
        await sub.wait(timeout)
    finally:
        asked.cancel()
    return asked.done() and not asked.cancelled()


async def _refresh_requested(feedback: Feedback) -> None:
    # Released DSNs need nothing here: a file holds no resource per DSN.
    while not (await feedback.wait()).refresh:
        pass


@dataclass(frozen=True)
class _Layout:
    """Where *path* is watched from and which changed paths matter, as its links are now."""

    parent: str
    dirs: tuple[str, ...]
    relevant: frozenset[str]

    @classmethod
    def of(cls, path: str) -> _Layout:
        parent = os.path.dirname(path)
        relevant = {path}
        for hop in _link_chain(path):
            relevant.add(hop)
            if _within(hop, parent):
                # A link through a sibling (``dsn -> ..data/dsn``) changes when that sibling does.
                first = os.path.relpath(hop, parent).split(os.sep, 1)[0]
                relevant.add(os.path.join(parent, first))
        target = os.path.realpath(path)
        relevant.add(target)
        dirs = [parent]
        target_dir = os.path.dirname(target)
        # A target inside the parent (a Kubernetes timestamped dir) changes through the parent.
        if not _within(target_dir, os.path.realpath(parent)) and os.path.isdir(target_dir):
            dirs.append(target_dir)
        return cls(parent, tuple(dirs), frozenset(relevant))

    def wants(self, changes: Changes) -> bool:
        """True if *changes* touch the file, a link on its way, or a watched directory."""
        if not self.relevant.isdisjoint(changes.paths):
            return True
        if any(d in changes.paths for d in self.dirs):
            return True
        # Kubernetes' AtomicWriter names everything it swaps ``..something``.
        return self.parent in changes.dotted


class _UnreadableError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read(path: str) -> str:
    """The stripped content of *path*; raises _UnreadableError whose reason never quotes it."""
    try:
        # O_NONBLOCK: a FIFO at the path must not block the event loop forever.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _UnreadableError("does not exist") from None
    except OSError as exc:
        raise _UnreadableError(f"cannot be opened: {describe_error(exc)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _UnreadableError("is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise _UnreadableError("is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, _MAX_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_BYTES:
                raise _UnreadableError(f"is larger than {_MAX_BYTES} bytes")
    except OSError as exc:
        raise _UnreadableError(f"cannot be read: {describe_error(exc)}") from None
    finally:
        os.close(fd)
    try:
        text = b"".join(chunks).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _UnreadableError("is not valid UTF-8") from None
    if not text:
        raise _UnreadableError("is empty")
    return text


def _try_read(path: str) -> str | None:
    try:
        return _read(path)
    except _UnreadableError as exc:
        logger.debug("DSN file %s %s; keeping the current DSN", path, exc.reason)
        return None


def _parse_options(options: Mapping[str, str]) -> _Options:
    opts = OptionReader("watchfiles", options, _KNOWN_OPTIONS)
    defaults = _Options()
    ms = {
        name: opts.integer(
            name, getattr(defaults, name), minimum=minimum, maximum=_MAX_MS, unit="milliseconds"
        )
        for name, minimum in _MS_OPTIONS.items()
    }
    return _Options(**ms, polling=opts.boolean("polling", defaults.polling, "force_polling"))


def _absolute(path: str) -> str:
    if not isinstance(path, str) or not os.path.isabs(path):
        raise InvalidURLError(f"the watchfiles strategy needs an absolute file path; got {path!r}")
    if "\x00" in path:
        raise InvalidURLError("the DSN file path contains a NUL character")
    return os.path.normpath(path)


def _check_directory(path: str, parent: str) -> None:
    try:
        mode = os.stat(parent).st_mode
    except FileNotFoundError:
        raise SourceError(f"directory {parent!r} of DSN file {path!r} does not exist") from None
    except OSError as exc:
        raise SourceError(
            f"cannot access directory {parent!r} of DSN file {path!r}: {describe_error(exc)}"
        ) from None
    if not stat.S_ISDIR(mode):
        raise SourceError(f"{parent!r}, the parent of DSN file {path!r}, is not a directory")


def _link_chain(path: str) -> Iterable[str]:
    """Paths visited following *path*'s own symlinks (not those of its directories)."""
    for _ in range(40):  # the kernel's own limit on link hops
        try:
            link = os.readlink(path)
        except OSError:
            return
        path = os.path.normpath(os.path.join(os.path.dirname(path), link))
        yield path


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)
