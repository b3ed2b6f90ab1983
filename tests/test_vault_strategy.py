"""The vault strategy without Vault: paths, options, DSN building, lease timing, failure
pacing, and the lease lifecycle against a scripted Vault (httpx's MockTransport) on a
clock the test moves. Against a real server: integration_tests/test_vault.py."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from aiohotload.dsn import parse_key_value
from aiohotload.errors import InvalidOptionError, InvalidURLError
from aiohotload.strategies import Strategy, takes_feedback
from aiohotload.strategies._secret import SecretFormatError
from aiohotload.strategies.vault import VaultStrategy
from aiohotload.strategies.vault._auth import Authenticator, Token
from aiohotload.strategies.vault._client import (
    Unavailable,
    VaultClient,
    VaultDenied,
    VaultRejected,
)
from aiohotload.strategies.vault._dsn import DsnRecipe
from aiohotload.strategies.vault._dynamic import DynamicCredentials
from aiohotload.strategies.vault._faults import FailureLog, Retries
from aiohotload.strategies.vault._kv import dsn_from_kv
from aiohotload.strategies.vault._leases import Lease, Term, margin, replace_at
from aiohotload.strategies.vault._options import (
    AuthMethod,
    Kind,
    SecretPath,
    parse_options,
    parse_path,
)
from aiohotload.strategies.vault._source import REFRESH_GAP

HOSTILE = "p@:/%?#'\" \\&=+;é€"
DB = {"host": "db", "dbname": "app"}


def test_is_a_strategy_that_takes_feedback() -> None:
    assert isinstance(VaultStrategy(), Strategy)
    assert takes_feedback(VaultStrategy())


# ------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/database/creds/app", SecretPath(Kind.DYNAMIC, "database", "app")),
        ("/db/prod/creds/app", SecretPath(Kind.DYNAMIC, "db/prod", "app")),
        ("/database/static-creds/app", SecretPath(Kind.STATIC, "database", "app")),
        ("/secret/data/app/db", SecretPath(Kind.KV, "secret", "app/db")),
        # The first kind word after the mount decides: a KV path may hold 'creds'.
        ("/secret/data/app/creds/x", SecretPath(Kind.KV, "secret", "app/creds/x")),
        ("/creds/creds/app", SecretPath(Kind.DYNAMIC, "creds", "app")),
    ],
)
def test_path(path: str, expected: SecretPath) -> None:
    assert parse_path(path) == expected
    assert str(expected) == path.strip("/")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/", "needs a path such as"),
        ("/database//creds/app", "needs a path such as"),
        ("/database/creds", "reads no database credentials nor KV v2 secret"),
        ("/secret/app/db", "reads no database credentials nor KV v2 secret"),
        ("/database/creds/a/b", "a database role name has no '/'"),
    ],
)
def test_bad_path(path: str, message: str) -> None:
    with pytest.raises(InvalidURLError, match=message):
        parse_path(path)


# ------------------------------------------------------------------ options


def test_defaults_come_from_the_environment_as_vaults_cli_reads_it() -> None:
    env = {"VAULT_ADDR": "https://vault:8200/", "VAULT_NAMESPACE": "team/", "BAO_CACERT": ""}
    opts = parse_options(DB, Kind.DYNAMIC, env)
    assert (opts.addr, opts.namespace, opts.ca_file) == ("https://vault:8200", "team", None)
    assert opts.auth is AuthMethod.TOKEN
    assert (opts.renew_fraction, opts.rotate_before, opts.interval) == (2 / 3, 60.0, 30.0)
    assert parse_options(DB, Kind.DYNAMIC, {"BAO_ADDR": "http://bao:8200"}).addr == (
        "http://bao:8200"
    )
    assert parse_options(DB, Kind.DYNAMIC, {}).addr == "https://127.0.0.1:8200"
    # An option beats the environment.
    options = {**DB, "addr": "http://other:8200", "namespace": ""}
    opts = parse_options(options, Kind.DYNAMIC, env)
    assert (opts.addr, opts.namespace) == ("http://other:8200", None)


def test_options() -> None:
    options = {
        **DB,
        "auth": "AppRole",
        "auth_mount": "/approle-prod/",
        "role_id": "r1",
        "secret_id_file": "~/secret-id",
        "timeout": "2s",
        "rotate_before": "5m",
        "renew_fraction": "0.5",
        "sslmode": "verify-full",
    }
    opts = parse_options(options, Kind.DYNAMIC, {})
    assert opts.auth is AuthMethod.APPROLE
    assert opts.auth_mount == "approle-prod"
    assert opts.secret_id_file is not None and not opts.secret_id_file.startswith("~")
    assert (opts.timeout, opts.rotate_before, opts.renew_fraction) == (2.0, 300.0, 0.5)
    assert "r1" not in repr(opts)


@pytest.mark.parametrize(
    ("options", "kind", "message"),
    [
        ({"nope": "1"}, Kind.DYNAMIC, "unknown option 'nope' for the vault strategy; known: "),
        ({}, Kind.DYNAMIC, "needs option 'host'"),
        ({**DB, "addr": "vault:8200"}, Kind.DYNAMIC, "must be http"),
        ({**DB, "addr": "http://u:p@vault"}, Kind.DYNAMIC, "must not hold credentials"),
        ({**DB, "auth": "ldap"}, Kind.DYNAMIC, "must be one of token, approle, kubernetes"),
        ({**DB, "auth": "approle"}, Kind.DYNAMIC, "needs option 'role_id' or 'role_id_file'"),
        ({**DB, "auth": "kubernetes"}, Kind.DYNAMIC, "needs option 'role'"),
        ({**DB, "role": "app"}, Kind.DYNAMIC, "'role' is for auth=kubernetes, but auth=token"),
        ({**DB, "renew_fraction": "1"}, Kind.DYNAMIC, "from 0.1 to 0.9"),
        ({**DB, "rotate_before": "soon"}, Kind.DYNAMIC, "'rotate_before' must be a duration"),
        ({**DB, "timeout": "0"}, Kind.DYNAMIC, "'timeout' must be a duration > 0"),
        ({**DB, "port": "99999"}, Kind.DYNAMIC, "'port' must be 1 to 65535"),
        ({**DB, "field": "dsn"}, Kind.DYNAMIC, "'field' is for KV secrets"),
        ({"host": "db"}, Kind.KV, "'host' builds a DSN from database credentials"),
        ({"template": "postgresql://{username}@db"}, Kind.DYNAMIC, "must contain"),
        ({"template": "x{username}{password}", "host": "h"}, Kind.DYNAMIC, "drop option 'host'"),
        ({**DB, "key_file": "k.pem"}, Kind.DYNAMIC, "'key_file' needs 'cert_file'"),
    ],
)
def test_bad_options(options: dict[str, str], kind: Kind, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message.replace("(", r"\(")):
        parse_options(options, kind, {})


# ------------------------------------------------------------------ DSNs


def test_dsn_from_options_quotes_user_and_password() -> None:
    recipe = DsnRecipe.from_options(
        {"host": "::1", "port": "6432", "dbname": "my db"}
        | {
            "sslmode": "require",
            "application_name": "a&b",
        }
    )
    dsn = recipe.dsn("v-token-app-x", HOSTILE)
    parts = urlsplit(dsn)
    assert unquote(parts.password or "") == HOSTILE
    assert (parts.hostname, parts.port, unquote(parts.path)) == ("::1", 6432, "/my db")
    assert parts.query == "sslmode=require&application_name=a%26b"


def test_dsn_templates() -> None:
    url = DsnRecipe.from_options({"template": "postgresql://{username}:{password}@db/app?x={y}"})
    assert unquote(urlsplit(url.dsn("u", HOSTILE)).password or "") == HOSTILE
    assert url.dsn("u", "p").endswith("?x={y}")  # other braces stay as written
    kv = DsnRecipe.from_options({"template": "host=db user={username} password={password}"})
    assert parse_key_value(kv.dsn("u", HOSTILE))["password"] == HOSTILE


def test_dsn_from_kv() -> None:
    assert dsn_from_kv({"dsn": "postgresql://u:p@h/db"}, None) == "postgresql://u:p@h/db"
    assert dsn_from_kv({"url": "postgresql://u:p@h/db"}, "url") == "postgresql://u:p@h/db"
    fields = {"host": "h", "port": "5433", "username": "u", "password": HOSTILE, "dbname": "d"}
    assert unquote(urlsplit(dsn_from_kv(fields, None)).password or "") == HOSTILE
    with pytest.raises(SecretFormatError, match="has no field 'url'"):
        dsn_from_kv({"dsn": "x"}, "url")
    with pytest.raises(SecretFormatError) as raised:
        dsn_from_kv({"host": "h", "password": HOSTILE}, None)
    assert HOSTILE not in str(raised.value)


# ------------------------------------------------------------------ lease timing


def test_a_term_is_renewed_at_a_fraction_of_its_ttl_with_jitter() -> None:
    term = Term.new(100.0, 60.0, renewable=True, fraction=2 / 3)
    assert (term.expires, term.final) == (160.0, False)
    assert 100 + 36 <= term.renew_at <= 100 + 44
    assert replace_at(term, 30.0) == math.inf  # renewable: renewed, not replaced
    renewed = term.renewed(140.0, 60.0, fraction=2 / 3)
    assert (renewed.expires, renewed.final) == (200.0, False)


def test_a_capped_renewal_makes_the_term_final_and_due_for_replacement() -> None:
    term = Term.new(0.0, 3600.0, renewable=True, fraction=2 / 3)
    capped = term.renewed(86000.0, 400.0, fraction=2 / 3)  # max_ttl is at 86400
    assert (capped.expires, capped.final, capped.renew_at) == (86400.0, True, math.inf)
    assert replace_at(capped, 60.0) == 86400.0 - 60.0
    # A renewal that does not extend the end is a cap too.
    assert term.renewed(10.0, 3590.0, fraction=2 / 3).final


def test_a_non_renewable_lease_is_replaced_before_its_end() -> None:
    term = Term.new(0.0, 3600.0, renewable=False, fraction=2 / 3)
    assert term.final and term.renew_at == math.inf
    assert replace_at(term, 60.0) == 3540.0


def test_the_margin_is_at_most_half_the_life() -> None:
    # A 4 s lease with the default 60 s margin would be replaced the moment it was issued.
    term = Term.new(10.0, 4.0, renewable=False, fraction=2 / 3)
    assert margin(term, 60.0, term.expires) == 2.0
    assert replace_at(term, 60.0) == 12.0


def test_a_lease_is_replaced_before_the_token_that_leased_it_ends() -> None:
    term = Term.new(0.0, 3600.0, renewable=True, fraction=2 / 3)
    assert replace_at(term, 60.0, ends=1000.0) == 940.0
    assert replace_at(term, 60.0, ends=5000.0) == math.inf  # renewed beyond that first


def test_a_token_that_never_expires_is_never_replaced() -> None:
    term = Term.new(0.0, 0.0, renewable=False, fraction=2 / 3)
    assert term.final and term.expires == math.inf
    assert replace_at(term, 60.0) == math.inf


# ------------------------------------------------------------------ failure pacing


def test_retries_back_off_doubling_with_jitter_up_to_a_cap() -> None:
    retries = Retries(logging.getLogger("t"), "read x")
    delays = [retries.failed(100.0, "sealed", "keeping the current DSN") for _ in range(8)]
    for delay, nominal in zip(delays, [1, 2, 4, 8, 16, 32, 60, 60], strict=True):
        assert nominal / 2 <= delay <= nominal
    assert retries.retry_at == 100.0 + delays[-1]
    assert retries.failed(100.0, "sealed", "", cap=0.1) == 1.0  # capped, but not below 1 s
    retries.succeeded()
    assert (retries.failures, retries.retry_at, retries.trouble) == (0, 0.0, None)
    assert retries.failed(100.0, "sealed", "keeping the current DSN") <= 1.0  # from the start


def test_each_distinct_failure_is_a_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    log = FailureLog(logging.getLogger("t"), "read x")
    for reason in ("sealed", "sealed", "sealed", "unreachable", "unreachable"):
        log.failed(reason, "keeping the current DSN", 1.0)
    log.recovered()
    log.recovered()
    levels = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records]
    assert [lvl for lvl, _ in levels] == ["WARNING", "DEBUG", "DEBUG", "WARNING", "DEBUG", "INFO"]


# ------------------------------------------------------------------ a scripted Vault


class FakeVault:
    """Vault's answers, per path, for a MockTransport; records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.leases = 0
        self.renewal: Callable[[dict[str, Any]], httpx.Response] = lambda body: _ok(
            {"lease_id": body["lease_id"], "lease_duration": 60, "renewable": True}
        )
        self.revoke: Callable[[dict[str, Any]], httpx.Response] = lambda body: httpx.Response(204)
        self.down = False

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/v1/")
        body = json.loads(request.content) if request.content else {}
        self.requests.append((request.method, path, body))
        if self.down:
            return httpx.Response(503, json={"errors": ["Vault is sealed"]})
        if path == "auth/token/lookup-self":
            return _ok({"data": {"ttl": 0, "renewable": False, "creation_ttl": 0, "id": "t0k"}})
        if path == "database/creds/app":
            self.leases += 1
            return _ok(
                {
                    "lease_id": f"database/creds/app/{self.leases}",
                    "lease_duration": 60,
                    "renewable": True,
                    "data": {"username": f"v-app-{self.leases}", "password": f"pw-{self.leases}"},
                }
            )
        if path == "sys/leases/renew":
            return self.renewal(body)
        if path == "sys/leases/revoke":
            return self.revoke(body)
        return httpx.Response(404, json={"errors": []})

    def paths(self, path: str) -> list[dict[str, Any]]:
        return [body for _, p, body in self.requests if p == path]


def _ok(data: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json=data)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def vault() -> FakeVault:
    return FakeVault()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def creds(vault: FakeVault, clock: Clock) -> DynamicCredentials:
    opts = parse_options({**DB, "rotate_before": "10s"}, Kind.DYNAMIC, {})
    auth: Authenticator | None = None
    client = VaultClient(
        "http://vault",
        namespace=None,
        timeout=5.0,
        verify=True,
        secrets=lambda: auth.secrets() if auth else (),
        transport=httpx.MockTransport(vault.handle),
    )
    auth = Authenticator(client, opts, {"VAULT_TOKEN": "t0k"}, clock=clock)
    await auth.start()
    source = DynamicCredentials(client, auth, parse_path("database/creds/app"), opts)
    await source.start()
    return source


async def run_until(source: DynamicCredentials, clock: Clock, until: float) -> list[str]:
    """Step the source at each time it is due, up to *until*; the DSNs it gave."""
    dsns = []
    while (due := source.due()) <= until:
        clock.now = max(clock.now, due)
        if (dsn := await source.step(clock.now)) is not None:
            dsns.append(dsn)
    clock.now = until
    return dsns


async def test_a_lease_is_renewed_until_capped_then_replaced_before_its_end(
    creds: DynamicCredentials, vault: FakeVault, clock: Clock
) -> None:
    grants = iter([60, 60, 30])  # the third renewal reaches max_ttl: 30 s left
    vault.renewal = lambda body: _ok({"lease_duration": next(grants, 60), "renewable": True})
    first = creds.current
    assert first is not None
    dsns = await run_until(creds, clock, first.term.issued + 170)
    assert len(dsns) == 1 and creds.current is not first
    assert first.term.final
    # Replaced 10 s (rotate_before) before the capped end, not later.
    assert creds.current is not None
    assert creds.current.term.issued == pytest.approx(first.term.expires - 10)


async def test_a_lease_gone_from_vault_is_replaced_at_once(
    creds: DynamicCredentials, vault: FakeVault, clock: Clock
) -> None:
    vault.renewal = lambda body: httpx.Response(400, json={"errors": ["lease not found"]})
    first = creds.current
    assert first is not None
    renew_at = first.term.renew_at
    dsns = await run_until(creds, clock, renew_at)
    assert len(dsns) == 1
    assert creds.current is not None and creds.current.term.issued == renew_at


async def test_failing_renewals_give_up_in_time_to_replace_the_lease(
    creds: DynamicCredentials, vault: FakeVault, clock: Clock
) -> None:
    first = creds.current
    assert first is not None
    vault.down = True
    await run_until(creds, clock, first.term.expires - 10)
    assert first.term.final  # no more renewals: new credentials are due now
    assert len(vault.paths("database/creds/app")) > 1  # tried, Vault still down
    vault.down = False
    dsns = await run_until(creds, clock, first.term.expires)
    assert len(dsns) == 1


async def test_refreshes_are_paced(
    creds: DynamicCredentials, vault: FakeVault, clock: Clock
) -> None:
    creds.refresh(clock.now)  # right after the first credentials: wait out the gap
    assert creds.due() == clock.now + REFRESH_GAP
    dsns = await run_until(creds, clock, clock.now + REFRESH_GAP)
    assert len(dsns) == 1
    creds.refresh(clock.now + REFRESH_GAP)
    assert creds.due() == clock.now + REFRESH_GAP


async def test_released_leases_are_revoked_and_a_refusal_is_reported_once(
    creds: DynamicCredentials, vault: FakeVault, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    first = creds.current
    assert first is not None
    creds.refresh(clock.now)
    (second,) = await run_until(creds, clock, clock.now + REFRESH_GAP)
    creds.release(first.dsn)
    await creds.step(clock.now)
    assert vault.paths("sys/leases/revoke") == [{"lease_id": first.lease_id}]
    vault.revoke = lambda body: httpx.Response(403, json={"errors": ["permission denied"]})
    creds.release(second)
    await creds.step(clock.now)
    assert await creds.close()  # nothing left in use
    assert len(vault.paths("sys/leases/revoke")) == 2  # no retry after a refusal
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sys/leases/revoke" in warnings[0].getMessage()
    assert all("pw-" not in r.getMessage() for r in caplog.records)


async def test_a_token_past_its_max_ttl_is_replaced_at_once_not_retried(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # A grant capped by max_ttl to a whole TTL does not look capped; Vault then refuses the
    # next renewal (with a server error). Retrying it after a backoff would let the token,
    # and the leases Vault revokes with it, end first.
    logins: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/auth/approle/login":
            logins.append(f"token-{len(logins) + 1}")
            return _ok(
                {"auth": {"client_token": logins[-1], "lease_duration": 2, "renewable": True}}
            )
        assert request.url.path == "/v1/auth/token/renew-self"
        return httpx.Response(500, json={"errors": ["past the max TTL, cannot renew"]})

    opts = parse_options({**DB, "auth": "approle", "role_id": "r"}, Kind.DYNAMIC, {})
    client = VaultClient(
        "http://vault",
        namespace=None,
        timeout=5.0,
        verify=True,
        secrets=lambda: (),
        transport=httpx.MockTransport(handle),
    )
    auth = Authenticator(client, opts, {}, clock=clock)
    await auth.start()
    token = auth.current
    assert token is not None and not token.term.final
    clock.now = auth.due()
    await auth.step(clock.now)
    assert token.term.final and token.ends == token.term.expires
    assert auth.due() <= clock.now  # a login is due now, not after a backoff
    assert auth.trouble is None
    await auth.step(clock.now)
    assert logins == ["token-1", "token-2"]
    assert auth.current is not token
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await client.aclose()


# ------------------------------------------------------------------ the client


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (503, {"errors": ["Vault is sealed"]}, Unavailable, "Vault is sealed"),
        (429, {"errors": ["request path kv/: rate limit quota exceeded"]}, Unavailable, "rate"),
        (
            500,
            {"errors": ["1 error occurred:\n\t* internal error\n\n"]},
            Unavailable,
            "internal error",
        ),
        (403, {"errors": ["permission denied"]}, VaultDenied, "permission denied"),
        (400, {"errors": ["unknown role: app"]}, VaultRejected, "unknown role: app"),
        (404, None, VaultRejected, "HTTP 404"),
    ],
)
async def test_client_errors(
    status: int, body: dict[str, Any] | None, kind: type[Exception], reason: str
) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body) if body else httpx.Response(status)

    client = VaultClient(
        "http://vault",
        namespace="team",
        timeout=5.0,
        verify=True,
        secrets=lambda: ["s3cret"],
        transport=httpx.MockTransport(handle),
    )
    with pytest.raises(kind) as raised:
        await client.get("database/creds/app")
    assert str(raised.value) == reason or reason in str(raised.value)
    await client.aclose()


async def test_client_sends_token_and_namespace_and_scrubs_secrets() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(400, json={"errors": ["bad secret id s3cret"]})

    client = VaultClient(
        "http://vault/",
        namespace="team",
        timeout=5.0,
        verify=True,
        secrets=lambda: ["s3cret"],
        transport=httpx.MockTransport(handle),
    )
    client.token = "t0k"
    with pytest.raises(VaultRejected) as raised:
        await client.post("auth/approle/login", {"secret_id": "s3cret"})
    assert "s3cret" not in str(raised.value)
    request = seen[0]
    assert str(request.url) == "http://vault/v1/auth/approle/login"
    assert request.headers["X-Vault-Token"] == "t0k"
    assert request.headers["X-Vault-Namespace"] == "team"
    await client.aclose()


def test_reprs_hold_no_secret() -> None:
    term = Term.new(0.0, 60.0, renewable=True, fraction=2 / 3)
    token = Token("s.t0k3n", term, own=True, source="AppRole login")
    lease = Lease("database/creds/app/1", "v-app", "postgresql://v-app:pw-1@db/app", term, token)
    assert "t0k3n" not in repr(token)
    assert "pw-1" not in repr(lease) and "t0k3n" not in repr(lease)


def test_the_secrets_remembered_for_scrubbing_are_bounded_and_keep_the_token() -> None:
    opts = parse_options(DB, Kind.DYNAMIC, {})
    client = VaultClient("http://vault", namespace=None, timeout=1.0, verify=True, secrets=list)
    auth = Authenticator(client, opts, {})
    auth.remember("s.t0k3n")
    for n in range(1000):
        auth.remember(f"pw-{n}", password=True)
    secrets = auth.secrets()
    assert "s.t0k3n" in secrets and "pw-999" in secrets and "pw-0" not in secrets
    assert len(secrets) <= 2 * 64
