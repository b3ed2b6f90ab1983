"""Vault's HTTP API over httpx: one request at a time, errors sorted by what to do next.

Vault and OpenBao serve the same JSON API under ``/v1/``. Every error raised here is a
:class:`VaultError` whose ``reason`` holds Vault's own message (never a token, secret id or
password: those are scrubbed should Vault or httpx ever echo them).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import httpx

from ...redact import redact_text

__all__ = [
    "Unavailable",
    "VaultClient",
    "VaultDenied",
    "VaultError",
    "VaultRejected",
]

# OSError too: with TLS 1.3 a refused client certificate arrives on the first read, where
# httpx lets the raw ssl.SSLError through.
_NETWORK_ERRORS = (httpx.HTTPError, OSError)
_TOO_MANY_REQUESTS = 429
_FORBIDDEN = 403


class VaultError(Exception):
    """A request Vault did not answer as hoped; ``reason`` is safe to log."""

    def __init__(self, reason: str, status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Unavailable(VaultError):
    """Unreachable, timed out, sealed, a 5xx or rate-limited: try again later."""


class VaultDenied(VaultError):
    """HTTP 403: the token is invalid or expired, or its policies do not allow the path."""


class VaultRejected(VaultError):
    """Another 4xx: Vault understood and said no (unknown role, lease not found, ...)."""


class VaultClient:
    """Requests to one Vault server, with the token that :attr:`token` holds.

    secrets: called for the secrets to scrub from error text (token, secret id, ...).
    """

    def __init__(
        self,
        addr: str,
        *,
        namespace: str | None,
        timeout: float,
        verify: ssl.SSLContext | bool,
        secrets: Callable[[], Iterable[str]],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.addr = addr.rstrip("/")
        self.token: str | None = None
        self._timeout = timeout
        self._secrets = secrets
        headers = {"X-Vault-Request": "true"}  # as Vault's own clients send (SSRF guard)
        if namespace:
            headers["X-Vault-Namespace"] = namespace
        # No client-wide timeout: each request is bounded by anyio.fail_after, which also
        # covers a server that accepts the connection and then says nothing. trust_env=False:
        # a proxy set for the application's other traffic must not see the Vault token.
        self._http = httpx.AsyncClient(
            verify=verify, timeout=None, trust_env=False, headers=headers, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get(self, path: str, *, token: str | None = None) -> dict[str, Any]:
        """``GET /v1/<path>``: the JSON answer."""
        return await self.request("GET", path, token=token)

    async def post(
        self, path: str, body: dict[str, Any] | None = None, *, token: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/<path>`` (Vault's write): the JSON answer, ``{}`` for a 204."""
        return await self.request("POST", path, body, token=token)

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        auth: bool = True,
    ) -> dict[str, Any]:
        """Send one request with *token* (default :attr:`token`; none if not *auth*)."""
        headers = {}
        token = token or self.token
        if auth and token:
            headers["X-Vault-Token"] = token
        url = f"{self.addr}/v1/{path.lstrip('/')}"
        try:
            with anyio.fail_after(self._timeout):
                response = await self._http.request(method, url, json=body, headers=headers)
        except TimeoutError:
            raise Unavailable(f"no answer within {self._timeout:g}s") from None
        except _NETWORK_ERRORS as exc:
            raise Unavailable(self._scrub(_describe(exc))) from None
        if response.status_code == httpx.codes.NO_CONTENT:
            return {}
        data = _json(response)
        if response.is_success:
            if data is None:
                raise Unavailable(f"HTTP {response.status_code} with a body that is not JSON")
            return data
        raise self._error(response.status_code, data)

    def _error(self, status: int, data: dict[str, Any] | None) -> VaultError:
        errors = (data or {}).get("errors")
        messages = [str(e).strip() for e in errors] if isinstance(errors, list) else []
        # Vault wraps some messages in go-multierror's "1 error occurred:\n\t* ...".
        text = "; ".join(_unwrap(m) for m in messages if m) or f"HTTP {status}"
        reason = self._scrub(text)
        if status == _TOO_MANY_REQUESTS or status >= 500:
            return Unavailable(reason, status)
        if status == _FORBIDDEN:
            return VaultDenied(reason, status)
        return VaultRejected(reason, status)

    def _scrub(self, text: str) -> str:
        return redact_text(text, [s for s in self._secrets() if s])


def _json(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _unwrap(message: str) -> str:
    lines = [line.strip().removeprefix("* ") for line in message.splitlines()]
    lines = [line for line in lines if line and not line.endswith("error occurred:")]
    lines = [line for line in lines if not line.endswith("errors occurred:")]
    return "; ".join(lines) if lines else message


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
