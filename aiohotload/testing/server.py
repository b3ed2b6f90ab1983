"""One throwaway PostgreSQL server: :class:`PgServer`, and :class:`PgTemplate` to make many fast.

A :class:`PgServer` owns one server: a data directory, a postmaster started on a free port of
127.0.0.1, password (SCRAM) logins over TCP so a wrong password really fails, and asyncpg
helpers for the admin work tests need (roles, passwords, ``pg_stat_activity``).
``PgServer.existing(dsn)`` wraps a server someone else runs; its lifecycle methods raise
:class:`NotSupported`.

PostgreSQL refuses to run as root: when we are root, ``initdb`` and ``postgres`` run as the
``postgres`` OS user, which then owns the server's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import asyncpg

from ._osuser import ServerUser, server_env
from ._process import accepts, children, free_port, remove_stale_shm, running
from .binaries import PgInstall, find_postgres, runnable_by
from .credentials import Role, kv_dsn, url_dsn
from .errors import NotSupported, PgServerError

__all__ = [
    "ADMIN_APPLICATION_NAME",
    "FAST_SETTINGS",
    "PgServer",
    "PgTemplate",
    "StopMode",
    "start_all",
]

#: ``application_name`` of the helpers' own connections; :meth:`PgServer.backends` hides them.
ADMIN_APPLICATION_NAME = "pgserver-admin"
#: Seconds a server may take to accept connections after its postmaster starts.
READY_TIMEOUT = 30.0
#: Settings every started server gets: durability off (the data is thrown away), room for pools.
FAST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    # Not "off": that loses the last commits (a CREATE ROLE just made) when a test kills the
    # server or stops it "immediate". With fsync off a synchronous commit is one write() anyway.
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "logging_collector": "off",
    # Dynamic shared memory as files in the data dir, not in /dev/shm: a killed server's
    # segments then go with its directory instead of leaking.
    "dynamic_shared_memory_type": "mmap",
    "log_line_prefix": "%m [%p] %q%u@%d app=%a ",
}
_HBA = """\
# Written by aiohotload.testing. Trust only on the unix socket, which lives in a
# directory only the server's owner can enter; TCP logins need the password.
local all all trust
local replication all trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_BIND_FAILURES = ("could not bind", "could not create any TCP/IP sockets")
_PORT_ATTEMPTS = 8

StopMode = Literal["smart", "fast", "immediate"]


def _run(argv: list[str], user: ServerUser, cwd: Path) -> None:
    result = subprocess.run(
        argv,
        cwd=cwd,
        env=server_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        **user.popen_kwargs(),
    )
    if result.returncode != 0:
        raise PgServerError(
            f"{Path(argv[0]).name} failed with exit code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


def _initdb(bindir: Path, directory: Path, password: str, user: ServerUser) -> Path:
    """Create a cluster in ``directory/data`` with superuser ``postgres``; return the data dir."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    user.own(directory)
    pwfile = directory / "pwfile"
    pwfile.write_text(password + "\n", encoding="utf-8")
    pwfile.chmod(0o600)
    user.own(pwfile)
    data = directory / "data"
    try:
        _run(
            [
                str(bindir / "initdb"),
                "--pgdata",
                str(data),
                "--username",
                "postgres",
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            user,
            directory,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    return data


@dataclass(frozen=True)
class PgTemplate:
    """A cluster made by ``initdb`` once and copied for each server (a copy is ~5x faster)."""

    install: PgInstall
    data: Path
    password: str

    @classmethod
    def create(cls, directory: Path, *, install: PgInstall | None = None) -> PgTemplate:
        """Run ``initdb`` into *directory* with a random superuser password.

        install: the PostgreSQL to use (default: :func:`find_postgres`).
        """
        user = ServerUser.for_server()
        install = runnable_by(install or find_postgres(), user)
        password = secrets.token_urlsafe(16)
        data = _initdb(install.bindir, directory, password, user)
        return cls(install=install, data=data, password=password)


class PgServer:
    """One throwaway PostgreSQL server on 127.0.0.1 (or an existing one, see :meth:`existing`).

    directory: where the data dir, unix socket, ``pg_hba.conf`` and ``postgres.log`` live
        (created; a fresh temp dir if None).
    template: copy this cluster instead of running ``initdb``.
    install: the PostgreSQL to run (default: the template's, else :func:`find_postgres` at
        the first start).
    password: the superuser's password when there is no template (random if None).
    settings: extra ``postgres -c`` settings over :data:`FAST_SETTINGS`.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        directory: Path | None = None,
        *,
        template: PgTemplate | None = None,
        password: str | None = None,
        install: PgInstall | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if template is not None and password is not None:
            raise ValueError("a server copied from a template has the template's password")
        self._external_dsn: str | None = None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="pgserver-"))
        self.template = template
        self.install = install or (template.install if template else None)
        self.superuser = "postgres"
        self.password = template.password if template else (password or secrets.token_urlsafe(16))
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        self.log_path = self.directory / "postgres.log"
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._user: ServerUser | None = None
        # Set by a first start: restarts keep the port, as a real server's address stays.
        self._fixed_port = False

    @classmethod
    def existing(cls, dsn: str) -> PgServer:
        """Wrap a server someone else runs, named by a superuser URL DSN.

        Admin helpers and DSNs work; start/stop/restart/kill raise :class:`NotSupported`.
        """
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
            raise ValueError(
                "an existing server must be named by a URL DSN with a TCP host, "
                "like postgresql://postgres:secret@127.0.0.1:5433/postgres"
            )
        server = cls(Path(os.devnull), password=unquote(parts.password or ""))
        server.adopt(dsn, parts.hostname, parts.port or 5432)
        server.superuser = unquote(parts.username or "postgres")
        server.settings = {}
        server.log_path = Path(os.devnull)
        return server

    def adopt(self, dsn: str, host: str, port: int) -> None:
        """Make this object stand for the server someone else runs at *dsn* (see
        :meth:`existing`)."""
        self._external_dsn = dsn
        self.host = host
        self._port = port
        self._fixed_port = True

    def __repr__(self) -> str:
        where = "existing" if self.is_external else str(self.directory)
        return f"<PgServer {self.host}:{self._port} {where} running={self.is_running}>"

    # --- identity ------------------------------------------------------------------------

    @property
    def is_external(self) -> bool:
        """True for :meth:`existing` servers, which the tests must not stop."""
        return self._external_dsn is not None

    @property
    def port(self) -> int:
        """TCP port; fixed at the first start and kept across restarts."""
        if self._port is None:
            raise PgServerError("the server has not been started yet, so it has no port")
        return self._port

    @property
    def is_running(self) -> bool:
        """Whether the postmaster is alive (for an existing server: whether its port answers)."""
        if self.is_external:
            return accepts(self.host, self.port)
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def dsn(self, user: str, password: str, database: str = "postgres", **params: str) -> str:
        """URL DSN for *user*; user, password, database and params are percent-encoded."""
        return url_dsn(self.host, self.port, user, password, database, **params)

    def kv_dsn(self, user: str, password: str, database: str = "postgres", **params: str) -> str:
        """libpq ``key='value'`` DSN for *user* (asyncpg does not parse this form)."""
        return kv_dsn(self.host, self.port, user, password, database, **params)

    @property
    def admin_dsn(self) -> str:
        """URL DSN of the superuser."""
        return self._external_dsn or self.dsn(self.superuser, self.password)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- lifecycle -----------------------------------------------------------------------

    def start_sync(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the server (set it up first if needed) and wait until it accepts logins."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Set up if needed and start the postmaster without waiting (see :func:`start_all`)."""
        self._require_own("start")
        if self.is_running:
            return
        self._setup()
        assert self._user is not None and self.install is not None
        self._fixed_port = self._port is not None
        if self._port is None:
            self._port = free_port()
        argv = [str(self.install.bindir / "postgres"), "-D", str(self.directory / "data")]
        settings = {
            **self.settings,
            "port": str(self._port),
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.directory),
            "hba_file": str(self.directory / "pg_hba.conf"),
        }
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            # A session of its own: Ctrl-C in a terminal interrupts pytest, whose teardown
            # then stops the server, rather than killing the server under a running test.
            self._proc = subprocess.Popen(
                argv,
                cwd=self.directory,
                env=server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._user.popen_kwargs(),
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the launched postmaster accepts connections.

        Polls the "ready" status the postmaster writes to ``postmaster.pid`` (what
        ``pg_ctl -w`` waits for) and then a TCP connect. If another process took the port
        first, starts again on a new one (only before the port is fixed by a first start).
        """
        for _attempt in range(_PORT_ATTEMPTS):
            proc = self._proc
            if proc is None:
                raise PgServerError("wait_ready() called before launch()")
            deadline = time.monotonic() + timeout
            pidfile = self.directory / "data" / "postmaster.pid"
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if self._pidfile_ready(pidfile, proc.pid) and accepts(self.host, self.port):
                    return
                time.sleep(0.01)
            else:
                proc.kill()
                proc.wait()
                raise PgServerError(
                    f"server in {self.directory} did not accept connections within "
                    f"{timeout:.0f}s; log:\n{self.log_tail()}"
                )
            log = self._log_since_launch()
            if not self._fixed_port and any(m in log for m in _BIND_FAILURES):
                self._port = None
                self._proc = None
                self.launch()
                continue
            raise PgServerError(
                f"server in {self.directory} exited with code {proc.returncode} while "
                f"starting; log:\n{log or self.log_tail()}"
            )
        raise PgServerError(f"no free port found after {_PORT_ATTEMPTS} attempts")

    def stop_sync(self, mode: StopMode = "fast", timeout: float = 30.0) -> None:
        """Shut the server down and wait for the postmaster to exit; a no-op if it is down.

        smart: wait for clients to disconnect; fast: terminate sessions (clients see
        ``AdminShutdownError``); immediate: quit without a shutdown checkpoint, like a crash.
        """
        self._require_own("stop")
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(_STOP_SIGNALS[mode])
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise PgServerError(
                f"server did not stop ({mode}) within {timeout:.0f}s; log:\n{self.log_tail()}"
            ) from None

    def restart_sync(self, mode: StopMode = "fast", timeout: float = READY_TIMEOUT) -> None:
        """Stop (if running) and start again on the same port."""
        self.stop_sync(mode)
        self.start_sync(timeout)

    def kill_sync(self, *, backends: bool = True, timeout: float = 10.0) -> None:
        """SIGKILL the postmaster, and with *backends* every server process at once.

        With ``backends=False`` only the postmaster dies; its backends notice and exit on
        their own (clients see their connections close). Either way this returns once no
        server process is left, so :meth:`start_sync` can follow (with crash recovery).
        """
        self._require_own("kill")
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        # Backends run in sessions of their own (PostgreSQL calls setsid()), so they are found
        # as the postmaster's children; stopping it first means it forks no new ones meanwhile.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGSTOP)
        forked = children(proc.pid)
        proc.kill()
        if backends:
            for pid in forked:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while left := running(forked):
            if time.monotonic() > deadline:
                raise PgServerError(f"server processes {left} still run {timeout:.0f}s after kill")
            time.sleep(0.01)

    def cleanup(self) -> None:
        """Stop the server at once and remove its directory (a no-op for existing servers)."""
        if self.is_external:
            return
        with contextlib.suppress(PgServerError, subprocess.TimeoutExpired):
            self.stop_sync("immediate", timeout=10.0)
        if self.is_running:
            self.kill_sync()
        remove_stale_shm(self.directory / "data")
        shutil.rmtree(self.directory, ignore_errors=True)

    # The async forms run the blocking work in a thread, so the event loop (and the pool under
    # test) keeps running while a server starts or stops.

    async def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the server and wait until it accepts connections (see :meth:`start_sync`)."""
        await asyncio.to_thread(self.start_sync, timeout)

    async def stop(self, mode: StopMode = "fast", timeout: float = 30.0) -> None:
        """Shut the server down (see :meth:`stop_sync` for the modes)."""
        await asyncio.to_thread(self.stop_sync, mode, timeout)

    async def restart(self, mode: StopMode = "fast", timeout: float = READY_TIMEOUT) -> None:
        """Stop and start again on the same port."""
        await asyncio.to_thread(self.restart_sync, mode, timeout)

    async def kill(self, *, backends: bool = True) -> None:
        """SIGKILL the server (see :meth:`kill_sync`)."""
        await asyncio.to_thread(lambda: self.kill_sync(backends=backends))

    # ------------------------------------------------------------------ replication

    def standby(self, directory: Path | None = None) -> PgServer:
        """A new server that is a streaming standby of this running one (``pg_basebackup -R``
        over the unix socket): start it, and it replays this server's writes, read-only,
        until :meth:`promote`.

        Made for failover tests: stop this server, promote the standby, point the clients'
        name at it, and :meth:`follow` it with this one (the demoted old primary).
        """
        self._require_own("take a base backup of")
        if not self.is_running or self.install is None or self._port is None:
            raise PgServerError("a standby needs its primary running")
        standby = PgServer(directory, password=self.password, install=self.install)
        standby.settings = dict(self.settings)
        standby.directory.mkdir(parents=True, exist_ok=True)
        user = ServerUser.for_server()
        standby.directory.chmod(0o700)
        user.own(standby.directory)
        _run(
            [
                str(self.install.bindir / "pg_basebackup"),
                "--pgdata",
                str(standby.directory / "data"),
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--host",
                str(self.directory),
                "--port",
                str(self._port),
                "--username",
                self.superuser,
            ],
            user,
            standby.directory,
        )
        return standby

    def follow(self, primary: PgServer) -> None:
        """Make this stopped server a standby of *primary* when it next starts (a demoted
        old primary after a failover). It comes back read-only; it streams from *primary*
        if their histories allow it (a clean stop before the promotion does), and serves
        reads either way."""
        self._require_own("demote")
        if self.is_running:
            raise PgServerError("stop the server before making it a standby")
        self.settings["primary_conninfo"] = (
            f"host={primary.directory} port={primary.port} user={primary.superuser}"
        )
        signal_file = self.directory / "data" / "standby.signal"
        signal_file.touch()
        ServerUser.for_server().own(signal_file)

    async def promote(self, timeout: float = READY_TIMEOUT) -> None:
        """End recovery on this standby: it takes writes from now on."""
        await self.fetchval("SELECT pg_promote(true, $1)", int(timeout))

    async def in_recovery(self) -> bool:
        """Whether this server is a standby (read-only, replaying a primary's writes)."""
        return bool(await self.fetchval("SELECT pg_is_in_recovery()"))

    def _require_own(self, operation: str) -> None:
        if self.is_external:
            raise NotSupported(
                f"can't {operation} an existing server ({self.host}:{self.port}, from "
                "AIOHOTLOAD_TEST_DSNS); this needs a server the tests start themselves"
            )

    def _setup(self) -> None:
        if self._user is not None:
            return
        user = ServerUser.for_server()
        self.install = runnable_by(self.install or find_postgres(), user)
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.template is not None:
            # copytree keeps the modes (the data dir must stay 0700); ownership is ours.
            shutil.copytree(self.template.data, self.directory / "data", symlinks=True)
            user.own(self.directory / "data", recursive=True)
        elif not (self.directory / "data").exists():
            _initdb(self.install.bindir, self.directory, self.password, user)
        self.directory.chmod(0o700)
        user.own(self.directory)
        (self.directory / "pg_hba.conf").write_text(_HBA, encoding="utf-8")
        user.own(self.directory / "pg_hba.conf")
        self.log_path.touch()
        user.own(self.log_path)
        self._user = user

    @staticmethod
    def _pidfile_ready(pidfile: Path, pid: int) -> bool:
        try:
            lines = pidfile.read_text().splitlines()
        except OSError:
            return False
        # Line 1 is the postmaster PID (a stale file after kill() names a dead one);
        # line 8 is its status, "ready" once it accepts connections.
        return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"

    def _log_since_launch(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    # --- admin (asyncpg) -----------------------------------------------------------------

    async def admin(self, **kwargs: Any) -> asyncpg.Connection:
        """A new superuser connection (close it when done); kwargs go to ``asyncpg.connect``."""
        settings = {"application_name": ADMIN_APPLICATION_NAME, **kwargs.pop("server_settings", {})}
        kwargs.setdefault("timeout", 10.0)
        return await asyncpg.connect(self.admin_dsn, server_settings=settings, **kwargs)

    @contextlib.asynccontextmanager
    async def admin_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """``async with server.admin_connection() as conn:`` closes it for you."""
        conn = await self.admin()
        try:
            yield conn
        finally:
            await conn.close(timeout=5.0)

    async def execute(self, query: str, *args: object) -> str:
        """Run one statement as the superuser; returns its status (``CREATE ROLE``...)."""
        async with self.admin_connection() as conn:
            return await conn.execute(query, *args)

    async def fetchval(self, query: str, *args: object) -> Any:
        """First column of the first row of *query*, run as the superuser."""
        async with self.admin_connection() as conn:
            return await conn.fetchval(query, *args)

    async def version_num(self) -> int:
        """The server's ``server_version_num``: 150014 for 15.14, 180006 for 18.6."""
        return int(await self.fetchval("SHOW server_version_num"))

    async def create_role(self, name: str, password: str, *, superuser: bool = False) -> Role:
        """``CREATE ROLE name LOGIN PASSWORD ...`` (quoted by the server, so any text works)."""
        attrs = "LOGIN SUPERUSER" if superuser else "LOGIN"
        async with self.admin_connection() as conn:
            statement = await conn.fetchval(
                f"SELECT format('CREATE ROLE %I {attrs} PASSWORD %L', $1::text, $2::text)",
                name,
                password,
            )
            await conn.execute(statement)
        return Role(name, password)

    async def alter_password(self, name: str, password: str) -> None:
        """Give role *name* a new password; existing sessions stay logged in."""
        async with self.admin_connection() as conn:
            statement = await conn.fetchval(
                "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)", name, password
            )
            await conn.execute(statement)

    async def terminate(
        self, *, usename: str | None = None, application_name: str | None = None
    ) -> int:
        """Terminate matching client backends (not the helpers') and wait until they are gone.

        Returns how many were terminated.
        """
        async with self.admin_connection() as conn:
            count: int = await conn.fetchval(
                f"""SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))
                    FROM pg_stat_activity WHERE {_BACKEND_FILTER}""",
                usename,
                application_name,
                ADMIN_APPLICATION_NAME,
            )
            return count

    async def drop_role(self, name: str) -> None:
        """Terminate the role's sessions, drop what it owns here, and drop it (if it exists)."""
        await self.terminate(usename=name)
        async with self.admin_connection() as conn:
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
                ident = await conn.fetchval("SELECT quote_ident($1::text)", name)
                await conn.execute(f"DROP OWNED BY {ident}; DROP ROLE {ident}")

    async def backends(
        self, usename: str | None = None, application_name: str | None = None
    ) -> list[asyncpg.Record]:
        """Client backends (``pid, usename, application_name, state, query, datname``), oldest
        first, optionally filtered; the helpers' own connections are left out."""
        async with self.admin_connection() as conn:
            return await conn.fetch(
                f"""SELECT pid, usename, application_name, state, query, datname
                    FROM pg_stat_activity WHERE {_BACKEND_FILTER}
                    ORDER BY backend_start, pid""",
                usename,
                application_name,
                ADMIN_APPLICATION_NAME,
            )


_BACKEND_FILTER = """backend_type = 'client backend'
    AND pid <> pg_backend_pid()
    AND application_name <> $3
    AND ($1::text IS NULL OR usename = $1::text)
    AND ($2::text IS NULL OR application_name = $2::text)"""


def start_all(servers: Iterable[PgServer], timeout: float = READY_TIMEOUT) -> None:
    """Start several servers at once: launch every postmaster, then wait for each."""
    servers = list(servers)
    for server in servers:
        server.launch()
    for server in servers:
        server.wait_ready(timeout)
