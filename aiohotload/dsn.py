"""DSN forms: a check that a DSN reads as one (without echoing it), and libpq ``key=value``
strings converted to the URL form asyncpg reads."""

from __future__ import annotations

import re
import unicodedata
from typing import Any
from urllib.parse import parse_qs, quote, unquote, unquote_plus, urlencode, urlsplit

from .errors import InvalidDSNError

__all__ = [
    "as_url",
    "check_dsn",
    "is_key_value",
    "key_value_to_url",
    "parse_key_value",
    "wants_primary",
    "writable_only",
]

# libpq keywords that have a place in the URL itself; the rest become query parameters.
_URL_PARTS = frozenset({"host", "hostaddr", "port", "user", "password", "dbname"})
# Every libpq connection keyword (PostgreSQL 17). An error may name one of these; any other
# word of a DSN that failed to parse may be a piece of a password, so it is never quoted.
_LIBPQ_KEYWORDS = _URL_PARTS | frozenset(
    {
        "application_name", "channel_binding", "client_encoding", "connect_timeout",
        "fallback_application_name", "gssdelegation", "gssencmode", "gsslib", "keepalives",
        "keepalives_count", "keepalives_idle", "keepalives_interval", "krbsrvname",
        "load_balance_hosts", "options", "passfile", "replication", "require_auth",
        "requirepeer", "requiressl", "service", "ssl_max_protocol_version",
        "ssl_min_protocol_version", "sslcert", "sslcertmode", "sslcompression", "sslcrl",
        "sslcrldir", "sslkey", "sslmode", "sslnegotiation", "sslpassword", "sslrootcert",
        "sslsni", "target_session_attrs", "tcp_user_timeout",
    }
)  # fmt: skip

_SCHEMES = ("postgresql", "postgres")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# A shell, dotenv or YAML line holding a URL: DATABASE_URL=postgresql://..., export X="...",
# url: postgres://...
_ASSIGNMENT = re.compile(
    r"(?:export[ \t]+)?[A-Za-z_][A-Za-z0-9_.\-]*[ \t]*(?P<sign>[=:])[ \t]*[\"']?postgres(?:ql)?://",
    re.IGNORECASE,
)
_EMBEDDED_URL = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
# Characters a URL DSN never holds raw: a fragment mark (asyncpg would drop what follows
# silently) and control characters (line breaks, tabs: urllib removes some silently).
_URL_FORBIDDEN = re.compile(r"[#\x00-\x1f\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BOMS = ("\ufeff", "\u00ef\u00bb\u00bf")  # the mark itself; its UTF-8 bytes read as Latin-1
_MAX_PORT = 65535
# libpq separates key=value pairs with ASCII whitespace only (C isspace on bytes): a
# non-ASCII space belongs to the value.
_BLANKS = frozenset(" \t\n\r\f\v")


def check_dsn(dsn: str) -> None:
    """Raise :class:`~aiohotload.InvalidDSNError` unless *dsn* reads unambiguously as a
    PostgreSQL URL (``postgresql://...``) or libpq ``key=value`` DSN.

    The message names the problem and its position (character N, counting from 1 after
    leading blanks), never any text of the DSN: a DSN that failed to parse may hold a password
    anywhere. It recognises the classic mistakes: a byte order mark at the start, a
    ``KEY=URL`` line from a dotenv or shell file, an unencoded ``@ / ? #`` in a URL password,
    a bad port, a query parameter without ``=``.
    """
    problem = _problem(dsn.strip())
    if problem is not None:
        raise InvalidDSNError(f"invalid DSN: {problem}")


def _problem(text: str) -> str | None:
    # A problem is a message (never empty) or None, so `a or b` is the first problem found.
    if not text:
        return "it is empty"
    wrapped = _wrapped_problem(text)
    if wrapped is not None:
        return wrapped
    scheme = _URL_SCHEME.match(text)
    if scheme is not None and (text.startswith("//", scheme.end()) or _is_postgres(text)):
        return _url_problem(text, scheme.end())
    if "=" in text:
        return _key_value_problem(text)
    return "it is neither a postgresql:// URL nor libpq key=value pairs" + _embedded_url(text)


def _wrapped_problem(text: str) -> str | None:
    """A DSN inside something else: after a byte order mark, or in a ``KEY=URL`` line."""
    if text.startswith(_BOMS):
        return (
            "it starts with a UTF-8 byte order mark (U+FEFF), which is not part of a DSN: "
            "save the source as UTF-8 without a byte order mark"
        )
    assignment = _ASSIGNMENT.match(text)
    if assignment is None:
        return None
    if assignment.group("sign") == "=":
        return (
            "it looks like KEY=URL (a shell or dotenv line such as "
            "DATABASE_URL=postgresql://...): the source must hold the URL alone, without "
            "a name, '=' or quotes"
        )
    return (
        "it looks like KEY: URL (a YAML or config line such as url: postgresql://...): "
        "the source must hold the URL alone"
    )


def _is_postgres(text: str) -> bool:
    return text.split(":", 1)[0].lower() in _SCHEMES


def _embedded_url(text: str) -> str:
    found = _EMBEDDED_URL.search(text)
    if found is None:
        return ""
    return (
        f"; a postgresql:// URL starts at character {found.start() + 1}, after other text: "
        "the source must hold the DSN alone"
    )


def _keyword(key: str) -> str:
    """*key* quoted if it is a libpq keyword, else a neutral word: it may be a secret."""
    return repr(key) if key in _LIBPQ_KEYWORDS else "the word"


# --------------------------------------------------------------------------- URL form


def _url_problem(text: str, after_scheme: int) -> str | None:
    if not _is_postgres(text):
        return "the URL's scheme must be postgresql:// or postgres://"
    if not text.startswith("//", after_scheme):
        return "a URL DSN starts with postgresql:// (two slashes after the colon)"
    start = after_scheme + 2
    ends = [i for i in (text.find("/", start), text.find("?", start)) if i != -1]
    end = min(ends, default=len(text))
    query_at = text.find("?", end)
    return (
        _url_character_problem(text)
        or _authority_problem(text, start, end)
        or (_query_problem(text, query_at + 1) if query_at != -1 else None)
        or _unreadable_url(text)
    )


def _url_character_problem(text: str) -> str | None:
    """A character a URL DSN never holds raw, or a '%' that starts no escape."""
    bad = _URL_FORBIDDEN.search(text)
    if bad is not None:
        at = bad.start() + 1
        if bad.group() == "#":
            return (
                f"a '#' at character {at}: a DSN has no fragment, and asyncpg would ignore "
                "what follows; in a password or name, write it as %23"
            )
        return (
            f"a line break, tab or other control character at character {at}: a URL DSN is "
            "one line; percent-encode it if it belongs to a value"
        )
    escape = _BAD_ESCAPE.search(text)
    if escape is not None:
        return (
            f"the '%' at character {escape.start() + 1} is not followed by two hex digits: "
            "a '%' in a password or name is written %25"
        )
    return None


def _unreadable_url(text: str) -> str | None:
    """What asyncpg does with the URL; the checks before this should leave it nothing."""
    try:
        parts = urlsplit(text)
        if parts.query:
            parse_qs(parts.query, strict_parsing=True)
    except ValueError:
        return "the URL cannot be read (its user name, password or host part is malformed)"
    return None


def _authority_problem(text: str, start: int, end: int) -> str | None:
    """Problems in ``user:password@host:port,...`` (``text[start:end]``)."""
    ats = [i for i in range(start, end) if text[i] == "@"]
    if len(ats) > 1:
        return (
            f"'@' appears more than once before the host (characters {ats[0] + 1} and "
            f"{ats[1] + 1}): an '@' in a user name or password must be percent-encoded as %40"
        )
    for i in range(start, end):
        if not text[i].isascii() and any(
            c in unicodedata.normalize("NFKC", text[i]) for c in "/?#@:[]"
        ):
            return (
                f"character {i + 1} becomes a URL delimiter under Unicode "
                "normalization (NFKC), so the URL cannot be read: percent-encode it"
            )
    host_start = start
    if ats:
        host_start = ats[0] + 1
        for i in range(start, ats[0]):
            if text[i] in "[]":
                return (
                    f"a '[' or ']' in the user name or password at character {i + 1}: "
                    "percent-encode it (%5B, %5D)"
                )
    port_problem = _hosts_problem(text, host_start, end, unquoted=False)
    query = text.find("?", end)
    path_at = text.find("@", end, len(text) if query == -1 else query)
    later_at = path_at if ats else text.find("@", end)
    if later_at != -1 and (
        port_problem is not None or later_at == path_at or _misplaced_at(text, end, later_at)
    ):
        return (
            f"an '@' at character {later_at + 1} comes after the host part, which ends "
            f"at the {text[end]!r} at character {end + 1}: a '/', '?' or '#' in a "
            "password must be percent-encoded (%2F, %3F, %23)"
        )
    return port_problem


def _misplaced_at(text: str, end: int, at: int) -> bool:
    """Whether the '@' at *at*, in the query after a host part ending at *end* that has none,
    likely ends a password cut short by an unencoded '?': it is in a parameter's name, or the
    host part ends with the password's ':'. (In a value, ``?user=me@corp``, it is fine.)"""
    if text[end - 1] == ":":
        return True
    query = text.find("?", end)
    field = max(query, text.rfind("&", query, at))
    return "=" not in text[field:at]


def _hosts_problem(text: str, start: int, end: int, *, unquoted: bool) -> str | None:
    """Problems in a comma-separated list of ``host[:port]`` (``text[start:end]``)."""
    if start >= end:
        return None  # no host: the default, or the query's host
    pos = start
    for item in text[start:end].split(","):
        problem = _host_problem(item, pos, unquoted=unquoted)
        if problem is not None:
            return problem
        pos += len(item) + 1
    return None


def _host_problem(item: str, pos: int, *, unquoted: bool) -> str | None:
    at = pos + 1
    if not item:
        return f"an empty host in the host list at character {at}"
    if item.startswith("/"):
        return None  # a unix socket directory
    if item.startswith("["):
        problem = _ipv6_host_problem(item, at)
        port = item[item.find("]") + 2 :]  # after "]:"
    else:
        host, _, port = item.partition(":")
        problem = _named_host_problem(host, port, at)
    return problem or _port_problem(
        port if unquoted else unquote(port), f"the port of the host at character {at}"
    )


def _ipv6_host_problem(item: str, at: int) -> str | None:
    """Problems in ``[address]`` or ``[address]:port``."""
    close = item.find("]")
    if close == -1:
        return f"the IPv6 address at character {at} has no closing ']'"
    rest = item[close + 1 :]
    if rest and not rest.startswith(":"):
        return f"unexpected text after the ']' of the IPv6 address at character {at}"
    return None


def _named_host_problem(host: str, port: str, at: int) -> str | None:
    """Problems in ``host[:port]`` without brackets, split at its first ':'."""
    if ":" in port:
        return (
            f"more than one ':' in the host at character {at}: an IPv6 address goes in "
            "brackets, like [::1]:5432"
        )
    if "[" in host or "]" in host:
        return f"a '[' or ']' in the host at character {at}: only an IPv6 address has them"
    return None


def _port_problem(port: str, subject: str) -> str | None:
    """Whether *port* is one asyncpg reads; *subject* names it in the message."""
    if not port:
        return None
    if not (port.isascii() and port.isdigit()):
        return f"{subject} is not a number"
    if not 1 <= int(port) <= _MAX_PORT:
        return f"{subject} is out of range (1-{_MAX_PORT})"
    return None


def _ports_problem(ports: str, subject: str) -> str | None:
    """The first problem of a comma-separated list of ports."""
    for port in ports.split(","):
        problem = _port_problem(port, subject)
        if problem is not None:
            return problem
    return None


def _query_problem(text: str, start: int) -> str | None:
    """Problems in the query ``text[start:]``, read as asyncpg reads it (strictly)."""
    if start >= len(text):
        return None
    pos = start
    for field in text[start:].split("&"):
        at = pos + 1
        pos += len(field) + 1
        if not field:
            return f"an empty query parameter at character {at} ('&&', or '&' at an end)"
        name, eq, value = field.partition("=")
        if not eq:
            return f"the query parameter at character {at} has no '=' (name=value)"
        name = unquote_plus(name)
        if name == "port":
            problem = _ports_problem(
                unquote_plus(value), f"the query parameter 'port' at character {at}"
            )
            if problem is not None:
                return problem
        elif name == "host":
            decoded = unquote_plus(value)
            problem = _hosts_problem(decoded, 0, len(decoded), unquoted=True)
            if problem is not None:
                return f"in the query parameter 'host' at character {at}: {problem}"
    return None


# --------------------------------------------------------------------------- key=value form


def _key_value_problem(text: str) -> str | None:
    try:
        pairs = _key_value_pairs(text)
    except InvalidDSNError as exc:
        return str(exc).removeprefix("invalid DSN: ") + _embedded_url(text)
    for key, value, at in pairs:
        problem = _pair_problem(text, key, value, at)
        if problem is not None:
            return problem
    try:
        key_value_to_url(text)
    except InvalidDSNError as exc:
        return str(exc).removeprefix("invalid DSN: ")
    return None


def _pair_problem(text: str, key: str, value: str, at: int) -> str | None:
    """Problems in the pair ``key=value`` whose key is at *at* in *text*."""
    if not _KEYWORD.fullmatch(key):
        return (
            f"the keyword at character {at + 1} is not a word (letters, digits, '_')"
            + _embedded_url(text)
        )
    if key == "port":
        return _ports_problem(value, f"'port' at character {at + 1}")
    if key in ("host", "hostaddr") and not value.startswith("/"):
        for host in value.split(","):
            if not host:
                return f"an empty host in {key!r} at character {at + 1}"
            if any(c in host for c in "/?#@[]"):
                return (
                    f"{key!r} at character {at + 1} holds a character a host name cannot "
                    "have ('/', '?', '#', '@', '[' or ']')"
                )
    return None


def is_key_value(dsn: str) -> bool:
    """Whether *dsn* is a libpq ``key=value`` string rather than a URL."""
    text = dsn.lstrip()
    return "=" in text and not text.lower().startswith(("postgres://", "postgresql://"))


def parse_key_value(dsn: str) -> dict[str, str]:
    """Parse a libpq ``key=value`` DSN (values may be single-quoted, with ``\\`` escapes).

    Raises :class:`~aiohotload.InvalidDSNError` naming the position (and a libpq keyword),
    never a value or an unknown word, which may be a piece of a password.
    """
    return {key: value for key, value, _ in _key_value_pairs(dsn)}


def _key_value_pairs(dsn: str) -> list[tuple[str, str, int]]:
    """``(key, value, position of the key)`` for each pair of a key=value DSN, in order."""
    pairs: list[tuple[str, str, int]] = []
    i = _skip_blanks(dsn, 0)
    while i < len(dsn):
        start = i
        key, i = _keyword_at(dsn, start)
        if i < len(dsn) and dsn[i] == "'":
            value, i = _quoted_value_at(dsn, i, key)
        else:
            value, i = _plain_value_at(dsn, i)
        pairs.append((key, value, start))
        i = _skip_blanks(dsn, i)
    return pairs


def _skip_blanks(dsn: str, i: int) -> int:
    while i < len(dsn) and dsn[i] in _BLANKS:
        i += 1
    return i


def _keyword_at(dsn: str, start: int) -> tuple[str, int]:
    """The keyword at *start*, and where its value starts (after '=' and blanks)."""
    i = start
    while i < len(dsn) and dsn[i] not in _BLANKS and dsn[i] != "=":
        i += 1
    key = dsn[start:i]
    i = _skip_blanks(dsn, i)
    if not key:
        raise InvalidDSNError(f"invalid DSN: '=' at character {i + 1} has no keyword before it")
    if i >= len(dsn) or dsn[i] != "=":
        raise InvalidDSNError(
            f"invalid DSN: expected '=' after {_keyword(key)} at character {start + 1} "
            "(key=value form; a value with spaces must be single-quoted)"
        )
    return key, _skip_blanks(dsn, i + 1)


def _quoted_value_at(dsn: str, quote_at: int, key: str) -> tuple[str, int]:
    """The value in the quotes opening at *quote_at*, and the index after them."""
    value: list[str] = []
    i = quote_at + 1
    while i < len(dsn):
        if dsn[i] == "'":
            return "".join(value), i + 1
        char, i = _char_at(dsn, i)
        value.append(char)
    raise InvalidDSNError(
        f"invalid DSN: the quote at character {quote_at + 1} opening the value "
        f"of {_keyword(key)} is never closed"
    )


def _plain_value_at(dsn: str, i: int) -> tuple[str, int]:
    """The unquoted value at *i* (up to a blank), and the index after it."""
    value: list[str] = []
    while i < len(dsn) and dsn[i] not in _BLANKS:
        char, i = _char_at(dsn, i)
        value.append(char)
    return "".join(value), i


def _char_at(dsn: str, i: int) -> tuple[str, int]:
    """The character at *i*, or the one a backslash there escapes; and the index after."""
    if dsn[i] == "\\" and i + 1 < len(dsn):
        return dsn[i + 1], i + 2
    return dsn[i], i + 1


def _connect_host(params: dict[str, str]) -> str:
    """Where to connect: libpq connects to ``hostaddr`` when given (an address, no name
    lookup), using ``host`` only to check the server's certificate and find passfile lines.
    asyncpg has no such split: it connects to, and checks the certificate of, one host. So
    ``hostaddr`` wins, and with ``sslmode=verify-full`` (which would then check the address
    against the certificate) both together are refused with what to do."""
    hostaddr = params.get("hostaddr")
    if not hostaddr:
        return params.get("host") or ""
    if params.get("host") and params.get("sslmode") == "verify-full":
        raise InvalidDSNError(
            "invalid DSN: 'hostaddr' with 'host' and sslmode=verify-full is not supported "
            "(asyncpg checks the certificate against the address it connects to): give "
            "'host' alone"
        )
    return hostaddr


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
    host = _connect_host(params)
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
            raise InvalidDSNError(
                "invalid DSN: 'port' lists a different number of hosts than 'host'"
            )
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
    """*dsn* as asyncpg reads it (URLs only): a libpq key=value DSN becomes a URL.

    Checked first with :func:`check_dsn`: this is the step every DSN takes before asyncpg
    sees it, so nothing asyncpg would misread (and quote back in an error) reaches it.
    """
    check_dsn(dsn)
    return key_value_to_url(dsn) if is_key_value(dsn) else _dbname_in_path(dsn)


def _dbname_in_path(url: str) -> str:
    """*url* with a ``dbname`` query parameter moved into its path, where asyncpg reads it.

    libpq lets ``?dbname=`` name the database (``postgresql:///?host=db&dbname=app``, and over
    a path); asyncpg takes the path even when it is empty, so such a URL would silently reach
    the database named after the user. The other parameters are kept as written.
    """
    head, mark, query = url.partition("?")
    if not mark:
        return url
    params = query.split("&")
    names = [unquote_plus(param.partition("=")[0]) for param in params]
    if "dbname" not in names:
        return url
    last = len(names) - 1 - names[::-1].index("dbname")  # libpq: the last one counts
    database = unquote_plus(params[last].partition("=")[2])
    rest = "&".join(p for p, name in zip(params, names, strict=True) if name != "dbname")
    scheme, sep, after = head.partition("://")
    netloc = after.split("/", 1)[0]
    url = f"{scheme}{sep}{netloc}/{quote(database, safe='')}"
    return f"{url}?{rest}" if rest else url


def wants_primary(dsn: str) -> bool:
    """Whether *dsn* asks for a server that takes writes: ``target_session_attrs`` of
    ``read-write`` or ``primary`` (libpq's names, which asyncpg honours)."""
    try:
        query = urlsplit(as_url(dsn)).query
    except ValueError:
        return False
    return any(
        value in ("read-write", "primary")
        for value in parse_qs(query).get("target_session_attrs", [])
    )


def writable_only(dsn: str, connect_kwargs: dict[str, Any]) -> None:
    """Make the connections made with *dsn* and *connect_kwargs* reach only a server that
    takes writes (``follow_primary``): asyncpg's ``target_session_attrs="read-write"``,
    unless the DSN or the arguments choose ``target_session_attrs`` themselves."""
    if "target_session_attrs" in connect_kwargs or "target_session_attrs" in dsn:
        return
    connect_kwargs["target_session_attrs"] = "read-write"
