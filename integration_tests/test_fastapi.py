"""The FastAPI integration in a real uvicorn process (examples/fastapi_app.py) under load:
no failed request while the DSN moves between servers, and a clean, drained shutdown."""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
from pathlib import Path
from urllib.parse import quote

import anyio
import httpx
import pytest

from aiohotload.testing import PgServer, RoleFactory, wait_until, write_dsn

from .apps import ROOT, child_env, exited_cleanly, uvicorn

pytestmark = pytest.mark.timeout(90)

CLIENTS = 20
SWITCHES = 5


async def test_requests_keep_succeeding_while_the_dsn_switches_and_shutdown_drains(
    pg_a: PgServer, pg_b: PgServer, role: RoleFactory, tmp_path: Path
) -> None:
    user, password = await role(pg_a)
    await role(pg_b, name=user, password=password)
    # A directory of its own: the strategy watches the directory, and the log is busy.
    (tmp_path / "secret").mkdir()
    dsn_file = tmp_path / "secret" / "dsn"
    write_dsn(dsn_file, pg_a.dsn(user, password))

    statuses: collections.Counter[int] = collections.Counter()
    ports: collections.Counter[int] = collections.Counter()
    errors: list[str] = []  # transport errors while the server should be serving
    stopping = False
    limits = httpx.Limits(max_connections=CLIENTS)

    async with (
        httpx.AsyncClient(timeout=30, limits=limits) as client,
        uvicorn(
            "examples.fastapi_app:app",
            tmp_path / "uvicorn.log",
            client,
            AIOHOTLOAD_URL=f"watchfiles://postgres{quote(str(dsn_file))}",
        ) as server,
    ):

        async def generation() -> int:
            response = await client.get(server.url + "/healthz")
            assert response.status_code == 200, response.text
            number: int = response.json()["generation"]
            return number

        async def hammer() -> None:
            while True:
                try:
                    response = await client.get(server.url + "/")
                except httpx.TransportError as exc:
                    if stopping:
                        return  # the server closed its connections: shutdown is under way
                    errors.append(repr(exc))
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    ports[response.json()["port"]] += 1

        async with anyio.create_task_group() as tg:
            for _ in range(CLIENTS):
                tg.start_soon(hammer)
            for switch in range(1, SWITCHES + 1):
                target = pg_b if switch % 2 else pg_a
                answered = ports[target.port]
                write_dsn(dsn_file, target.dsn(user, password))
                await wait_until(generation, lambda g, n=switch: g == n, timeout=20)
                # Traffic reached the new server before the next move.
                await wait_until(lambda t=target, n=answered: ports[t.port] > n, timeout=20)

            # Shut down under load: requests in flight finish, then the pool drains.
            stopping = True
            returncode = await server.stop(signal.SIGTERM)
            tg.cancel_scope.cancel()

    log = server.output
    assert exited_cleanly(returncode, signal.SIGTERM), (returncode, log)
    assert errors == []
    assert set(statuses) == {200}, statuses
    assert set(ports) == {pg_a.port, pg_b.port}
    assert "Application shutdown complete" in log, log
    assert "pool closed" in log, log  # aiohotload's own record of the drained close
    assert log.count("swapped to generation") == SWITCHES
    assert password not in log
    assert quote(password, safe="") not in log
    for pg in (pg_a, pg_b):
        # The app closed its connections; the backends exit right after.
        await wait_until(lambda pg=pg: pg.backends(usename=user), lambda rows: not rows)


async def test_startup_fails_without_a_usable_dsn(tmp_path: Path) -> None:
    """A missing DSN file stops uvicorn at startup instead of serving errors."""
    missing = tmp_path / "missing" / "dsn"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "examples.fastapi_app:app",
        "--port",
        "0",
        cwd=ROOT,
        env=child_env(AIOHOTLOAD_URL=f"watchfiles://postgres{missing}"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    with anyio.fail_after(30):
        output, _ = await proc.communicate()
    text = output.decode()
    assert proc.returncode == 3, text  # uvicorn's "startup failed"
    assert "Application startup failed" in text
    assert str(missing.parent) in text
