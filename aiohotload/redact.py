"""Redaction of DSNs, so that no password reaches a log, an error or a repr.

Redaction errs on the side of hiding too much: when a DSN is ambiguous (an unescaped ``@``,
``?`` or ``&`` that may belong to the password), the whole ambiguous stretch is hidden.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from .dsn import check_dsn
from .errors import InvalidDSNError

__all__ = [
    "REDACTED",
    "describe_error",
    "error_text",
    "redact_dsn",
    "redact_text",
    "redacted_error",
    "secrets_of",
    "shows_secret",
]

REDACTED = "********"

# Parameter names that carry a secret: the login password and the client key's passphrase.
_PASSWORD_NAMES = frozenset({"password", "sslpassword"})

# A URL DSN starts with a scheme; a key=value DSN starts with a keyword followed by '='.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_KEY_VALUE = re.compile(r"[A-Za-z_]+[ \t\n\r\f\v]*=")
# key=value DSN (libpq rules): a value is a single-quoted string with backslash escapes, or a
# bare word that ends at ASCII whitespace, in which a backslash escapes the next character.
# '?password=' and '&password=' are left to the query scan, whose values end at '&'.
_KV_PASSWORD = re.compile(
    r"""(?P<key>(?<![?&])\b(?:ssl)?password[ \t\n\r\f\v]*=[ \t\n\r\f\v]*)"""
    r"""(?P<value>'(?:[^'\\]|\\.)*(?:'|\\)?|(?:\\.|[^ \t\n\r\f\v\\])*\\?)""",
    re.IGNORECASE | re.DOTALL,
)
# A query parameter whose name may decode to a password's (it holds "pass" or an escape):
# '?' or '&', a name without '&=#?', '='. A match never holds another '?' or '&', so every one
# is tried: a password value that itself holds '?password=' cannot hide a later parameter.
# The value runs to the next '&' only: a raw '#' or '?' in it is more likely part of a
# password than not. (The lookahead scans one name at most: linear.)
_QUERY_PARAM = re.compile(r"[?&](?=[^&=#?]*?(?:pass|%))(?P<name>[^&=#?]*)=", re.IGNORECASE)
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
# In free text, a name that says it holds a secret, then its value: shell and dotenv
# assignments (PGPASSWORD=x, export DB_PASSWORD='x'), JSON and YAML (\"password\": \"x\",
# password: x), HTTP-like headers (X-Vault-Token: x) and command-line flags (--password x).
# A name is a run of letters, digits and '_.-' holding a secret word. The words are found
# first (in C); a name is then looked at once, however many words it holds: linear.
_SECRET_WORD = re.compile(  # the lookahead lets the engine skip most positions at C speed
    r"(?=[PpSsTtAaCc])(?:pass|pwd|secret|token|api[_.\-]?key|credential|private[_.\-]?key|auth)",
    re.IGNORECASE,
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_NAME_REST = re.compile(r"[A-Za-z0-9_.\-]*")
_AFTER_NAME = re.compile(r"""["']?[ \t]*(?P<sign>[=:])[ \t]*""")
_AFTER_FLAG = re.compile(r"=|[ \t]+")
_QUERY_VALUE = re.compile(r"[^\s&]*")
_REST_OF_LINE = re.compile(r"[^\n\r]*")
_SPACE = re.compile(r"\s")
# Names that hold no secret although they contain a secret word: exception classes
# ("InvalidPasswordError: password authentication failed ...").
_NOT_A_SECRET_NAME = re.compile(r"(?:error|exception|warning)$")
# Fragments of a password at least this long are removed from error messages.
_FRAGMENT = 4
# Up to this many pieces, each is searched for on its own (in C); beyond, one pass in Python.
_FIND_EACH = 64

_Span = tuple[int, int]
_E = TypeVar("_E", bound=BaseException)
_DecodeFn = Callable[[str], str]


def redact_dsn(dsn: str) -> str:
    """Return *dsn* with every password replaced by ``********``.

    Handles URL DSNs (``postgresql://user:pw@host/db``, including ``?password=`` and
    ``?sslpassword=`` in the query) and libpq key=value DSNs (``host=h password='p w'``).
    User, hosts, ports and database stay readable. A PostgreSQL DSN that does not read
    cleanly (see :func:`aiohotload.dsn.check_dsn`: where its password ends is then a guess)
    and text that is neither form (a garbled file, a bare password) are hidden whole. The
    result is meant for humans, never for connecting. Linear in the length of *dsn*.
    """
    text = dsn.strip()
    if not text:
        return text
    scheme = _SCHEME.match(text)
    if scheme is not None:
        if text[: scheme.end() - 1].lower() in ("postgresql", "postgres") and not _reads(text):
            return REDACTED
        return _replace(text, _merge(span for span, _ in _url_passwords(text)), REDACTED)
    if _KEY_VALUE.match(text) and _reads(text):
        return _replace(
            text, _merge(m.span("value") for m in _KV_PASSWORD.finditer(text)), REDACTED
        )
    return REDACTED


def redact_text(text: str, secrets: Sequence[str] = (), *, pieces: bool = False) -> str:
    """Remove each of *secrets*, and anything shaped like a password (a DSN's password, a
    ``PASSWORD=x``, ``"password": "x"``, ``token: x`` or ``--password x``), from free text
    such as an error message or a program's output. Linear in the length of *text*.

    With *pieces*, every piece of a secret at least 4 characters long goes too: for text
    that may quote a password in part (a parser's error, a shell trace).
    """
    spans = _text_spans(text, secrets)
    if pieces:
        spans += _fragment_spans(text, [s for s in secrets if len(s) >= _FRAGMENT])
    return _replace(text, _merge(spans), _marker(secrets))


def describe_error(exc: BaseException, dsn: str) -> str:
    """``Type: message`` of *exc*, raised while connecting with *dsn*, safe to show: every
    piece of *dsn*'s password at least 4 characters long is removed, in every form a driver
    might print it (as written, decoded, escaped), along with whole passwords and anything
    :func:`redact_text` finds.

    A DSN that does not read cleanly (:func:`aiohotload.dsn.check_dsn`) may hold its password
    anywhere, so then every piece of the whole DSN is removed. An
    :class:`~aiohotload.InvalidDSNError` holds no DSN text and is returned as it is.
    """
    if isinstance(exc, InvalidDSNError):
        return str(exc)
    return redact_text(error_text(exc), _secret_forms(dsn), pieces=True)


def error_text(exc: BaseException) -> str:
    """``Type: message`` of *exc* (``Type`` when it has no message), unredacted."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def shows_secret(exc: BaseException, dsn: str) -> bool:
    """Whether the text of *exc* shows anything :func:`describe_error` would hide."""
    return describe_error(exc, dsn) != error_text(exc)


def redacted_error(exc: _E, dsn: str) -> _E | None:
    """A copy of *exc*, of its class (``except`` clauses match it as they match *exc*), whose
    arguments and text attributes (asyncpg's ``detail``, ``hint``...) are redacted as
    :func:`describe_error` redacts them; its cause, context and traceback are not kept.
    ``None`` if *exc* cannot be copied."""
    forms = _secret_forms(dsn)

    def scrub(value: object) -> object:
        return redact_text(value, forms, pieces=True) if isinstance(value, str) else value

    try:
        clone = copy.copy(exc)
        clone.args = tuple(scrub(arg) for arg in exc.args)
        for name, value in list(vars(clone).items()):
            setattr(clone, name, scrub(value))
    except Exception:  # an exception class that cannot be copied or set
        return None
    return clone


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
    """Spans of ``password``/``sslpassword`` query values in ``text[start:]``."""
    found: list[tuple[_Span, tuple[_DecodeFn, ...]]] = []
    amp = -1  # the next '&' at or after the current position; found once per stretch
    for param in _QUERY_PARAM.finditer(text, start):
        if unquote_plus(param.group("name")).strip().lower() not in _PASSWORD_NAMES:
            continue
        value_start = param.end()
        if amp < value_start:
            amp = text.find("&", value_start)
            if amp == -1:
                amp = len(text)
        found.append(((value_start, amp), (unquote, unquote_plus)))
    return found


def _text_spans(text: str, secrets: Iterable[str]) -> list[_Span]:
    """Spans of free *text* to hide: each of *secrets*, DSN passwords and secret values."""
    spans: list[_Span] = []
    # Longest first is not needed: overlapping spans are merged.
    for secret in {s for s in secrets if s}:
        i = text.find(secret)
        while i != -1:
            spans.append((i, i + len(secret)))
            i = text.find(secret, i + 1)
    spans += [m.span("value") for m in _KV_PASSWORD.finditer(text)]
    spans += [span for span, _ in _query_passwords(text, 0)]
    spans += _text_url_passwords(text)
    spans += _secret_values(text)
    return spans


def _text_url_passwords(text: str) -> list[_Span]:
    """The password of each ``scheme://user:password@`` in free text: from the user's ':' to
    the last '@' of the word (an unescaped password may itself hold '@')."""
    spans: list[_Span] = []
    word_end = -1
    last_at = -1
    i = text.find("://")
    while i != -1:
        j = i - 1  # a scheme is letters, digits, '+.-', and starts with a letter
        has_letter = False
        while j >= 0 and text[j] in _SCHEME_CHARS:
            has_letter = has_letter or text[j].isalpha()
            j -= 1
        if has_letter:
            colon = i + 3
            while colon < len(text) and not text[colon].isspace() and text[colon] not in ":/@":
                colon += 1
            if colon < len(text) and text[colon] == ":":
                if word_end < colon:  # the end of the word and its last '@', once per word
                    word_end = _word_end(text, colon)
                    last_at = text.rfind("@", colon, word_end)
                if last_at > colon:
                    spans.append((colon + 1, last_at))
        i = text.find("://", i + 3)
    return spans


def _word_end(text: str, start: int) -> int:
    match = _SPACE.search(text, start)
    return len(text) if match is None else match.start()


def _secret_values(text: str) -> list[_Span]:
    """Values of names that say they hold a secret (see ``_SECRET_WORD``)."""
    spans: list[_Span] = []
    done = 0  # the end of the last name looked at, or of the last value hidden
    for hit in _SECRET_WORD.finditer(text):
        if hit.start() < done:
            continue  # in a name already looked at, or in a hidden value
        start = hit.start()  # the name around the word: back to its start (once per name)
        while start > 0 and text[start - 1] in _NAME_CHARS:
            start -= 1
        end = _NAME_REST.match(text, hit.end()).end()  # type: ignore[union-attr]
        done = end
        word = text[start:end].lower()
        if _NOT_A_SECRET_NAME.search(word):
            continue
        sign = _AFTER_NAME.match(text, end)
        colon = sign is not None and sign.group("sign") == ":"
        if sign is None and word.startswith("-"):
            sign = _AFTER_FLAG.match(text, end)
        if sign is None:
            continue
        value = _value_end(text, sign.end(), (start, end), colon=colon)
        if value > sign.end():
            spans.append((sign.end(), value))
            done = value
    return spans


def _value_end(text: str, pos: int, name: tuple[int, int], *, colon: bool) -> int:
    """Where the value starting at *pos* after the secret *name* (its span) ends."""
    start, end = name
    opener = text[start - 1] if start > 0 else ""
    if opener and opener in "?&":  # a URL query parameter: its value ends at the next one
        match = _QUERY_VALUE.match(text, pos)
    elif colon and text[pos : pos + 1] not in ("'", '"'):  # YAML, a header: the line
        match = _REST_OF_LINE.match(text, pos)
    else:  # a word as a shell reads it; in 'PGPASSWORD=a b' the quote is still open
        still_open = opener in ("'", '"') and text[end : end + 1] != opener
        return _shell_word_end(text, pos, opener if still_open else "")
    assert match is not None
    return match.end()


def _shell_word_end(text: str, pos: int, quote: str) -> int:
    """The end of the shell word starting at *pos* inside *quote* (or none): quoted parts
    ('...', "...") and backslash escapes join it; it ends at a blank outside quotes."""
    i, n = pos, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"':
                i += 1
        elif c.isspace():
            return i
        elif c in ("'", '"'):
            quote = c
        elif c == "\\":
            i += 1
        i += 1
    return n


def _secret_forms(dsn: str) -> tuple[str, ...]:
    """The strings whose pieces :func:`describe_error` removes: *dsn*'s passwords in every
    form, or all of *dsn* when it does not read cleanly."""
    text = dsn.strip()
    raw = secrets_of(text) if _reads(text) else (text,)
    forms: set[str] = set()
    for secret in raw:
        for form in (secret, unquote(secret), unquote_plus(secret)):
            forms.update((form, quote(form, safe=""), quote_plus(form, safe="")))
            # As a repr() in an exception message shows it: str, ASCII-escaped, or bytes.
            forms.update((repr(form)[1:-1], ascii(form)[1:-1], repr(form.encode())[2:-1]))
    forms.discard("")
    return tuple(sorted(forms, key=lambda s: (-len(s), s)))


def _fragment_spans(text: str, secrets: Sequence[str]) -> list[_Span]:
    """Every window of *text* of ``_FRAGMENT`` characters that is also a piece of one of
    *secrets*: together they cover every longer piece too."""
    pieces = {s[i : i + _FRAGMENT] for s in secrets for i in range(len(s) - _FRAGMENT + 1)}
    if len(pieces) > _FIND_EACH:  # one pass over the text, whatever the number of pieces
        return [
            (i, i + _FRAGMENT)
            for i in range(len(text) - _FRAGMENT + 1)
            if text[i : i + _FRAGMENT] in pieces
        ]
    spans: list[_Span] = []
    for piece in pieces:  # a search per piece: faster while there are few
        i = text.find(piece)
        while i != -1:
            spans.append((i, i + _FRAGMENT))
            i = text.find(piece, i + 1)
    return spans


def _marker(secrets: Iterable[str]) -> str:
    """:data:`REDACTED`, or a run of another character if a secret holds '*': a marker must
    share no character with what it hides, or next to what is left it could rebuild a piece
    of it."""
    used = set().union(*(set(s) for s in secrets))
    for c in "*#~_X=":
        if c not in used:
            return c * len(REDACTED)
    return next(chr(c) for c in range(0x2580, 0x25FF) if chr(c) not in used) * len(REDACTED)


def _reads(text: str) -> bool:
    """Whether *text* reads cleanly as a PostgreSQL DSN (see :func:`check_dsn`)."""
    try:
        check_dsn(text)
    except InvalidDSNError:
        return False
    return True


def _merge(spans: Iterable[_Span]) -> list[_Span]:
    """Sort *spans* and join those that overlap or touch."""
    merged: list[_Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _replace(text: str, spans: list[_Span], marker: str) -> str:
    """Replace each of the sorted, disjoint *spans* of *text* by *marker*."""
    parts: list[str] = []
    pos = 0
    for start, end in spans:
        parts += (text[pos:start], marker)
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
