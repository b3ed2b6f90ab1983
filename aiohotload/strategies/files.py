"""The ``watchfiles`` strategy: a DSN kept in a file, re-read whenever the file changes.

The parent directory is watched rather than the file, so atomic renames (editors, config
tools) and Kubernetes Secret volumes (a ``..data`` symlink swapped over a new timestamped
directory) are seen as well as in-place writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import time
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass

import anyio
from watchfiles import Change, awatch

from ..errors import InvalidOptionError, InvalidURLError, SourceError
from ..url import _shorten, parse_bool

__all__ = ["WatchfilesStrategy"]

logger = logging.getLogger(__name__)

_Changes = set[tuple[Change, str]]

# Upper bound of every millisecond option, so nothing overflows watchfiles' u64 maths.
_MAX_MS = 86_400_000
# A DSN is short; the cap stops a path pointed at a huge file from filling memory.
_MAX_BYTES = 64 * 1024
# Bounds the cleanup when the consumer stops; closing normally takes about one `step`.
_CLOSE_TIMEOUT = 5.0
_MS = re.compile(r"\s*([0-9]+)\s*")
_INT_OPTIONS = {"debounce": 1, "step": 1, "poll_delay": 1, "recheck": 0}  # name -> minimum
_POLLING_ALIASES = ("polling", "force_polling")
_KNOWN_OPTIONS = ", ".join(sorted([*_INT_OPTIONS, *_POLLING_ALIASES]))


@dataclass(frozen=True)
class _Options:
    debounce: int = 200
    step: int = 10
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


class WatchfilesStrategy:
    """Yields the stripped content of a file: its current value, then each real change.

    Options (all times in milliseconds):

    - ``debounce`` (default 200): longest time changes are grouped before a re-read.
    - ``step`` (default 10): quiet time after the last change before a re-read.
    - ``polling`` or ``force_polling`` (default false): poll instead of using OS events,
      for network filesystems and some container mounts.
    - ``poll_delay`` (default 300): polling interval; when polling the file is also
      re-read this often. Also how often a vanished directory is looked for.
    - ``recheck`` (default 5000): re-read at least this often even without events;
      ``0`` disables it.

    The file's content is never logged nor put in an exception: it holds a password.
    """

    async def watch(self, path: str, options: Mapping[str, str]) -> AsyncGenerator[str, None]:
        """Yield the DSN in *path* (an absolute path), then each new DSN, until closed.

        Raises :class:`~aiohotload.InvalidOptionError`, :class:`~aiohotload.InvalidURLError`
        or, if the file cannot be read at start, :class:`~aiohotload.SourceError`.
        """
        opts = _parse_options(options)
        path = _absolute(path)
        _check_directory(path, os.path.dirname(path))
        layout = _Layout.of(path)
        try:
            watcher = await _DirWatch.start(layout.dirs, opts)
        except (OSError, RuntimeError) as exc:
            raise SourceError(
                f"cannot watch directory {layout.parent!r} of DSN file {path!r}: {_reason(exc)}"
            ) from None
        try:
            # Read only now that the watcher is installed, so no change can slip in between.
            try:
                current = _read(path)
            except _UnreadableError as exc:
                raise SourceError(f"DSN file {path!r} {exc.reason}") from None
            last_read = time.monotonic()
            logger.debug("watching DSN file %s (directories: %s)", path, ", ".join(watcher.dirs))
            yield current

            while True:
                changes = await watcher.next()
                if changes and logger.isEnabledFor(logging.DEBUG):
                    logger.debug("changes seen: %s", ", ".join(sorted(p for _, p in changes)))
                lost = changes is None or watcher.lost(changes)
                due = opts.reread > 0 and time.monotonic() - last_read >= opts.reread / 1000
                if changes and not lost and not due and not any(map(layout.wants, _paths(changes))):
                    continue
                layout = _Layout.of(path)
                if lost or layout.dirs != watcher.wanted:
                    await watcher.aclose()
                    # A watcher that failed may fail again at once: pause rather than spin.
                    watcher, layout = await _rewatch(path, opts, pause=changes is None)
                last_read = time.monotonic()
                value = _try_read(path)
                if value is None:
                    continue
                if value == current:
                    logger.debug("DSN file %s re-read, unchanged", path)
                    continue
                current = value
                logger.debug("DSN file %s changed", path)
                yield current
        finally:
            # Shielded: when an anyio scope cancels the consumer, the watcher must still stop.
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await watcher.aclose()


class _DirWatch:
    """One ``awatch`` over a fixed set of directories (non-recursive, unfiltered)."""

    def __init__(self, wanted: tuple[str, ...], dirs: tuple[str, ...], opts: _Options) -> None:
        self.wanted = wanted  # what the layout asked for; dirs may be fewer after a fallback
        self.dirs = dirs
        self._step = opts.step / 1000
        self._ids = [_identity(d) for d in dirs]
        # Our own event lets aclose() stop the thread within one step. awatch sets it only when
        # cancelled, and a cancel from an anyio scope reaches awatch only once the thread
        # returns on its own, after up to rust_timeout.
        self._stop = asyncio.Event()
        self._gen = awatch(
            *dirs,
            watch_filter=None,
            debounce=opts.debounce,
            step=opts.step,
            stop_event=self._stop,
            rust_timeout=opts.reread or _MAX_MS,
            yield_on_timeout=True,
            force_polling=opts.polling,
            poll_delay_ms=opts.poll_delay,
            recursive=False,
            ignore_permission_denied=False,
        )
        self._pending: asyncio.Task[_Changes | None] | None = None

    @classmethod
    async def start(cls, dirs: tuple[str, ...], opts: _Options) -> _DirWatch:
        """Start watching *dirs*; the OS watch is installed when this returns.

        Raises OSError or RuntimeError (watchfiles' errors) if *dirs* cannot be watched.
        """
        try:
            return await cls._start(dirs, dirs, opts)
        except (OSError, RuntimeError):
            if len(dirs) == 1:
                raise
        # The link target's directory is a bonus; the parent alone still sees most changes.
        return await cls._start(dirs, dirs[:1], opts)

    @classmethod
    async def _start(
        cls, wanted: tuple[str, ...], dirs: tuple[str, ...], opts: _Options
    ) -> _DirWatch:
        self = cls(wanted, dirs, opts)
        first = self._pending = asyncio.ensure_future(self._next_batch())
        try:
            # One loop turn runs the task's first step, which builds RustNotify (installing the
            # OS watch) before its first await; events from then on queue up in RustNotify.
            await asyncio.sleep(0)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        error = first.exception() if first.done() else None
        if error is not None:
            await self.aclose()
            raise error
        return self

    async def _next_batch(self) -> _Changes | None:
        try:
            return await anext(self._gen)
        except StopAsyncIteration:
            return None

    async def next(self) -> _Changes | None:
        """The next batch of changes, empty on a recheck timeout; None if the watcher died."""
        task = self._pending
        if task is None:
            task = self._pending = asyncio.ensure_future(self._next_batch())
        # Not `await task`, which would cancel it with us: aclose() stops it more cleanly.
        await asyncio.wait([task])
        self._pending = None
        try:
            return task.result()
        except (OSError, RuntimeError) as exc:
            logger.warning("watching %s failed: %s; restarting", ", ".join(self.dirs), _reason(exc))
            return None

    def lost(self, changes: _Changes) -> bool:
        """True if a watched directory was deleted or replaced, so its OS watch is gone."""
        deleted = (path for change, path in changes if change == Change.deleted)
        if any(p in self.dirs for p in _paths_of(deleted)):
            return True  # the inode number may be reused at once, so identity alone misses it
        return any(_identity(d) != ident for d, ident in zip(self.dirs, self._ids, strict=True))

    async def aclose(self) -> None:
        """Stop the watcher thread and release the OS watch; idempotent."""
        self._stop.set()
        task, self._pending = self._pending, None
        if task is not None:
            # The thread sees the stop event within one step; letting it return (rather than
            # cancelling at once) hands anyio's worker thread back before a new watcher wants one.
            await asyncio.wait([task], timeout=self._step + 1)
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not warn about it
        await self._gen.aclose()


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

    def wants(self, changed: str) -> bool:
        if changed in self.relevant or changed in self.dirs:
            return True
        # Kubernetes' AtomicWriter names everything it swaps ``..something``.
        name = os.path.basename(changed)
        return name.startswith("..") and os.path.dirname(changed) == self.parent


async def _rewatch(path: str, opts: _Options, *, pause: bool) -> tuple[_DirWatch, _Layout]:
    """Start a new watcher, waiting for the parent directory to (re)appear."""
    delay = min(opts.poll_delay, opts.recheck or opts.poll_delay) / 1000
    if pause:
        await asyncio.sleep(delay)
    while True:
        layout = _Layout.of(path)
        if _is_directory(layout.parent):
            try:
                watcher = await _DirWatch.start(layout.dirs, opts)
            except (OSError, RuntimeError) as exc:
                logger.debug("cannot watch %s yet: %s", layout.parent, _reason(exc))
            else:
                logger.debug(
                    "watching DSN file %s again (directories: %s)", path, ", ".join(watcher.dirs)
                )
                return watcher, layout
        else:
            logger.debug("directory %s is gone; waiting for it to reappear", layout.parent)
        await asyncio.sleep(delay)


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
        raise _UnreadableError(f"cannot be opened: {_reason(exc)}") from None
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
        raise _UnreadableError(f"cannot be read: {_reason(exc)}") from None
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
    ms: dict[str, int] = {}
    polling: bool | None = None  # None: not given, so a second spelling can be caught
    for name, value in options.items():
        if name in _INT_OPTIONS:
            ms[name] = _parse_ms(name, value, _INT_OPTIONS[name])
        elif name in _POLLING_ALIASES:
            if polling is not None:
                raise InvalidOptionError(
                    "options 'polling' and 'force_polling' mean the same; give one"
                )
            polling = parse_bool(name, value)
        else:
            raise InvalidOptionError(
                f"unknown option {_shorten(name)!r} for the watchfiles strategy; "
                f"known: {_KNOWN_OPTIONS}"
            )
    defaults = _Options()
    return _Options(
        debounce=ms.get("debounce", defaults.debounce),
        step=ms.get("step", defaults.step),
        polling=defaults.polling if polling is None else polling,
        poll_delay=ms.get("poll_delay", defaults.poll_delay),
        recheck=ms.get("recheck", defaults.recheck),
    )


def _parse_ms(name: str, value: str, minimum: int) -> int:
    m = _MS.fullmatch(value)
    number = int(m.group(1)) if m else -1
    if not minimum <= number <= _MAX_MS:
        raise InvalidOptionError(
            f"option {name!r} must be a whole number of milliseconds from {minimum} "
            f"to {_MAX_MS}; got {_shorten(value)!r}"
        )
    return number


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
            f"cannot access directory {parent!r} of DSN file {path!r}: {_reason(exc)}"
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


def _paths(changes: _Changes) -> Iterator[str]:
    return _paths_of(path for _, path in changes)


def _paths_of(paths: Iterable[str]) -> Iterator[str]:
    # watchfiles joins the watched path and the name; normalise to compare with ours.
    return (os.path.normpath(p) for p in paths)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _is_directory(path: str) -> bool:
    return os.path.isdir(path)


def _identity(directory: str) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
