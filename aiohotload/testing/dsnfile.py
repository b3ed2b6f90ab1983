"""A DSN file a pool follows, changed as a secret store or a config tool would change it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import quote, urlencode

from .credentials import Role, hostile_password
from .server import PgServer

__all__ = ["DsnFile", "watch_url", "write_dsn"]


def write_dsn(path: Path, dsn: str) -> None:
    """Replace the file's content atomically (a temp file beside it, then a rename), as config
    tools do: a watcher never reads half a DSN."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dsn + "\n", encoding="utf-8")
    os.replace(tmp, path)


def watch_url(path: Path, **options: str) -> str:
    """``watchfiles://postgres<path>?options``: the hotload URL of a DSN file."""
    url = f"watchfiles://postgres{quote(str(path))}"
    return url + ("?" + urlencode(options) if options else "")


class DsnFile:
    """A DSN file that points at *server* and logs in as *role*; writes it on creation.

    :meth:`rotate_password` and :meth:`move_to` change it the way production does: the
    server first, then the file. Make one with :meth:`create` (which also makes the role) or
    use the ``dsn_file`` fixture of the pytest plugin.
    """

    def __init__(self, path: Path, server: PgServer, role: Role) -> None:
        self.path = path
        self.server = server
        self.role = role
        #: Servers that have the role (a rotation changes the password on each).
        self.servers = [server]
        self._created: list[PgServer] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    @classmethod
    async def create(
        cls, path: Path, server: PgServer, *, name: str | None = None, password: str | None = None
    ) -> DsnFile:
        """Create a login role on *server* (``hl_<hex>``, a :func:`hostile_password` unless
        given) and a DSN file at *path* for it. :meth:`drop_roles` drops it again."""
        role = await server.create_role(
            name or f"hl_{secrets.token_hex(6)}", password or hostile_password()
        )
        dsn_file = cls(path, server, role)
        dsn_file._created.append(server)
        return dsn_file

    def url(self, **options: str) -> str:
        """The hotload URL to open a pool on: ``watchfiles://postgres<path>?options``."""
        return watch_url(self.path, **options)

    @property
    def dsn(self) -> str:
        """The DSN the file holds: :attr:`role` at :attr:`server`."""
        return self.server.dsn(*self.role)

    def write(self, dsn: str | None = None) -> None:
        """Write *dsn* (default: :attr:`dsn`) atomically; e.g. a broken one, to test that."""
        write_dsn(self.path, self.dsn if dsn is None else dsn)

    async def rotate_password(self, password: str | None = None) -> Role:
        """Give the role a new password (random and hostile unless given) on every server
        that has it, then write the new DSN. Sessions already open stay logged in; new
        logins need the new password. Returns the new role."""
        self.role = Role(self.role.name, password or hostile_password())
        for server in self.servers:
            await server.alter_password(*self.role)
        self.write()
        return self.role

    async def move_to(self, server: PgServer) -> None:
        """Point the file at *server*; the role is made there first (same name and password),
        or given the current password if it exists."""
        if server not in self.servers:
            if await server.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", self.role.name):
                await server.alter_password(*self.role)
            else:
                await server.create_role(*self.role)
                self._created.append(server)
            self.servers.append(server)
        self.server = server
        self.write()

    async def drop_roles(self) -> None:
        """Drop the roles this file made (on servers still running), sessions first."""
        for server in reversed(self._created):
            if server.is_running:
                await server.drop_role(self.role.name)
        self._created.clear()
