"""The ``awssm`` strategy: a DSN kept in AWS Secrets Manager, polled for rotations.

``awssm://postgres/prod/app/db?region=eu-west-1&interval=60s`` reads secret ``prod/app/db``
(a name or an ARN). The secret is either a DSN or the JSON object AWS rotation functions
write for RDS (``engine``, ``host``, ``port``, ``username``, ``password``, ``dbname``).
Secrets Manager has no change notification, so the strategy polls ``GetSecretValue`` for the
version holding the ``AWSCURRENT`` label, which a rotation moves once it has finished.

It needs ``aiobotocore`` (``pip install 'aiohotload[aws]'``), imported only when a pool uses
the strategy, so the entry point loads (and ``awssm`` is listed) without it. Credentials come
from the standard AWS chain: environment, shared files, container or instance roles.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio

from ..errors import InvalidOptionError, InvalidURLError, SourceError, StrategyError
from ..redact import redact_dsn, redact_text
from ._secret import SecretFormatError, dsn_from_secret
from .feedback import Feedback
from .toolkit import Backoff, OptionReader, describe_error, quoted

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient

__all__ = ["AwsSecretsManagerStrategy"]

logger = logging.getLogger(__name__)

_KNOWN_OPTIONS = ("endpoint_url", "interval", "region", "timeout", "version_stage")
_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# Polls are spread by up to this fraction of the interval, so replicas started together do
# not call the API in lockstep (Secrets Manager's quota is per account and region).
_JITTER = 0.1
# Longest wait between polls while throttled or failing, unless the interval is longer.
_MAX_BACKOFF = 300.0
# Errors that mean "slow down" or "try again": backed off, not just reported.
_THROTTLED = frozenset(
    {"ThrottlingException", "TooManyRequestsException", "Throttling", "RequestLimitExceeded"}
)
_TRANSIENT = frozenset(
    {"InternalServiceError", "InternalFailure", "ServiceUnavailable", "RequestTimeout"}
)
# Polls asked for by the pool come no sooner than this after the last poll.
_MIN_POLL_GAP = 1.0
# Bounds closing the client when the pool stops.
_CLOSE_TIMEOUT = 5.0
# Attempts botocore makes per poll (its "standard" retry mode backs off between them).
_ATTEMPTS = 3


@dataclass(frozen=True)
class _Options:
    region: str | None = None
    interval: float = 60.0
    endpoint_url: str | None = None
    version_stage: str = "AWSCURRENT"
    timeout: float = 10.0


@dataclass(frozen=True)
class _Version:
    version_id: str | None
    text: str


class AwsSecretsManagerStrategy:
    """Yields the DSN in an AWS Secrets Manager secret: its current value, then each rotation.

    The URL's path is the secret's name or ARN. Options:

    - ``region``: the AWS region (default: the standard chain, e.g. ``AWS_REGION``).
    - ``interval`` (default 60 s): time between polls, with a little jitter; doubled after
      each throttled or failed poll, up to 5 minutes (or the interval, if longer).
    - ``version_stage`` (default ``AWSCURRENT``): the staging label to follow.
    - ``endpoint_url``: another endpoint (a VPC endpoint, LocalStack, moto).
    - ``timeout`` (default 10 s): longest one poll may take, botocore's retries included.

    A secret deleted, denied or unreadable later is logged and the current DSN kept. The
    secret's value is never logged unredacted nor put in an exception.

    When the pool asks (*feedback*: a login with the current DSN was refused, as in the
    window of a single-user rotation), the secret is polled at once rather than at the next
    interval; never sooner than 1 s after the last poll, nor while backing off after a
    throttled or failed one, so the account's API quota is respected.
    """

    async def watch(
        self, path: str, options: Mapping[str, str], *, feedback: Feedback | None = None
    ) -> AsyncGenerator[str, None]:
        """Yield the DSN in secret *path*, then each new DSN, until closed.

        Raises :class:`~aiohotload.InvalidOptionError`, :class:`~aiohotload.InvalidURLError`,
        :class:`~aiohotload.StrategyError` if aiobotocore is missing, or, if the secret cannot
        be read at start (missing, deleted, access denied), :class:`~aiohotload.SourceError`.
        """
        opts = _parse_options(options)
        secret_id = _secret_id(path)
        what = f"AWS secret {secret_id!r} ({opts.version_stage})"
        stack = contextlib.AsyncExitStack()
        try:
            client = await _open_client(stack, opts)
            current, seen = await _first_dsn(client, secret_id, opts, what)
            logger.info("DSN from %s, version %s: %s", what, seen, redact_dsn(current))
            yield current

            failures = 0  # consecutive throttled or transient failures, for the backoff
            last_failure: str | None = None
            while True:
                await _until_next_poll(time.monotonic(), opts.interval, failures, feedback, what)
                try:
                    version = await _read(client, secret_id, opts)
                except _ReadError as exc:
                    failures = failures + 1 if exc.transient else 0
                    # A warning per distinct failure: polling a deleted secret every few
                    # seconds must not flood the log.
                    level = logging.DEBUG if exc.reason == last_failure else logging.WARNING
                    logger.log(
                        level,
                        "cannot read %s: %s; keeping the current DSN, next poll in %.1fs",
                        what,
                        exc.reason,
                        _delay(opts.interval, failures, jitter=False),
                    )
                    last_failure = exc.reason
                    continue
                failures = 0
                if last_failure is not None:
                    logger.info("%s can be read again", what)
                    last_failure = None
                if version.version_id is not None and version.version_id == seen:
                    logger.debug("%s unchanged, version %s", what, seen)
                    continue
                # A version with an unusable value is reported once, not at every poll.
                seen = version.version_id
                try:
                    dsn = dsn_from_secret(version.text)
                except SecretFormatError as exc:
                    logger.warning(
                        "%s, version %s, %s; keeping the current DSN", what, seen, exc.reason
                    )
                    continue
                if dsn == current:
                    continue
                current = dsn
                logger.info("new DSN from %s, version %s: %s", what, seen, redact_dsn(current))
                yield current
        finally:
            # Shielded: a cancelled pool must still close the client's HTTP connections.
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await stack.aclose()


async def _first_dsn(
    client: SecretsManagerClient, secret_id: str, opts: _Options, what: str
) -> tuple[str, str | None]:
    """The DSN in the secret and its version id; SourceError if it cannot be had."""
    try:
        version = await _read(client, secret_id, opts)
        return dsn_from_secret(version.text), version.version_id
    except _ReadError as exc:
        raise SourceError(f"cannot read {what}: {exc.reason}") from None
    except SecretFormatError as exc:
        raise SourceError(f"{what} {exc.reason}") from None


async def _until_next_poll(
    polled_at: float, interval: float, failures: int, feedback: Feedback | None, what: str
) -> None:
    """Wait until the next poll is due: the interval (or the backoff) after the poll at
    *polled_at*, or sooner if the pool asks for it."""
    due = polled_at + _delay(interval, failures)
    while (left := due - time.monotonic()) > 0:
        if feedback is None:
            await anyio.sleep(left)
            return
        news = await feedback.wait(left)  # released DSNs need nothing: no lease to free
        if news.refresh:
            due = _next_poll(polled_at, due, asked=True, backing_off=failures > 0)
            wait = max(0.0, due - time.monotonic())
            logger.debug("the pool asked for a fresh %s; polling in %.1fs", what, wait)


def _next_poll(polled_at: float, due: float, *, asked: bool, backing_off: bool) -> float:
    """When the next poll is due, given that it was due at *due*, when the last poll was at
    *polled_at*, and whether the pool *asked* for a fresh value."""
    if not asked or backing_off:
        return due  # throttled or failing: polling sooner would make it worse
    return min(due, polled_at + _MIN_POLL_GAP)


class _ReadError(Exception):
    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


async def _open_client(stack: contextlib.AsyncExitStack, opts: _Options) -> SecretsManagerClient:
    try:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        from botocore.exceptions import BotoCoreError, NoRegionError
    except ImportError:
        raise StrategyError(
            "the awssm strategy needs aiobotocore: pip install 'aiohotload[aws]'"
        ) from None
    config = AioConfig(
        connect_timeout=opts.timeout,
        read_timeout=opts.timeout,
        retries={"mode": "standard", "total_max_attempts": _ATTEMPTS},
    )
    creator = get_session().create_client(
        "secretsmanager",
        region_name=opts.region,
        endpoint_url=opts.endpoint_url,
        config=config,
    )
    try:
        return await stack.enter_async_context(creator)
    except NoRegionError:
        raise SourceError(
            "no AWS region for the awssm strategy: set option 'region' or AWS_REGION"
        ) from None
    except BotoCoreError as exc:
        raise SourceError(f"cannot create an AWS Secrets Manager client: {exc}") from None


async def _read(client: SecretsManagerClient, secret_id: str, opts: _Options) -> _Version:
    """The secret's value at the wanted stage; _ReadError, whose reason holds no secret."""
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        with anyio.fail_after(opts.timeout):
            response = await client.get_secret_value(
                SecretId=secret_id, VersionStage=opts.version_stage
            )
    except TimeoutError:
        raise _ReadError(f"no answer within {opts.timeout:g}s", transient=True) from None
    except ClientError as exc:
        raise _client_error(exc.response) from None
    except (BotoConnectionError, HTTPClientError) as exc:
        raise _ReadError(describe_error(exc), transient=True) from None
    except BotoCoreError as exc:  # no credentials, a bad profile, ...
        raise _ReadError(describe_error(exc)) from None
    version_id = response.get("VersionId")
    text = response.get("SecretString")
    if text is None:
        binary = response.get("SecretBinary")
        if binary is None:
            raise _ReadError("the version has neither SecretString nor SecretBinary")
        try:
            text = binary.decode("utf-8")
        except UnicodeDecodeError:
            raise _ReadError("SecretBinary is not UTF-8 text") from None
    return _Version(version_id, text)


def _client_error(response: Any) -> _ReadError:
    error = response.get("Error", {}) if isinstance(response, dict) else {}
    code = str(error.get("Code") or "UnknownError")
    # AWS's messages name the secret and the reason, not the value; scrubbed all the same.
    message = redact_text(str(error.get("Message") or "").strip().rstrip("."))
    reason = f"{code}: {message}" if message else code
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    server_fault = isinstance(status, int) and status >= 500
    return _ReadError(reason, transient=code in _THROTTLED or code in _TRANSIENT or server_fault)


def _delay(interval: float, failures: int, *, jitter: bool = True) -> float:
    """Seconds until the next poll: *interval*, doubled per consecutive failure, capped."""
    backoff = Backoff(first=interval, maximum=max(interval, _MAX_BACKOFF), jitter=_JITTER)
    return backoff.delay(failures + 1, jitter=jitter)


def _secret_id(path: str) -> str:
    # parse_url keeps the path's leading '/': 'awssm://postgres/prod/db' -> '/prod/db'.
    secret_id = path[1:] if path.startswith("/") else path
    if not secret_id:
        raise InvalidURLError("the awssm strategy needs a secret: 'awssm://postgres/<secret-id>'")
    if len(secret_id) > 2048:  # AWS's own limit on a SecretId
        raise InvalidURLError(f"secret id {quoted(secret_id)} is longer than 2048 characters")
    return secret_id


def _parse_options(options: Mapping[str, str]) -> _Options:
    opts = OptionReader("awssm", options, _KNOWN_OPTIONS)
    defaults = _Options()
    region = opts.text("region")
    if region is not None and not _REGION.fullmatch(region.strip()):
        raise InvalidOptionError(
            f"option 'region' must be an AWS region such as 'us-east-1'; got {quoted(region)}"
        )
    stage = opts.text("version_stage")
    if stage is not None and not 0 < len(stage.strip()) <= 256:
        raise InvalidOptionError(
            "option 'version_stage' must be a staging label of 1 to 256 characters, "
            f"such as AWSCURRENT; got {quoted(stage)}"
        )
    endpoint_url = opts.text("endpoint_url")
    return _Options(
        region=region.strip() if region is not None else defaults.region,
        interval=opts.duration("interval", defaults.interval),
        endpoint_url=_endpoint(endpoint_url) if endpoint_url is not None else None,
        version_stage=stage.strip() if stage is not None else defaults.version_stage,
        timeout=opts.duration("timeout", defaults.timeout),
    )


def _endpoint(value: str) -> str:
    url = value.strip()
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        valid = False
    if not valid:
        raise InvalidOptionError(
            "option 'endpoint_url' must be an http:// or https:// URL with a host; "
            f"got {quoted(value)}"
        )
    return url
