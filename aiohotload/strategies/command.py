"""The ``exec`` strategy: a DSN printed by a program, run again every ``interval``.

``exec://postgres/usr/local/bin/db-dsn?interval=30s&args=--role%20app`` runs
``/usr/local/bin/db-dsn --role app`` (no shell) and reads the DSN from its standard output,
the pattern of AWS ``credential_process`` helpers and ``vault read`` wrappers. Output that is
a JSON object of the AWS shape (``host``, ``port``, ``username``, ``password``, ``dbname``)
is turned into a DSN.

The program's standard error is treated as secret-bearing: a helper run with ``set -x``
prints the fresh password there, under any name. By default only how much it wrote is said;
``show_stderr=true`` shows its end, scrubbed of every password that can be recognised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

import anyio

from ..errors import InvalidOptionError, InvalidURLError, SourceError
from ..redact import redact_dsn, redact_text, secrets_of
from ._secret import SecretFormatError, dsn_from_secret, passwords_in_secret
from .feedback import Feedback
from .toolkit import Backoff, OptionReader, describe_error, quoted

__all__ = ["ExecStrategy"]

logger = logging.getLogger(__name__)

_KNOWN_OPTIONS = ("args", "interval", "show_stderr", "timeout")
# A DSN is short; the cap stops a chatty program from filling memory.
_MAX_OUTPUT = 64 * 1024
# How much of the (redacted) standard error goes into a warning or an error.
_MAX_STDERR_SHOWN = 500
# Runs are spread by up to this fraction of the interval, so replicas started together do
# not all call the secret store at the same moment.
_JITTER = 0.1
# Bounds the wait for a killed process to be reaped, so a cancelled pool still closes.
_REAP_TIMEOUT = 5.0
# A refresh the pool asks for (a refused login) runs the program at once, but never sooner
# than this after the previous run began: a wrong password must not become a storm of runs.
_REFRESH_FLOOR = 1.0


@dataclass(frozen=True)
class _Options:
    interval: float = 30.0
    timeout: float = 10.0
    args: tuple[str, ...] = ()
    show_stderr: bool = False


class ExecStrategy:
    """Yields the DSN a program prints: at start, then whenever a later run prints another.

    The URL's path is the program's absolute path. Options:

    - ``interval`` (default 30 s): time between runs, with a little jitter.
    - ``timeout`` (default 10 s): longest a run may take; its process group is then killed.
    - ``args``: the program's arguments as one string, split like a shell would (no shell
      runs); percent-encode it in the URL (a space is ``%20``).
    - ``show_stderr`` (default false): on a failed run, show the end of the program's
      standard error, scrubbed, rather than only how many lines it wrote.

    The program inherits the environment, and its standard output, stripped, is the DSN. A
    failed run (non-zero exit, timeout, empty output) keeps the current DSN and logs a
    warning. When the pool asks for a refresh (a refused login), the program runs at once,
    but at most once a second.
    """

    async def watch(
        self, path: str, options: Mapping[str, str], *, feedback: Feedback | None = None
    ) -> AsyncGenerator[str, None]:
        """Yield the DSN the program at *path* prints, then each new one, until closed.

        Raises :class:`~aiohotload.InvalidOptionError`, :class:`~aiohotload.InvalidURLError`
        or, if the first run fails, :class:`~aiohotload.SourceError`.
        """
        opts = _parse_options(options)
        program = _program(path)
        started = time.monotonic()
        try:
            current = await _run(program, opts, known="")
        except _RunError as exc:
            raise SourceError(f"command {program!r} {exc.reason}") from None
        logger.info("DSN from command %s: %s", program, redact_dsn(current))
        yield current

        last_failure: str | None = None
        while True:
            due = time.monotonic() + _pause(opts.interval)
            await _wait(program, due, started, feedback)
            started = time.monotonic()
            try:
                value = await _run(program, opts, known=current)
            except _RunError as exc:
                # A warning per distinct failure: a program failing the same way every few
                # seconds must not flood the log.
                level = logging.DEBUG if exc.reason == last_failure else logging.WARNING
                logger.log(level, "command %s %s; keeping the current DSN", program, exc.reason)
                last_failure = exc.reason
                continue
            if last_failure is not None:
                logger.info("command %s succeeded again", program)
                last_failure = None
            if value == current:
                logger.debug("command %s printed the current DSN again", program)
                continue
            current = value
            logger.info("new DSN from command %s: %s", program, redact_dsn(current))
            yield current


async def _wait(program: str, due: float, started: float, feedback: Feedback | None) -> None:
    """Sleep until *due* (``time.monotonic()``), or less if the pool asks for a refresh: then
    until ``_REFRESH_FLOOR`` after *started*, when the last run began."""
    while (remaining := due - time.monotonic()) > 0:
        if feedback is None:
            await anyio.sleep(remaining)
            return
        news = await feedback.wait(remaining)
        if news.refresh and due > started + _REFRESH_FLOOR:
            due = started + _REFRESH_FLOOR
            logger.debug("refresh asked for: running command %s now", program)


class _RunError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Capture:
    """The first (or, with *tail*, the last) *limit* bytes a stream gave, and how many lines
    it had. Everything is read, so the program never blocks on a full pipe; the rest is
    dropped."""

    def __init__(self, limit: int, *, tail: bool = False) -> None:
        self.limit = limit
        self.tail = tail
        self.data = bytearray()
        self.size = 0
        self.newlines = 0
        self.blank = True  # nothing but whitespace so far
        self.last = b"\n"

    async def drain(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while chunk := await stream.read(_MAX_OUTPUT):
            self.size += len(chunk)
            self.newlines += chunk.count(b"\n")
            self.blank = self.blank and not chunk.strip()
            self.last = chunk[-1:]
            if self.tail:
                self.data = (self.data + chunk)[-self.limit :]
            else:
                self.data += chunk[: max(0, self.limit - len(self.data))]

    @property
    def lines(self) -> int:
        return self.newlines + (self.last != b"\n")

    @property
    def overflowed(self) -> bool:
        return self.size > self.limit


async def _run(program: str, opts: _Options, *, known: str) -> str:
    """Run the program once; the DSN it printed, or _RunError whose reason holds no secret.

    *known* is the current DSN, whose password is scrubbed from the program's error output.
    """
    proc = await _launch(program, opts.args)
    # Standard error's end is kept: that is where programs say what finally went wrong.
    out, err = _Capture(_MAX_OUTPUT), _Capture(_MAX_OUTPUT, tail=True)
    reaped = False
    try:
        with anyio.fail_after(opts.timeout):
            await asyncio.gather(out.drain(proc.stdout), err.drain(proc.stderr))
            code = await proc.wait()
        reaped = True
    except TimeoutError:
        reason = f"did not finish within {opts.timeout:g}s (timeout) and was killed"
        raise _RunError(reason + _stderr_note(err, out, known, opts)) from None
    finally:
        if not reaped:
            # Timed out or cancelled: nothing it started may outlive the run.
            await _kill_and_reap(proc)
    return _dsn_printed(code, out, err, known, opts)


async def _launch(program: str, args: tuple[str, ...]) -> asyncio.subprocess.Process:
    """The program started; _RunError saying why it cannot be."""
    try:
        return await _start(program, args)
    except FileNotFoundError:
        raise _RunError("does not exist") from None
    except PermissionError:
        raise _RunError("cannot be run: permission denied (is it executable?)") from None
    except OSError as exc:
        raise _RunError(f"cannot be run: {describe_error(exc)}") from None


def _dsn_printed(code: int, out: _Capture, err: _Capture, known: str, opts: _Options) -> str:
    """The DSN a run that ended with exit status *code* printed; _RunError if it failed."""
    if code != 0:
        if code < 0:
            status = f"was killed by signal {_signal_name(-code)}"
        else:
            status = f"exited with status {code}"
        raise _RunError(status + _stderr_note(err, out, known, opts))
    if out.overflowed:
        raise _RunError(f"printed more than {_MAX_OUTPUT} bytes")
    try:
        text = out.data.decode("utf-8")
    except UnicodeDecodeError:
        raise _RunError("printed output that is not valid UTF-8") from None
    if not text.strip():
        raise _RunError("printed no DSN" + _stderr_note(err, out, known, opts))
    try:
        return dsn_from_secret(text)
    except SecretFormatError as exc:
        raise _RunError(f"printed output that {exc.reason}") from None


def _stderr_note(err: _Capture, out: _Capture, known: str, opts: _Options) -> str:
    """'; stderr: ...' about the program's error output: how many lines it wrote or, with
    ``show_stderr``, its end with passwords scrubbed.

    Scrubbing runs on the event loop: it is linear in what was kept of each stream (at most
    64 KiB), a few milliseconds at worst. A worker thread stalled the loop longer, the work
    holding the interpreter lock (``benchmarks/redaction.py`` measures the stall).
    """
    if err.blank:
        return ""
    if not opts.show_stderr:
        lines = "1 line" if err.lines == 1 else f"{err.lines} lines"
        return f"; stderr: {lines}, not shown (may hold secrets; show_stderr=true shows them)"
    return "; stderr: " + _scrubbed_tail(bytes(err.data), bytes(out.data), known)


def _scrubbed_tail(err: bytes, out: bytes, known: str) -> str:
    """The end of the error output *err*, one line, every password found scrubbed: those of
    the current DSN *known* and of what the program printed (*out*), in whole or in part,
    and anything shaped like one. Linear in the sizes."""
    text = err.decode("utf-8", "replace")
    printed = out.decode("utf-8", "replace")
    secrets = (*secrets_of(known), *secrets_of(printed), *passwords_in_secret(printed))
    # Scrubbed before it is cut, so a cut cannot split a password from what marks it.
    scrubbed = redact_text(text, secrets, pieces=True)
    shown = " | ".join(line.strip() for line in scrubbed.splitlines() if line.strip())
    if len(shown) > _MAX_STDERR_SHOWN:
        shown = "..." + shown[-(_MAX_STDERR_SHOWN - 3) :]
    return shown


async def _start(program: str, args: tuple[str, ...]) -> asyncio.subprocess.Process:
    starting = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            program,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # A process group of its own, so a timeout also kills what the program started.
            start_new_session=True,
        )
    )
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        # Cancelled while the program starts. Left alone, asyncio would kill the program but
        # not what it started, then wait for the pipes those keep open. Let the start finish
        # and kill the whole group instead.
        with anyio.move_on_after(_REAP_TIMEOUT, shield=True):
            with contextlib.suppress(OSError):
                await _kill_and_reap(await starting)
        if not starting.done():
            starting.cancel()
        raise


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    """Kill *proc* and its process group, then wait for it, so no zombie is left."""
    killpg = getattr(os, "killpg", None)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if killpg is not None:
            killpg(proc.pid, signal.SIGKILL)
        else:  # Windows: no process groups to kill
            proc.kill()
    with anyio.move_on_after(_REAP_TIMEOUT, shield=True):
        await proc.wait()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _pause(interval: float) -> float:
    """Seconds from one run to the next: *interval*, spread by +-``_JITTER``."""
    return Backoff(first=interval, maximum=interval, jitter=_JITTER).delay(1)


def _program(path: str) -> str:
    if not os.path.isabs(path):
        raise InvalidURLError(
            f"the exec strategy needs the program's absolute path; got {quoted(path)}"
        )
    return path


def _parse_options(options: Mapping[str, str]) -> _Options:
    opts = OptionReader("exec", options, _KNOWN_OPTIONS)
    defaults = _Options()
    args = opts.text("args")
    return _Options(
        interval=opts.duration("interval", defaults.interval),
        timeout=opts.duration("timeout", defaults.timeout),
        args=defaults.args if args is None else _split_args(args),
        show_stderr=opts.boolean("show_stderr", defaults.show_stderr),
    )


def _split_args(value: str) -> tuple[str, ...]:
    """The ``args`` option split as a shell would (no shell runs)."""
    try:
        return tuple(shlex.split(value))
    except ValueError as exc:
        # Not quoting the value: arguments may carry a token.
        raise InvalidOptionError(f"option 'args' is not valid shell-style quoting: {exc}") from None
