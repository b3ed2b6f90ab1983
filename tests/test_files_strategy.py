"""The watchfiles strategy against real files in a temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from aiohotload.errors import InvalidOptionError, InvalidURLError, SourceError
from aiohotload.strategies import Feedback, Strategy, get_strategy
from aiohotload.strategies.files import WatchfilesStrategy

# recheck=0 by default so every change below must be seen through events, not the safety net.
EVENTS_ONLY = {"recheck": "0"}


def write(path: Path, text: str) -> None:
    path.write_text(text)


def replace(path: Path, text: str) -> None:
    """Write like an editor or a config tool: a temporary file renamed over the target."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink()


def make_unusable(path: Path, how: str) -> None:
    """Leave something at *path* that cannot be read as a DSN."""
    if how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "symlink loop":
        path.unlink()
        path.symlink_to("loop")
        (path.parent / "loop").symlink_to(path.name)
    else:
        write(path, "postgres://app:unreadable@db/app")
        path.chmod(0)


def watch(path: Path | str, **options: str) -> AsyncGenerator[str, None]:
    return WatchfilesStrategy().watch(str(path), {**EVENTS_ONLY, **options})


@asynccontextmanager
async def watching(path: Path | str, **options: str) -> AsyncIterator[AsyncGenerator[str, None]]:
    gen = watch(path, **options)
    try:
        yield gen
    finally:
        await gen.aclose()


async def next_value(gen: AsyncGenerator[str, None], timeout: float = 5.0) -> str:
    with anyio.fail_after(timeout):
        return await anext(gen)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def next_soon(gen: AsyncGenerator[str, None]) -> asyncio.Task[str]:
    """Ask for the next value now, so the watcher runs while the test changes the file."""

    async def get() -> str:
        return await anext(gen)

    return asyncio.create_task(get())


async def result(task: asyncio.Task[str], timeout: float = 5.0) -> str:
    with anyio.fail_after(timeout):
        return await task


class Log:
    """The strategy's own log records, to wait on what it has done."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG, logger="aiohotload.strategies.files")
        self._caplog = caplog

    def count(self, fragment: str) -> int:
        records = self._caplog.records
        return sum(fragment in r.getMessage() for r in records if r.name.startswith("aiohotload"))

    async def wait(self, fragment: str, times: int = 1) -> None:
        await until(lambda: self.count(fragment) >= times)


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Log:
    return Log(caplog)


def os_threads() -> int:
    """Threads of this process, including the ones Rust starts that Python cannot see."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


@pytest.fixture
def dsn(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "dsn"
    path.parent.mkdir()
    write(path, "postgres://app:pw0@db/app\n")
    return path


def test_registered_under_both_schemes() -> None:
    assert isinstance(get_strategy("watchfiles"), WatchfilesStrategy)
    assert get_strategy("fsnotify") is get_strategy("watchfiles")
    assert isinstance(WatchfilesStrategy(), Strategy)


# ---------------------------------------------------------------------------- changes


async def test_initial_value_is_stripped(dsn: Path) -> None:
    async with watching(dsn) as gen:
        assert await next_value(gen) == "postgres://app:pw0@db/app"


async def test_in_place_write(dsn: Path) -> None:
    async with watching(dsn) as gen:
        await next_value(gen)
        for i in range(1, 4):
            write(dsn, f"postgres://app:pw{i}@db/app")
            assert await next_value(gen) == f"postgres://app:pw{i}@db/app"


async def test_atomic_rename(dsn: Path) -> None:
    async with watching(dsn) as gen:
        await next_value(gen)
        for i in range(1, 4):
            replace(dsn, f"postgres://app:pw{i}@db/app")
            assert await next_value(gen) == f"postgres://app:pw{i}@db/app"


class SecretVolume:
    """A Kubernetes Secret volume as kubelet's AtomicWriter lays it out and updates it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        self.current: Path | None = None

    def publish(self, value: str) -> None:
        self.version += 1
        stamp = self.root / f"..2026_11_28_01_02_03.{self.version:09d}"
        stamp.mkdir()
        (stamp / "dsn").write_text(value)
        if self.current is None:
            (self.root / "..data").symlink_to(stamp.name)
            (self.root / "dsn").symlink_to("..data/dsn")
        else:
            (self.root / "..data_tmp").symlink_to(stamp.name)
            os.rename(self.root / "..data_tmp", self.root / "..data")
            shutil.rmtree(self.current)
        self.current = stamp


async def test_kubernetes_secret_symlink_swap(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path)
    volume.publish("postgres://app:pw0@db/app")
    async with watching(tmp_path / "dsn") as gen:
        assert await next_value(gen) == "postgres://app:pw0@db/app"
        for i in range(1, 4):
            volume.publish(f"postgres://app:pw{i}@db/app")
            assert await next_value(gen) == f"postgres://app:pw{i}@db/app"
        # Updates back to back, as when a Secret is edited twice quickly: the last one wins.
        for i in range(4, 7):
            volume.publish(f"postgres://app:pw{i}@db/app")
        value = await next_value(gen)
        while value != "postgres://app:pw6@db/app":
            value = await next_value(gen)


async def test_target_outside_the_directory_is_watched(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "vault").mkdir()
    (tmp_path / "other").mkdir()
    target = tmp_path / "vault" / "dsn"
    write(target, "postgres://app:pw0@db/app")
    link = tmp_path / "app" / "dsn"
    link.symlink_to(target)
    async with watching(link) as gen:
        assert await next_value(gen) == "postgres://app:pw0@db/app"
        # Only the target's directory sees an in-place write of the target.
        write(target, "postgres://app:pw1@db/app")
        assert await next_value(gen) == "postgres://app:pw1@db/app"
        # Re-pointing the link moves the watch along with it.
        other = tmp_path / "other" / "dsn"
        write(other, "postgres://app:pw2@db/app")
        tmp_link = link.with_name("dsn.tmp")
        tmp_link.symlink_to(other)
        os.replace(tmp_link, link)
        assert await next_value(gen) == "postgres://app:pw2@db/app"
        write(other, "postgres://app:pw3@db/app")
        assert await next_value(gen) == "postgres://app:pw3@db/app"


async def test_delete_then_recreate(dsn: Path) -> None:
    async with watching(dsn) as gen:
        await next_value(gen)
        remove(dsn)
        write(dsn, "postgres://app:pw1@db/app")
        assert await next_value(gen) == "postgres://app:pw1@db/app"


async def test_empty_file_then_a_value(dsn: Path, log: Log) -> None:
    async with watching(dsn) as gen:
        await next_value(gen)
        task = next_soon(gen)
        write(dsn, "  \n")
        await log.wait("is empty")
        write(dsn, "postgres://app:pw1@db/app")
        assert await result(task) == "postgres://app:pw1@db/app"


async def test_identical_content_yields_nothing(dsn: Path, log: Log) -> None:
    async with watching(dsn) as gen:
        first = await next_value(gen)
        task = next_soon(gen)
        write(dsn, first + "\n")
        await log.wait("unchanged", 1)
        replace(dsn, f"  {first}  \n\n")
        await log.wait("unchanged", 2)
        assert not task.done()
        write(dsn, "postgres://app:pw1@db/app")
        assert await result(task) == "postgres://app:pw1@db/app"


async def test_burst_settles_on_the_last_value(dsn: Path) -> None:
    async with watching(dsn) as gen:
        await next_value(gen)
        task = next_soon(gen)
        for i in range(20):
            write(dsn, f"postgres://app:pw{i:02d}@db/app")
            await asyncio.sleep(0.002)
        seen = [await result(task)]
        while seen[-1] != "postgres://app:pw19@db/app":
            seen.append(await next_value(gen))
        # Values only move forward: no stale value arrives after a newer one.
        assert seen == sorted(set(seen))
        write(dsn, "postgres://app:final@db/app")
        assert await next_value(gen) == "postgres://app:final@db/app"


async def test_change_right_after_the_first_value_is_not_lost(dsn: Path) -> None:
    for i in range(5):
        write(dsn, f"postgres://app:start{i}@db/app")
        async with watching(dsn) as gen:
            assert await next_value(gen) == f"postgres://app:start{i}@db/app"
            write(dsn, f"postgres://app:next{i}@db/app")
            assert await next_value(gen) == f"postgres://app:next{i}@db/app"


async def test_polling_sees_quick_same_size_writes(dsn: Path) -> None:
    # watchfiles' poller compares mtimes in whole seconds; these writes come faster.
    async with watching(dsn, polling="true", poll_delay="30") as gen:
        await next_value(gen)
        for i in range(1, 6):
            write(dsn, f"postgres://app:pw{i}@db/app")
            assert await next_value(gen) == f"postgres://app:pw{i}@db/app"
        replace(dsn, "postgres://app:pw6@db/app")
        assert await next_value(gen) == "postgres://app:pw6@db/app"


async def test_recheck_rereads_without_events(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = tmp_path / "a" / "dsn"
    write(path, "postgres://app:pw0@db/app")
    # A write through a hard link elsewhere raises no event in the watched directory.
    os.link(path, tmp_path / "b" / "dsn")
    async with watching(path, recheck="50") as gen:
        await next_value(gen)
        write(tmp_path / "b" / "dsn", "postgres://app:pw1@db/app")
        assert await next_value(gen, timeout=2) == "postgres://app:pw1@db/app"


async def test_recheck_happens_in_a_busy_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = tmp_path / "a" / "dsn"
    write(path, "postgres://app:pw0@db/app")
    os.link(path, tmp_path / "b" / "dsn")
    async with watching(path, recheck="50") as gen:
        await next_value(gen)
        task = next_soon(gen)
        write(tmp_path / "b" / "dsn", "postgres://app:pw1@db/app")
        # Unrelated files changing all the time keep watchfiles from ever timing out.
        with anyio.fail_after(2):
            while not task.done():
                write(tmp_path / "a" / "noise", str(time.monotonic()))
                await asyncio.sleep(0.005)
        assert task.result() == "postgres://app:pw1@db/app"


async def test_refresh_request_rereads_at_once(tmp_path: Path, log: Log) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = tmp_path / "a" / "dsn"
    write(path, "postgres://app:pw0@db/app")
    # A write through a hard link elsewhere raises no event, and recheck is off: only the
    # pool's request can make the strategy look again.
    os.link(path, tmp_path / "b" / "dsn")
    feedback = Feedback()
    gen = WatchfilesStrategy().watch(str(path), EVENTS_ONLY, feedback=feedback)
    try:
        await next_value(gen)
        task = next_soon(gen)
        write(tmp_path / "b" / "dsn", "postgres://app:pw1@db/app")
        feedback.release("postgres://app:pw0@db/app")  # nothing to do for a file
        feedback.request_refresh()
        assert await result(task) == "postgres://app:pw1@db/app"
        # Asked again with nothing new: read, and nothing yielded.
        task = next_soon(gen)
        feedback.request_refresh()
        await log.wait("re-read on the pool's request, unchanged")
        write(path, "postgres://app:pw2@db/app")  # and events still count
        assert await result(task) == "postgres://app:pw2@db/app"
    finally:
        await gen.aclose()


async def test_the_pool_s_news_of_released_dsns_triggers_no_read(dsn: Path, log: Log) -> None:
    feedback = Feedback()
    gen = WatchfilesStrategy().watch(str(dsn), EVENTS_ONLY, feedback=feedback)
    try:
        await next_value(gen)
        task = next_soon(gen)
        feedback.release("postgres://app:pw0@db/app")
        await until(lambda: not feedback.pending)  # the strategy took the news
        feedback.request_refresh()
        await log.wait("re-read on the pool's request, unchanged")
        # Had the release made it read, that read would have been logged first.
        assert log.count("re-read") == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await gen.aclose()


@pytest.mark.parametrize("gap", [0.0, 0.2])
async def test_parent_directory_deleted_and_recreated(dsn: Path, gap: float) -> None:
    async with watching(dsn, poll_delay="30") as gen:
        await next_value(gen)
        shutil.rmtree(dsn.parent)
        await asyncio.sleep(gap)  # pace: 0.2 s leaves the watcher waiting for the directory
        dsn.parent.mkdir()
        write(dsn, "postgres://app:pw1@db/app")
        assert await next_value(gen) == "postgres://app:pw1@db/app"
        # The new directory is watched through events again (recheck is off).
        write(dsn, "postgres://app:pw2@db/app")
        assert await next_value(gen) == "postgres://app:pw2@db/app"


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("directory", "is a directory"),
        ("symlink loop", "symbolic links"),
        ("permission denied", "Permission denied"),
    ],
)
async def test_unusable_file_yields_nothing_and_keeps_watching(
    dsn: Path, log: Log, breakage: str, reason: str
) -> None:
    if breakage == "permission denied" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    async with watching(dsn) as gen:
        await next_value(gen)
        task = next_soon(gen)
        make_unusable(dsn, breakage)
        await log.wait(reason)
        remove(dsn)
        write(dsn, "postgres://app:pw1@db/app")
        assert await result(task) == "postgres://app:pw1@db/app"


async def test_content_is_never_logged(
    dsn: Path, log: Log, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with watching(dsn) as gen:
        await next_value(gen)
        write(dsn, "postgres://app:hunter2@db/app")
        await next_value(gen)
        task = next_soon(gen)
        dsn.write_bytes(b"\xff not utf-8 hunter3")
        await log.wait("is not valid UTF-8")
        write(dsn, "postgres://app:hunter4@db/app")
        await result(task)
    assert "pw0" not in caplog.text
    assert "hunter" not in caplog.text


# ---------------------------------------------------------------------------- bad input


async def test_unknown_option_lists_the_known_ones(dsn: Path) -> None:
    with pytest.raises(InvalidOptionError, match=r"'debounse'.*known: debounce, force_polling"):
        await anext(watch(dsn, debounse="100"))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("debounce", "0"),
        ("debounce", "-5"),
        ("step", "fast"),
        ("step", "1.5"),
        ("poll_delay", ""),
        ("recheck", "-1"),
        ("recheck", "1e9"),
        ("debounce", "99999999999999999999"),
        ("polling", "maybe"),
        ("force_polling", "2"),
    ],
)
async def test_bad_option_value_names_option_and_value(dsn: Path, name: str, value: str) -> None:
    with pytest.raises(InvalidOptionError, match=rf"'{name}'.*{value!r}"):
        await anext(watch(dsn, **{name: value}))


async def test_both_polling_spellings_are_refused(dsn: Path) -> None:
    with pytest.raises(InvalidOptionError, match="'polling' and 'force_polling'"):
        await anext(watch(dsn, polling="true", force_polling="true"))


async def test_good_options_are_accepted(dsn: Path) -> None:
    options = {"debounce": "50", "step": " 5 ", "force_polling": "off", "poll_delay": "1"}
    async with watching(dsn, recheck="0", **options) as gen:
        assert await next_value(gen) == "postgres://app:pw0@db/app"


async def test_relative_path_is_refused() -> None:
    with pytest.raises(InvalidURLError, match=r"absolute.*'secrets/dsn'"):
        await anext(WatchfilesStrategy().watch("secrets/dsn", {}))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing file", r"'{path}' does not exist"),
        ("missing dir", r"directory '{parent}' of DSN file '{path}' does not exist"),
        ("parent is a file", r"'{parent}', the parent of DSN file '{path}', is not a directory"),
        ("directory", r"'{path}' is a directory"),
        ("empty", r"'{path}' is empty"),
        ("fifo", r"'{path}' is not a regular file"),
        ("not utf-8", r"'{path}' is not valid UTF-8"),
    ],
)
async def test_unusable_source_at_start(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / "secrets" / "dsn"
    if setup == "missing dir":
        pass
    elif setup == "parent is a file":
        write(path.parent, "not a directory")
    else:
        path.parent.mkdir()
        if setup == "directory":
            path.mkdir()
        elif setup == "empty":
            write(path, " \n\t")
        elif setup == "fifo":
            os.mkfifo(path)  # would block a plain open() forever
        elif setup == "not utf-8":
            path.write_bytes(b"postgres://app:\xff@db/app")
    expected = message.format(path=path, parent=path.parent)
    with anyio.fail_after(2), pytest.raises(SourceError, match=expected) as info:
        await anext(watch(path))
    assert "\\xff" not in str(info.value)


# ---------------------------------------------------------------------------- clean-up


async def test_close_leaves_no_tasks_or_threads(dsn: Path) -> None:
    # anyio keeps an idle worker thread per loop for reuse: have it made before counting.
    async with watching(dsn) as gen:
        await next_value(gen)
        write(dsn, "postgres://app:warm@db/app")
        await next_value(gen)
    tasks = asyncio.all_tasks()
    threads, py_threads = os_threads(), threading.active_count()

    for i in range(3):
        # Closed right after the first value: the first batch is being waited for.
        gen = watch(dsn, recheck="60000")
        await next_value(gen)
        started = time.monotonic()
        await gen.aclose()
        assert time.monotonic() - started < 1

        # Closed after a change: awatch is suspended at its yield, nothing is waited for.
        gen = watch(dsn, recheck="60000")
        await next_value(gen)
        write(dsn, f"postgres://app:a{i}@db/app")
        await next_value(gen)
        await gen.aclose()

        # Cancelled while waiting for a change.
        gen = watch(dsn, recheck="60000")
        await next_value(gen)
        consumer = next_soon(gen)
        write(dsn, f"postgres://app:b{i}@db/app")
        await asyncio.sleep(0)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await gen.aclose()

    assert asyncio.all_tasks() == tasks
    await until(lambda: os_threads() <= threads and threading.active_count() <= py_threads, 2)


async def test_cancel_by_anyio_scope_is_prompt(dsn: Path) -> None:
    # awatch alone keeps its thread, and so the cancelled task, until rust_timeout.
    gen = watch(dsn, recheck="3000")
    await next_value(gen)
    write(dsn, "postgres://app:pw1@db/app")
    await next_value(gen)  # past the first batch, which runs differently
    started = time.monotonic()
    with anyio.move_on_after(0.1):
        await anext(gen)
    assert time.monotonic() - started < 1
    with pytest.raises(StopAsyncIteration):
        await anext(gen)
