"""The ``etcd`` strategy: the value of an etcd key, its changes seen through a shared watch."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping

from ...errors import SourceError
from ...redact import redact_dsn
from ._client import DeniedError, Event, Read, UnavailableError
from ._options import key_of, parse_options
from ._shared_watch import subscribe

__all__ = ["EtcdStrategy"]

logger = logging.getLogger("aiohotload.strategies.etcd")

# A DSN is short; the cap stops a key holding something else from filling memory.
_MAX_BYTES = 64 * 1024


class EtcdStrategy:
    """Yields the value of an etcd key: its current value, then each change, seen by watch.

    The URL's path after the driver is the key: ``etcd://postgres/app/dsn`` reads ``app/dsn``,
    ``etcd://postgres//app/dsn`` reads ``/app/dsn``. Options:

    - ``endpoints`` (default ``127.0.0.1:2379``): comma-separated ``host:port`` or
      ``http(s)://host:port``; on a failure the next one is used.
    - ``timeout`` (default 5 s): bound of each request, e.g. ``2s``, ``500ms``.
    - ``keepalive`` (default 10 s): a watch silent this long is checked with a read through
      the same member (bounded by ``timeout``); a member that does not answer is left for the
      next. ``0`` turns the check off.
    - ``ca_file``, ``cert_file``, ``key_file``: TLS; bare endpoints then use https.
    - ``user``, ``password``: etcd authentication.

    Pools on one event loop following the same key with the same options share one watch
    (one stream, one connection). A deleted, empty or unreadable value is logged and the
    current DSN kept until a good value is put again. The DSN and etcd's password are never
    logged unredacted. A pool's requests to look again (a refused login) need no answer: the
    watch already delivers every change as it happens, so the strategy takes no feedback.
    """

    async def watch(self, path: str, options: Mapping[str, str]) -> AsyncGenerator[str, None]:
        """Yield the DSN in etcd key *path*, then each new DSN, until closed.

        Raises :class:`~aiohotload.InvalidOptionError` or, if the key cannot be read at
        start (missing, empty, etcd unreachable), :class:`~aiohotload.SourceError`. Later
        connection failures are retried forever; refused credentials or permissions raise
        :class:`~aiohotload.StrategyError`.
        """
        opts = parse_options(options)
        key = key_of(path)
        async with subscribe(opts, key) as sub:
            try:
                read = await sub.first_read()
            except (UnavailableError, DeniedError) as exc:
                raise SourceError(f"cannot read etcd key {key!r}: {exc.reason}") from None
            current = _start_value(key, read)
            yield current
            while True:
                event = await sub.next_event()
                if (dsn := _new_value(key, event, current)) is not None:
                    current = dsn
                    yield dsn


def _new_value(key: str, event: Event, current: str) -> str | None:
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


def _start_value(key: str, read: Read) -> str:
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
