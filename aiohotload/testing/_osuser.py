"""Who the server processes run as: PostgreSQL refuses root, so as root they run as the
``postgres`` OS user, which must then own the server's files and be able to run the binaries."""

from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PgServerError

__all__ = ["ServerUser", "server_env"]


def server_env() -> dict[str, str]:
    """Our environment for a server process, less the ``PG*`` variables that would steer it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


@dataclass(frozen=True)
class ServerUser:
    """The OS user of the server processes: ``postgres`` when we are root, else us."""

    uid: int
    gid: int
    name: str

    @classmethod
    def for_server(cls) -> ServerUser:
        """Us, or ``postgres`` if we are root (raises :class:`PgServerError` if it is missing)."""
        if os.geteuid() != 0:
            return cls(os.geteuid(), os.getegid(), pwd.getpwuid(os.geteuid()).pw_name)
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise PgServerError(
                "running as root, but there is no 'postgres' OS user to run PostgreSQL as "
                "(PostgreSQL refuses to run as root): create one (useradd --system postgres) "
                "or run as an ordinary user"
            ) from None
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    @property
    def switches(self) -> bool:
        """Whether the servers run as another user than us."""
        return self.uid != os.geteuid()

    def popen_kwargs(self) -> dict[str, Any]:
        """``subprocess`` arguments that run a child as this user."""
        if not self.switches:
            return {}
        # extra_groups=[] drops root's supplementary groups.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, path: Path, *, recursive: bool = False) -> None:
        """Give *path* (and with *recursive* everything under it) to this user."""
        if not self.switches:
            return
        os.chown(path, self.uid, self.gid)
        if recursive:
            for parent, dirs, files in os.walk(path):
                for name in (*dirs, *files):
                    os.chown(os.path.join(parent, name), self.uid, self.gid, follow_symlinks=False)

    def can_run(self, executable: Path) -> bool:
        """Whether this user can run *executable* (``--version``): it must reach the file
        through every parent directory, and its shared libraries."""
        try:
            result = subprocess.run(
                [str(executable), "--version"],
                cwd="/",
                env=server_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
                timeout=30,
                **self.popen_kwargs(),
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0
