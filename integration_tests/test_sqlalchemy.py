"""The SQLAlchemy engine against real servers: ORM sessions across swaps, password rotation,
drains, force kill, failures and dispose."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiohotload import (
    Event,
    ForceKillDone,
    PoolDrained,
    ReloadFailed,
    SourceError,
    SwapDone,
)
from aiohotload.sqlalchemy import HotEngine, create_async_engine
from aiohotload.testing import (
    PgServer,
    Role,
    RoleFactory,
    url_dsn,
    wait_until,
    watch_url,
    write_dsn,
)

from .faults import backends
from .tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(120)

TABLE = "hotload_note"


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body: Mapped[str]
    port: Mapped[int] = mapped_column(server_default=text("inet_server_port()"))


async def no_backends(server: PgServer, user: str) -> None:
    """Wait until *server* has no session of *user* left."""
    await wait_until(
        lambda: backends(server, user), lambda n: n == 0, timeout=10, what=f"no {user} on {server}"
    )


async def port_of(engine: HotEngine) -> int:
    """The port of the server a new session of *engine* talks to."""
    async with AsyncSession(engine) as session:
        port = await session.scalar(text("SELECT inet_server_port()"))
    assert isinstance(port, int)
    return port


async def swapped_to(engine: HotEngine, generation: int) -> None:
    await wait_until(lambda: engine.generation, lambda g: g >= generation, timeout=10)


@pytest.fixture
async def notes(pg_a: PgServer, pg_b: PgServer, user_ab: Role) -> AsyncIterator[None]:
    """The ``Note`` table on both servers, writable by ``user_ab``."""
    for server in (pg_a, pg_b):
        await server.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await server.execute(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, body text NOT NULL, "
            "port int NOT NULL DEFAULT inet_server_port())"
        )
        await server.execute(f'GRANT ALL ON {TABLE} TO "{user_ab.name}"')
    yield
    for server in (pg_a, pg_b):
        await server.execute(f"DROP TABLE IF EXISTS {TABLE}")


async def note_ids(server: PgServer) -> list[int]:
    async with server.admin_connection() as conn:
        return [r["id"] for r in await conn.fetch(f"SELECT id FROM {TABLE} ORDER BY id")]


async def test_sessions_follow_the_dsn_to_another_server(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path), pool_size=4)
    try:
        assert await port_of(engine) == pg_a.port
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_user")) == user
        assert engine.generation == 0
        assert engine.target == f"postgresql://{user}:********@127.0.0.1:{pg_a.port}/postgres"
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await swapped_to(engine, 1)
        async with engine.begin() as conn:
            assert await conn.scalar(text("SELECT inet_server_port()")) == pg_b.port
        assert await port_of(engine) == pg_b.port
        await no_backends(pg_a, user)
    finally:
        await engine.dispose()
    await no_backends(pg_b, user)


async def test_orm_sessions_lose_no_transaction_across_server_moves_and_rotations(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, notes: None, dsn_path: Path
) -> None:
    """Concurrent ORM sessions write and read while the DSN moves between servers and the
    password is rotated (ALTER ROLE, then the new DSN): no transaction fails, and every
    committed row is on exactly one server."""
    user, password = user_ab
    passwords = {pg_a.port: password, pg_b.port: password}
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path), pool_size=8, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    committed: list[int] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            note_id = n * 1_000_000 + i
            try:
                async with sessions() as session, session.begin():
                    session.add(Note(id=note_id, body=f"worker {n}"))
                    await session.flush()
                    mine = await session.scalar(select(func.count()).where(Note.id == note_id))
                    assert mine == 1
                    await session.execute(text("SELECT pg_sleep(0.001)"))
                committed.append(note_id)
                async with sessions() as session:
                    rows = (await session.scalars(select(Note).limit(5))).all()
                    assert all(isinstance(row.port, int) for row in rows)
            except Exception as exc:
                failures.append(exc)

    async def progress(n: int = 40) -> None:
        target = len(committed) + n
        await wait_until(lambda: len(committed) >= target, timeout=20, what=f"{n} more commits")

    workers = [asyncio.ensure_future(worker(n)) for n in range(6)]
    try:
        await progress()
        on = pg_a
        steps = ["move", "rotate", "move", "rotate", "move", "move", "rotate", "move"]
        for generation, step in enumerate(steps, start=1):
            # The previous old connections are gone and the current DSN's are in use.
            await wait_until(lambda: engine.draining, lambda n: n == 0, timeout=10)
            await progress()
            if step == "rotate":
                passwords[on.port] = f"{passwords[on.port][:12]}-r{generation}"
                await on.alter_password(user, passwords[on.port])
                old = None
            else:
                old, on = on, (pg_b if on is pg_a else pg_a)
            dsn_of = on.kv_dsn if generation % 3 == 0 else on.dsn
            write_dsn(dsn_path, dsn_of(user, passwords[on.port]))
            await swapped_to(engine, generation)
            assert engine.generation == generation
            await progress()
            if old is not None:
                await no_backends(old, user)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await engine.dispose()
    assert failures == []
    on_a, on_b = await note_ids(pg_a), await note_ids(pg_b)
    assert sorted(on_a + on_b) == sorted(committed)
    assert on_a and on_b
    for server in (pg_a, pg_b):
        await no_backends(server, user)


async def test_sessions_waiting_for_a_full_pool_are_served_across_swaps(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, dsn_path: Path
) -> None:
    """More sessions than connections: those waiting for one when a swap happens get one (a
    slot freed by an old connection reconnects with the new DSN)."""
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path), pool_size=2, max_overflow=0)
    done = 0
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def worker() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                async with engine.begin() as conn:
                    await conn.execute(text("SELECT pg_sleep(0.002)"))
                done += 1
            except Exception as exc:
                failures.append(exc)

    workers = [asyncio.ensure_future(worker()) for _ in range(10)]
    try:
        for generation in range(1, 7):
            target = done + 30
            await wait_until(lambda target=target: done >= target, timeout=20)
            server = pg_b if generation % 2 else pg_a
            write_dsn(dsn_path, server.dsn(user, password))
            await swapped_to(engine, generation)
        target = done + 30
        await wait_until(lambda: done >= target, timeout=20)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await engine.dispose()
    assert failures == []
    for server in (pg_a, pg_b):
        await no_backends(server, user)


async def test_connecting_to_a_silent_old_server_moves_to_the_new_one(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, dsn_path: Path
) -> None:
    """A session waiting for a new connection to the old server, which has stopped
    answering, is given one to the new server when the swap happens."""
    user, password = user_ab
    async with TcpProxy(pg_a.host, pg_a.port) as proxy:
        write_dsn(dsn_path, url_dsn("127.0.0.1", proxy.port, user, password))
        engine = create_async_engine(watch_url(dsn_path), pool_size=1)
        try:
            held = await engine.connect()
            await held.execute(text("SELECT 1"))
            proxy.mode = "blackhole"
            waiting = asyncio.ensure_future(port_of(engine))  # needs a second connection
            await wait_until(lambda: proxy.active, lambda n: n == 2, what="a connect in flight")
            write_dsn(dsn_path, pg_b.dsn(user, password))
            assert await asyncio.wait_for(waiting, timeout=10) == pg_b.port
            proxy.mode = "pass"
            await held.close()
            await wait_until(lambda: proxy.active, lambda n: n == 0, timeout=10)
        finally:
            await engine.dispose()
    await no_backends(pg_a, user)


async def test_transaction_open_across_a_swap_commits_on_the_old_server(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, notes: None, dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path), pool_size=4)
    try:
        async with AsyncSession(engine) as old_session, old_session.begin():
            old_session.add(Note(id=1, body="before the swap"))
            await old_session.flush()
            write_dsn(dsn_path, pg_b.dsn(user, password))
            await swapped_to(engine, 1)
            # New sessions go to B meanwhile.
            async with AsyncSession(engine) as new_session, new_session.begin():
                new_session.add(Note(id=3, body="new session"))
            old_session.add(Note(id=2, body="after the swap"))
            await old_session.flush()
            assert await old_session.scalar(text("SELECT inet_server_port()")) == pg_a.port
            assert await backends(pg_a, user) == 1
        # Committed on A; its connection was closed at checkin instead of returned.
        await no_backends(pg_a, user)
        assert await port_of(engine) == pg_b.port
    finally:
        await engine.dispose()
    assert await note_ids(pg_a) == [1, 2]
    assert await note_ids(pg_b) == [3]


async def test_old_server_has_no_connection_left_after_the_drain(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path), pool_size=5)
    seen: list[Event] = []
    engine.add_listener(seen.append)
    try:
        # Five connections in the pool, then one of them held across the swap.
        held_sessions = [AsyncSession(engine) for _ in range(5)]
        for session in held_sessions:
            await session.execute(text("SELECT 1"))
        for session in held_sessions:
            await session.close()
        assert await backends(pg_a, user) == 5
        held = await engine.connect()
        await held.execute(text("SELECT 1"))
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await swapped_to(engine, 1)
        # The idle ones are closed at once; the held one keeps working.
        await wait_until(lambda: backends(pg_a, user), lambda n: n == 1, timeout=10)
        assert engine.draining == 1
        assert await held.scalar(text("SELECT inet_server_port()")) == pg_a.port
        await held.close()
        await no_backends(pg_a, user)
        drained = await wait_until(lambda: [e for e in seen if isinstance(e, PoolDrained)])
        assert drained[0].generation == 0 and drained[0].terminated == 0
        assert engine.draining == 0
        assert await port_of(engine) == pg_b.port
    finally:
        await engine.dispose()
    # dispose() drains the last generation as HotPool's close() does: one more PoolDrained.
    assert [type(e) for e in seen if isinstance(e, (SwapDone, PoolDrained))] == [
        SwapDone,
        PoolDrained,
        PoolDrained,
    ]


async def test_bad_dsn_keeps_the_engine_working_then_recovers(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: Role,
    dsn_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "aiohotload")
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path), pool_size=2)
    failed: list[ReloadFailed] = []
    engine.add_listener(lambda e: failed.append(e) if isinstance(e, ReloadFailed) else None)
    try:
        assert await port_of(engine) == pg_a.port
        for bad in (
            pg_b.dsn(user, password + "-wrong"),
            "postgresql://nobody@127.0.0.1:1/nowhere",
            "this is not a DSN at all",
        ):
            count = len(failed)
            write_dsn(dsn_path, bad)
            await wait_until(lambda count=count: len(failed) > count, timeout=10)
            assert engine.last_error is not None
            assert engine.generation == 0
            assert await port_of(engine) == pg_a.port
            async with AsyncSession(engine) as session, session.begin():
                assert await session.scalar(text("SELECT 1")) == 1
        assert password not in str(engine.last_error)
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await swapped_to(engine, 1)
        assert engine.last_error is None
        assert await port_of(engine) == pg_b.port
        await no_backends(pg_a, user)
    finally:
        await engine.dispose()
    assert any("reload failed" in r.getMessage() for r in caplog.records)


async def test_late_server_is_picked_up_by_the_retry(
    pg_a: PgServer, pg_disposable: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_a)
    await role(pg_disposable, name=user, password=password)
    await pg_disposable.stop("fast")
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path))
    try:
        await engine.start()
        write_dsn(dsn_path, pg_disposable.dsn(user, password))
        await wait_until(lambda: engine.last_error, lambda e: e is not None, timeout=10)
        assert await port_of(engine) == pg_a.port
        await pg_disposable.start()
        await swapped_to(engine, 1)  # no further change to the file
        assert await port_of(engine) == pg_disposable.port
    finally:
        await engine.dispose()


async def wait_for_sleeper(server: PgServer, user: str) -> None:
    await wait_until(
        lambda: server.backends(usename=user),
        lambda rows: any("pg_sleep" in (r["query"] or "") and r["state"] == "active" for r in rows),
        timeout=10,
        what="pg_sleep running",
    )


async def sleeper(engine: HotEngine) -> Callable[[], Awaitable[object]]:
    """A session running ``pg_sleep(60)``; returns how to await its outcome."""
    session = AsyncSession(engine)

    async def run() -> object:
        try:
            return await session.scalar(text("SELECT pg_sleep(60)"))
        finally:
            await session.close()

    task = asyncio.ensure_future(run())
    return lambda: asyncio.wait_for(task, timeout=10)


async def test_force_kill_stops_old_queries_at_once(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path, force_kill="true"), pool_size=4)
    seen: list[Event] = []
    engine.add_listener(seen.append)
    try:
        idle = AsyncSession(engine)
        await idle.execute(text("SELECT 1"))  # checked out, in a transaction, not running
        outcome = await sleeper(engine)
        await wait_for_sleeper(pg_a, user)
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await swapped_to(engine, 1)
        with pytest.raises(DBAPIError) as info:
            await outcome()
        assert info.value.connection_invalidated
        # The query was stopped on the server too, and nothing is left there.
        await no_backends(pg_a, user)
        with pytest.raises(DBAPIError):
            await idle.execute(text("SELECT 1"))
        await idle.close()
        killed = await wait_until(lambda: [e for e in seen if isinstance(e, ForceKillDone)])
        assert killed[0].cancelled == 2
        assert await port_of(engine) == pg_b.port
    finally:
        await engine.dispose()


async def test_drain_timeout_terminates_stragglers(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path, drain_timeout="300ms"), pool_size=4)
    seen: list[Event] = []
    engine.add_listener(seen.append)
    try:
        outcome = await sleeper(engine)
        await wait_for_sleeper(pg_a, user)
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await swapped_to(engine, 1)
        with pytest.raises(DBAPIError):
            await outcome()
        await no_backends(pg_a, user)
        drained = await wait_until(lambda: [e for e in seen if isinstance(e, PoolDrained)])
        assert drained[0].terminated == 1
        assert await port_of(engine) == pg_b.port
    finally:
        await engine.dispose()


async def test_dispose_leaves_no_backends_and_no_tasks(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, dsn_path: Path
) -> None:
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    tasks_before = asyncio.all_tasks()
    engine = create_async_engine(watch_url(dsn_path), pool_size=3)
    for _ in range(3):
        assert await port_of(engine) == pg_a.port
    held = AsyncSession(engine)
    await held.execute(text("SELECT 1"))
    write_dsn(dsn_path, pg_b.dsn(user, password))
    await swapped_to(engine, 1)
    assert await port_of(engine) == pg_b.port
    # Disposing while a session of each generation is still open: both are closed when they
    # are done with, and the engine's idle connections at once.
    on_b = await engine.connect()
    await on_b.execute(text("SELECT 1"))
    await engine.dispose()
    assert "disposed" in repr(engine)
    assert engine.target is None
    await on_b.close()
    await held.close()
    for server in (pg_a, pg_b):
        await no_backends(server, user)
    await wait_until(
        lambda: asyncio.all_tasks() - tasks_before - {asyncio.current_task()},
        lambda left: not left,
        timeout=5,
        what="no task left",
    )
    # Like any SQLAlchemy engine, it can be used again: it follows the file again.
    assert await port_of(engine) == pg_b.port
    await engine.dispose()
    await no_backends(pg_b, user)


async def test_first_dsn_errors_reach_start_and_the_first_session(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_a)
    engine = create_async_engine(watch_url(dsn_path, connect_timeout="5s"))
    try:
        with pytest.raises(SourceError, match=r"dsn\.txt"):
            await engine.start()
        write_dsn(dsn_path, pg_a.dsn(user, password + "-wrong"))
        # Raised as SQLAlchemy raises it for a plain engine (its text holds no password);
        # last_error names the target, redacted.
        with pytest.raises(sqlalchemy.exc.DBAPIError) as info:
            await port_of(engine)
        assert password not in str(info.value)
        assert "password authentication failed" in str(info.value)
        assert "********" in str(engine.last_error)
        assert password not in str(engine.last_error)
        write_dsn(dsn_path, pg_a.dsn(user, password))
        assert await port_of(engine) == pg_a.port  # the next use starts again
    finally:
        await engine.dispose()


async def test_key_value_dsn_and_connect_args(
    pg_a: PgServer, role: RoleFactory, dsn_path: Path
) -> None:
    user, password = await role(pg_a)
    write_dsn(dsn_path, pg_a.kv_dsn(user, password))
    engine = create_async_engine(
        watch_url(dsn_path),
        pool_size=2,
        max_overflow=0,
        connect_args={"server_settings": {"application_name": "hot-engine"}},
    )
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_setting('application_name')")) == (
                "hot-engine"
            )
            assert isinstance(conn, AsyncConnection) and conn.engine is engine
        assert engine.sync_engine.pool.size() == 2  # type: ignore[attr-defined]
        assert engine.target is not None and password not in engine.target
    finally:
        await engine.dispose()


async def test_no_password_in_logs_errors_repr_or_events(
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: Role,
    dsn_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path), echo=True, echo_pool="debug")
    seen: list[Event] = []
    engine.add_listener(seen.append)
    texts: list[str] = []
    try:
        assert await port_of(engine) == pg_a.port
        write_dsn(dsn_path, pg_b.kv_dsn(user, password + "-wrong"))
        await wait_until(lambda: engine.last_error, lambda e: e is not None, timeout=10)
        texts += [str(engine.last_error), repr(engine.last_error), repr(engine)]
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await swapped_to(engine, 1)
        assert await port_of(engine) == pg_b.port
        texts += [repr(engine), str(engine.target), str(engine.url), repr(engine.sync_engine)]
    finally:
        await engine.dispose()
    texts += [repr(e) for e in seen]
    texts += [r.getMessage() for r in caplog.records]
    texts += [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert any("swapped" in t for t in texts)
    for text_ in texts:
        assert password not in text_


async def test_prometheus_collector_tracks_the_engine(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, dsn_path: Path
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from aiohotload.metrics import HotloadCollector

    def scrape() -> dict[str, float]:
        text_ = generate_latest(registry).decode()
        assert user_ab.password not in text_
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text_)
            for s in family.samples
            if s.labels.get("pool") == "orders" and not s.name.endswith(("_bucket", "_created"))
        }

    user, password = user_ab
    write_dsn(dsn_path, pg_a.dsn(user, password))
    registry = CollectorRegistry()
    collector = HotloadCollector()
    registry.register(collector)
    engine = create_async_engine(watch_url(dsn_path), name="orders", pool_size=3)
    try:
        collector.track(engine)
        async with AsyncSession(engine) as session:
            assert await session.scalar(text("SELECT 1")) == 1
            before = scrape()
            assert before["hotload_pool_connections"] == 1  # checked out by this session
            assert before["hotload_pool_idle_connections"] == 0
        assert scrape()["hotload_pool_idle_connections"] == 1
        assert before["hotload_change_total"] == 0
        write_dsn(dsn_path, pg_b.dsn(user, password))
        await swapped_to(engine, 1)
        assert await port_of(engine) == pg_b.port
        after = scrape()
        assert after["hotload_change_total"] == 1
        assert after["hotload_epoch"] == 1
        assert after["hotload_reload_failing"] == 0
    finally:
        await engine.dispose()


async def test_a_dsn_on_which_the_apps_connect_listener_fails_is_not_swapped_in(
    pg_a: PgServer, pg_b: PgServer, user_ab: Role, dsn_path: Path
) -> None:
    """The new DSN is proven through the engine's own connect path: an application's
    ``connect`` listener that fails there (here: a table it needs is missing on the new
    server, as a codec for a missing extension would) keeps the engine where it is, until the
    retry succeeds (fails on a version that validates with a bare asyncpg.connect)."""
    user, password = user_ab
    table = f"needed_{user}"
    await pg_a.execute(f'CREATE TABLE "{table}" (id int)')
    await pg_a.execute(f'GRANT SELECT ON "{table}" TO "{user}"')
    write_dsn(dsn_path, pg_a.dsn(user, password))
    engine = create_async_engine(watch_url(dsn_path), pool_size=2)

    @sqlalchemy.event.listens_for(engine.sync_engine, "connect")
    def needs_table(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f'SELECT 1 FROM "{table}" LIMIT 1')
        cursor.close()

    try:
        assert await port_of(engine) == pg_a.port
        write_dsn(dsn_path, pg_b.dsn(user, password))
        error = await wait_until(lambda: engine.last_error, timeout=10)
        # Not the whole name: redaction may hide a piece of it that the password shares.
        assert "needed_" in str(error) and "does not exist" in str(error)
        assert engine.generation == 0
        assert await port_of(engine) == pg_a.port
        await pg_b.execute(f'CREATE TABLE "{table}" (id int)')
        await pg_b.execute(f'GRANT SELECT ON "{table}" TO "{user}"')
        await swapped_to(engine, 1)
        assert await port_of(engine) == pg_b.port
    finally:
        await engine.dispose()
        for server in (pg_a, pg_b):
            await server.execute(f'DROP TABLE IF EXISTS "{table}"')
