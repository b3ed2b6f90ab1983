"""Throwaway single-member etcd servers, a TCP proxy that can cut connections, and test certs.

:class:`EtcdServer` runs ``etcd`` on free loopback ports with its data in a given directory;
it can be stopped and started again on the same ports and data. Its ``put``, ``delete``,
``compact`` and ``enable_auth`` speak etcd's JSON gateway, so no ``etcdctl`` is needed.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from aiohotload.testing import free_port

from .server_process import ServerProcess

__all__ = [
    "EtcdServer",
    "EtcdServerError",
    "TlsFiles",
    "connections_to",
    "find_etcd",
    "make_tls_files",
]

#: Longest wait for a started server to answer.
READY_TIMEOUT = 20.0


class EtcdServerError(RuntimeError):
    """The server did not start, or an admin request failed."""


def find_etcd() -> str | None:
    """The path of the ``etcd`` binary, or None."""
    return shutil.which("etcd") or next(
        (p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd") if Path(p).is_file()), None
    )


def connections_to(port: int) -> int:
    """Established TCP connections from this process to loopback *port* (Linux's /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                ours.add(link.removeprefix("socket:[").removesuffix("]"))
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                established = fields[3] == "01"
                count += remote_port == port and established and fields[9] in ours
    return count


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def make_tls_files(directory: Path) -> TlsFiles:
    """Make a CA and certificates signed by it with the ``openssl`` command."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=aiohotload test CA")  # fmt: skip
    for name, ext in (
        # clientAuth too: etcd's JSON gateway dials its own gRPC server with this certificate.
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (directory / f"{name}.ext").write_text(ext + "\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext")  # fmt: skip
    return TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


class EtcdServer(ServerProcess):
    """One etcd member on 127.0.0.1; ``tls`` makes it require client certificates."""

    log_name = "etcd.log"

    def __init__(
        self, directory: Path, *, binary: str, tls: TlsFiles | None = None, name: str = "hl"
    ) -> None:
        super().__init__(directory)
        self.binary = binary
        self.tls = tls
        self.name = name
        self.port = free_port()
        self.peer_port = free_port()
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.endpoint = f"127.0.0.1:{self.port}"
        self.initial_cluster = f"{name}={self.peer_url}"
        self._root_password: str | None = None

    @classmethod
    def cluster(cls, directory: Path, *, binary: str, size: int) -> list[EtcdServer]:
        """*size* members of one cluster, not started (see :meth:`start_all`)."""
        members = [cls(directory / f"m{i}", binary=binary, name=f"m{i}") for i in range(size)]
        initial = ",".join(m.initial_cluster for m in members)
        for member in members:
            member.initial_cluster = initial
        return members

    @staticmethod
    def start_all(servers: list[EtcdServer]) -> None:
        """Launch every server, then wait for each: members of a cluster need each other."""
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()

    def start(self) -> None:
        """Start the server (on the same ports and data as before) and wait until it serves."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it to serve."""
        if self.is_running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.directory / 'data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            # A member calls an election after one election timeout: keep it short.
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls:
            args += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        self._spawn(args)

    def wait_ready(self) -> None:
        """Wait until the server answers and knows its cluster's leader."""
        deadline = time.monotonic() + READY_TIMEOUT
        last: object = None
        with self._client_sync() as client:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise EtcdServerError(f"etcd exited with {self._proc.returncode}: {self.log()}")
                try:
                    # Status is local and needs no auth; a linearizable read made before the
                    # member knows its leader can stall for etcd's 5 s request timeout.
                    response = client.post(f"{self.url}/v3/maintenance/status", json={})
                    if response.status_code == 200 and int(response.json().get("leader", 0)):
                        return
                    last = response.text
                except httpx.TransportError as exc:
                    last = exc
                time.sleep(0.02)
        self.stop()
        raise EtcdServerError(f"etcd not ready within {READY_TIMEOUT}s ({last!r}): {self.log()}")

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM), killing it if it lingers; a frozen one too."""
        self.thaw()
        super().stop()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        self.thaw()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def freeze(self) -> None:
        """Stop the process (SIGSTOP): its sockets stay open, it answers nothing, as a hung
        member would (a stalled disk, a frozen VM)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen process run again (SIGCONT)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    # ------------------------------------------------------------------ admin requests

    async def metric(self, name: str) -> float:
        """The value of metric *name* (a gauge or counter without labels) from ``/metrics``."""
        async with self._client() as client:
            response = await client.get(f"{self.url}/metrics")
        for line in response.text.splitlines():
            metric, _, value = line.partition(" ")
            if metric == name:
                return float(value)
        raise EtcdServerError(f"no metric {name!r} at {self.url}/metrics")

    async def put(self, key: str, value: str) -> int:
        """Put *value* at *key*; the revision of the change."""
        data = await self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(data["header"]["revision"])

    async def delete(self, key: str) -> int:
        data = await self.call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(data["header"]["revision"])

    async def revision(self) -> int:
        data = await self.call("/v3/kv/range", {"key": _b64("_")})
        return int(data["header"]["revision"])

    async def compact(self, revision: int | None = None) -> int:
        """Compact the history up to *revision* (default: the current one)."""
        revision = revision or await self.revision()
        await self.call("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    async def enable_auth(self, user: str, password: str, *, readable: str) -> None:
        """Create *user* allowed to read key *readable* (and a root user), and turn auth on."""
        root_password = "root-" + password[::-1]
        role = f"{user}-reader"
        for path, body in (
            ("/v3/auth/user/add", {"name": "root", "password": root_password}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/user/add", {"name": user, "password": password}),
            ("/v3/auth/role/add", {"name": role}),
            ("/v3/auth/role/grant", {"name": role, "perm": {"key": _b64(readable)}}),
            ("/v3/auth/user/grant", {"user": user, "role": role}),
            ("/v3/auth/enable", {}),
        ):
            await self.call(path, body)
        self._root_password = root_password

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST *body* to the gateway's *path* as root (once auth is on); the JSON answer."""
        async with self._client() as client:
            headers = {}
            if self._root_password is not None:
                auth = await client.post(
                    f"{self.url}/v3/auth/authenticate",
                    json={"name": "root", "password": self._root_password},
                )
                headers["Authorization"] = auth.json()["token"]
            response = await client.post(f"{self.url}{path}", json=body, headers=headers)
        if response.status_code != 200:
            raise EtcdServerError(f"{path}: HTTP {response.status_code}: {response.text}")
        data: dict[str, Any] = response.json()
        return data

    def _client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = self.tls.client_context() if self.tls else True
        return httpx.AsyncClient(verify=verify, timeout=10, trust_env=False)

    def _client_sync(self) -> httpx.Client:
        verify: ssl.SSLContext | bool = self.tls.client_context() if self.tls else True
        return httpx.Client(verify=verify, timeout=0.25, trust_env=False)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
