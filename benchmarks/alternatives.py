"""Rotation side by side: aiohotload and what a Python user does today, in one run.

Every alternative serves the same workload against the same two throwaway servers: 16 workers
run a tiny query flat out on a pool of 8 while, every 2 s, the DSN file changes, alternately
a password rotation of the current server and a move to the other server. Then a wrong
password is written for 3 s, and the right one again. Each alternative is written the way its
documentation recommends:

- ``asyncpg_set_connect_args``: asyncpg's own answer, a file watcher (watchfiles) calling
  ``Pool.set_connect_args(dsn)`` then ``Pool.expire_connections()``;
- ``asyncpg_password_callable``: ``password=`` as a coroutine that reads the secret file
  (used by new connections only; host and port are fixed);
- ``psycopg_pool``: psycopg_pool 3.3's ``AsyncConnectionPool`` with ``conninfo`` as a callable
  that reads the file, and ``drain()`` from a file watcher on change;
- ``sqlalchemy_do_connect``: SQLAlchemy's async engine with a ``do_connect`` event that
  reads the file into the connect parameters, and ``pool_pre_ping``;
- ``aiohotload_sqlalchemy``: ``aiohotload.sqlalchemy.create_async_engine``;
- ``aiohotload``: ``aiohotload.create_pool``.

A rotation is done as rotation tools do it (a Secrets Manager rotation function, Vault's static
roles): ``ALTER ROLE ... PASSWORD`` on the server first, then the new secret is published (the
file is written). Sessions stay logged in across ``ALTER ROLE``; only new logins need the new
password. Which credentials a session logged in with is told by a role setting changed in the
same transaction as the password (``ALTER ROLE ... SET bench.epoch``): a session keeps the
value it logged in with, so the query ``SELECT inet_server_port(),
current_setting('bench.epoch')`` names the server and the password of the session answering.

Measured per change, each bounded by the 2 s until the next change: from the file write to
the first answer from a session of the new DSN, and until no session of the role is left on
the other server or with the server's previous password (``pg_stat_activity``, polled).

Run ``python benchmarks/alternatives.py`` (``--quick`` for a short run); it prints the
Markdown table of the README's "Why not just ..." and writes
``benchmarks/results/alternatives.json`` and ``.md``. ``benchmarks/run.py --only
alternatives`` runs the same as a row of the benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import watchfiles
from common import PASSWORD, ROLE, PgServer, median, two_servers, write_atomic

import aiohotload

QUERY = "SELECT inet_server_port(), current_setting('bench.epoch')"
POOL_SIZE = 8
#: Seconds between two changes of the DSN file.
INTERVAL = 2.0
#: Seconds a wrong password stays in the file, then as long with the right one again.
BAD_SECONDS = 3.0
#: Longest wait for answers to resume once the right password is back.
RECOVERY_LIMIT = 15.0
#: How often pg_stat_activity is polled for sessions that should be gone.
POLL = 0.005
#: The hand-written watchers use aiohotload's watchfiles timing (a change is read after 2 ms
#: of quiet) so that the comparison is of what happens after the read. watchfiles' own
#: defaults (step 50 ms, debounce 1600 ms) would add about 50 ms to theirs.
WATCH_STEP_MS = 2
WATCH_DEBOUNCE_MS = 200
#: Slower queries are kept (end time, seconds) to find stalls.
SLOW = 0.1

Marker = tuple[int, str]


def read_dsn(path: Path) -> str:
    """The DSN in *path*, stripped."""
    return path.read_text().strip()


async def follow_file(
    path: Path, on_change: Callable[[str], Awaitable[None]], stop: asyncio.Event
) -> None:
    """Call *on_change(dsn)* each time the DSN in *path* changes: the watcher a user writes
    with watchfiles (its directory is watched, so atomic renames are seen)."""
    current = read_dsn(path)
    async for _changes in watchfiles.awatch(
        path.parent, step=WATCH_STEP_MS, debounce=WATCH_DEBOUNCE_MS, stop_event=stop
    ):
        try:
            dsn = read_dsn(path)
        except OSError:
            continue
        if dsn and dsn != current:
            current = dsn
            await on_change(dsn)


# --------------------------------------------------------------------------- the alternatives


class Alternative:
    """One way to follow the DSN file: open on it, run :data:`QUERY`, close."""

    key = ""
    title = ""
    #: What the table says about it.
    note = ""

    async def open(self, path: Path) -> None:
        raise NotImplementedError

    async def query(self) -> Marker:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class AsyncpgSetConnectArgs(Alternative):
    key = "asyncpg_set_connect_args"
    title = "asyncpg + watcher: `set_connect_args()` + `expire_connections()`"
    note = "applies any DSN it reads, wrong or not"

    async def open(self, path: Path) -> None:
        self.pool = await asyncpg.create_pool(
            read_dsn(path), min_size=POOL_SIZE, max_size=POOL_SIZE
        )
        self._stop = asyncio.Event()
        self._watch = asyncio.ensure_future(follow_file(path, self._apply, self._stop))

    async def _apply(self, dsn: str) -> None:
        # asyncpg's documented way: new arguments for new connections, then expire the
        # current ones (idle ones are replaced at the next acquire, busy ones at release).
        self.pool.set_connect_args(dsn)
        await self.pool.expire_connections()

    async def query(self) -> Marker:
        row = await self.pool.fetchrow(QUERY)
        assert row is not None
        return row[0], row[1]

    async def close(self) -> None:
        self._stop.set()
        await self._watch
        self.pool.terminate()


class AsyncpgPasswordCallable(Alternative):
    key = "asyncpg_password_callable"
    title = "asyncpg: `password=` coroutine reading the secret"
    note = "new connections only; host and port are fixed: cannot follow a server move"

    async def open(self, path: Path) -> None:
        self.path = path
        url = urlsplit(read_dsn(path))
        self.pool = await asyncpg.create_pool(
            host=url.hostname,
            port=url.port,
            user=unquote(url.username or ""),
            database=url.path.lstrip("/"),
            password=self._password,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
        )

    async def _password(self) -> str:
        return unquote(urlsplit(read_dsn(self.path)).password or "")

    async def query(self) -> Marker:
        row = await self.pool.fetchrow(QUERY)
        assert row is not None
        return row[0], row[1]

    async def close(self) -> None:
        self.pool.terminate()


class PsycopgPool(Alternative):
    key = "psycopg_pool"
    title = "psycopg_pool 3.3: `conninfo` callable + `drain()` from a watcher"
    note = "applies any DSN it reads; on a wrong one, callers wait for a connection"

    async def open(self, path: Path) -> None:
        from psycopg_pool import AsyncConnectionPool

        self.path = path
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo=lambda: read_dsn(path),
            kwargs={"autocommit": True},
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            open=False,
        )
        await self.pool.open(wait=True)
        self._stop = asyncio.Event()
        self._watch = asyncio.ensure_future(follow_file(path, self._apply, self._stop))

    async def _apply(self, dsn: str) -> None:
        await self.pool.drain()  # conninfo is read again for each new connection

    async def query(self) -> Marker:
        async with self.pool.connection() as conn:
            cur = await conn.execute(QUERY)
            row = await cur.fetchone()
        assert row is not None
        return row[0], row[1]

    async def close(self) -> None:
        self._stop.set()
        await self._watch
        await self.pool.close(timeout=1.0)


async def _engine_query(engine: Any) -> Marker:
    from sqlalchemy import text

    async with engine.connect() as conn:
        row = (await conn.execute(text(QUERY))).one()
    return row[0], row[1]


class SqlalchemyDoConnect(Alternative):
    key = "sqlalchemy_do_connect"
    title = "SQLAlchemy async engine: `do_connect` reading the secret, `pool_pre_ping`"
    note = "new connections only: a pooled connection is replaced when it fails a pre-ping"

    async def open(self, path: Path) -> None:
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import create_async_engine

        self.engine = create_async_engine(
            "postgresql+asyncpg://",
            pool_size=POOL_SIZE,
            max_overflow=0,
            pool_pre_ping=True,
        )

        # SQLAlchemy's recipe for credentials that change ("Generating dynamic
        # authentication tokens"), on the async engine's sync_engine; the whole DSN is read,
        # so new connections follow a server move too.
        @event.listens_for(self.engine.sync_engine, "do_connect")
        def provide_dsn(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            url = urlsplit(read_dsn(path))
            cparams.update(
                host=url.hostname,
                port=url.port,
                user=unquote(url.username or ""),
                password=unquote(url.password or ""),
                database=url.path.lstrip("/"),
            )

        await _engine_query(self.engine)

    async def query(self) -> Marker:
        return await _engine_query(self.engine)

    async def close(self) -> None:
        await self.engine.dispose()


class AiohotloadSqlalchemy(Alternative):
    key = "aiohotload_sqlalchemy"
    title = "`aiohotload.sqlalchemy.create_async_engine`"
    note = "a new DSN is validated before use; a wrong one is logged and retried"

    async def open(self, path: Path) -> None:
        from aiohotload.sqlalchemy import create_async_engine

        self.engine = create_async_engine(
            f"watchfiles://postgres{path}", pool_size=POOL_SIZE, max_overflow=0
        )
        await _engine_query(self.engine)

    async def query(self) -> Marker:
        return await _engine_query(self.engine)

    async def close(self) -> None:
        await self.engine.dispose()


class Aiohotload(Alternative):
    key = "aiohotload"
    title = "`aiohotload.create_pool`"
    note = "a new DSN is validated before use; a wrong one is logged and retried"

    async def open(self, path: Path) -> None:
        self.pool = await aiohotload.create_pool(
            f"watchfiles://postgres{path}", min_size=POOL_SIZE, max_size=POOL_SIZE
        )

    async def query(self) -> Marker:
        row = await self.pool.fetchrow(QUERY)
        assert row is not None
        return row[0], row[1]

    async def close(self) -> None:
        await self.pool.close()


ALTERNATIVES: tuple[type[Alternative], ...] = (
    AsyncpgSetConnectArgs,
    AsyncpgPasswordCallable,
    PsycopgPool,
    SqlalchemyDoConnect,
    AiohotloadSqlalchemy,
    Aiohotload,
)


# --------------------------------------------------------------------------- the workload


class _Workers:
    """Workers running the alternative's query flat out, noting failures, stalls and the
    first answer from the session the current change wants."""

    def __init__(self, query: Callable[[], Awaitable[Marker]], n: int) -> None:
        self.query = query
        self.n = n
        self.answered = 0
        self.failed: list[tuple[float, str]] = []
        self.slow: list[tuple[float, float]] = []
        self.target: Marker | None = None
        self.seen: float | None = None
        self.last_answer = 0.0
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []

    async def _work(self) -> None:
        while not self._stop:
            t0 = time.perf_counter()
            try:
                marker = await self.query()
            except Exception as exc:  # counted
                self.failed.append((time.perf_counter(), type(exc).__name__))
                await asyncio.sleep(0)  # a failure that did not wait must not hog the loop
                continue
            t1 = time.perf_counter()
            self.answered += 1
            self.last_answer = t1
            if t1 - t0 > SLOW:
                self.slow.append((t1, t1 - t0))
            if self.seen is None and marker == self.target:
                self.seen = t1

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._work()) for _ in range(self.n)]

    def expect(self, target: Marker) -> None:
        self.target = target
        self.seen = None

    def failed_between(self, start: float, end: float) -> int:
        return sum(1 for t, _ in self.failed if start <= t < end)

    def longest_between(self, start: float, end: float) -> float:
        return max((lat for t, lat in self.slow if start <= t < end), default=0.0)

    async def stop(self) -> None:
        self._stop = True
        # Callers stuck waiting for a connection (a pool that cannot connect) are cancelled.
        _done, pending = await asyncio.wait(self._tasks, timeout=5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class _Server:
    """One server as the rotation sees it: its admin connection, password and epoch."""

    pg: PgServer
    admin: asyncpg.Connection
    password: str = PASSWORD
    epoch: int = 0
    changed_at: Any = None  # server time of the last password change

    @property
    def marker(self) -> Marker:
        return self.pg.port, f"{self.pg.port}-{self.epoch}"

    @property
    def dsn(self) -> str:
        return self.pg.dsn(ROLE, self.password)

    async def set_password(self, password: str, epoch: int) -> None:
        """ALTER ROLE's password and epoch in one transaction (as the server, not the file)."""
        statement = await self.admin.fetchval(
            "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)", ROLE, password
        )
        async with self.admin.transaction():
            await self.admin.execute(statement)
            await self.admin.execute(
                f"ALTER ROLE {ROLE} SET bench.epoch = '{self.pg.port}-{epoch}'"
            )
        self.changed_at = await self.admin.fetchval("SELECT clock_timestamp()")
        self.password, self.epoch = password, epoch

    async def stale(self, current: bool) -> int:
        """Sessions of the role that the current DSN does not name: all of them on the other
        server, those from before the last password change on the current one."""
        if current:
            n = await self.admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_start < $2",
                ROLE,
                self.changed_at,
            )
        else:
            n = await self.admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", ROLE
            )
        return int(n)

    async def reset(self) -> None:
        await self.admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = $1",
            ROLE,
        )
        await self.set_password(PASSWORD, 0)


@dataclass
class _Change:
    kind: str  # "rotate" or "move"
    new_serves_ms: float | None = None
    stale_gone_ms: float | None = None


@dataclass
class _Run:
    changes: list[_Change] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


async def _stale_gone(
    servers: list[_Server], current: _Server, t0: float, deadline: float
) -> float | None:
    """Milliseconds from *t0* until no stale session is left, or None by *deadline*."""
    while time.perf_counter() < deadline:
        counts = [await s.stale(s is current) for s in servers]
        if sum(counts) == 0:
            return (time.perf_counter() - t0) * 1000
        await asyncio.sleep(POLL)
    return None


async def _run_one(
    alt: Alternative, servers: list[_Server], tmp: Path, changes: int, workers: int
) -> _Run:
    for s in servers:
        await s.reset()
    current = servers[0]
    path = tmp / f"alt-{alt.key}" / "dsn"
    path.parent.mkdir()
    write_atomic(path, current.dsn)
    await alt.open(path)
    load = _Workers(alt.query, workers)
    load.start()
    run = _Run()
    try:
        await asyncio.sleep(1.0)
        start = time.perf_counter()
        answered0 = load.answered
        for i in range(changes):
            await asyncio.sleep(max(0.0, start + i * INTERVAL - time.perf_counter()))
            if i % 2 == 0:
                change = _Change("rotate")
                await current.set_password(f"pw-{i}-{alt.key}", current.epoch + 1)
            else:
                change = _Change("move")
                current = next(s for s in servers if s is not current)
            load.expect(current.marker)
            write_atomic(path, current.dsn)
            t_write = time.perf_counter()
            deadline = start + (i + 1) * INTERVAL - 0.05
            change.stale_gone_ms = await _stale_gone(servers, current, t_write, deadline)
            await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
            if load.seen is not None and load.seen < deadline:
                change.new_serves_ms = (load.seen - t_write) * 1000
            run.changes.append(change)
        end = start + changes * INTERVAL
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        run.extra["failed"] = load.failed_between(start, end)
        run.extra["failures"] = sorted({name for t, name in load.failed if start <= t < end})
        run.extra["queries_per_s"] = (load.answered - answered0) / (end - start)
        run.extra["longest_query_ms"] = load.longest_between(start, end) * 1000
        run.extra["wrong"] = await _wrong_password(load, path, current)
    finally:
        await load.stop()
        await alt.close()
    return run


async def _wrong_password(load: _Workers, path: Path, current: _Server) -> dict[str, Any]:
    """A wrong password for the server in use, then the right one again: what the load saw."""
    good = current.dsn
    answered0 = load.answered
    t_bad = time.perf_counter()
    write_atomic(path, current.pg.dsn(ROLE, "wrong-password"))
    await asyncio.sleep(BAD_SECONDS)
    answered_bad = load.answered - answered0
    write_atomic(path, good)
    t_fix = time.perf_counter()
    # Answers resume at once where they never stopped; a pool that waits for its
    # reconnect backoff takes longer, so this wait may outlast BAD_SECONDS.
    while True:
        if load.last_answer >= t_fix or time.perf_counter() > t_fix + RECOVERY_LIMIT:
            break
        await asyncio.sleep(POLL)
    resumed = load.last_answer - t_fix if load.last_answer >= t_fix else None
    await asyncio.sleep(max(0.0, t_fix + BAD_SECONDS - time.perf_counter()))
    t_end = time.perf_counter()
    return {
        "failed": load.failed_between(t_bad, t_fix),
        "answered": answered_bad,
        "longest_query_ms": load.longest_between(t_bad, t_end) * 1000,
        "answers_resumed_after_fix_ms": None if resumed is None else resumed * 1000,
        "failed_after_fix": load.failed_between(t_fix, t_end),
        "answered_after_fix": load.answered - answered0 - answered_bad,
    }


def _summary(run: _Run) -> dict[str, Any]:
    out: dict[str, Any] = dict(run.extra)
    for kind in ("rotate", "move"):
        changes = [c for c in run.changes if c.kind == kind]
        for what in ("new_serves_ms", "stale_gone_ms"):
            values = [v for c in changes if (v := getattr(c, what)) is not None]
            out[f"{kind}_{what}"] = {
                "n": len(changes),
                "within_interval": len(values),
                "median": median(values),
                "max": max(values, default=float("nan")),
                "samples": values,
            }
    return out


async def bench_alternatives(
    a: PgServer, b: PgServer, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """Run every alternative (or those in ``args.alternatives``) on the rotation workload,
    one after the other, print the table and return the results by key."""
    logging.getLogger("aiohotload").setLevel(logging.ERROR)  # the wrong DSN is logged
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger("asyncpg.pool").setLevel(logging.CRITICAL)  # its refills fail then too
    admins = [await s.admin() for s in (a, b)]
    servers = [_Server(s, admin) for s, admin in zip((a, b), admins, strict=True)]
    chosen = getattr(args, "alternatives", None) or [c.key for c in ALTERNATIVES]
    results: dict[str, Any] = {}
    try:
        for cls in ALTERNATIVES:
            if cls.key not in chosen:
                continue
            alt = cls()
            run = await _run_one(alt, servers, tmp, args.alt_changes, args.workers)
            results[cls.key] = {"title": cls.title, "note": cls.note, **_summary(run)}
            print(f"  {cls.key}: {_line(results[cls.key])}")
    finally:
        for s in servers:
            await s.reset()
            await s.admin.close()
    md = table(results)
    print(md)
    out = getattr(args, "out", None)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "alternatives.md").write_text(md)
        (out / "alternatives.json").write_text(json.dumps(results, indent=2))
        print(f"results: {out / 'alternatives.json'}, {out / 'alternatives.md'}")
    return results


# --------------------------------------------------------------------------- the table


def _cell(stat: dict[str, Any]) -> str:
    n, k = stat["n"], stat["within_interval"]
    if k == 0:
        return f"not within {INTERVAL:g} s (0/{n})"
    text = f"{stat['median']:.0f} / {stat['max']:.0f} ms"
    return text if k == n else f"{text} ({k}/{n} within {INTERVAL:g} s)"


def _wrong(r: dict[str, Any]) -> str:
    w = r["wrong"]
    if w["failed"]:
        what = f"{w['failed']:,} failed, {w['answered']:,} answered"
    elif w["answered"] == 0:
        what = "0 failed, 0 answered (callers wait)"
    else:
        what = f"0 failed, {w['answered']:,} answered"
    if w["longest_query_ms"] >= 1000:
        what += f"; longest wait {w['longest_query_ms'] / 1000:.1f} s"
    resumed = w["answers_resumed_after_fix_ms"]
    if w["failed"] or w["answered"] == 0 or w["longest_query_ms"] >= 1000:
        what += (
            f"; serving again {resumed:.0f} ms after the fix"
            if resumed is not None
            else f"; not serving {RECOVERY_LIMIT:g} s after the fix"
        )
    return what


def _line(r: dict[str, Any]) -> str:
    return (
        f"failed {r['failed']} ({', '.join(r['failures']) or '-'}), "
        f"{r['queries_per_s']:.0f} q/s; rotate: new {_cell(r['rotate_new_serves_ms'])}, "
        f"old gone {_cell(r['rotate_stale_gone_ms'])}; move: new "
        f"{_cell(r['move_new_serves_ms'])}, old gone {_cell(r['move_stale_gone_ms'])}; "
        f"wrong DSN: {_wrong(r)}"
    )


def table(results: dict[str, Any]) -> str:
    """The Markdown table of the README's "Why not just ..." section."""
    lines = [
        "| | failed queries | new password serves | no session with the old password "
        "| new server serves | no session on the old server | wrong password written "
        "(3 s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results.values():
        lines.append(
            f"| {r['title']} | {r['failed']:,} | {_cell(r['rotate_new_serves_ms'])} "
            f"| {_cell(r['rotate_stale_gone_ms'])} | {_cell(r['move_new_serves_ms'])} "
            f"| {_cell(r['move_stale_gone_ms'])} | {_wrong(r)} |"
        )
    lines.append("")
    lines += [f"- {r['title']}: {r['note']}." for r in results.values()]
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 changes each (smoke test)")
    parser.add_argument(
        "--only",
        dest="alternatives",
        nargs="+",
        choices=[c.key for c in ALTERNATIVES],
        metavar="KEY",
        help="run only these alternatives",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    args.workers = 16
    args.alt_changes = 4 if args.quick else 12
    with two_servers() as (tmp, a, b):
        for s in (a, b):
            await s.create_role(ROLE, PASSWORD)
        await bench_alternatives(a, b, args, tmp)


if __name__ == "__main__":
    asyncio.run(main())
