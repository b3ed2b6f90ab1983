"""The Reloader on its own: a queue strategy, an owner that opens strings, no server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import anyio
import pytest

import aiohotload
from aiohotload.events import Event, ReloadFailed, ReloadStarted
from aiohotload.reloader import Reloader
from aiohotload.url import parse_url
from tests.support import QueueStrategy, until


@dataclass
class Current:
    number: int
    dsn: str
    target: str


class Owner:
    """Opens 'conn(<dsn>)' strings; DSNs starting with 'bad' fail, 'slow' ones hang."""

    def __init__(self) -> None:
        self.current: Current | None = None
        self.swaps: list[tuple[str, str]] = []
        self.closed: list[str] = []
        self.events: list[Event] = []
        self.attempts: list[str] = []
        self.slow = asyncio.Event()

    async def open(self, dsn: str) -> str:
        self.attempts.append(dsn)
        if dsn.startswith("bad"):
            raise ConnectionRefusedError(f"refused: {dsn}")
        if dsn.startswith("slow"):
            await self.slow.wait()
        return f"conn({dsn})"

    def swap(self, opened: str, seconds: float, reason: str) -> None:
        assert self.current is not None
        dsn = opened[len("conn(") : -1]
        self.swaps.append((dsn, opened))
        self.current = Current(self.current.number + 1, dsn, dsn)

    def discard(self, opened: str) -> None:
        self.closed.append(opened)

    def serving(self) -> Current | None:
        return self.current

    def reloader(self, url: str = "queue://x/p") -> Reloader[str]:
        return Reloader(
            parse_url(url),
            name="test",
            owner=self,
            emit=self.events.append,
            action="connect to",
        )


async def test_first_then_swaps_on_each_new_dsn_once(strategy: QueueStrategy) -> None:
    owner = Owner()
    reloader = owner.reloader()
    async with anyio.create_task_group() as tg:
        tg.start_soon(reloader.run)
        await strategy.queue.put("postgresql://a")
        dsn, opened, seconds = await reloader.first()
        assert (dsn, opened) == ("postgresql://a", "conn(postgresql://a)")
        assert seconds >= 0
        owner.current = Current(0, "postgresql://a", "postgresql://a")
        reloader.started("postgresql://a")
        await strategy.queue.put("postgresql://a")  # the DSN in use: nothing to do
        await strategy.queue.put("postgresql://b")
        await until(lambda: len(owner.swaps) == 1)
        await strategy.queue.put("postgresql://b")  # repeated: ignored
        await strategy.queue.put("postgresql://c")
        await until(lambda: len(owner.swaps) == 2)
        reloader.close()
    assert owner.swaps == [
        ("postgresql://b", "conn(postgresql://b)"),
        ("postgresql://c", "conn(postgresql://c)"),
    ]
    assert [type(e) for e in owner.events] == [ReloadStarted, ReloadStarted]


async def test_failure_is_retried_redacted_and_superseded_attempts_are_closed(
    strategy: QueueStrategy,
) -> None:
    owner = Owner()
    reloader = owner.reloader()
    async with anyio.create_task_group() as tg:
        tg.start_soon(reloader.run)
        await strategy.queue.put("postgresql://a")
        await reloader.first()
        owner.current = Current(0, "postgresql://a", "postgresql://a")
        reloader.started("postgresql://a")
        await strategy.queue.put("bad://u:s3cret@h/db")
        await until(lambda: owner.attempts.count("bad://u:s3cret@h/db") >= 2)
        error = str(reloader.last_error)
        assert error.startswith("could not connect to bad://u:********@h/db: ")
        assert "s3cret" not in error
        failed = [e for e in owner.events if isinstance(e, ReloadFailed)]
        assert failed and all("s3cret" not in e.error for e in failed)
        # A slow attempt replaced by a newer DSN: what it opens late is closed.
        await strategy.queue.put("slow://x")
        await until(lambda: "slow://x" in owner.attempts)
        await strategy.queue.put("postgresql://c")
        await until(lambda: owner.swaps == [("postgresql://c", "conn(postgresql://c)")])
        assert reloader.last_error is None
        reloader.close()
    assert owner.closed == []  # the slow open was cancelled before it produced anything


async def test_nothing_is_swapped_once_the_owner_serves_nothing(strategy: QueueStrategy) -> None:
    owner = Owner()
    reloader = owner.reloader()
    async with anyio.create_task_group() as tg:
        tg.start_soon(reloader.run)
        await strategy.queue.put("postgresql://a")
        await reloader.first()
        owner.current = None  # closing
        reloader.started("postgresql://a")
        await strategy.queue.put("postgresql://b")
        await until(strategy.queue.empty)
        for _ in range(10):  # let the reload loop run, if it were to
            await asyncio.sleep(0)
        reloader.close()
    assert owner.swaps == []


async def test_first_is_bounded_by_connect_timeout(strategy: QueueStrategy) -> None:
    reloader = Owner().reloader("queue://x/p?connect_timeout=50ms")
    async with anyio.create_task_group() as tg:
        tg.start_soon(reloader.run)
        with pytest.raises(aiohotload.StrategyError, match="connect_timeout"):
            await reloader.first()
        reloader.close()


class FeedbackStrategy:
    """A queue strategy that listens to its pool: records the news it gets."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.news: list[aiohotload.strategies.News] = []
        self.closed_with: list[str] = []

    async def watch(
        self,
        path: str,
        options: Mapping[str, str],
        *,
        feedback: aiohotload.strategies.Feedback,
    ) -> AsyncIterator[str]:
        try:
            yield await self.queue.get()
            while True:
                news = await feedback.wait(0.01)
                if news:
                    self.news.append(news)
                while not self.queue.empty():
                    yield self.queue.get_nowait()
        finally:
            self.closed_with.extend(feedback.take().released)


async def test_feedback_releases_each_dsn_once_no_longer_used() -> None:
    strategy = FeedbackStrategy()
    aiohotload.register_strategy("rfeedback", strategy)
    try:
        owner = Owner()
        reloader = owner.reloader("rfeedback://x/p")

        def released() -> list[str]:
            return [d for n in strategy.news for d in n.released]

        async with anyio.create_task_group() as tg:
            tg.start_soon(reloader.run)
            await strategy.queue.put("postgresql://a")
            await reloader.first()
            owner.current = Current(0, "postgresql://a", "postgresql://a")
            reloader.started("postgresql://a")
            # A DSN that fails to open, replaced by one that opens: the failed one is
            # released at once; the one in use is not.
            await strategy.queue.put("bad://x")
            await until(lambda: "bad://x" in owner.attempts)
            await strategy.queue.put("postgresql://b")
            await until(lambda: len(owner.swaps) == 1)
            await until(lambda: released() == ["bad://x"])
            # The owner drained generation 0: its DSN is released.
            reloader.done_with("postgresql://a")
            await until(lambda: released() == ["bad://x", "postgresql://a"])
            # Closing: the current DSN is released once its generation is gone, before the
            # strategy is closed.
            reloader.stop()
            reloader.done_with("postgresql://b")
            reloader.close()
        everything = released() + strategy.closed_with
        assert sorted(everything) == ["bad://x", "postgresql://a", "postgresql://b"]
    finally:
        aiohotload.unregister_strategy("rfeedback")


async def test_feedback_news_hides_dsns_and_coalesces_refreshes() -> None:
    feedback = aiohotload.strategies.Feedback()
    assert not await feedback.wait(0.001)
    feedback.request_refresh()
    feedback.request_refresh()
    feedback.release("postgresql://u:s3cret@h/db")
    assert feedback.pending
    assert "s3cret" not in repr(feedback)
    news = await feedback.wait(1)
    assert news.refresh and news.released == ("postgresql://u:s3cret@h/db",)
    assert "s3cret" not in repr(news)
    assert not feedback.pending and not feedback.take()
