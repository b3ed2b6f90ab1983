"""Processes and ports on this machine: free ports, who runs, leftovers of killed servers."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

__all__ = ["accepts", "children", "free_port", "remove_stale_shm", "running"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (another process may take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on *host*:*port*."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _proc_stat(pid: int | str) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command: state, ppid, pgrp, ..."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def children(pid: int) -> list[int]:
    """PIDs whose parent is *pid* (Linux; empty elsewhere)."""
    with contextlib.suppress(OSError):
        return [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit()
            and (fields := _proc_stat(entry.name)) is not None
            and fields[1] == str(pid)
        ]
    return []


def running(pids: Iterable[int]) -> list[int]:
    """Those of *pids* that still run (exited ones may linger as zombies: they don't count)."""
    return [pid for pid in pids if (fields := _proc_stat(pid)) is not None and fields[0] != "Z"]


def remove_stale_shm(data: Path) -> None:
    """Remove the SysV segment named in *data*'s ``postmaster.pid``, left by a killed server.

    A restart would reuse it; a server that is thrown away must remove it. Call only once
    the server's processes are gone.
    """
    with contextlib.suppress(OSError, ValueError, IndexError):
        # Line 7 is "<key> <shmid>".
        shmid = int((data / "postmaster.pid").read_text().splitlines()[6].split()[1])
        if ipcrm := shutil.which("ipcrm"):
            subprocess.run([ipcrm, "-m", str(shmid)], capture_output=True, check=False)
