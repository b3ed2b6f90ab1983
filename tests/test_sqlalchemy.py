"""The SQLAlchemy engine without a server: construction, bad input, what it shows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine

import aiohotload
from aiohotload.sqlalchemy import HotEngine, _EngineGeneration, create_async_engine


def test_is_an_async_engine_without_a_dsn_of_its_own(tmp_path: Path) -> None:
    engine = create_async_engine(
        f"watchfiles://postgres{tmp_path}/dsn?drain_timeout=5s", name="orders", pool_size=3
    )
    assert isinstance(engine, HotEngine) and isinstance(engine, AsyncEngine)
    # SQLAlchemy maps its sync engine back to this engine (AsyncConnection.engine, ...).
    assert AsyncEngine._retrieve_proxy_for_target(engine.sync_engine) is engine
    assert str(engine.url) == "postgresql+asyncpg://"
    assert engine.sync_engine.pool.size() == 3  # type: ignore[attr-defined]
    assert engine.name == "orders"
    assert engine.hotload_url.drain_timeout == 5
    assert engine.generation == 0
    assert engine.target is None
    assert engine.last_error is None
    assert repr(engine) == (
        f"<aiohotload.HotEngine watchfiles://postgres{tmp_path}/dsn generation=0 target=None idle>"
    )


def test_bad_input_fails_at_creation(tmp_path: Path) -> None:
    with pytest.raises(aiohotload.UnknownStrategyError, match="nosuch"):
        create_async_engine(f"nosuch://postgres{tmp_path}/dsn")
    with pytest.raises(aiohotload.InvalidURLError, match="asyncpg"):
        create_async_engine(f"watchfiles://mysql{tmp_path}/dsn")
    with pytest.raises(aiohotload.InvalidOptionError, match="drain_timeout"):
        create_async_engine(f"watchfiles://postgres{tmp_path}/dsn?drain_timeout=soon")
    with pytest.raises(aiohotload.InvalidOptionError, match="async_creator"):
        create_async_engine(f"watchfiles://postgres{tmp_path}/dsn", async_creator=object())
    with pytest.raises(aiohotload.InvalidURLError) as info:
        create_async_engine("postgresql+asyncpg://app:s3cret@db/app")
    assert "s3cret" not in str(info.value)


async def test_dispose_before_any_use_is_harmless(tmp_path: Path) -> None:
    engine = create_async_engine(f"watchfiles://postgres{tmp_path}/dsn")
    waiting = asyncio.ensure_future(engine.wait_for_swap())
    await asyncio.sleep(0)
    await engine.dispose()
    with pytest.raises(aiohotload.HotloadError, match="disposed"):
        await waiting
    await engine.dispose()
    assert "disposed" in repr(engine)
    assert [event async for event in engine.events()] == []  # a disposed engine's stream ends


async def test_missing_source_fails_start(tmp_path: Path) -> None:
    engine = create_async_engine(f"watchfiles://postgres{tmp_path}/dsn")
    with pytest.raises(aiohotload.SourceError, match="dsn"):
        await engine.start()
    assert engine.target is None
    await engine.dispose()


class FakeRecord:
    """What the pool events read of a connection record."""

    def __init__(self, **info: object) -> None:
        self.info: dict[str, object] = dict(info)
        self.driver_connection = None
        self.invalidated = 0

    def invalidate(self) -> None:
        self.invalidated += 1


async def test_checkout_refuses_an_old_connection_once_unless_it_is_new(tmp_path: Path) -> None:
    engine = create_async_engine(f"watchfiles://postgres{tmp_path}/dsn")
    old = _EngineGeneration("postgresql://a", engine._ops)
    old.retired = True
    new = _EngineGeneration("postgresql://b", engine._ops)
    stale = FakeRecord(**{"aiohotload.generation": old})
    # An idle connection of a replaced DSN: SQLAlchemy is told to replace it.
    with pytest.raises(DisconnectionError):
        engine._on_checkout(None, stale, None)  # type: ignore[arg-type]
    # A connection made just now is used once, whatever its DSN; the next checkin closes it.
    stale.info["aiohotload.fresh"] = True
    engine._on_checkout(None, stale, None)  # type: ignore[arg-type]
    engine._on_checkin(object(), stale)  # type: ignore[arg-type]
    assert stale.invalidated == 1
    # One of the current DSN goes back to the pool.
    current = FakeRecord(**{"aiohotload.generation": new})
    engine._on_checkout(None, current, None)  # type: ignore[arg-type]
    assert new.out == {cast(Any, current)}
    engine._on_checkin(object(), current)  # type: ignore[arg-type]
    assert current.invalidated == 0
    assert new.idle == {cast(Any, current)} and not new.out


async def test_dispose_while_starting_ends_the_start_and_every_task() -> None:
    started = asyncio.Event()

    async def never(path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        started.set()
        await asyncio.Event().wait()
        yield "unreachable"  # pragma: no cover

    aiohotload.register_strategy("never", never)
    try:
        before = asyncio.all_tasks()
        engine = create_async_engine("never://postgres/x")
        starting = asyncio.ensure_future(engine.start())
        await asyncio.wait_for(started.wait(), 5)
        await engine.dispose()
        with pytest.raises(aiohotload.HotloadError, match="disposed while starting"):
            await starting
        await asyncio.sleep(0)
        assert asyncio.all_tasks() - before - {asyncio.current_task()} == set()
    finally:
        aiohotload.unregister_strategy("never")
