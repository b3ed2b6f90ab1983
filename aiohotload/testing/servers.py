"""A set of throwaway servers for a test session: started from one ``initdb`` template, on
demand, and all stopped at the end (or by the next session, if this one is killed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from ._process import remove_stale_shm, running
from .binaries import PgInstall, find_postgres
from .errors import NotSupported
from .server import PgServer, PgTemplate

__all__ = ["ENV_DSNS", "ENV_TMPDIR", "ServerFactory", "ServerSet"]

#: Comma-separated superuser URL DSNs of servers to use instead of starting throwaway ones.
ENV_DSNS = "AIOHOTLOAD_TEST_DSNS"
#: Where the session directories go (default: ``/dev/shm/aiohotload-pg``, else the temp dir).
ENV_TMPDIR = "AIOHOTLOAD_PG_TMPDIR"


class ServerSet:
    """Servers for a session: shared ones (:meth:`shared`) and fresh ones (:meth:`new`).

    existing_dsns: superuser URL DSNs of servers someone else runs; when given, they are the
        shared servers and :meth:`new` raises :class:`NotSupported`.
    install: the PostgreSQL to start (default: ``find_postgres(choice)``, on first use).
    choice: ``auto``, ``system`` or ``embedded`` (default: ``$AIOHOTLOAD_PG``, else auto).
    base: the parent of the session directory (default: see :data:`ENV_TMPDIR`); session
        directories left there by a process that is gone are reaped.
    """

    def __init__(
        self,
        existing_dsns: Sequence[str] = (),
        *,
        install: PgInstall | None = None,
        choice: str | None = None,
        base: Path | None = None,
    ) -> None:
        self.existing = [PgServer.existing(dsn) for dsn in existing_dsns]
        self._install = install
        self._choice = choice
        self._base = base
        self._shared: list[PgServer] = []
        self._owned: list[PgServer] = []
        self._template: PgTemplate | None = None
        self._dir: Path | None = None
        self._count = 0

    @classmethod
    def from_env(cls, *, choice: str | None = None) -> ServerSet:
        """A set that uses the servers named by ``$AIOHOTLOAD_TEST_DSNS``, if any."""
        dsns = [d.strip() for d in os.environ.get(ENV_DSNS, "").split(",") if d.strip()]
        return cls(dsns, choice=choice)

    @property
    def install(self) -> PgInstall:
        """The PostgreSQL the servers start from (found on first use)."""
        if self._install is None:
            self._install = find_postgres(self._choice)
        return self._install

    def shared(self, count: int) -> list[PgServer]:
        """The first *count* shared servers; any not yet running start together."""
        if self.existing:
            if len(self.existing) < count:
                raise NotSupported(f"needs {count} servers; {ENV_DSNS} names {len(self.existing)}")
            return self.existing[:count]
        missing = count - len(self._shared)
        if missing > 0:
            self._shared += self.new(missing)
        return self._shared[:count]

    def new(self, count: int = 1) -> list[PgServer]:
        """*count* fresh running servers, started together; they stop at :meth:`close` at the
        latest."""
        if self.existing:
            raise NotSupported(f"needs a server of its own, but {ENV_DSNS} is set")
        template = self._ensure_template()
        servers = []
        for _ in range(count):
            self._count += 1
            servers.append(PgServer(self._session_dir() / f"pg{self._count}", template=template))
        self._owned += servers
        # Copy the template and launch the postmasters side by side, then wait for each.
        with ThreadPoolExecutor(max_workers=max(1, count)) as pool:
            list(pool.map(PgServer.launch, servers))
        for server in servers:
            server.wait_ready()
        return servers

    def discard(self, server: PgServer) -> None:
        """Stop *server* and remove its directory."""
        server.cleanup()
        with contextlib.suppress(ValueError):
            self._owned.remove(server)

    def close(self) -> None:
        """Stop every server of the set and remove the session directory."""
        for server in self._owned:
            server.cleanup()
        self._owned.clear()
        self._shared.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._template = None

    def _ensure_template(self) -> PgTemplate:
        if self._template is None:
            directory = self._session_dir() / "template"
            self._template = PgTemplate.create(directory, install=self.install)
            # The copy the servers' OS user can run, if it had to be made.
            self._install = self._template.install
        return self._template

    def _session_dir(self) -> Path:
        if self._dir is None:
            base = self._base or _default_base()
            base.mkdir(parents=True, exist_ok=True)
            # Sticky and world-writable like /tmp: root's servers run as 'postgres', and
            # ordinary users may share the base directory.
            with contextlib.suppress(PermissionError):
                base.chmod(0o1777)
            _reap_stale_sessions(base)
            self._dir = Path(tempfile.mkdtemp(prefix="session-", dir=base))
            # The 'postgres' user must be able to pass through to its own server directories.
            self._dir.chmod(0o711)
            (self._dir / "owner.pid").write_text(str(os.getpid()))
        return self._dir


def _default_base() -> Path:
    """``$AIOHOTLOAD_PG_TMPDIR``, else ``/dev/shm/aiohotload-pg`` (RAM: copying the template
    there takes 0.06s instead of about 0.9s on a small machine's disk), else the temp dir."""
    if env := os.environ.get(ENV_TMPDIR):
        return Path(env)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if os.access(shm, os.W_OK | os.X_OK) and shutil.disk_usage(shm).free > 1 << 30:
            return shm / "aiohotload-pg"
    return Path(tempfile.gettempdir()) / "aiohotload-pg"


def _reap_stale_sessions(base: Path) -> None:
    """Kill the servers of, and remove, session directories whose process is gone.

    A session killed hard (pytest-timeout, SIGKILL) runs no teardown and leaves postmasters.
    """
    for session in base.glob("session-*"):
        try:
            owner = int((session / "owner.pid").read_text())
            if running([owner]):
                continue
        except (OSError, ValueError):
            # A session that is just starting has not written it yet: leave young ones be.
            with contextlib.suppress(OSError):
                if time.time() - session.stat().st_mtime < 3600:
                    continue
        for pidfile in session.glob("*/data/postmaster.pid"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(pidfile.read_text().splitlines()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"postgres" in cmdline and str(pidfile.parent).encode() in cmdline:
                    # Its backends notice the postmaster's death and exit.
                    os.kill(pid, signal.SIGKILL)
            remove_stale_shm(pidfile.parent)
        shutil.rmtree(session, ignore_errors=True)


class ServerFactory(Protocol):
    """``pg_disposable_factory``: ``servers = factory(count)``."""

    def __call__(self, count: int = 1) -> list[PgServer]: ...
