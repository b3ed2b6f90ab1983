"""Many watchfiles subscribers sharing one directory watcher per event loop (issue 4)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from watchfiles._rust_notify import RustNotify

from aiohotload.strategies import _dir_watcher, _watch_hub
from aiohotload.strategies.files import WatchfilesStrategy

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts threads and inotify watches in /proc"
)

EVENTS_ONLY = {"recheck": "0"}  # every change below must be seen through events

Gen = AsyncGenerator[str, None]


def dsn(name: str, version: object) -> str:
    return f"postgres://{name}:pw-{version}@db/app"


def make(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def watch(path: Path, **options: str) -> Gen:
    return WatchfilesStrategy().watch(str(path), {**EVENTS_ONLY, **options})


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def next_value(gen: Gen, timeout: float = 5.0) -> str:
    with anyio.fail_after(timeout):
        return await anext(gen)


def os_threads() -> int:
    """Threads of this process, the Rust ones included."""
    return len(os.listdir("/proc/self/task"))


def inotify_instances() -> list[list[int]]:
    """For each inotify instance of this process, the inode numbers it watches."""
    instances = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                # "inotify wd:1 ino:20e002 sdev:fe00000 ...": one line per watch, inode in hex.
                lines = [line.split() for line in info if line.startswith("inotify wd:")]
        except OSError:
            continue  # closed meanwhile
        instances.append([int(line[2].removeprefix("ino:"), 16) for line in lines])
    return instances


def inotify_watches() -> list[int]:
    """For each inotify instance of this process, how many watches it holds."""
    return sorted(len(inodes) for inodes in inotify_instances())


def watched(directory: Path) -> bool:
    return any(directory.stat().st_ino in inodes for inodes in inotify_instances())


class Subscribers:
    """Generators for many DSN files, each consumed by a task recording every value."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self._stack = stack
        self.values: dict[Path, list[str]] = {}

    async def add(self, paths: Sequence[Path], **options: str) -> None:
        """Start watching *paths* concurrently; returns once each gave its first value."""
        firsts = [asyncio.Event() for _ in paths]
        for path, first in zip(paths, firsts, strict=True):
            self._stack.push_async_callback(self._consume(path, first, options))
        with anyio.fail_after(10):
            await asyncio.gather(*(f.wait() for f in firsts))

    def _consume(
        self, path: Path, first: asyncio.Event, options: dict[str, str]
    ) -> Callable[[], Any]:
        values = self.values[path] = []

        async def run() -> None:
            gen = watch(path, **options)
            try:
                async for value in gen:
                    values.append(value)
                    first.set()
            finally:
                await gen.aclose()

        task = asyncio.create_task(run())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # raises what the generator raised, if anything

        return stop

    async def settle(self, expected: dict[Path, str], timeout: float = 10.0) -> None:
        """Wait until each path's latest value is the expected one."""
        await until(lambda: all(self.values[p][-1] == v for p, v in expected.items()), timeout)


@asynccontextmanager
async def subscribers() -> AsyncIterator[Subscribers]:
    async with AsyncExitStack() as stack:
        yield Subscribers(stack)


@pytest.fixture
def baseline() -> tuple[int, list[int]]:
    """Threads and inotify watches before the test starts any watcher."""
    return os_threads(), inotify_watches()


async def no_watcher_left(baseline: tuple[int, list[int]]) -> None:
    threads, watches = baseline
    await until(lambda: os_threads() <= threads and inotify_watches() == watches)
    assert not _watch_hub._hubs.get(asyncio.get_running_loop())
    assert asyncio.all_tasks() == {asyncio.current_task()}


# ---------------------------------------------------------------------------- sharing


async def test_many_subscribers_in_one_directory_share_one_watcher(
    tmp_path: Path, baseline: tuple[int, list[int]]
) -> None:
    threads, watches = baseline
    paths = [make(tmp_path / "tenants" / f"t{i}.dsn", dsn(f"t{i}", 0)) for i in range(200)]
    async with subscribers() as subs:
        await subs.add(paths[:1])
        # One thread reads the watcher, one is Rust's; they should be all the 200 ever need.
        await until(lambda: os_threads() <= threads + 2)
        one = os_threads()
        await subs.add(paths[1:])
        await until(lambda: inotify_watches() == sorted([*watches, 1]))
        assert os_threads() <= one

        for round_ in (1, 2):
            changed = paths if round_ == 1 else paths[::2]
            for p in changed:
                p.write_text(dsn(p.stem, round_))
            await subs.settle({p: dsn(p.stem, round_) for p in changed})
        for p in paths:
            p.write_text(dsn(p.stem, "final"))
        await subs.settle({p: dsn(p.stem, "final") for p in paths})
        assert os_threads() <= one

        # Each saw its own changes, each once: nothing from a neighbour, nothing twice.
        for i, p in enumerate(paths):
            versions = [0, 1, 2, "final"] if i % 2 == 0 else [0, 1, "final"]
            assert subs.values[p] == [dsn(p.stem, v) for v in versions]
    await no_watcher_left(baseline)


async def test_directories_of_concurrent_joins_share_one_watcher(
    tmp_path: Path, baseline: tuple[int, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    threads, watches = baseline
    started = count_watchers(monkeypatch)
    paths = [make(tmp_path / f"d{i % 20}" / f"t{i}.dsn", dsn(f"t{i}", 0)) for i in range(100)]
    async with subscribers() as subs:
        await subs.add(paths)  # all at once, as a service opening its pools with gather()
        # One watcher over the 20 directories; the joins were coalesced into few restarts.
        assert len(started) <= 3
        await until(lambda: inotify_watches() == sorted([*watches, 20]))
        await until(lambda: os_threads() <= threads + 2)
        for p in paths:
            p.write_text(dsn(p.stem, 1))
        await subs.settle({p: dsn(p.stem, 1) for p in paths})
        assert all(subs.values[p] == [dsn(p.stem, 0), dsn(p.stem, 1)] for p in paths)
    await no_watcher_left(baseline)


async def test_directories_of_one_by_one_joins_share_one_watcher(
    tmp_path: Path, baseline: tuple[int, list[int]]
) -> None:
    threads, watches = baseline
    paths = [make(tmp_path / f"d{i}" / "dsn", dsn(f"t{i}", 0)) for i in range(50)]
    async with subscribers() as subs:
        for p in paths:
            await subs.add([p])
        await until(lambda: inotify_watches() == sorted([*watches, 50]))
        await until(lambda: os_threads() <= threads + 2)
        for p in paths:
            p.write_text(dsn(p.parent.name, 1))
        await subs.settle({p: dsn(p.parent.name, 1) for p in paths})
    await no_watcher_left(baseline)


async def test_different_watcher_options_get_their_own_watcher(
    tmp_path: Path, baseline: tuple[int, list[int]]
) -> None:
    _, watches = baseline
    a = make(tmp_path / "a.dsn", dsn("a", 0))
    b = make(tmp_path / "b.dsn", dsn("b", 0))
    c = make(tmp_path / "c.dsn", dsn("c", 0))
    async with subscribers() as subs:
        # recheck is each subscriber's own: it does not need a watcher of its own.
        await subs.add([a], recheck="0")
        await subs.add([b], recheck="60000")
        await until(lambda: inotify_watches() == sorted([*watches, 1]))
        await subs.add([c], debounce="100")
        await until(lambda: inotify_watches() == sorted([*watches, 1, 1]))
        for p in (a, b, c):
            p.write_text(dsn(p.stem, 1))
        await subs.settle({p: dsn(p.stem, 1) for p in (a, b, c)})
    await no_watcher_left(baseline)


async def test_each_event_loop_has_its_own_hub(
    tmp_path: Path, baseline: tuple[int, list[int]]
) -> None:
    _, watches = baseline
    path = make(tmp_path / "dsn", dsn("app", 0))
    seen: list[str] = []

    async def elsewhere() -> None:
        gen = watch(path)
        try:
            seen.append(await next_value(gen))
            seen.append(await next_value(gen))
        finally:
            await gen.aclose()

    thread = threading.Thread(target=asyncio.run, args=(elsewhere(),))
    thread.start()
    async with subscribers() as subs:
        await subs.add([path])
        await until(lambda: len(seen) == 1)
        # Two loops, two hubs: a hub's task and futures belong to its loop.
        await until(lambda: inotify_watches() == sorted([*watches, 1, 1]))
        path.write_text(dsn("app", 1))
        await subs.settle({path: dsn("app", 1)})
        await until(lambda: not thread.is_alive())
    assert seen == [dsn("app", 0), dsn("app", 1)]
    await no_watcher_left(baseline)


# ---------------------------------------------------------------------------- joining, leaving


async def test_a_join_loses_no_change_of_the_others(
    tmp_path: Path, baseline: tuple[int, list[int]]
) -> None:
    # A long step keeps a change in the old watcher, still grouping it, when the join below
    # replaces that watcher: the old one stops and drops it, so the hub must re-read for us.
    options = {"step": "100", "debounce": "300"}
    a = make(tmp_path / "a" / "dsn", dsn("a", 0))
    async with subscribers() as subs:
        await subs.add([a], **options)
        for i in range(1, 6):
            a.write_text(dsn("a", i))  # before the join
            b = make(tmp_path / f"b{i}" / "dsn", dsn(f"b{i}", 0))
            await subs.add([b], **options)
            await subs.settle({a: dsn("a", i)})
            a.write_text(dsn("a", f"{i}-after"))  # right after it: the new watcher's
            await subs.settle({a: dsn("a", f"{i}-after")})
        expected = [(i, f"{i}-after") for i in range(1, 6)]
        assert subs.values[a] == [dsn("a", v) for v in [0, *(v for pair in expected for v in pair)]]
    await no_watcher_left(baseline)


async def test_a_joiner_sees_a_change_right_after_its_first_value(
    tmp_path: Path, baseline: tuple[int, list[int]]
) -> None:
    a = make(tmp_path / "a" / "dsn", dsn("a", 0))
    async with subscribers() as subs:
        await subs.add([a])
        for i in range(5):
            # Its directory is new to the hub, so it waits for a new watcher before reading.
            b = make(tmp_path / f"b{i}" / "dsn", dsn(f"b{i}", 0))
            gen = watch(b)
            try:
                assert await next_value(gen) == dsn(f"b{i}", 0)
                assert watched(b.parent)
                b.write_text(dsn(f"b{i}", 1))
                assert await next_value(gen) == dsn(f"b{i}", 1)
            finally:
                await gen.aclose()
        a.write_text(dsn("a", 1))
        await subs.settle({a: dsn("a", 1)})
    await no_watcher_left(baseline)


async def test_leaving_keeps_the_others_watched_and_frees_the_directory(
    tmp_path: Path, baseline: tuple[int, list[int]]
) -> None:
    _, watches = baseline
    a = make(tmp_path / "a" / "dsn", dsn("a", 0))
    b = make(tmp_path / "b" / "dsn", dsn("b", 0))
    async with subscribers() as stay:
        await stay.add([a])
        async with subscribers() as leave:
            await leave.add([b])
            await until(lambda: inotify_watches() == sorted([*watches, 2]))
        a.write_text(dsn("a", 1))
        await stay.settle({a: dsn("a", 1)})
        # b is dropped from the union when the watcher is next replaced, here for c.
        c = make(tmp_path / "c" / "dsn", dsn("c", 0))
        async with subscribers() as join:
            await join.add([c])
            await until(lambda: inotify_watches() == sorted([*watches, 2]))
            a.write_text(dsn("a", 2))
            c.write_text(dsn("c", 1))
            await stay.settle({a: dsn("a", 2)})
            await join.settle({c: dsn("c", 1)})
    await no_watcher_left(baseline)


async def test_last_one_out_stops_the_watcher_and_a_newcomer_starts_another(
    tmp_path: Path, baseline: tuple[int, list[int]]
) -> None:
    a = make(tmp_path / "a.dsn", dsn("a", 0))
    for i in range(3):
        async with subscribers() as subs:
            await subs.add([a])
            a.write_text(dsn("a", f"{i}-1"))
            await subs.settle({a: dsn("a", f"{i}-1")})
        await no_watcher_left(baseline)


# ---------------------------------------------------------------------------- recheck


async def test_recheck_is_each_subscriber_s_own_in_a_busy_shared_directory(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    quiet = [make(shared / f"q{i}.dsn", dsn(f"q{i}", 0)) for i in range(20)]
    rechecked = make(shared / "r.dsn", dsn("r", 0))
    # A write through a hard link elsewhere raises no event in the watched directory.
    os.link(rechecked, tmp_path / "elsewhere")
    async with subscribers() as subs:
        await subs.add(quiet)
        await subs.add([rechecked], recheck="100")
        (tmp_path / "elsewhere").write_text(dsn("r", 1))
        # Unrelated files changing all the time keep the shared watcher busy.
        with anyio.fail_after(3):
            while subs.values[rechecked][-1] != dsn("r", 1):
                (shared / "noise").write_text(str(asyncio.get_running_loop().time()))
                await asyncio.sleep(0.005)
        assert all(subs.values[p] == [dsn(p.stem, 0)] for p in quiet)


# ---------------------------------------------------------------------------- failures


class FlakyNotify:
    """Wraps RustNotify; its watch() fails once when told to, as a watcher error would."""

    fail = threading.Event()
    created = 0

    def __init__(self, *args: Any) -> None:
        self._inner = RustNotify(*args)
        type(self).created += 1

    def watch(self, *args: Any) -> Any:
        result = self._inner.watch(*args)
        if result != "stop" and self.fail.is_set():
            self.fail.clear()
            raise RuntimeError("injected watcher failure")
        return result

    def close(self) -> None:
        self._inner.close()


def count_watchers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Record the directories of each watcher started from now on."""
    started: list[tuple[str, ...]] = []

    def counting(paths: list[str], *args: Any) -> Any:
        started.append(tuple(paths))
        return RustNotify(paths, *args)

    monkeypatch.setattr(_dir_watcher, "RustNotify", counting)
    return started


async def test_watcher_failure_reaches_every_subscriber(
    tmp_path: Path,
    baseline: tuple[int, list[int]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_dir_watcher, "RustNotify", FlakyNotify)
    paths = [make(tmp_path / f"d{i % 3}" / f"t{i}.dsn", dsn(f"t{i}", 0)) for i in range(12)]
    async with subscribers() as subs:
        await subs.add(paths, poll_delay="50")
        created = FlakyNotify.created
        FlakyNotify.fail.set()
        # The batch carrying these changes fails: every subscriber must still see its change.
        for p in paths:
            p.write_text(dsn(p.stem, 1))
        await subs.settle({p: dsn(p.stem, 1) for p in paths})
        assert "injected watcher failure; restarting" in caplog.text
        assert FlakyNotify.created > created  # a new watcher, not a new hub per subscriber
        for p in paths:
            p.write_text(dsn(p.stem, 2))
        await subs.settle({p: dsn(p.stem, 2) for p in paths})
    await no_watcher_left(baseline)


async def test_a_failed_hub_is_replaced_and_its_subscribers_rejoin(
    tmp_path: Path,
    baseline: tuple[int, list[int]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    paths = [make(tmp_path / f"d{i % 2}" / f"t{i}.dsn", dsn(f"t{i}", 0)) for i in range(6)]
    async with subscribers() as subs:
        await subs.add(paths, poll_delay="50")
        hub = _watch_hub._hubs[asyncio.get_running_loop()]
        update = _watch_hub._Hub._update

        def broken(self: _watch_hub._Hub) -> None:
            monkeypatch.setattr(_watch_hub._Hub, "_update", update)
            raise RuntimeError("injected bug")

        monkeypatch.setattr(_watch_hub._Hub, "_update", broken)
        caplog.set_level(logging.ERROR)
        newcomer = make(tmp_path / "new" / "dsn", dsn("new", 0))
        await subs.add([newcomer], poll_delay="50")  # wakes the hub, which fails
        assert "directory watcher hub failed" in caplog.text
        everyone = [*paths, newcomer]
        for p in everyone:
            p.write_text(dsn(p.stem, 1))
        await subs.settle({p: dsn(p.stem, 1) for p in everyone})
        assert _watch_hub._hubs[asyncio.get_running_loop()] != hub
    await no_watcher_left(baseline)


async def test_shared_directory_deleted_and_recreated(
    tmp_path: Path, baseline: tuple[int, list[int]]
) -> None:
    gone = [make(tmp_path / "gone" / f"t{i}.dsn", dsn(f"g{i}", 0)) for i in range(5)]
    kept = [make(tmp_path / "kept" / f"t{i}.dsn", dsn(f"k{i}", 0)) for i in range(5)]
    async with subscribers() as subs:
        await subs.add([*gone, *kept], poll_delay="30")
        for p in gone:
            p.unlink()
        gone[0].parent.rmdir()
        for p in kept:
            p.write_text(dsn(p.stem, 1))  # while the watcher is being replaced
        await subs.settle({p: dsn(p.stem, 1) for p in kept})
        for p in gone:
            make(p, dsn(p.stem, 1))
        await subs.settle({p: dsn(p.stem, 1) for p in gone})
        for p in [*gone, *kept]:
            p.write_text(dsn(p.stem, 2))
        await subs.settle({p: dsn(p.stem, 2) for p in [*gone, *kept]})
    await no_watcher_left(baseline)
