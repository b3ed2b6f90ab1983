"""What strategies share: option checks, jittered exponential backoff, a TLS context from
certificate files, and text safe to put in a message.

The built-in strategies use it; third-party ones may, so that their errors read like the
built-in ones::

    from aiohotload.strategies.toolkit import Backoff, OptionReader, describe_error, quoted

    opts = OptionReader("vault", options, known=("interval", "timeout", "tls"))
    interval = opts.duration("interval", 60.0)   # "30s", "500ms", "1m"; > 0 unless allow_zero
    tls = opts.boolean("tls", True)
    retries = opts.integer("retries", 3, minimum=0, maximum=10)

    backoff = Backoff(first=0.5, maximum=30.0)
    await anyio.sleep(backoff.delay(failures))   # 0.5, 1, 2, ... 30 s, each spread by +-20%

    verify = tls_context(opts.text("ca_file"), opts.text("cert_file"), opts.text("key_file"))

Every message names the option and quotes what was given through :func:`quoted`, which
hides password patterns and cuts long text.
"""

from __future__ import annotations

import random
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import InvalidOptionError
from ..redact import error_text, redact_text
from ..url import parse_bool, parse_duration

__all__ = [
    "Backoff",
    "OptionReader",
    "check_options",
    "describe_error",
    "quoted",
    "tls_context",
]

_WHOLE_NUMBER = re.compile(r"\s*([0-9]+)\s*")


def quoted(text: str, limit: int = 80) -> str:
    """*text* as a message may quote it: password patterns redacted, then cut to *limit*
    characters, in quotes (``repr``, so control characters are escaped)."""
    # Redacted before it is cut, so a cut cannot separate a password from what marks it.
    shown = redact_text(text)
    if len(shown) > limit:
        shown = shown[: limit - 3] + "..."
    return repr(shown)


def describe_error(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """A one-line description of *exc*: the operating system's reason for an
    :class:`OSError` that has one, else ``Type: message`` (or ``Type``); *secrets* and any
    password pattern removed."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else error_text(exc)
    return redact_text(text, tuple(secrets))


def check_options(strategy: str, options: Mapping[str, str], known: Iterable[str]) -> None:
    """Raise :class:`~aiohotload.InvalidOptionError` for the first option of *options* not
    in *known*, naming the known ones (or saying that *strategy* takes none)."""
    names = sorted(set(known))
    unknown = [name for name in options if name not in names]
    if not unknown:
        return
    if not names:
        given = ", ".join(quoted(name) for name in sorted(unknown))
        raise InvalidOptionError(f"the {strategy} strategy takes no options; got {given}")
    raise InvalidOptionError(
        f"unknown option {quoted(unknown[0])} for the {strategy} strategy; "
        f"known: {', '.join(names)}"
    )


class OptionReader:
    """A strategy's options, checked: unknown names are refused at once, and each getter
    parses one option (or returns its default when it is not given)."""

    def __init__(self, strategy: str, options: Mapping[str, str], known: Iterable[str]) -> None:
        """Raise :class:`~aiohotload.InvalidOptionError` if *options* holds a name not in
        *known* (which lists every accepted spelling)."""
        check_options(strategy, options, known)
        self.strategy = strategy
        self._options = options

    def __contains__(self, name: object) -> bool:
        return name in self._options

    def text(self, name: str, *aliases: str) -> str | None:
        """The value of *name* as given, or None; *aliases* are other spellings of it, of
        which at most one may be given."""
        given = [n for n in (name, *aliases) if n in self._options]
        if len(given) > 1:
            spelled = " and ".join(repr(n) for n in given)
            raise InvalidOptionError(f"options {spelled} mean the same; give one")
        return self._options[given[0]] if given else None

    def duration(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        """Seconds: ``30``, ``2.5``, ``500ms``, ``30s``, ``1m``, ``1h``; more than 0 unless
        *allow_zero*."""
        value = self.text(name)
        return default if value is None else parse_duration(name, value, allow_zero=allow_zero)

    def boolean(self, name: str, default: bool, *aliases: str) -> bool:
        """``true/false``, ``1/0``, ``yes/no``, ``on/off``; *aliases* as for :meth:`text`."""
        given = [n for n in (name, *aliases) if n in self._options]
        value = self.text(name, *aliases)
        return default if value is None else parse_bool(given[0], value)

    def integer(
        self, name: str, default: int, *, minimum: int, maximum: int, unit: str = ""
    ) -> int:
        """A whole number from *minimum* to *maximum*; *unit* (e.g. ``"milliseconds"``)
        only words the error."""
        value = self.text(name)
        if value is None:
            return default
        m = _WHOLE_NUMBER.fullmatch(value)
        number = int(m.group(1)) if m else minimum - 1
        if not minimum <= number <= maximum:
            of = f" of {unit}" if unit else ""
            raise InvalidOptionError(
                f"option {name!r} must be a whole number{of} from {minimum} to {maximum}; "
                f"got {quoted(value)}"
            )
        return number


@dataclass(frozen=True)
class Backoff:
    """Delays between retries: *first* seconds after the first failure, doubling with each
    failure in a row up to *maximum*, each spread at random by +-*jitter* (a fraction), so
    that many processes retrying after one outage do not retry in lockstep.

    With *below*, the spread is drawn below the nominal delay only, from ``1 - jitter`` to 1
    times it ("equal jitter" with ``jitter=0.5``): a delay never exceeds its nominal value,
    for a caller whose retries must fit before a deadline (the vault strategy's leases).
    """

    first: float
    maximum: float
    jitter: float = 0.2
    below: bool = False

    def delay(self, failures: int, *, jitter: bool = True) -> float:
        """Seconds to wait after the *failures*-th failure in a row (1 or more); without
        *jitter*, the nominal delay (the middle of the spread, or its top with *below*), for
        messages."""
        # The exponent is capped so that a long outage cannot overflow the float.
        base = min(self.maximum, self.first * 2.0 ** min(max(failures, 1) - 1, 64))
        if not jitter:
            return base
        return base * random.uniform(1 - self.jitter, 1 if self.below else 1 + self.jitter)


def tls_context(
    ca_file: str | None,
    cert_file: str | None = None,
    key_file: str | None = None,
    *,
    ca_option: str = "option 'ca_file'",
    cert_option: str | None = None,
) -> ssl.SSLContext:
    """A TLS context that verifies servers against the CA bundle *ca_file* (else the
    system's) and, given *cert_file*, presents that client certificate (its key in
    *key_file*, else in *cert_file*); all PEM files.

    Raises :class:`~aiohotload.InvalidOptionError` if a file cannot be loaded, naming
    *ca_option* or *cert_option* (by default ``option 'cert_file'``, or ``options 'cert_file'
    and 'key_file'`` when a key file is given): how the user spelled what was wrong.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidOptionError(
            f"{ca_option}: cannot load {ca_file!r}: {describe_error(exc)}"
        ) from None
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            if cert_option is None:
                cert_option = (
                    "option 'cert_file'"
                    if key_file is None
                    else "options 'cert_file' and 'key_file'"
                )
            raise InvalidOptionError(
                f"{cert_option}: cannot load the client certificate: {describe_error(exc)}"
            ) from None
    return context
