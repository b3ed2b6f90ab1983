"""Redaction of DSNs, so that no password reaches a log, an error or a repr.

Redaction errs on the side of hiding too much: when a DSN is ambiguous (an unescaped ``@``,
``?`` or ``&`` that may belong to the password), the whole ambiguous stretch is hidden.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from urllib.parse import unquote, unquote_plus

__all__ = ["REDACTED", "redact_dsn", "redact_text", "secrets_of"]

REDACTED = "********"

# Parameter names that carry a secret: the login password and the client key's passphrase.
_PASSWORD_NAMES = frozenset({"password", "sslpassword"})

# A URL DSN starts with a scheme; a key=value DSN starts with a keyword followed by '='.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_KEY_VALUE = re.compile(r"[A-Za-z_]+[ \t\n\r\f\v]*=")
# key=value DSN (libpq rules): a value is a single-quoted string with backslash escapes, or a
# bare word that ends at ASCII whitespace, in which a backslash escapes the next character.
# '?password=' and '&password=' are left to _QUERY_PARAM, whose values end at '&'.
_KV_PASSWORD = re.compile(
    r"""(?P<key>(?<![?&])\b(?:ssl)?password[ \t\n\r\f\v]*=[ \t\n\r\f\v]*)"""
    r"""(?P<value>'(?:[^'\\]|\\.)*(?:'|\\)?|(?:\\.|[^ \t\n\r\f\v\\])*\\?)""",
    re.IGNORECASE | re.DOTALL,
)
# One query parameter. Tried at every '?' and '&' (not just non-overlapping matches), so a
# password value that itself holds '?password=' cannot hide a later parameter. The value runs
# to the next '&' only: a raw '#' or '?' in it is more likely part of a password than not.
_QUERY_PARAM = re.compile(r"[?&](?P<name>[^&=#?]*)=(?P<value>[^&]*)")
# A URL's userinfo password inside free text: up to the last '@' before whitespace (an
# unescaped password may hold '@' itself).
_TEXT_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:(?P<value>\S*)@")

_Span = tuple[int, int]
_DecodeFn = Callable[[str], str]


def redact_dsn(dsn: str) -> str:
    """Return *dsn* with every password replaced by ``********``.

    Handles URL DSNs (``postgresql://user:pw@host/db``, including ``?password=`` and
    ``?sslpassword=`` in the query) and libpq key=value DSNs (``host=h password='p w'``).
    User, hosts, ports and database stay readable. Text that is neither form (a garbled file,
    a bare password) is hidden whole. The result is meant for humans, never for connecting.
    """
    text = dsn.strip()
    if _SCHEME.match(text):
        return _replace(text, _merge(span for span, _ in _url_passwords(text)))
    if _KEY_VALUE.match(text):
        return _KV_PASSWORD.sub(lambda m: m.group("key") + REDACTED, text)
    return REDACTED if text else text


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Remove each of *secrets* (and any DSN password pattern) from free text such as an
    error message from a driver."""
    # Longest first, so a secret that contains another is replaced whole.
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _KV_PASSWORD.sub(lambda m: m.group("key") + REDACTED, text)
    spans = [span for span, _ in _query_passwords(text, 0)]
    spans += [m.span("value") for m in _TEXT_URL_PASSWORD.finditer(text)]
    return _replace(text, _merge(spans))


def secrets_of(dsn: str) -> tuple[str, ...]:
    """Every password in *dsn* in every form a driver might echo it (as written,
    percent-decoded, unescaped), for scrubbing driver error messages with :func:`redact_text`.
    """
    text = dsn.strip()
    forms: set[str] = set()
    if _SCHEME.match(text):
        for (start, end), decoders in _url_passwords(text):
            raw = text[start:end]
            forms.add(raw)
            forms.update(decode(raw) for decode in decoders)
    elif _KEY_VALUE.match(text):
        for m in _KV_PASSWORD.finditer(text):
            raw = m.group("value")
            forms.add(raw)
            forms.add(_kv_unescape(raw))
    else:  # not a DSN: all of it may be secret, as redact_dsn hides it whole
        forms.add(text)
    forms.discard("")
    # Longest first, so a secret that contains another is replaced whole.
    return tuple(sorted(forms, key=lambda s: (-len(s), s)))


def _url_passwords(url: str) -> list[tuple[_Span, tuple[_DecodeFn, ...]]]:
    """Spans of *url* that may hold a password, each with how a driver decodes it."""
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme else 0
    if url.startswith("//", start):
        start += 2
    found: list[tuple[_Span, tuple[_DecodeFn, ...]]] = []
    # The userinfo ends at the *last* '@': an unescaped password may itself hold '@', '/',
    # '?' or '#'. When the '@' is really in the query, this hides more than needed.
    at = url.rfind("@", start)
    if at != -1:
        colon = url.find(":", start, at)
        if colon != -1:
            found.append(((colon + 1, at), (unquote,)))
    found.extend(_query_passwords(url, start))
    return found


def _query_passwords(text: str, start: int) -> list[tuple[_Span, tuple[_DecodeFn, ...]]]:
    found: list[tuple[_Span, tuple[_DecodeFn, ...]]] = []
    for i in range(start, len(text)):
        if text[i] not in "?&":
            continue
        m = _QUERY_PARAM.match(text, i)
        if m and unquote_plus(m.group("name")).strip().lower() in _PASSWORD_NAMES:
            found.append((m.span("value"), (unquote, unquote_plus)))
    return found


def _merge(spans: Iterable[_Span]) -> list[_Span]:
    """Sort *spans* and join those that overlap or touch."""
    merged: list[_Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _replace(text: str, spans: list[_Span]) -> str:
    """Replace each of the sorted, disjoint *spans* of *text* by :data:`REDACTED`."""
    parts: list[str] = []
    pos = 0
    for start, end in spans:
        parts += (text[pos:start], REDACTED)
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def _kv_unescape(value: str) -> str:
    """The value libpq reads from a key=value token (quotes stripped, escapes resolved)."""
    quoted = value.startswith("'")
    chars = iter(value[1:] if quoted else value)
    out: list[str] = []
    for c in chars:
        if c == "\\":
            out.append(next(chars, ""))
        elif c == "'" and quoted:
            break
        else:
            out.append(c)
    return "".join(out)
