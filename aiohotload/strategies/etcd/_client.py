"""A client for etcd's JSON gateway: linearizable reads and watches of one key, over httpx.

The gateway (``/v3/kv/range``, ``/v3/watch``, ``/v3/auth/authenticate``) is served by every
etcd >= 3.4 on its client port. The Python gRPC clients on PyPI each lacked something needed
here (TLS, several endpoints, re-authentication, Python 3.10), and the gateway gives the same
calls with nothing but a well-kept, typed HTTP client.

The client talks to one endpoint at a time; :meth:`EtcdClient.next_endpoint` moves on. Its
errors say what to do next: :class:`UnavailableError` (try another endpoint, or later),
:class:`DeniedError` (retrying will not help), :class:`CompactedError` (read the key again).
Their ``reason`` never holds the password or the auth token.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the etcd strategy needs httpx: pip install 'aiohotload[etcd]'") from exc

from ...redact import redact_text
from ..toolkit import describe_error
from ._options import EtcdOptions

__all__ = [
    "BadTokenError",
    "Batch",
    "CompactedError",
    "DeniedError",
    "EtcdClient",
    "EtcdError",
    "Event",
    "Read",
    "UnavailableError",
]

logger = logging.getLogger("aiohotload.strategies.etcd")

T = TypeVar("T")

# gRPC status codes the gateway reports (google.golang.org/grpc/codes).
_INVALID_ARGUMENT, _PERMISSION_DENIED, _UNAUTHENTICATED = 3, 7, 16
# OSError too: with TLS 1.3 the server's rejection of our certificate arrives on the first
# read, where httpx lets the raw ssl.SSLError through.
_NETWORK_ERRORS = (httpx.HTTPError, OSError)
# A watch's cancel_reason is a Go gRPC error: "rpc error: code = X desc = etcdserver: ...".
_RPC_ERROR = re.compile(r"^rpc error: code = \w+ desc = ")
# TCP keepalive: an established watch is silent until a change, so a peer that vanished
# without a reset (a partition, a dead host) is noticed by the kernel in about 30 s. A peer
# alive for TCP but not answering (a frozen process) is not: the watch's keepalive reads are.
_KEEPALIVE = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    *(
        (socket.IPPROTO_TCP, getattr(socket, name), value)
        for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
        if hasattr(socket, name)
    ),
]


@dataclass(frozen=True)
class Read:
    """A key's value as a linearizable read saw it."""

    value: bytes | None  # None: no such key
    revision: int  # the store's revision the read saw


@dataclass(frozen=True)
class Event:
    """A change of the key (or its state as a read saw it, at the read's revision)."""

    deleted: bool
    value: bytes
    revision: int

    @classmethod
    def of(cls, read: Read) -> Event:
        return cls(read.value is None, read.value or b"", read.revision)


@dataclass(frozen=True)
class Batch:
    """What one watch message brought."""

    events: tuple[Event, ...]
    revision: int  # every change up to this revision has been delivered


class EtcdError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnavailableError(EtcdError):
    """This endpoint failed; another one, or a later try, may work."""


class BadTokenError(UnavailableError):
    """The auth token expired or etcd restarted and forgot it: authenticate again."""


class DeniedError(EtcdError):
    """etcd refused the credentials or the permission: retrying soon will not help."""


class CompactedError(Exception):
    def __init__(self, revision: int) -> None:
        super().__init__(f"compacted up to revision {revision}")
        self.revision = revision


class EtcdClient:
    """etcd's JSON gateway through one endpoint at a time, with an auth token if configured."""

    def __init__(self, opts: EtcdOptions, ssl_context: ssl.SSLContext | None) -> None:
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

    @property
    def endpoints(self) -> int:
        return len(self._opts.endpoints)

    def next_endpoint(self) -> None:
        self._index = (self._index + 1) % len(self._opts.endpoints)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def read_any(self, key: str) -> Read:
        """Read *key*, trying each endpoint once from the current one; UnavailableError
        naming each endpoint's failure if none answers."""
        failures: list[str] = []
        for _ in self._opts.endpoints:
            try:
                return await self.read(key)
            except UnavailableError as exc:
                failures.append(f"{self.endpoint}: {exc.reason}")
                self.next_endpoint()
        raise UnavailableError("; ".join(failures))

    async def read(self, key: str) -> Read:
        """The value of *key* and the revision it was read at (a linearizable range)."""
        data = await self._call("/v3/kv/range", {"key": _b64(key)})
        revision = _int(data.get("header", {}).get("revision"))
        kvs = data.get("kvs") or []
        if not kvs:
            return Read(None, revision)
        return Read(_unb64(kvs[0].get("value")), revision)

    async def watch(self, key: str, start: int) -> AsyncGenerator[Batch, None]:
        """Watch *key* from revision *start*: an empty batch once the watch is created, then
        batches of events and progress notifications. Raises CompactedError if *start* is
        compacted away, UnavailableError or DeniedError."""
        response, lines = await self._open_watch(key, start)
        logger.debug(
            "watch created on etcd key %r through %s from revision %d", key, self.endpoint, start
        )
        try:
            yield Batch((), start - 1)
            async for line in lines:
                if not line.strip():
                    continue
                result = self._watch_result(line)
                events = tuple(_event(e) for e in result.get("events") or [])
                if events:
                    yield Batch(events, events[-1].revision)
                elif not result.get("created"):
                    # A progress notification: everything up to its revision was sent.
                    yield Batch((), _int(result.get("header", {}).get("revision")))
        except _NETWORK_ERRORS as exc:
            raise UnavailableError(self._scrub(describe_error(exc))) from None
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(lines, "aclose", None)  # httpx types it as an AsyncIterator
                if aclose is not None:
                    await aclose()
                await response.aclose()

    async def _open_watch(self, key: str, start: int) -> tuple[httpx.Response, AsyncIterator[str]]:
        return await self._with_token(lambda: self._create_watch(key, start))

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
                        raise UnavailableError("etcd did not confirm the watch")
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
                    raise
        except TimeoutError:
            raise UnavailableError(f"no answer within {self._opts.timeout:g}s") from None
        except StopAsyncIteration:
            raise UnavailableError("etcd closed the watch stream") from None
        except _NETWORK_ERRORS as exc:
            raise UnavailableError(self._scrub(describe_error(exc))) from None
        return response, lines

    def _watch_result(self, line: str) -> dict[str, Any]:
        try:
            data = json.loads(line)
        except ValueError:
            raise UnavailableError("etcd sent a watch message that is not JSON") from None
        if not isinstance(data, dict):
            raise UnavailableError("etcd sent a watch message that is not an object")
        if "error" in data:
            raise self._error(*_error_fields(data))
        result = data.get("result")
        if not isinstance(result, dict):
            return {}
        if result.get("canceled"):
            compacted = _int(result.get("compact_revision"))
            if compacted:
                raise CompactedError(compacted)
            raise self._error(str(result.get("cancel_reason") or "etcd cancelled the watch"))
        return result

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._with_token(lambda: self._post(path, body))

    async def _with_token(self, request: Callable[[], Awaitable[T]]) -> T:
        """*request* made with the auth token (if any), and once more with a new one if etcd
        rejects it (expired, or the member restarted)."""
        await self._authenticate_once()
        try:
            return await request()
        except BadTokenError:
            self._forget_token()
            await self._authenticate_once()
            return await request()

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
        except EtcdError as exc:
            if "authentication is not enabled" in exc.reason:
                # As etcd's own client does: credentials for a cluster without auth are moot.
                logger.debug("etcd at %s has authentication disabled", self.endpoint)
                self._authenticate = False
                return
            raise
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise UnavailableError("etcd gave no auth token")
        self._token = token

    async def _post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        headers = self._headers() if auth else {}
        try:
            with anyio.fail_after(self._opts.timeout):
                response = await self._http.post(self.endpoint + path, json=body, headers=headers)
        except TimeoutError:
            raise UnavailableError(f"no answer within {self._opts.timeout:g}s") from None
        except _NETWORK_ERRORS as exc:
            raise UnavailableError(self._scrub(describe_error(exc))) from None
        if response.status_code != httpx.codes.OK:
            raise self._http_error(response)
        try:
            data = response.json()
        except ValueError:
            raise UnavailableError("etcd answered with something that is not JSON") from None
        if not isinstance(data, dict):
            raise UnavailableError("etcd answered with JSON that is not an object")
        return data

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    def _http_error(self, response: httpx.Response) -> EtcdError:
        try:
            data = response.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and (data.get("message") or data.get("error")):
            return self._error(*_error_fields(data))
        if response.status_code == httpx.codes.NOT_FOUND:
            return UnavailableError("HTTP 404: not an etcd >= 3.4 JSON gateway")
        return UnavailableError(f"HTTP {response.status_code}")

    def _error(self, message: str, code: object = None) -> EtcdError:
        """Classify an error etcd reported, by gRPC code and message."""
        reason = self._scrub(_RPC_ERROR.sub("", message).removeprefix("etcdserver: "))
        if "invalid auth token" in reason:
            return BadTokenError(reason)
        if "user name is empty" in reason:
            return DeniedError(
                "etcd has authentication enabled; give the user and password options"
            )
        if code in (_INVALID_ARGUMENT, _PERMISSION_DENIED, _UNAUTHENTICATED) or any(
            text in reason for text in ("permission denied", "authentication", "Unauthenticated")
        ):
            return DeniedError(reason)
        return UnavailableError(reason)

    def _scrub(self, text: str) -> str:
        """*text* without our password or token, should etcd or httpx ever echo them."""
        secrets = [s for s in (self._opts.password, self._token) if s]
        return redact_text(text, secrets)


def _event(raw: dict[str, Any]) -> Event:
    kv = raw.get("kv") or {}
    return Event(
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


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _unb64(value: object) -> bytes:
    # The gateway leaves out empty fields: no "value" means an empty value.
    if not isinstance(value, str):
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise UnavailableError("etcd sent a value that is not base64") from None


def _int(value: object) -> int:
    # int64 fields arrive as JSON strings, and are left out when zero.
    try:
        return int(value) if isinstance(value, (int, str)) else 0
    except ValueError:
        return 0
