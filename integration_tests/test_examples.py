"""Every example runs, so none can rot: the FastAPI app under uvicorn, the custom strategy as
a script, the Kubernetes manifests as YAML that agrees with the URL it configures."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml

import aiohotload
from aiohotload.testing import PgServer, RoleFactory, wait_until, write_dsn

from .apps import ROOT, child_env, exited_cleanly, uvicorn

pytestmark = pytest.mark.timeout(60)

EXAMPLES = ROOT / "examples"


async def test_fastapi_app_answers_healthz_and_stops_on_ctrl_c(
    pg_a: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    (tmp_path / "secret").mkdir()
    dsn_file = tmp_path / "secret" / "dsn"
    write_dsn(dsn_file, pg_a.dsn(user, password))
    async with (
        httpx.AsyncClient(timeout=30) as client,
        uvicorn(
            "examples.fastapi_app:app",
            tmp_path / "uvicorn.log",
            client,
            AIOHOTLOAD_URL=f"watchfiles://postgres{quote(str(dsn_file))}",
        ) as server,
    ):
        health = (await client.get(server.url + "/healthz")).json()
        index = (await client.get(server.url + "/")).json()
        returncode = await server.stop(signal.SIGINT)
    assert health["ready"] is True
    assert health["generation"] == 0
    assert health["last_error"] is None
    assert health["target"] == f"postgresql://{user}:********@127.0.0.1:{pg_a.port}/postgres"
    assert index == {"port": pg_a.port, "user": user, "generation": 0}
    log = server.output
    assert exited_cleanly(returncode, signal.SIGINT), (returncode, log)
    assert "pool closed" in log
    assert password not in log
    assert quote(password, safe="") not in log


async def test_fastapi_sqlalchemy_app_follows_a_change_and_disposes_on_ctrl_c(
    pg_a: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    (tmp_path / "secret").mkdir()
    dsn_file = tmp_path / "secret" / "dsn"
    write_dsn(dsn_file, pg_a.dsn(user, password))
    async with (
        httpx.AsyncClient(timeout=30) as client,
        uvicorn(
            "examples.fastapi_sqlalchemy:app",
            tmp_path / "uvicorn.log",
            client,
            AIOHOTLOAD_URL=f"watchfiles://postgres{quote(str(dsn_file))}",
        ) as server,
    ):
        health = (await client.get(server.url + "/healthz")).json()
        before = (await client.get(server.url + "/")).json()
        write_dsn(dsn_file, pg_b.dsn(user, password))
        after = await wait_until(
            lambda: client.get(server.url + "/"),
            lambda r: r.json()["port"] == pg_b.port,
            timeout=10,
            what="/ answered by server B",
        )
        returncode = await server.stop(signal.SIGINT)
    assert health == {
        "generation": 0,
        "target": f"postgresql://{user}:********@127.0.0.1:{pg_a.port}/postgres",
        "last_error": None,
        "draining": 0,
    }
    assert before == {"port": pg_a.port, "user": user, "generation": 0}
    assert after.json() == {"port": pg_b.port, "user": user, "generation": 1}
    log = server.output
    assert exited_cleanly(returncode, signal.SIGINT), (returncode, log)
    assert "swapped to generation 1" in log
    assert "engine stopped following" in log
    assert password not in log
    assert quote(password, safe="") not in log
    for server_ in (pg_a, pg_b):
        await wait_until(lambda s=server_: s.backends(usename=user), lambda rows: not rows)


async def test_custom_strategy_script_queries_and_follows_a_change(
    pg_a: PgServer, pg_b: PgServer, role: RoleFactory
) -> None:
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(EXAMPLES / "custom_strategy.py")],
        cwd=ROOT,
        env=child_env(
            DATABASE_URL=pg_a.dsn(user, password), DATABASE_URL_NEXT=pg_b.dsn(user, password)
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(f"generation 0: {user} on port {pg_a.port} (postgresql://")
    assert lines[1].startswith(f"generation 1: {user} on port {pg_b.port} (postgresql://")
    assert ":********@" in lines[1]
    output = result.stdout + result.stderr
    assert password not in output
    assert quote(password, safe="") not in output


def load(name: str) -> list[dict[str, Any]]:
    documents = list(yaml.safe_load_all((EXAMPLES / "kubernetes" / name).read_text()))
    assert all(isinstance(d, dict) for d in documents)
    return documents


def test_kubernetes_manifests_agree_with_the_url_they_configure() -> None:
    (secret,) = load("secret.yaml")
    (deployment,) = load("deployment.yaml")
    assert secret["kind"] == "Secret"
    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (key,) = secret["stringData"]
    assert key == "dsn"

    containers = pod["initContainers"] + pod["containers"]
    assert len(containers) == 2
    for container in containers:
        env = {e["name"]: e["value"] for e in container["env"]}
        url = aiohotload.parse_url(env["AIOHOTLOAD_URL"])
        assert url.strategy == "watchfiles"
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        # A subPath mount would never see the Secret change.
        assert "subPath" not in mount
        assert url.path == f"{mount['mountPath']}/{key}"

    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["aiohotload", "check"]
    assert init["command"][-1] == "$(AIOHOTLOAD_URL)"
    (app,) = pod["containers"]
    assert app["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert '@app.get("/healthz")' in (EXAMPLES / "fastapi_app.py").read_text()


def test_readme_shows_the_rotation_example_as_the_suite_runs_it() -> None:
    code = (EXAMPLES / "test_rotation.py").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "```python\n" + code[code.index("from __future__") :] + "```\n" in readme
