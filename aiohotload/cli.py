"""The ``aiohotload`` command: watch a URL's DSN, check that it connects, run the demo.

Nothing it prints holds a password: DSNs are redacted, errors are the library's redacted
messages. SIGINT (Ctrl-C) and SIGTERM stop ``watch`` and ``check`` cleanly: the strategy is
closed, so a program the ``exec`` strategy is running is killed with its process group.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import Any, TextIO

import anyio

from . import __version__
from .drivers import get_driver
from .errors import (
    HotloadError,
    InvalidOptionError,
    InvalidURLError,
    UnknownDriverError,
    UnknownStrategyError,
)
from .exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE
from .pool import create_pool
from .redact import redact_dsn, redact_text, secrets_of
from .strategies import get_strategy
from .url import HotloadURL, parse_url

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "main",
]


# Errors that mean the URL itself is wrong, whatever the state of the DSN source.
_BAD_URL = (InvalidURLError, InvalidOptionError, UnknownStrategyError, UnknownDriverError)

_DESCRIPTION = """\
Tools for aiohotload: see the DSN a hotload URL gives, check that it connects, and watch a
live demo of reloads under load.

A hotload URL is <strategy>://<driver>/<path>?<options>, e.g.
watchfiles://postgres/etc/app/dsn (the DSN is the content of /etc/app/dsn)."""

_EPILOG = """\
exit codes:
  0    success
  1    check: could not connect; demo: some queries failed, or it could not start
  2    usage error or bad hotload URL (malformed, unknown strategy, driver or option)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)

examples:
  aiohotload watch watchfiles://postgres/etc/app/dsn
  aiohotload check 'watchfiles://postgres/etc/app/dsn?connect_timeout=5' --wait 60
  aiohotload demo --duration 30

On Ctrl-C or SIGTERM, watch and check stop cleanly: a program the exec strategy is running
is killed with everything it started. Passwords are never printed: DSNs are shown with the
password as ********."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line *argv* (default: ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiohotload",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log the pool's reloads (-v) and everything, watch events included (-vv)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    watch = commands.add_parser(
        "watch",
        help="print the URL's DSN and each change, redacted, until Ctrl-C",
        description="Run the URL's strategy and print each DSN it gives, redacted, with a "
        "timestamp: the current one first, then each change. Runs until Ctrl-C or --count.",
    )
    watch.add_argument("url", metavar="URL", help="hotload URL")
    watch.add_argument("-n", "--count", type=_positive_int, help="stop after printing N values")
    watch.set_defaults(run=_run_watch)

    check = commands.add_parser(
        "check",
        help="connect once with the URL's current DSN and print the server version",
        description="Read the URL's current DSN, open one connection with it and run "
        "SHOW server_version. Exits 0 if that works, 1 (with the reason, never the password) "
        "if not: for init containers and CI.",
    )
    check.add_argument("url", metavar="URL", help="hotload URL")
    check.add_argument(
        "--wait",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="keep trying for up to SECONDS in all, each attempt cut short at that deadline "
        "(default: try once, for up to the URL's connect_timeout)",
    )
    check.set_defaults(run=_run_check)

    demo = commands.add_parser(
        "demo",
        help="a live demo: queries under load while the DSN moves and the password rotates",
        description="Start two throwaway PostgreSQL servers (or use --dsn-a/--dsn-b), open "
        "a pool on a DSN file and query it from several workers while the file is rewritten "
        "every --interval seconds: alternately moving to the other server and rotating the "
        "password. Shows which server answers, the generation, swaps, queries/s and failed "
        "queries (there should be none). Exits 0 if no query failed.",
    )
    demo.add_argument(
        "--duration",
        type=_positive_float,
        default=20.0,
        metavar="SECONDS",
        help="how long to run (default: 20)",
    )
    demo.add_argument(
        "--interval",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="time between changes of the DSN file (default: 2)",
    )
    demo.add_argument(
        "--workers",
        type=_positive_int,
        default=8,
        metavar="N",
        help="concurrent query loops (default: 8)",
    )
    demo.add_argument(
        "--dsn-a",
        metavar="URL",
        help="superuser URL DSN of an existing server to use instead of a throwaway one, "
        "e.g. postgresql://postgres:postgres@127.0.0.1:5433/postgres (with --dsn-b)",
    )
    demo.add_argument("--dsn-b", metavar="URL", help="the second existing server (with --dsn-a)")
    demo.add_argument(
        "--plain",
        action="store_true",
        help="print a line a second instead of the live view (the default when stdout is "
        "not a terminal or rich is not installed)",
    )
    demo.set_defaults(run=_run_demo)
    return parser


def _configure_logging(verbose: int) -> None:
    if verbose <= 0:
        return  # warnings still reach stderr through logging's last-resort handler
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohotload").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _run_stoppable(main: Coroutine[Any, Any, int]) -> int:
    """Run *main* in a new event loop until it returns its exit code. SIGINT and SIGTERM
    cancel it, so it stops as at any other end (the strategy closed, a running ``exec``
    program and its process group killed), and give ``128 + signal``."""
    return asyncio.run(_stoppable(main))


async def _stoppable(main: Coroutine[Any, Any, int]) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[signal.Signals] = []

    def stop(signum: signal.Signals) -> None:
        received.append(signum)
        task.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop, signum)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C still interrupts
            continue
        installed.append(signum)
    try:
        return await main
    except asyncio.CancelledError:
        if not received:
            raise
        if received[0] == signal.SIGINT:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _error(command: str, message: str, code: int) -> int:
    print(f"aiohotload {command}: error: {message}", file=sys.stderr)
    return code


def _describe(exc: BaseException, url: str, *dsns: str) -> str:
    # The library's messages are redacted already, but a URL parse error quotes the URL,
    # and someone may have passed a DSN with its password; a strategy's or driver's own
    # error might quote a DSN too. So anything shaped like a password, or one found in
    # *url* or in the DSNs seen so far, is scrubbed.
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, HotloadError):
        text = f"{type(exc).__name__}: {text}"
    secrets = [secret for each in (url, *dsns) for secret in secrets_of(each)]
    return redact_text(text, secrets)


def _parse(command: str, url: str) -> HotloadURL | int:
    """The parsed URL with its strategy and driver known, or the exit code of the error."""
    try:
        parsed = parse_url(url)
        get_strategy(parsed.strategy)
        get_driver(parsed.driver)
    except _BAD_URL as exc:
        message = _describe(exc, url)
        if url.strip().lower().startswith(("postgres://", "postgresql://")):
            message = (
                f"{redact_dsn(url)} is a DSN, not a hotload URL: put the DSN in a file and "
                "name the file, e.g. watchfiles://postgres/etc/app/dsn"
            )
        return _error(command, message, EXIT_USAGE)
    return parsed


# --------------------------------------------------------------------------- watch


def _run_watch(args: argparse.Namespace) -> int:
    parsed = _parse("watch", args.url)
    if isinstance(parsed, int):
        return parsed
    return _run_stoppable(_watch(args.url, parsed, args.count, sys.stdout))


async def _watch(raw: str, url: HotloadURL, count: int | None, out: TextIO) -> int:
    strategy = get_strategy(url.strategy)
    iterator = strategy.watch(url.path, url.options)
    previous: str | None = None
    seen: set[str] = set()
    printed = 0
    try:
        async for value in iterator:
            dsn = value.strip()
            if previous is None:
                kind = "current"
            elif dsn == previous:
                kind = "same"  # a polling strategy may repeat itself; the pool ignores it
            else:
                kind = "changed"
            shown = redact_dsn(dsn) if dsn else "(empty: ignored by the pool)"
            print(f"{_now()}  {kind:<7}  {shown}", file=out, flush=True)
            previous = dsn
            seen.add(dsn)
            printed += 1
            if count is not None and printed >= count:
                break
    except _BAD_URL as exc:  # an option the strategy rejects, a relative path, ...
        return _error("watch", _describe(exc, raw, *seen), EXIT_USAGE)
    except Exception as exc:
        return _error("watch", _describe(exc, raw, *seen), EXIT_FAILED)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
    if previous is None:
        return _error("watch", f"strategy {url.strategy!r} ended without a DSN", EXIT_FAILED)
    return EXIT_OK


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- check


def _run_check(args: argparse.Namespace) -> int:
    if isinstance(code := _parse("check", args.url), int):
        return code
    return _run_stoppable(_check(args.url, args.wait, sys.stdout))


async def _check(url: str, wait: float, out: TextIO) -> int:
    """Connect once; with *wait* > 0, retry until *wait* seconds have passed in all, an
    attempt still running then being cut short (the URL's connect_timeout bounds it too)."""
    deadline = time.monotonic() + wait
    delay = 0.5
    last = ""  # why the last attempt failed
    while True:
        remaining = deadline - time.monotonic()
        if last and remaining <= 0:
            return _error("check", f"cannot connect: {last}", EXIT_FAILED)
        with anyio.move_on_after(remaining if wait > 0 else math.inf) as attempt:
            try:
                return await _check_once(url, out)
            except _BAD_URL as exc:  # an option the strategy rejects
                return _error("check", _describe(exc, url), EXIT_USAGE)
            except Exception as exc:
                last = _describe(exc, url)
        if attempt.cancelled_caught:
            why = f"last error: {last}" if last else "the attempt was cut short"
            return _error("check", f"cannot connect within --wait {wait:g}s ({why})", EXIT_FAILED)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _error("check", f"cannot connect: {last}", EXIT_FAILED)
        pause = min(delay, remaining)
        print(f"not yet: {last}; retrying in {pause:.1f}s", file=sys.stderr, flush=True)
        await asyncio.sleep(pause)
        delay = min(delay * 2, 5.0)


async def _check_once(url: str, out: TextIO) -> int:
    pool = create_pool(url, min_size=1, max_size=1)
    try:
        async with pool:
            version = await pool.fetchval("SHOW server_version")
            print(f"ok: connected to {pool.target}", file=out)
            print(f"server_version: {version}", file=out, flush=True)
            return EXIT_OK
    except _BAD_URL:
        raise
    except Exception as exc:
        # The pool's own account names the server it tried (redacted).
        raise (pool.last_error or exc) from None


# --------------------------------------------------------------------------- demo


def _run_demo(args: argparse.Namespace) -> int:
    if (args.dsn_a is None) != (args.dsn_b is None):
        return _error("demo", "--dsn-a and --dsn-b go together: name two servers", EXIT_USAGE)
    for option, dsn in (("--dsn-a", args.dsn_a), ("--dsn-b", args.dsn_b)):
        if dsn is not None and not dsn.startswith(("postgres://", "postgresql://")):
            return _error(
                "demo",
                f"{option} must be a superuser URL DSN like "
                f"postgresql://postgres:secret@127.0.0.1:5433/postgres; got {redact_dsn(dsn)}",
                EXIT_USAGE,
            )
    from .demo import DemoOptions, run

    return run(
        DemoOptions(
            duration=args.duration,
            interval=args.interval,
            workers=args.workers,
            dsn_a=args.dsn_a,
            dsn_b=args.dsn_b,
            plain=args.plain,
        )
    )


# --------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value
