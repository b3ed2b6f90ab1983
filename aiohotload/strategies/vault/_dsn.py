"""DSNs from database credentials: options (host, port, dbname, libpq parameters) or a
template with ``{username}`` and ``{password}`` in it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from ...errors import InvalidOptionError
from ..toolkit import quoted

__all__ = ["DSN_PARAMS", "DsnRecipe"]

#: libpq connection parameters (that asyncpg reads from a DSN) accepted as options.
DSN_PARAMS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "application_name",
    "target_session_attrs",
)
_URL_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class DsnRecipe:
    """How a username and password become a DSN."""

    host: str | None = None
    port: int = 5432
    dbname: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    template: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> DsnRecipe:
        """The recipe the options describe; InvalidOptionError if they describe none."""
        template = options.get("template")
        if template is not None:
            others = sorted(set(options) - {"template"})
            if others:
                raise InvalidOptionError(
                    f"option 'template' holds the whole DSN; drop option {others[0]!r}"
                )
            if "{username}" not in template or "{password}" not in template:
                raise InvalidOptionError(
                    "option 'template' must contain '{username}' and '{password}'; "
                    f"got {quoted(template)}"
                )
            return cls(template=template.strip())
        host = options.get("host", "").strip()
        if not host:
            raise InvalidOptionError(
                "the vault strategy needs option 'host' (and 'port', 'dbname') or 'template' "
                "to build a DSN from database credentials"
            )
        port = options.get("port", "5432").strip()
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidOptionError(f"option 'port' must be 1 to 65535; got {quoted(port)}")
        dbname = options.get("dbname", "").strip() or None
        params = tuple((k, options[k]) for k in DSN_PARAMS if k in options)
        return cls(host=host, port=int(port), dbname=dbname, params=params)

    def dsn(self, username: str, password: str) -> str:
        """The DSN for these credentials, each quoted for the DSN's form."""
        if self.template is not None:
            escape = _url_quote if self.template.startswith(_URL_SCHEMES) else _kv_quote
            # replace, not str.format: other braces in the template stay as written.
            return self.template.replace("{username}", escape(username)).replace(
                "{password}", escape(password)
            )
        assert self.host is not None
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        path = "/" + quote(self.dbname, safe="") if self.dbname else ""
        query = "?" + urlencode(self.params, quote_via=quote) if self.params else ""
        userinfo = f"{_url_quote(username)}:{_url_quote(password)}"
        return f"postgresql://{userinfo}@{host}:{self.port}{path}{query}"


def _url_quote(value: str) -> str:
    return quote(value, safe="")


def _kv_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"
