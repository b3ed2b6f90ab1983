"""The awssm strategy against moto's Secrets Manager server: the first value, rotations
through AWSPENDING to AWSCURRENT followed by a real pool, deleted and missing secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

import anyio
import pytest

import aiohotload
from aiohotload import SourceError
from aiohotload.strategies import Feedback, register_strategy, unregister_strategy
from aiohotload.strategies.awssm import AwsSecretsManagerStrategy
from aiohotload.testing import PgServer, RoleFactory, port_of, wait_until

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient

try:
    from aiobotocore.session import get_session
    from moto.server import ThreadedMotoServer
except ImportError as exc:
    _MESSAGE = f"needs aiohotload[aws] and moto[server]: {exc}"
    if os.environ.get("CI"):
        pytest.fail(_MESSAGE, pytrace=False)
    pytest.skip(_MESSAGE, allow_module_level=True)

pytestmark = [pytest.mark.timeout(60), pytest.mark.source]

LOGGER = "aiohotload.strategies.awssm"
REGION = "us-east-1"


@pytest.fixture(scope="module", autouse=True)
def _awssm_strategy() -> Iterator[None]:
    """Register the strategy by hand where the installed metadata predates its entry point."""
    if any(ep.name == "awssm" for ep in entry_points(group="aiohotload.strategies")):
        yield
        return
    register_strategy("awssm", AwsSecretsManagerStrategy())
    yield
    unregister_strategy("awssm")


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's server on a free local port, shared by the module's tests (each uses its own
    secrets)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Fake credentials from the environment, and nothing else of the machine's AWS setup."""
    nowhere = str(tmp_path_factory.getbasetemp() / "no-aws-config")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass(frozen=True)
class Aws:
    """A client for the tests' own calls (creating, rotating, deleting secrets), moto's
    endpoint, and a secret name of the test's own."""

    sm: SecretsManagerClient
    endpoint: str
    secret_id: str


@pytest.fixture
async def aws(moto_endpoint: str) -> AsyncIterator[Aws]:
    session = get_session()
    async with session.create_client(
        "secretsmanager", region_name=REGION, endpoint_url=moto_endpoint
    ) as client:
        yield Aws(client, moto_endpoint, f"hl/{secrets.token_hex(4)}/db")


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="aiohotload")
    return caplog


def rds_secret(server: PgServer, user: str, password: str) -> str:
    """The JSON an AWS rotation function keeps for an RDS PostgreSQL database."""
    return json.dumps(
        {
            "engine": "postgres",
            "host": server.host,
            "port": server.port,
            "username": user,
            "password": password,
            "dbname": "postgres",
            "dbInstanceIdentifier": "hl-test",
        }
    )


def url_for(aws: Aws, **options: str) -> str:
    query = {"region": REGION, "endpoint_url": aws.endpoint, **options}
    return f"awssm://postgres/{aws.secret_id}?" + "&".join(f"{k}={v}" for k, v in query.items())


async def first(aws: Aws, **options: str) -> str:
    """The strategy's first value for the test's secret."""
    opts = {"region": REGION, "endpoint_url": aws.endpoint, **options}
    async with aclosing(AwsSecretsManagerStrategy().watch(f"/{aws.secret_id}", opts)) as gen:
        with anyio.fail_after(10):
            return await anext(gen)


async def put_pending(aws: Aws, value: str) -> str:
    """A rotation's first step: the new value goes in as AWSPENDING. Returns its version."""
    pending = await aws.sm.put_secret_value(
        SecretId=aws.secret_id, SecretString=value, VersionStages=["AWSPENDING"]
    )
    return pending["VersionId"]


async def move_current(aws: Aws, version_id: str) -> None:
    """A rotation's last step: AWSCURRENT moves to *version_id*."""
    stages = (await aws.sm.describe_secret(SecretId=aws.secret_id))["VersionIdsToStages"]
    (current,) = [v for v, labels in stages.items() if "AWSCURRENT" in labels]
    await aws.sm.update_secret_version_stage(
        SecretId=aws.secret_id,
        VersionStage="AWSCURRENT",
        MoveToVersionId=version_id,
        RemoveFromVersionId=current,
    )


def polls(log: pytest.LogCaptureFixture) -> int:
    """How many polls found the secret unchanged so far."""
    return sum(1 for r in log.records if r.name == LOGGER and "unchanged" in r.getMessage())


def strategy_warnings(log: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in log.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def assert_never_logged(log: pytest.LogCaptureFixture, password: str) -> None:
    for form in (password, quote(password, safe=""), json.dumps(password)[1:-1]):
        assert form not in log.text


# ---------------------------------------------------------------------------- the value


def test_entry_point_names_the_strategy() -> None:
    eps = [ep for ep in entry_points(group="aiohotload.strategies") if ep.name == "awssm"]
    if not eps:
        pytest.skip("the installed aiohotload's metadata has no 'awssm' entry point yet")
    assert eps[0].load() is AwsSecretsManagerStrategy


async def test_json_secret_becomes_a_dsn(aws: Aws, log: pytest.LogCaptureFixture) -> None:
    password = "p@:/%?#'\" \\&=+;é€日本"
    value = {"engine": "postgres", "host": "db.internal", "port": 5433, "username": "app"}
    await aws.sm.create_secret(
        Name=aws.secret_id,
        SecretString=json.dumps({**value, "password": password, "dbname": "db"}),
    )
    parts = urlsplit(await first(aws))
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == (
        "postgresql",
        "db.internal",
        5433,
        "/db",
    )
    assert (unquote(parts.username or ""), unquote(parts.password or "")) == ("app", password)
    assert any("postgresql://app:********@db.internal:5433/db" in m for m in log.messages)
    assert_never_logged(log, password)


async def test_plain_dsn_secret_is_the_dsn(aws: Aws) -> None:
    await aws.sm.create_secret(Name=aws.secret_id, SecretString=" postgresql://u:pw@h:5432/d\n")
    assert await first(aws) == "postgresql://u:pw@h:5432/d"


async def test_version_stage_chooses_the_label(aws: Aws) -> None:
    await aws.sm.create_secret(Name=aws.secret_id, SecretString="postgresql://u@current/d")
    await put_pending(aws, "postgresql://u@pending/d")
    assert await first(aws) == "postgresql://u@current/d"
    assert await first(aws, version_stage="AWSPENDING") == "postgresql://u@pending/d"


# ---------------------------------------------------------------------------- with a pool


async def test_rotation_through_awspending_switches_the_pool(
    aws: Aws,
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    log: pytest.LogCaptureFixture,
) -> None:
    user, password = user_ab
    await aws.sm.create_secret(Name=aws.secret_id, SecretString=rds_secret(pg_a, user, password))
    async with aiohotload.create_pool(
        url_for(aws, interval="200ms"), min_size=1, max_size=2
    ) as pool:
        assert await port_of(pool) == pg_a.port
        assert await pool.fetchval("SELECT current_user") == user

        # While the new value is only AWSPENDING, the pool stays where it is.
        version = await put_pending(aws, pg_b.dsn(user, password))
        seen = polls(log)
        await wait_until(lambda: polls(log), lambda n: n >= seen + 2, what="two more polls")
        assert pool.generation == 0

        # AWSCURRENT moves to the new version (a plain DSN this time): the pool follows.
        swapped = asyncio.ensure_future(pool.wait_for_swap(timeout=10))
        await move_current(aws, version)
        assert await swapped == 1
        assert await port_of(pool) == pg_b.port
        assert await pool.fetchval("SELECT current_user") == user
    (news,) = [m for m in log.messages if "new DSN from" in m]
    assert version in news
    assert_never_logged(log, password)


async def test_refresh_request_sees_a_new_awscurrent_at_once(
    aws: Aws, log: pytest.LogCaptureFixture
) -> None:
    await aws.sm.create_secret(
        Name=aws.secret_id, SecretString="postgresql://app:pw-r0tated-1@db/app"
    )
    feedback = Feedback()
    options = {"region": REGION, "endpoint_url": aws.endpoint, "interval": "1h"}
    watch = AwsSecretsManagerStrategy().watch(f"/{aws.secret_id}", options, feedback=feedback)
    async with aclosing(watch) as gen:
        with anyio.fail_after(10):
            assert await anext(gen) == "postgresql://app:pw-r0tated-1@db/app"
        # A single-user rotation's last step: AWSCURRENT moves to the new password. The pool,
        # whose logins the database now refuses, asks the strategy to look again.
        await move_current(aws, await put_pending(aws, "postgresql://app:pw-r0tated-2@db/app"))
        feedback.request_refresh()
        # Seen now, not after the hour the interval would take.
        with anyio.fail_after(10):
            assert await anext(gen) == "postgresql://app:pw-r0tated-2@db/app"
    assert any("the pool asked for a fresh" in m for m in log.messages)
    assert_never_logged(log, "pw-r0tated-2")


async def test_deleted_secret_keeps_the_pool_serving(
    aws: Aws,
    pg_a: PgServer,
    pg_b: PgServer,
    user_ab: tuple[str, str],
    log: pytest.LogCaptureFixture,
) -> None:
    user, password = user_ab
    await aws.sm.create_secret(Name=aws.secret_id, SecretString=rds_secret(pg_a, user, password))
    async with aiohotload.create_pool(
        url_for(aws, interval="100ms"), min_size=1, max_size=2
    ) as pool:
        await aws.sm.delete_secret(SecretId=aws.secret_id, RecoveryWindowInDays=7)
        (warning,) = await wait_until(lambda: strategy_warnings(log), what="a warning")
        assert aws.secret_id in warning
        assert "InvalidRequestException" in warning
        assert "keeping the current DSN" in warning
        # Failing polls go on; the pool serves from the DSN it has.
        seen = len(log.records)
        await wait_until(lambda: len(log.records), lambda n: n >= seen + 2, what="more polls")
        assert await port_of(pool) == pg_a.port
        assert pool.last_error is None

        # Restored, then rotated: the strategy kept polling all along.
        await aws.sm.restore_secret(SecretId=aws.secret_id)
        swapped = asyncio.ensure_future(pool.wait_for_swap(timeout=10))
        await move_current(aws, await put_pending(aws, rds_secret(pg_b, user, password)))
        assert await swapped == 1
        assert await port_of(pool) == pg_b.port
    # One warning for the whole outage, however many polls failed.
    assert len(strategy_warnings(log)) == 1
    assert any("can be read again" in m for m in log.messages)
    assert_never_logged(log, password)


# ---------------------------------------------------------------------------- at start


async def test_missing_secret_at_start_is_a_source_error(aws: Aws) -> None:
    with pytest.raises(SourceError) as info:
        await aiohotload.create_pool(url_for(aws))
    assert str(info.value) == (
        f"cannot read AWS secret {aws.secret_id!r} (AWSCURRENT): ResourceNotFoundException: "
        "Secrets Manager can't find the specified secret"
    )


@pytest.mark.parametrize("force", [True, False], ids=["deleted", "scheduled for deletion"])
async def test_deleted_secret_at_start_is_a_source_error(aws: Aws, force: bool) -> None:
    await aws.sm.create_secret(Name=aws.secret_id, SecretString="postgresql://u:pw@h/d")
    if force:
        await aws.sm.delete_secret(SecretId=aws.secret_id, ForceDeleteWithoutRecovery=True)
    else:
        await aws.sm.delete_secret(SecretId=aws.secret_id, RecoveryWindowInDays=7)
    code = "ResourceNotFoundException" if force else "InvalidRequestException"
    with pytest.raises(SourceError, match=f"{aws.secret_id}.*{code}"):
        await first(aws)


async def test_unusable_secret_at_start_is_a_source_error(aws: Aws) -> None:
    value = {"engine": "mysql", "host": "h", "username": "u", "password": "s3cret"}
    await aws.sm.create_secret(Name=aws.secret_id, SecretString=json.dumps(value))
    with pytest.raises(SourceError) as info:
        await first(aws)
    assert str(info.value) == (
        f"AWS secret {aws.secret_id!r} (AWSCURRENT) is for engine 'mysql', not PostgreSQL"
    )


async def test_unreachable_endpoint_at_start_is_a_source_error(aws: Aws) -> None:
    unreachable = Aws(aws.sm, "http://127.0.0.1:9", aws.secret_id)  # the discard port
    with pytest.raises(SourceError, match="Could not connect to the endpoint URL"):
        await first(unreachable, timeout="5s")


class WithoutFeedback:
    """The awssm strategy as one that never hears from its pool: polls only."""

    async def watch(self, path: str, options: Mapping[str, str]) -> AsyncIterator[str]:
        async with aclosing(AwsSecretsManagerStrategy().watch(path, options)) as gen:
            async for dsn in gen:
                yield dsn


@pytest.mark.parametrize("hook", [True, False], ids=["refresh on refused login", "polls only"])
async def test_single_user_rotation_window(
    aws: Aws, pg_a: PgServer, role: RoleFactory, hook: bool
) -> None:
    """AWS single-user rotation: the password changes on the server (setSecret), and a
    moment later AWSCURRENT moves to it (finishSecret). In between, new logins fail with
    either pool; with the refresh hook the pool follows at once when AWSCURRENT moves,
    without it only at its next poll (60 s here)."""
    user, password = await role(pg_a)
    await aws.sm.create_secret(Name=aws.secret_id, SecretString=rds_secret(pg_a, user, password))
    scheme = "awssm"
    if not hook:
        scheme = "awssm-polls-only"
        register_strategy(scheme, WithoutFeedback())
    try:
        url = url_for(aws, interval="60s").replace("awssm://", f"{scheme}://", 1)
        async with aiohotload.create_pool(url, min_size=2, max_size=4) as pool:
            failed = 0
            stop = asyncio.Event()

            async def load() -> None:
                nonlocal failed
                while not stop.is_set():
                    try:
                        await pool.fetchval("SELECT 1")
                    except Exception:  # an application's retry loop
                        failed += 1
                        await asyncio.sleep(0.01)

            loader = asyncio.ensure_future(load())
            rotated = "rot-" + password
            version = await put_pending(aws, rds_secret(pg_a, user, rotated))
            await pg_a.alter_password(user, rotated)  # setSecret
            await pg_a.terminate(usename=user)  # so that new logins are needed
            await wait_until(lambda: failed, lambda n: n > 0, timeout=10, what="refused logins")
            await move_current(aws, version)  # finishSecret
            finished = time.monotonic()
            if hook:
                await pool.wait_until(lambda p: p.generation == 1, timeout=20)
                seconds = time.monotonic() - finished
                print(f"single-user rotation with the hook: followed {seconds:.2f}s after "
                      f"finishSecret, {failed} failed queries")  # fmt: skip
                failed_before = failed
                await wait_until(lambda: pool.fetchval("SELECT 1"), timeout=10)
                assert failed == failed_before  # serving again
            else:
                # Nothing makes it look before its next poll, a minute away.
                with pytest.raises(TimeoutError):
                    await pool.wait_for_swap(timeout=5)
                print(f"single-user rotation polling only: still failing 5s after finishSecret, "
                      f"{failed} failed queries")  # fmt: skip
            stop.set()
            await loader
    finally:
        if not hook:
            unregister_strategy(scheme)
