"""Login roles and DSNs for test servers, with passwords that break naive DSN building."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, NamedTuple, Protocol
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from .server import PgServer

__all__ = ["HOSTILE", "Role", "RoleFactory", "hostile_password", "kv_dsn", "url_dsn"]

#: Characters that break naive DSN building: URL delimiters, quotes, space, backslash, non-ASCII.
HOSTILE = "@:/%?#'\" \\&=+;é€日本"


class Role(NamedTuple):
    """A login role: unpacks as ``name, password``; ``server.dsn(*role)`` logs in as it."""

    name: str
    password: str


class RoleFactory(Protocol):
    """``role``: ``name, password = await role(server)``."""

    async def __call__(
        self,
        server: PgServer,
        *,
        name: str | None = None,
        password: str | None = None,
        superuser: bool = False,
    ) -> Role: ...


def hostile_password() -> str:
    """A random password holding every character of :data:`HOSTILE`."""
    return f"p{HOSTILE}{secrets.token_hex(4)}"


def url_dsn(
    host: str, port: int, user: str, password: str, database: str = "postgres", **params: str
) -> str:
    """``postgresql://user:password@host:port/database?params`` with every part percent-encoded."""
    netloc_host = f"[{host}]" if ":" in host else host
    url = (
        f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
        f"@{netloc_host}:{port}/{quote(database, safe='')}"
    )
    if params:
        url += "?" + urlencode(params, quote_via=quote, safe="")
    return url


def kv_dsn(
    host: str, port: int, user: str, password: str, database: str = "postgres", **params: str
) -> str:
    """libpq ``key='value' ...`` DSN, every value single-quoted with ``\\`` and ``'`` escaped.

    asyncpg (0.32) parses URL DSNs only; libpq (psql, psycopg) and aiohotload read this form.
    """
    pairs = {"host": host, "port": str(port), "user": user, "password": password}
    pairs |= {"dbname": database, **params}
    return " ".join(f"{key}={_kv_quote(value)}" for key, value in pairs.items())


def _kv_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
