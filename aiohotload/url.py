"""Parsing of hotload URLs: ``<strategy>://<driver>/<path>?<options>``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import unquote

from .errors import InvalidOptionError, InvalidURLError
from .redact import REDACTED, redact_dsn, redact_text

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DRAIN_TIMEOUT",
    "HotloadURL",
    "parse_bool",
    "parse_duration",
    "parse_url",
]

#: Seconds a graceful drain may last before the remaining connections are terminated.
DEFAULT_DRAIN_TIMEOUT = 30.0
#: Seconds allowed to open a new inner pool (and to get the first DSN) before giving up.
DEFAULT_CONNECT_TIMEOUT = 10.0

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
_FALSE = frozenset({"0", "f", "false", "n", "no", "off"})
_DURATION = re.compile(
    r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>ms|s|m|h)?\s*$"
)
_UNIT = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}
# Option names whose values must not be shown (a strategy's own credentials).
_SECRET_OPTION = re.compile(r"pass|secret|token|key", re.IGNORECASE)

# Pool-level options: canonical name -> accepted spellings (Go hotload uses camelCase).
_POOL_OPTIONS = {
    "force_kill": ("force_kill", "forceKill"),
    "follow_primary": ("follow_primary", "followPrimary"),
    "drain_timeout": ("drain_timeout", "drainTimeout"),
    "connect_timeout": ("connect_timeout", "connectTimeout"),
}
_POOL_ALIASES = {alias: name for name, aliases in _POOL_OPTIONS.items() for alias in aliases}


@dataclass(frozen=True)
class HotloadURL:
    """A parsed hotload URL.

    ``options`` holds the query options meant for the strategy; the pool's own options
    (``force_kill``, ``drain_timeout``, ``connect_timeout``, ``follow_primary``) are parsed
    into fields.
    """

    strategy: str
    driver: str
    path: str
    # A mapping is not hashable; equal URLs still hash equal without it.
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    force_kill: bool = False
    follow_primary: bool = False
    """Connect only to a server that takes writes (``target_session_attrs=read-write``) and
    open a new generation on the same DSN when the server stops taking them (a failover)."""
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def __repr__(self) -> str:
        shown = {
            k: ("********" if _SECRET_OPTION.search(k) else v) for k, v in self.options.items()
        }
        return (
            f"HotloadURL(strategy={self.strategy!r}, driver={self.driver!r}, path={self.path!r}, "
            f"options={shown!r}, force_kill={self.force_kill!r}, "
            f"follow_primary={self.follow_primary!r}, "
            f"drain_timeout={self.drain_timeout!r}, connect_timeout={self.connect_timeout!r})"
        )


def parse_url(url: str) -> HotloadURL:
    """Parse a hotload URL, raising :class:`InvalidURLError` or :class:`InvalidOptionError`
    that names the bad part."""
    if not isinstance(url, str):
        raise InvalidURLError(f"hotload URL must be a str, not {type(url).__name__}")
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        raise InvalidURLError(
            "hotload URL must look like '<strategy>://<driver>/<path>?<options>', "
            f"e.g. 'watchfiles://postgres/etc/app/dsn.txt'; got {_shown(url)!r}"
        )
    # fullmatch, not match: '$' would let a trailing newline through.
    if not _SCHEME.fullmatch(scheme):
        raise InvalidURLError(f"invalid strategy name {_shorten(scheme)!r} in hotload URL")
    rest, _, _fragment = rest.partition("#")
    location, _, query = rest.partition("?")
    driver, slash, raw_path = location.partition("/")
    if not driver:
        raise InvalidURLError(
            "hotload URL names no driver: expected '<strategy>://<driver>/<path>', "
            f"e.g. '{scheme}://postgres/...'"
        )
    if not _NAME.fullmatch(driver):
        if "@" in driver:
            # Most likely a DSN given where a hotload URL belongs: never echo its userinfo.
            raise InvalidURLError(
                "hotload URL's driver part contains '@': this looks like a DSN "
                f"({_shown(url)!r}); pass a hotload URL such as "
                "'watchfiles://postgres/etc/app/dsn.txt' whose source holds the DSN"
            )
        raise InvalidURLError(f"invalid driver name {_shorten(driver)!r} in hotload URL")
    try:
        path = unquote(slash + raw_path, errors="strict") if raw_path else ""
    except UnicodeDecodeError as exc:
        raise InvalidURLError(
            f"hotload URL path {_shorten(raw_path)!r} is not valid UTF-8 once percent-decoded"
        ) from exc
    if not path or path == "/":
        raise InvalidURLError(f"hotload URL names no path: expected '{scheme}://{driver}/<path>'")
    if "\x00" in path:
        raise InvalidURLError("hotload URL path contains a NUL character")

    options, pool = _parse_query(query)
    return HotloadURL(
        strategy=scheme.lower(),
        driver=driver.lower(),
        path=path,
        options=MappingProxyType(options),
        force_kill=parse_bool("force_kill", pool["force_kill"]) if "force_kill" in pool else False,
        follow_primary=(
            parse_bool("follow_primary", pool["follow_primary"])
            if "follow_primary" in pool
            else False
        ),
        drain_timeout=(
            parse_duration("drain_timeout", pool["drain_timeout"])
            if "drain_timeout" in pool
            else DEFAULT_DRAIN_TIMEOUT
        ),
        connect_timeout=(
            parse_duration("connect_timeout", pool["connect_timeout"], allow_zero=False)
            if "connect_timeout" in pool
            else DEFAULT_CONNECT_TIMEOUT
        ),
    )


def _parse_query(query: str) -> tuple[dict[str, str], dict[str, str]]:
    options: dict[str, str] = {}
    pool: dict[str, str] = {}
    if not query:
        return options, pool
    for part in query.split("&"):
        if not part:
            continue
        raw_key, eq, raw_value = part.partition("=")
        try:
            key = unquote(raw_key.replace("+", " "), errors="strict")
            value = unquote(raw_value.replace("+", " "), errors="strict")
        except UnicodeDecodeError as exc:
            raise InvalidOptionError(f"option {_shorten(raw_key)!r} is not valid UTF-8") from exc
        if not key:
            raise InvalidOptionError("hotload URL has an option with an empty name")
        if not eq:
            # '?forceKill' alone reads as a flag set to true.
            value = "true"
        canonical = _POOL_ALIASES.get(key)
        target, name = (pool, canonical) if canonical else (options, key)
        if name in target:
            raise InvalidOptionError(f"option {key!r} is given more than once")
        target[name] = value
    return options, pool


def parse_bool(name: str, value: str) -> bool:
    """Parse a boolean option (``true/false``, ``1/0``, ``yes/no``, ``on/off``)."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidOptionError(
        f"option {name!r} must be a boolean (true/false, 1/0, yes/no, on/off); "
        f"got {_shorten(value)!r}"
    )


def parse_duration(name: str, value: str, *, allow_zero: bool = True) -> float:
    """Parse a duration option in seconds: ``30``, ``2.5``, ``500ms``, ``30s``, ``1m``."""
    m = _DURATION.match(value)
    seconds = float(m.group("num")) * _UNIT[m.group("unit")] if m else math.nan
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidOptionError(
            f"option {name!r} must be a duration {bound} in seconds (e.g. 30, 2.5, 500ms, 1m); "
            f"got {_shorten(value)!r}"
        )
    return seconds


def _shown(url: str) -> str:
    """*url* as an error may quote it: a password in it, if any, redacted."""
    if "://" not in url and "@" in url:
        return "********@" + _shorten(url.rpartition("@")[2])
    shown = redact_dsn(url)
    if shown == REDACTED:
        # Neither DSN form: a mistyped hotload URL or a bare path, worth showing, password
        # patterns still hidden.
        shown = redact_text(url.strip())
    return _shorten(shown)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
