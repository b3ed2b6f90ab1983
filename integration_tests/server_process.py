"""What the etcd and OpenBao test servers share: one child process, its directory, its log."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["ServerProcess"]


class ServerProcess:
    """A server process run from *directory*, logging to ``directory / log_name``."""

    log_name = "server.log"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, args: list[str]) -> None:
        """Start *args*, its output appended to the log."""
        with (self.directory / self.log_name).open("ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        """Stop the server (SIGTERM; SIGKILL if it lingers)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self, lines: int = 20) -> str:
        """The last *lines* of the server's log."""
        try:
            text = (self.directory / self.log_name).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
