"""The vault strategy's options, the environment Vault's CLI reads, and the secret's path."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ...errors import InvalidOptionError, InvalidURLError
from ...url import parse_duration
from ..toolkit import check_options, quoted
from ._dsn import DSN_PARAMS, DsnRecipe

__all__ = ["AuthMethod", "Kind", "SecretPath", "VaultOptions", "parse_options", "parse_path"]

DEFAULT_ADDR = "https://127.0.0.1:8200"  # Vault's CLI default
DEFAULT_JWT_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
DEFAULT_RENEW_FRACTION = 2 / 3  # as Vault's own lifetime watcher renews
DEFAULT_ROTATE_BEFORE = 60.0
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 10.0


class AuthMethod(enum.Enum):
    TOKEN = "token"
    APPROLE = "approle"
    KUBERNETES = "kubernetes"


class Kind(enum.Enum):
    """What the path reads, named by the path segment that says so."""

    DYNAMIC = "creds"  # <mount>/creds/<role>: a new user per lease
    STATIC = "static-creds"  # <mount>/static-creds/<role>: a user whose password rotates
    KV = "data"  # <mount>/data/<path>: a KV version 2 secret


@dataclass(frozen=True)
class SecretPath:
    kind: Kind
    mount: str
    name: str  # the role, or the KV secret's path under the mount

    def __str__(self) -> str:
        return f"{self.mount}/{self.kind.value}/{self.name}"


@dataclass(frozen=True)
class VaultOptions:
    addr: str = DEFAULT_ADDR
    namespace: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    auth: AuthMethod = AuthMethod.TOKEN
    auth_mount: str = "token"
    token_file: str | None = None  # None: VAULT_TOKEN, then ~/.vault-token
    role_id: str | None = field(default=None, repr=False)
    role_id_file: str | None = None
    secret_id_file: str | None = None
    role: str | None = None
    jwt_file: str = DEFAULT_JWT_FILE
    renew_fraction: float = DEFAULT_RENEW_FRACTION
    rotate_before: float = DEFAULT_ROTATE_BEFORE
    interval: float = DEFAULT_INTERVAL
    field: str | None = None
    recipe: DsnRecipe | None = None  # how to build the DSN from database credentials

    @property
    def where(self) -> str:
        """Vault's address (and namespace), for messages."""
        return f"{self.addr} (namespace {self.namespace!r})" if self.namespace else self.addr


_FILES = ("ca_file", "cert_file", "key_file", "token_file", "role_id_file", "secret_id_file")
_DURATIONS = ("timeout", "rotate_before", "interval")
_METHOD_OPTIONS = {
    AuthMethod.TOKEN: {"token_file"},
    AuthMethod.APPROLE: {"role_id", "role_id_file", "secret_id_file"},
    AuthMethod.KUBERNETES: {"role", "jwt_file"},
}
_KNOWN = sorted(
    {
        "addr",
        "namespace",
        "auth",
        "auth_mount",
        "renew_fraction",
        "field",
        "host",
        "port",
        "dbname",
        "template",
        *_FILES,
        *_DURATIONS,
        *DSN_PARAMS,
        *(name for names in _METHOD_OPTIONS.values() for name in names),
    }
)
_DSN_OPTIONS = {"host", "port", "dbname", "template", *DSN_PARAMS}


def parse_path(path: str) -> SecretPath:
    """``database/creds/app`` and the like; InvalidURLError naming what is wrong."""
    text = path.strip("/")
    segments = text.split("/")
    if not text or any(not s for s in segments):
        raise InvalidURLError(
            "the vault strategy needs a path such as 'vault://postgres/database/creds/<role>', "
            "'.../database/static-creds/<role>' or '.../secret/data/<path>'; "
            f"got {quoted(path)}"
        )
    # The mount is at least one segment; the first kind word after it decides.
    for index, segment in enumerate(segments[1:], start=1):
        for kind in Kind:
            if segment == kind.value and index < len(segments) - 1:
                name = "/".join(segments[index + 1 :])
                if kind is not Kind.KV and "/" in name:
                    raise InvalidURLError(
                        f"vault path {quoted(text)}: a database role name has no '/'"
                    )
                return SecretPath(kind, "/".join(segments[:index]), name)
    raise InvalidURLError(
        f"vault path {quoted(text)} reads no database credentials nor KV v2 secret: expected "
        "'<mount>/creds/<role>', '<mount>/static-creds/<role>' or '<mount>/data/<path>'"
    )


def parse_options(
    options: Mapping[str, str], kind: Kind, environ: Mapping[str, str] | None = None
) -> VaultOptions:
    """Validate *options*; the defaults come from *environ* (``os.environ``) as Vault's CLI
    reads it: ``VAULT_ADDR``, ``VAULT_NAMESPACE``, ``VAULT_CACERT``, ``VAULT_CLIENT_CERT``,
    ``VAULT_CLIENT_KEY`` (OpenBao's ``BAO_*`` names too)."""
    env = os.environ if environ is None else environ
    check_options("vault", options, _KNOWN)
    values: dict[str, object] = {
        name: parse_duration(name, options[name], allow_zero=name != "timeout")
        for name in _DURATIONS
        if name in options
    }
    values.update(_files(options, env))
    values["addr"] = _addr(options.get("addr") or _env(env, "ADDR") or DEFAULT_ADDR)
    namespace = options.get("namespace", _env(env, "NAMESPACE") or "").strip().strip("/")
    values["namespace"] = namespace or None
    values.update(_auth(options))
    values.update(_secret(options, kind))
    return VaultOptions(**values)  # type: ignore[arg-type]


def _files(options: Mapping[str, str], env: Mapping[str, str]) -> dict[str, object]:
    """The file options: TLS files (from the environment by default), credential files."""
    values: dict[str, object] = {}
    for name, variable in (
        ("ca_file", "CACERT"),
        ("cert_file", "CLIENT_CERT"),
        ("key_file", "CLIENT_KEY"),
    ):
        value = options.get(name) or _env(env, variable)
        if value is not None:
            values[name] = _file(name, value)
    for name in ("token_file", "role_id_file", "secret_id_file", "jwt_file"):
        if name in options:
            values[name] = _file(name, options[name])
    if values.get("key_file") and not values.get("cert_file"):
        raise InvalidOptionError("option 'key_file' needs 'cert_file' (the client certificate)")
    return values


def _auth(options: Mapping[str, str]) -> dict[str, object]:
    """How to log in: the method, its mount, and its own options (no other method's)."""
    method = _method(options)
    values: dict[str, object] = {
        "auth": method,
        "auth_mount": _mount(options.get("auth_mount", method.value)),
    }
    for other, names in _METHOD_OPTIONS.items():
        given = sorted(names & set(options))
        if other is not method and given:
            raise InvalidOptionError(
                f"option {given[0]!r} is for auth={other.value}, but auth={method.value}"
            )
    if method is AuthMethod.APPROLE:
        _approle(options, values)
    if method is AuthMethod.KUBERNETES:
        role = options.get("role", "").strip()
        if not role:
            raise InvalidOptionError("auth=kubernetes needs option 'role' (the Vault role)")
        values["role"] = role
    return values


def _secret(options: Mapping[str, str], kind: Kind) -> dict[str, object]:
    """The options about the secret of *kind*: renewal, a KV field, or the DSN recipe."""
    values: dict[str, object] = {}
    if "renew_fraction" in options:
        values["renew_fraction"] = _fraction(options["renew_fraction"])
    if "field" in options:
        if kind is not Kind.KV:
            raise InvalidOptionError("option 'field' is for KV secrets ('<mount>/data/<path>')")
        if not options["field"].strip():
            raise InvalidOptionError("option 'field' is empty")
        values["field"] = options["field"].strip()
    dsn_options = {k: v for k, v in options.items() if k in _DSN_OPTIONS}
    if kind is not Kind.KV:
        values["recipe"] = DsnRecipe.from_options(dsn_options)
    elif dsn_options:
        raise InvalidOptionError(
            f"option {sorted(dsn_options)[0]!r} builds a DSN from database credentials; "
            "a KV secret holds the DSN itself"
        )
    return values


def _env(env: Mapping[str, str], suffix: str) -> str | None:
    return env.get(f"VAULT_{suffix}") or env.get(f"BAO_{suffix}") or None


def _file(name: str, value: str) -> str:
    if not value.strip():
        raise InvalidOptionError(f"option {name!r} is empty; give a file path")
    return os.path.expanduser(value.strip())


def _addr(value: str) -> str:
    text = value.strip().rstrip("/")
    bad = InvalidOptionError(
        f"option 'addr' (or VAULT_ADDR) must be http(s)://host[:port]; got {quoted(value)}"
    )
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad
    if parts.username is not None or parts.password is not None:
        raise InvalidOptionError("option 'addr' (or VAULT_ADDR) must not hold credentials")
    if parts.query or parts.fragment or parts.path not in ("",):
        raise bad
    return text


def _method(options: Mapping[str, str]) -> AuthMethod:
    value = options.get("auth", "token").strip().lower()
    try:
        return AuthMethod(value)
    except ValueError:
        known = ", ".join(m.value for m in AuthMethod)
        raise InvalidOptionError(
            f"option 'auth' must be one of {known}; got {quoted(value)}"
        ) from None


def _mount(value: str) -> str:
    mount = value.strip().strip("/")
    if not mount or any(not s for s in mount.split("/")):
        raise InvalidOptionError(f"option 'auth_mount' is not a mount path: {quoted(value)}")
    return mount


def _approle(options: Mapping[str, str], values: dict[str, object]) -> None:
    role_id = options.get("role_id")
    if role_id is not None:
        if not role_id.strip():
            raise InvalidOptionError("option 'role_id' is empty")
        if "role_id_file" in options:
            raise InvalidOptionError("give option 'role_id' or 'role_id_file', not both")
        values["role_id"] = role_id.strip()
    elif "role_id_file" not in options:
        raise InvalidOptionError("auth=approle needs option 'role_id' or 'role_id_file'")


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.1 <= number <= 0.9:
        raise InvalidOptionError(
            f"option 'renew_fraction' must be a number from 0.1 to 0.9; got {quoted(value)}"
        )
    return number
