"""Helpers for tests that run the package's programs as processes: a uvicorn server for an
app module, and the ``aiohotload`` command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx

from aiohotload.testing import free_port, wait_until

__all__ = ["ROOT", "Uvicorn", "exited_cleanly", "run_aiohotload", "uvicorn"]

#: The repository: app modules are given as ``examples.fastapi_app:app`` relative to it.
ROOT = Path(__file__).resolve().parent.parent
_PORT_ATTEMPTS = 5


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: ours, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def exited_cleanly(returncode: int | None, sig: signal.Signals) -> bool:
    """Whether a process stopped by *sig* ended well: exit status 0, or death by that same
    signal, which uvicorn (>= 0.29) re-raises after its graceful shutdown, as a process
    that handled the signal should."""
    return returncode in (0, -sig)


class _Exited(Exception):
    pass


class Uvicorn:
    """One ``python -m uvicorn <app>`` process on a free port of 127.0.0.1.

    Its output goes to ``log`` (read it with :attr:`output`); :attr:`url` is its base URL.
    """

    def __init__(self, app: str, log: Path, env: Mapping[str, str]) -> None:
        self.app = app
        self.log = log
        self.env = dict(env)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def start(self, client: httpx.AsyncClient, ready_path: str = "/healthz") -> None:
        """Start the server and wait until *ready_path* answers 200.

        The port is chosen free and then bound by uvicorn; if another process took it in
        between, start again on another.
        """
        for _attempt in range(_PORT_ATTEMPTS):
            proc = self._spawn()

            async def probe(proc: subprocess.Popen[bytes] = proc) -> httpx.Response:
                if proc.poll() is not None:
                    raise _Exited
                return await client.get(self.url + ready_path)

            try:
                await wait_until(
                    probe,
                    lambda r: r.status_code == 200,
                    timeout=30,
                    interval=0.05,
                    ignore=(httpx.TransportError,),
                    what=f"uvicorn {self.app} answering 200 on {ready_path}",
                )
                return
            except _Exited:
                if "address already in use" not in self.output.lower():
                    raise AssertionError(
                        f"uvicorn exited with {proc.returncode}:\n{self.output}"
                    ) from None
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\nlog:\n{self.output}") from None
        raise AssertionError(f"no free port after {_PORT_ATTEMPTS} attempts:\n{self.output}")

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.port = free_port()
        argv = [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--no-access-log"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.proc

    async def stop(self, sig: signal.Signals, timeout: float = 30) -> int:
        """Send *sig* and wait for the process to exit; returns its return code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.to_thread(self.proc.wait, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.asynccontextmanager
async def uvicorn(
    app: str, log: Path, client: httpx.AsyncClient, **env: str
) -> AsyncIterator[Uvicorn]:
    """A started :class:`Uvicorn` for the block; killed at the end if the test did not stop
    it."""
    server = Uvicorn(app, log, child_env(**env))
    try:
        await server.start(client)
        yield server
    finally:
        server.kill()


def run_aiohotload(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m aiohotload ARGS`` to the end, capturing its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "aiohotload", *args],
        cwd=ROOT,
        env=child_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
