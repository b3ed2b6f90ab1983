"""DSN forms: libpq ``key=value`` strings converted to the URL form asyncpg reads."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from .errors import InvalidOptionError

__all__ = ["as_url", "is_key_value", "key_value_to_url", "parse_key_value"]

# libpq keywords that have a place in the URL itself; the rest become query parameters.
_URL_PARTS = frozenset({"host", "hostaddr", "port", "user", "password", "dbname"})


def is_key_value(dsn: str) -> bool:
    """Whether *dsn* is a libpq ``key=value`` string rather than a URL."""
    text = dsn.lstrip()
    return "=" in text and not text.lower().startswith(("postgres://", "postgresql://"))


def parse_key_value(dsn: str) -> dict[str, str]:
    """Parse a libpq ``key=value`` DSN (values may be single-quoted, with ``\\`` escapes).

    Raises :class:`~aiohotload.InvalidOptionError` naming the bad keyword, never the value.
    """
    params: dict[str, str] = {}
    i, n = 0, len(dsn)
    while True:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            return params
        start = i
        while i < n and not dsn[i].isspace() and dsn[i] != "=":
            i += 1
        key = dsn[start:i]
        while i < n and dsn[i].isspace():
            i += 1
        if not key or i >= n or dsn[i] != "=":
            raise InvalidOptionError(f"key=value DSN: expected '=' after {key or '(nothing)'!r}")
        i += 1
        while i < n and dsn[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and dsn[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise InvalidOptionError(f"key=value DSN: unterminated quote in {key!r}")
                c = dsn[i]
                if c == "\\" and i + 1 < n:
                    value.append(dsn[i + 1])
                    i += 2
                elif c == "'":
                    i += 1
                    break
                else:
                    value.append(c)
                    i += 1
        else:
            while i < n and not dsn[i].isspace():
                if dsn[i] == "\\" and i + 1 < n:
                    value.append(dsn[i + 1])
                    i += 2
                else:
                    value.append(dsn[i])
                    i += 1
        params[key] = "".join(value)


def key_value_to_url(dsn: str) -> str:
    """Convert a libpq ``key=value`` DSN to an equivalent ``postgresql://`` URL."""
    params = parse_key_value(dsn)
    user = params.get("user")
    password = params.get("password")
    userinfo = ""
    if user is not None:
        userinfo = quote(user, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        userinfo += "@"
    host = params.get("host") or params.get("hostaddr") or ""
    query = {k: v for k, v in params.items() if k not in _URL_PARTS}
    if password is not None and user is None:
        query["password"] = password
    if host.startswith("/"):
        # A unix socket directory goes in the query; the URL's host stays empty.
        query["host"] = host
        host = ""
    port = params.get("port")
    if host:
        hosts = host.split(",")
        ports = port.split(",") if port else [""]
        if len(ports) == 1:
            ports = ports * len(hosts)
        if len(ports) != len(hosts):
            raise InvalidOptionError("key=value DSN: 'port' lists a different number of hosts")
        # An IPv6 literal needs brackets in a URL.
        host = ",".join(
            (f"[{h}]" if ":" in h else h) + (f":{p}" if p else "")
            for h, p in zip(hosts, ports, strict=True)
        )
    elif port:
        query["port"] = port
    netloc = userinfo + host
    path = "/" + quote(params["dbname"], safe="") if "dbname" in params else ""
    return "postgresql://" + netloc + path + ("?" + urlencode(query) if query else "")


def as_url(dsn: str) -> str:
    """*dsn* as asyncpg reads it (URLs only): a libpq key=value DSN becomes a URL."""
    return key_value_to_url(dsn) if is_key_value(dsn) else dsn
