"""The ``vault`` strategy: DSNs from HashiCorp Vault or OpenBao, leases and all."""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import AsyncGenerator, Mapping

import anyio

from ...errors import SourceError
from ...redact import redact_dsn
from ..feedback import Feedback
from ..toolkit import tls_context
from ._auth import Authenticator
from ._client import VaultClient, VaultDenied, VaultError
from ._dynamic import DynamicCredentials
from ._kv import KvSecret
from ._options import Kind, SecretPath, VaultOptions, parse_options, parse_path
from ._source import Source
from ._static import StaticCredentials

__all__ = ["VaultStrategy"]

logger = logging.getLogger("aiohotload.strategies.vault")

# Revoking leases and tokens at close is bounded by this (the reloader allows 5 s).
_CLOSE_TIMEOUT = 4.0
# Shortest sleep between two steps: a guard against a busy loop, far below any TTL.
_MIN_SLEEP = 0.05
_SOURCES: dict[Kind, type[DynamicCredentials | StaticCredentials | KvSecret]] = {
    Kind.DYNAMIC: DynamicCredentials,
    Kind.STATIC: StaticCredentials,
    Kind.KV: KvSecret,
}


class VaultStrategy:
    """Yields DSNs built from a Vault (or OpenBao) secret, following it for its whole life.

    The path names the secret: ``<mount>/creds/<role>`` (dynamic database credentials),
    ``<mount>/static-creds/<role>`` (a static role) or ``<mount>/data/<path>`` (KV v2).
    Dynamic leases are renewed, replaced before they end and revoked once the pool no longer
    uses them; static passwords are re-read when Vault rotates them; KV versions are polled.
    The options are described in the README ("Vault / OpenBao"). No token, secret id, JWT or
    password is ever logged or put in an exception.
    """

    async def watch(
        self, path: str, options: Mapping[str, str], *, feedback: Feedback | None = None
    ) -> AsyncGenerator[str, None]:
        """Yield the secret's DSN, then each new one, until closed.

        Raises :class:`~aiohotload.InvalidURLError` or :class:`~aiohotload.InvalidOptionError`
        for a bad path or option, and :class:`~aiohotload.SourceError` if the first DSN cannot
        be had (Vault unreachable or sealed, login refused, permission denied, no such role).
        Later failures keep the current DSN and are retried with backoff.
        """
        secret = parse_path(path)
        opts = parse_options(options, secret.kind)
        verify = _ssl_context(opts)
        auth: Authenticator | None = None
        client = VaultClient(
            opts.addr,
            namespace=opts.namespace,
            timeout=opts.timeout,
            verify=verify,
            secrets=lambda: auth.secrets() if auth is not None else (),
        )
        auth = Authenticator(client, opts)
        source: Source = _SOURCES[secret.kind](client, auth, secret, opts)
        try:
            dsn = await _start(auth, source, secret, opts)
            logger.info("DSN from %s at %s: %s", secret, opts.where, redact_dsn(dsn))
            yield dsn
            while True:
                wake = min(auth.due(), source.due())
                delay = max(_MIN_SLEEP, wake - auth.clock()) if math.isfinite(wake) else None
                if feedback is not None:
                    news = await feedback.wait(delay)
                    for released in news.released:
                        source.release(released)
                    if news.refresh:
                        source.refresh(auth.clock())
                elif delay is None:
                    await anyio.sleep_forever()
                else:
                    await anyio.sleep(delay)
                now = auth.clock()
                await auth.step(now)
                new = await source.step(now)
                if feedback is not None:  # the pool shows it as its last_error
                    feedback.trouble(source.trouble or auth.trouble)
                if new is not None:
                    yield new
        finally:
            # Shielded: the pool cancels the watch when it closes, and the leases it released
            # must still be revoked.
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                if feedback is not None:
                    for released in feedback.take().released:
                        source.release(released)
                idle = await source.close()
                # A token we logged in for takes its leases with it; only once none is in use.
                await auth.close(revoke=idle)
            with anyio.CancelScope(shield=True):
                await client.aclose()


async def _start(
    auth: Authenticator, source: Source, secret: SecretPath, opts: VaultOptions
) -> str:
    """The first DSN; SourceError naming what failed (never a token)."""
    try:
        await auth.start()
    except VaultError as exc:
        raise SourceError(
            f"cannot authenticate to Vault at {opts.where} ({auth.method}): {exc.reason}"
        ) from None
    try:
        return await source.start()
    except VaultDenied as exc:
        raise SourceError(
            f"permission denied reading {secret} from Vault at {opts.where}: {exc.reason} "
            f"(check the token's policies; auth: {auth.method})"
        ) from None
    except VaultError as exc:
        raise SourceError(
            f"cannot read {secret} from Vault at {opts.where}: {exc.reason}"
        ) from None


def _ssl_context(opts: VaultOptions) -> ssl.SSLContext | bool:
    """The TLS context for the CA and client certificate options, or True (the defaults)."""
    if not (opts.ca_file or opts.cert_file):
        return True
    return tls_context(
        opts.ca_file,
        opts.cert_file,
        opts.key_file,
        ca_option="option 'ca_file' (or VAULT_CACERT)",
        cert_option="option 'cert_file' (or VAULT_CLIENT_CERT)",
    )
