"""The etcd strategy's options, its key, and the TLS context they describe."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ...errors import InvalidOptionError, InvalidURLError
from ..toolkit import OptionReader, quoted, tls_context

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_TIMEOUT",
    "EtcdOptions",
    "key_of",
    "parse_options",
    "ssl_context",
]

DEFAULT_ENDPOINT = "127.0.0.1:2379"
DEFAULT_TIMEOUT = 5.0
DEFAULT_KEEPALIVE = 10.0
_DEFAULT_PORT = 2379
_TLS_OPTIONS = ("ca_file", "cert_file", "key_file")
_KNOWN_OPTIONS = ("endpoints", "timeout", "keepalive", *_TLS_OPTIONS, "user", "password")


@dataclass(frozen=True)
class EtcdOptions:
    """The parsed options; equal options (and key) share one watch on an event loop."""

    endpoints: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    keepalive: float = DEFAULT_KEEPALIVE  # 0: never check a silent watch
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return any(getattr(self, name) for name in _TLS_OPTIONS)


def parse_options(options: Mapping[str, str]) -> EtcdOptions:
    """The options of an ``etcd://`` URL; :class:`~aiohotload.InvalidOptionError` naming
    the bad one."""
    opts = OptionReader("etcd", options, _KNOWN_OPTIONS)
    files = {name: _file_option(opts, name) for name in _TLS_OPTIONS}
    if files["key_file"] and not files["cert_file"]:
        raise InvalidOptionError("option 'key_file' needs 'cert_file' (the client certificate)")
    user, password = opts.text("user"), opts.text("password")
    if user is not None and not user:
        raise InvalidOptionError("option 'user' is empty")
    if (user is None) != (password is None):
        given, missing = ("user", "password") if password is None else ("password", "user")
        raise InvalidOptionError(f"option {given!r} needs option {missing!r} too")
    tls = any(files.values())
    endpoints = opts.text("endpoints")
    return EtcdOptions(
        endpoints=_parse_endpoints(DEFAULT_ENDPOINT if endpoints is None else endpoints, tls=tls),
        timeout=opts.duration("timeout", DEFAULT_TIMEOUT),
        keepalive=opts.duration("keepalive", DEFAULT_KEEPALIVE, allow_zero=True),
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        user=user,
        password=password,
    )


def key_of(path: str) -> str:
    """The etcd key a hotload URL's path names."""
    # The slash after the driver separates it from the key; a second slash starts the key.
    key = path[1:] if path.startswith("/") else path
    if not key:
        raise InvalidURLError("the etcd strategy needs a key: 'etcd://postgres/<key>'")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidURLError("the etcd key is not valid UTF-8") from None
    return key


def ssl_context(opts: EtcdOptions) -> ssl.SSLContext | None:
    """The TLS context for the TLS options, or None to use httpx's defaults."""
    if not opts.tls:
        return None
    return tls_context(opts.ca_file, opts.cert_file, opts.key_file)


def _file_option(opts: OptionReader, name: str) -> str | None:
    value = opts.text(name)
    if value is None:
        return None
    if not value.strip():
        raise InvalidOptionError(f"option {name!r} is empty; give a file path")
    return os.path.expanduser(value.strip())


def _parse_endpoints(value: str, *, tls: bool) -> tuple[str, ...]:
    endpoints = [_endpoint(item.strip(), tls=tls) for item in value.split(",") if item.strip()]
    if not endpoints:
        raise InvalidOptionError(
            "option 'endpoints' names no endpoint; e.g. endpoints=10.0.0.1:2379,10.0.0.2:2379"
        )
    return tuple(dict.fromkeys(endpoints))


def _endpoint(item: str, *, tls: bool) -> str:
    """``http(s)://host:port`` for an endpoint given as ``host[:port]`` or a URL."""
    text = item if "://" in item else f"{'https' if tls else 'http'}://{item}"
    bad = InvalidOptionError(
        f"option 'endpoints': {quoted(item)} is not host:port or http(s)://host:port"
    )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise bad from None
    if parts.username is not None or parts.password is not None:
        # Not quoted: it holds a password.
        raise InvalidOptionError(
            "option 'endpoints': an endpoint holds credentials; give them as the user and "
            "password options"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad
    if tls and parts.scheme == "http":
        raise InvalidOptionError(
            f"option 'endpoints': {quoted(item)} is plain http://, but TLS options "
            f"({', '.join(_TLS_OPTIONS)}) are given"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port or _DEFAULT_PORT}"
