"""Redaction of DSNs, so that no password reaches a log, an error or a repr."""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["REDACTED", "redact_dsn", "redact_text", "secrets_of"]

REDACTED = "********"

# key=value DSN: the value is a bare word or a single-quoted string with \' and \\ escapes.
_KV_PASSWORD = re.compile(
    r"""(?P<key>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|\S*)""",
    re.IGNORECASE,
)
# The URL query may carry a password too (?password=...).
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&]password=)(?P<value>[^&#]*)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """Return *dsn* with its password replaced by ``********``.

    Handles URL DSNs (``postgresql://user:pw@host/db``, including a password in the query)
    and libpq key=value DSNs (``host=h password='p w'``). Anything else comes back with
    every plausible password removed; the result is meant for humans, never for connecting.
    """
    text = dsn.strip()
    if "://" in text.split("?", 1)[0] or text.lower().startswith(("postgres:", "postgresql:")):
        return _redact_url(text)
    return _KV_PASSWORD.sub(lambda m: m.group("key") + REDACTED, text)


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, _, rest = url.partition(":")
        sep = ":"
    # The authority ends at the first '/', '?' or '#' after the *last* '@', because an
    # unescaped password may itself contain '/', '?', '#' or '@'.
    at = rest.rfind("@")
    if at != -1:
        userinfo, hostpart = rest[:at], rest[at:]
        user, colon, _password = userinfo.partition(":")
        rest = user + (":" + REDACTED if colon else "") + hostpart
    rest = _QUERY_PASSWORD.sub(lambda m: m.group("key") + REDACTED, rest)
    return scheme + sep + rest


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Remove each of *secrets* (and any DSN password pattern) from free text such as an
    error message from a driver."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _KV_PASSWORD.sub(lambda m: m.group("key") + REDACTED, text)
    return _QUERY_PASSWORD.sub(lambda m: m.group("key") + REDACTED, text)


def secrets_of(dsn: str) -> tuple[str, ...]:
    """The password in *dsn* in every form a driver might echo it (raw and percent-decoded),
    for scrubbing driver error messages with :func:`redact_text`."""
    text = dsn.strip()
    found: str | None = None
    if "://" in text.split("?", 1)[0]:
        rest = text.partition("://")[2]
        at = rest.rfind("@")
        if at != -1 and ":" in rest[:at]:
            found = rest[:at].partition(":")[2]
        else:
            m = _QUERY_PASSWORD.search(text)
            found = m.group("value") if m else None
    else:
        m = _KV_PASSWORD.search(text)
        if m:
            found = m.group("value")
            if found.startswith("'"):
                found = found[1:-1] if found.endswith("'") and len(found) > 1 else found[1:]
                found = re.sub(r"\\(.)", r"\1", found)
    if not found:
        return ()
    forms = {found, unquote(found)}
    # Longest first, so a secret that contains another is replaced whole.
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))
