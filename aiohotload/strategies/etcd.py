"""The ``etcd`` strategy: a DSN kept in an etcd v3 key, followed through etcd's watch API.

``etcd://postgres/<key>?endpoints=10.0.0.1:2379,10.0.0.2:2379``: the key's value is the DSN.

It speaks etcd's gRPC gateway, the JSON API every etcd >= 3.4 serves at ``/v3/...`` on its
client port, over httpx. The Python gRPC clients on PyPI each lacked something needed here
(TLS, several endpoints, re-authentication, Python 3.10), and the gateway gives the same
range and watch calls with nothing but a well-kept, typed HTTP client.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the etcd strategy needs httpx: pip install 'aiohotload[etcd]'") from exc

from ..errors import InvalidOptionError, InvalidURLError, SourceError, StrategyError
from ..redact import redact_dsn, redact_text
from .toolkit import Backoff, OptionReader, describe_error, quoted

__all__ = ["EtcdStrategy"]

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "127.0.0.1:2379"
DEFAULT_TIMEOUT = 5.0
_DEFAULT_PORT = 2379
# A DSN is short; the cap stops a key holding something else from filling memory.
_MAX_BYTES = 64 * 1024
# Reconnect delays after every endpoint failed once more: doubling, with jitter, so that many
# replicas watching one key do not reconnect in lockstep after an etcd outage.
_BACKOFF = Backoff(first=0.1, maximum=5.0)
_TLS_OPTIONS = ("ca_file", "cert_file", "key_file")
_KNOWN_OPTIONS = ("endpoints", "timeout", *_TLS_OPTIONS, "user", "password")
# gRPC status codes the gateway reports (google.golang.org/grpc/codes).
_INVALID_ARGUMENT, _PERMISSION_DENIED, _UNAUTHENTICATED = 3, 7, 16
# OSError too: with TLS 1.3 the server's rejection of our certificate arrives on the first
# read, where httpx lets the raw ssl.SSLError through.
_NETWORK_ERRORS = (httpx.HTTPError, OSError)
# A watch's cancel_reason is a Go gRPC error: "rpc error: code = X desc = etcdserver: ...".
_RPC_ERROR = re.compile(r"^rpc error: code = \w+ desc = ")


@dataclass(frozen=True)
class _Options:
    endpoints: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return any(getattr(self, name) for name in _TLS_OPTIONS)


class EtcdStrategy:
    """Yields the value of an etcd key: its current value, then each change, seen by watch.

    The URL's path after the driver is the key: ``etcd://postgres/app/dsn`` reads ``app/dsn``,
    ``etcd://postgres//app/dsn`` reads ``/app/dsn``. Options:

    - ``endpoints`` (default ``127.0.0.1:2379``): comma-separated ``host:port`` or
      ``http(s)://host:port``; on a failure the next one is used.
    - ``timeout`` (default 5 s): bound of each request, e.g. ``2s``, ``500ms``.
    - ``ca_file``, ``cert_file``, ``key_file``: TLS; bare endpoints then use https.
    - ``user``, ``password``: etcd authentication.

    A deleted, empty or unreadable value is logged and the current DSN kept until a good
    value is put again. The DSN and etcd's password are never logged unredacted.
    """

    async def watch(self, path: str, options: Mapping[str, str]) -> AsyncGenerator[str, None]:
        """Yield the DSN in etcd key *path*, then each new DSN, until closed.

        Raises :class:`~aiohotload.InvalidOptionError` or, if the key cannot be read at
        start (missing, empty, etcd unreachable), :class:`~aiohotload.SourceError`. Later
        connection failures are retried forever; refused credentials or permissions raise
        :class:`~aiohotload.StrategyError`.
        """
        opts = _parse_options(options)
        key = _key_of(path)
        etcd = _Etcd(opts, _ssl_context(opts))
        try:
            read = await etcd.first_read(key)
            current = _start_value(key, read)
            yield current

            next_rev = read.revision + 1
            failures = 0
            resync = False
            while True:
                try:
                    if resync:
                        read = await etcd.read(key)
                        resync = False
                        next_rev = read.revision + 1
                        event = _Event(read.value is None, read.value or b"", read.revision)
                        if (dsn := _new_value(key, event, current)) is not None:
                            current = dsn
                            yield dsn
                    async with aclosing(etcd.watch(key, next_rev)) as batches:
                        async for batch in batches:
                            if failures:
                                logger.info(
                                    "watching etcd key %r again through %s", key, etcd.endpoint
                                )
                                failures = 0
                            # Resume point: a reconnect asks for what came after this batch.
                            next_rev = max(next_rev, batch.revision + 1)
                            if batch.events and (dsn := _new_value(key, batch.events[-1], current)):
                                current = dsn
                                yield dsn
                    raise _UnavailableError("the watch stream ended")
                except _CompactedError as exc:
                    # The history since next_rev is gone: the key's value now is what counts.
                    logger.info(
                        "etcd compacted key %r's history up to revision %d while the watch "
                        "was behind; re-reading the key",
                        key,
                        exc.revision,
                    )
                    resync = True
                except _UnavailableError as exc:
                    failures += 1
                    delay = _backoff(failures, len(opts.endpoints))
                    # Once per outage at warning level: a down etcd must not flood the log.
                    logger.log(
                        logging.WARNING if failures == 1 else logging.DEBUG,
                        "lost the watch on etcd key %r through %s: %s; retrying (attempt %d)",
                        key,
                        etcd.endpoint,
                        exc.reason,
                        failures,
                    )
                    etcd.next_endpoint()
                    await anyio.sleep(delay)
                except _DeniedError as exc:
                    raise StrategyError(f"etcd key {key!r}: {exc.reason}") from None
        finally:
            with anyio.CancelScope(shield=True):
                await etcd.aclose()


@dataclass(frozen=True)
class _Read:
    value: bytes | None  # None: no such key
    revision: int  # the store's revision the read saw


@dataclass(frozen=True)
class _Event:
    deleted: bool
    value: bytes
    revision: int


@dataclass(frozen=True)
class _Batch:
    events: tuple[_Event, ...]
    revision: int  # every change up to this revision has been delivered


class _EtcdError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _UnavailableError(_EtcdError):
    """This endpoint failed; another one, or a later try, may work."""


class _BadTokenError(_UnavailableError):
    """The auth token expired or etcd restarted and forgot it: authenticate again."""


class _DeniedError(_EtcdError):
    """etcd refused the credentials or the permission: retrying soon will not help."""


class _CompactedError(Exception):
    def __init__(self, revision: int) -> None:
        super().__init__(f"compacted up to revision {revision}")
        self.revision = revision


class _Etcd:
    """etcd's JSON gateway through one endpoint at a time, with an auth token if configured."""

    def __init__(self, opts: _Options, ssl_context: ssl.SSLContext | None) -> None:
        self._opts = opts
        self._index = 0
        self._token: str | None = None
        self._authenticate = opts.user is not None  # False once etcd says auth is off
        transport = httpx.AsyncHTTPTransport(
            verify=ssl_context if ssl_context is not None else True,
            socket_options=_KEEPALIVE,
        )
        # No client-wide timeout: requests are bounded by anyio.fail_after, and an
        # established watch stream may stay silent for hours. trust_env=False: an HTTP proxy
        # set for the application's other traffic must not sit between us and etcd.
        self._http = httpx.AsyncClient(transport=transport, timeout=None, trust_env=False)

    @property
    def endpoint(self) -> str:
        return self._opts.endpoints[self._index]

    def next_endpoint(self) -> None:
        self._index = (self._index + 1) % len(self._opts.endpoints)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def first_read(self, key: str) -> _Read:
        """Read *key*, trying each endpoint once; SourceError if none answers."""
        failures: list[str] = []
        for _ in self._opts.endpoints:
            try:
                return await self.read(key)
            except _UnavailableError as exc:
                failures.append(f"{self.endpoint}: {exc.reason}")
                self.next_endpoint()
            except _DeniedError as exc:
                raise SourceError(f"cannot read etcd key {key!r}: {exc.reason}") from None
        raise SourceError(f"cannot read etcd key {key!r}: {'; '.join(failures)}")

    async def read(self, key: str) -> _Read:
        """The value of *key* and the revision it was read at (a linearizable range)."""
        data = await self._call("/v3/kv/range", {"key": _b64(key)})
        revision = _int(data.get("header", {}).get("revision"))
        kvs = data.get("kvs") or []
        if not kvs:
            return _Read(None, revision)
        return _Read(_unb64(kvs[0].get("value")), revision)

    async def watch(self, key: str, start: int) -> AsyncGenerator[_Batch, None]:
        """Watch *key* from revision *start*: an empty batch once the watch is created, then
        batches of events and progress notifications. Raises _CompactedError if *start* is
        compacted away, _UnavailableError or _DeniedError."""
        response, lines = await self._open_watch(key, start)
        logger.debug(
            "watch created on etcd key %r through %s from revision %d", key, self.endpoint, start
        )
        try:
            yield _Batch((), start - 1)
            async for line in lines:
                if not line.strip():
                    continue
                result = self._watch_result(line)
                events = tuple(_event(e) for e in result.get("events") or [])
                if events:
                    yield _Batch(events, events[-1].revision)
                elif not result.get("created"):
                    # A progress notification: everything up to its revision was sent.
                    yield _Batch((), _int(result.get("header", {}).get("revision")))
        except _NETWORK_ERRORS as exc:
            raise _UnavailableError(self._scrub(describe_error(exc))) from None
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(lines, "aclose", None)  # httpx types it as an AsyncIterator
                if aclose is not None:
                    await aclose()
                await response.aclose()

    async def _open_watch(self, key: str, start: int) -> tuple[httpx.Response, AsyncIterator[str]]:
        await self._authenticate_once()
        try:
            return await self._create_watch(key, start)
        except _BadTokenError:
            self._forget_token()
            await self._authenticate_once()
            return await self._create_watch(key, start)

    async def _create_watch(
        self, key: str, start: int
    ) -> tuple[httpx.Response, AsyncIterator[str]]:
        body = {
            "create_request": {"key": _b64(key), "start_revision": start, "progress_notify": True}
        }
        # Forwarded as gRPC metadata: etcd then cancels the watch when its member loses the
        # leader (a partition), instead of leaving it silently stale; we move to another.
        headers = {**self._headers(), "Grpc-Metadata-hasleader": "true"}
        request = self._http.build_request(
            "POST", self.endpoint + "/v3/watch", json=body, headers=headers
        )
        try:
            with anyio.fail_after(self._opts.timeout):
                response = await self._http.send(request, stream=True)
                try:
                    if response.status_code != httpx.codes.OK:
                        await response.aread()
                        raise self._http_error(response)
                    lines = response.aiter_lines()
                    first = ""
                    while not first.strip():
                        first = await anext(lines)
                    if not self._watch_result(first).get("created"):
                        raise _UnavailableError("etcd did not confirm the watch")
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
                    raise
        except TimeoutError:
            raise _UnavailableError(f"no answer within {self._opts.timeout:g}s") from None
        except StopAsyncIteration:
            raise _UnavailableError("etcd closed the watch stream") from None
        except _NETWORK_ERRORS as exc:
            raise _UnavailableError(self._scrub(describe_error(exc))) from None
        return response, lines

    def _watch_result(self, line: str) -> dict[str, Any]:
        try:
            data = json.loads(line)
        except ValueError:
            raise _UnavailableError("etcd sent a watch message that is not JSON") from None
        if not isinstance(data, dict):
            raise _UnavailableError("etcd sent a watch message that is not an object")
        if "error" in data:
            raise self._error(*_error_fields(data))
        result = data.get("result")
        if not isinstance(result, dict):
            return {}
        if result.get("canceled"):
            compacted = _int(result.get("compact_revision"))
            if compacted:
                raise _CompactedError(compacted)
            raise self._error(str(result.get("cancel_reason") or "etcd cancelled the watch"))
        return result

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._authenticate_once()
        try:
            return await self._post(path, body)
        except _BadTokenError:
            self._forget_token()
            await self._authenticate_once()
            return await self._post(path, body)

    def _forget_token(self) -> None:
        logger.debug("etcd at %s rejected the auth token; authenticating again", self.endpoint)
        self._token = None

    async def _authenticate_once(self) -> None:
        """Get a token if credentials are configured and none is held."""
        if self._token is not None or not self._authenticate:
            return
        body = {"name": self._opts.user, "password": self._opts.password or ""}
        try:
            data = await self._post("/v3/auth/authenticate", body, auth=False)
        except _EtcdError as exc:
            if "authentication is not enabled" in exc.reason:
                # As etcd's own client does: credentials for a cluster without auth are moot.
                logger.debug("etcd at %s has authentication disabled", self.endpoint)
                self._authenticate = False
                return
            raise
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise _UnavailableError("etcd gave no auth token")
        self._token = token

    async def _post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        headers = self._headers() if auth else {}
        try:
            with anyio.fail_after(self._opts.timeout):
                response = await self._http.post(self.endpoint + path, json=body, headers=headers)
        except TimeoutError:
            raise _UnavailableError(f"no answer within {self._opts.timeout:g}s") from None
        except _NETWORK_ERRORS as exc:
            raise _UnavailableError(self._scrub(describe_error(exc))) from None
        if response.status_code != httpx.codes.OK:
            raise self._http_error(response)
        try:
            data = response.json()
        except ValueError:
            raise _UnavailableError("etcd answered with something that is not JSON") from None
        if not isinstance(data, dict):
            raise _UnavailableError("etcd answered with JSON that is not an object")
        return data

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    def _http_error(self, response: httpx.Response) -> _EtcdError:
        try:
            data = response.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and (data.get("message") or data.get("error")):
            return self._error(*_error_fields(data))
        if response.status_code == httpx.codes.NOT_FOUND:
            return _UnavailableError("HTTP 404: not an etcd >= 3.4 JSON gateway")
        return _UnavailableError(f"HTTP {response.status_code}")

    def _error(self, message: str, code: object = None) -> _EtcdError:
        """Classify an error etcd reported, by gRPC code and message."""
        reason = self._scrub(_RPC_ERROR.sub("", message).removeprefix("etcdserver: "))
        if "invalid auth token" in reason:
            return _BadTokenError(reason)
        if "user name is empty" in reason:
            return _DeniedError(
                "etcd has authentication enabled; give the user and password options"
            )
        if code in (_INVALID_ARGUMENT, _PERMISSION_DENIED, _UNAUTHENTICATED) or any(
            text in reason for text in ("permission denied", "authentication", "Unauthenticated")
        ):
            return _DeniedError(reason)
        return _UnavailableError(reason)

    def _scrub(self, text: str) -> str:
        """*text* without our password or token, should etcd or httpx ever echo them."""
        secrets = [s for s in (self._opts.password, self._token) if s]
        return redact_text(text, secrets)


def _new_value(key: str, event: _Event, current: str) -> str | None:
    """The DSN *event* brings, if it is a usable value other than *current*; logs why not."""
    if event.deleted:
        logger.info(
            "etcd key %r was deleted (revision %d); keeping the current DSN", key, event.revision
        )
        return None
    try:
        dsn = _decode(event.value)
    except _UnusableError as exc:
        logger.warning(
            "etcd key %r was set to a value that %s (revision %d); keeping the current DSN",
            key,
            exc.reason,
            event.revision,
        )
        return None
    if dsn == current:
        logger.debug("etcd key %r rewritten unchanged (revision %d)", key, event.revision)
        return None
    logger.info("etcd key %r changed (revision %d): %s", key, event.revision, redact_dsn(dsn))
    return dsn


def _start_value(key: str, read: _Read) -> str:
    if read.value is None:
        # etcd keys often start with '/', which the URL needs as a second slash.
        hint = "" if key.startswith("/") else f"; for '/{key}' write 'etcd://postgres//{key}'"
        raise SourceError(f"etcd key {key!r} does not exist{hint}")
    try:
        return _decode(read.value)
    except _UnusableError as exc:
        raise SourceError(f"etcd key {key!r} holds a value that {exc.reason}") from None


class _UnusableError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _decode(value: bytes) -> str:
    """The stripped DSN in *value*; _UnusableError (whose reason never quotes it) if none."""
    if len(value) > _MAX_BYTES:
        raise _UnusableError(f"is larger than {_MAX_BYTES} bytes")
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _UnusableError("is not valid UTF-8") from None
    if not text:
        raise _UnusableError("is empty")
    return text


def _event(raw: dict[str, Any]) -> _Event:
    kv = raw.get("kv") or {}
    return _Event(
        deleted=raw.get("type") == "DELETE",
        value=_unb64(kv.get("value")),
        revision=_int(kv.get("mod_revision")),
    )


def _error_fields(data: dict[str, Any]) -> tuple[str, object]:
    """Message and gRPC code of a gateway error: ``{"message", "code"}`` for a unary call,
    ``{"error": {"message", "grpc_code"}}`` for a stream."""
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error), error.get("grpc_code")
    return str(data.get("message") or error), data.get("code")


def _backoff(failures: int, endpoints: int) -> float:
    """Seconds to wait after the *failures*-th failure in a row: none while another endpoint
    is still untried in this round, then doubling per round, with jitter."""
    if failures % endpoints:
        return 0.0
    return _BACKOFF.delay(failures // endpoints)


# TCP keepalive: an established watch is silent until a change, so a peer that vanished
# without a reset (a partition, a dead host) is noticed by the kernel in about 30 s.
_KEEPALIVE = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    *(
        (socket.IPPROTO_TCP, getattr(socket, name), value)
        for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
        if hasattr(socket, name)
    ),
]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _unb64(value: object) -> bytes:
    # The gateway leaves out empty fields: no "value" means an empty value.
    if not isinstance(value, str):
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise _UnavailableError("etcd sent a value that is not base64") from None


def _int(value: object) -> int:
    # int64 fields arrive as JSON strings, and are left out when zero.
    try:
        return int(value) if isinstance(value, (int, str)) else 0
    except ValueError:
        return 0


def _key_of(path: str) -> str:
    # The slash after the driver separates it from the key; a second slash starts the key.
    key = path[1:] if path.startswith("/") else path
    if not key:
        raise InvalidURLError("the etcd strategy needs a key: 'etcd://postgres/<key>'")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidURLError("the etcd key is not valid UTF-8") from None
    return key


def _parse_options(options: Mapping[str, str]) -> _Options:
    opts = OptionReader("etcd", options, _KNOWN_OPTIONS)
    files = {name: _file_option(options, name) for name in _TLS_OPTIONS}
    if files["key_file"] and not files["cert_file"]:
        raise InvalidOptionError("option 'key_file' needs 'cert_file' (the client certificate)")
    user, password = options.get("user"), options.get("password")
    if user is not None and not user:
        raise InvalidOptionError("option 'user' is empty")
    if (user is None) != (password is None):
        given, missing = ("user", "password") if password is None else ("password", "user")
        raise InvalidOptionError(f"option {given!r} needs option {missing!r} too")
    tls = any(files.values())
    return _Options(
        endpoints=_parse_endpoints(options.get("endpoints", DEFAULT_ENDPOINT), tls=tls),
        timeout=opts.duration("timeout", DEFAULT_TIMEOUT),
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        user=user,
        password=password,
    )


def _file_option(options: Mapping[str, str], name: str) -> str | None:
    value = options.get(name)
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


def _ssl_context(opts: _Options) -> ssl.SSLContext | None:
    """The TLS context for the TLS options, or None to use httpx's defaults."""
    if not opts.tls:
        return None
    try:
        context = ssl.create_default_context(cafile=opts.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidOptionError(
            f"option 'ca_file': cannot load {opts.ca_file!r}: {describe_error(exc)}"
        ) from None
    if opts.cert_file:
        try:
            context.load_cert_chain(opts.cert_file, opts.key_file)
        except (OSError, ssl.SSLError) as exc:
            names = "'cert_file'" if opts.key_file is None else "'cert_file' and 'key_file'"
            raise InvalidOptionError(
                f"options {names}: cannot load the client certificate: {describe_error(exc)}"
            ) from None
    return context
