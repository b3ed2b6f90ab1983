"""Redaction cost on long lines, and how long the exec strategy stalls the event loop.

``redact_text`` runs on every failed ``exec`` run's standard error, on driver errors and on
etcd/AWS messages: one minified JSON or base64 blob on a line must cost time linear in its
size. For each input shape and size this prints the best time of several calls of
``redact_text`` (the least disturbed by other work on the machine) and the ratio to the
smallest size (about 2x per doubling when linear, 4x when quadratic). Then it
runs a failing program that writes 64 KB on standard error through the exec strategy with
``show_stderr=true`` and reports the longest the event loop went without running a ticker.

Run ``python benchmarks/redaction.py`` (``--quick`` for fewer repeats). From another script,
``bench_redaction()`` returns the same figures as a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohotload.redact import redact_dsn, redact_text  # noqa: E402

SIZES_KB = (16, 32, 64, 256)


def _shapes() -> dict[str, Callable[[int], str]]:
    """Input shapes, each a function of the size in bytes: what helpers print, and the
    patterns that made the old regular expressions backtrack."""

    def repeat(unit: str) -> Callable[[int], str]:
        return lambda n: (unit * (n // len(unit) + 1))[:n]

    def blob(n: int) -> str:
        return base64.b64encode(os.urandom(n))[:n].decode()

    def minified_json(n: int) -> str:
        items = [{"id": i, "name": f"item{i}", "ok": True} for i in range(n // 30 + 1)]
        return json.dumps(items, separators=(",", ":"))[:n]

    return {
        "no spaces (x...)": repeat("x"),
        "base64 blob": blob,
        "minified JSON": minified_json,
        "scheme-like (a://b:)": repeat("a://b:"),
        "query-like (?a=)": repeat("?a="),
        "password=": repeat("password="),
        "key: value": repeat("secret: x "),
        "at signs (@)": repeat("@"),
    }


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_redaction(sizes_kb: tuple[int, ...] = SIZES_KB, repeats: int = 7) -> dict[str, Any]:
    """Best seconds of ``redact_text`` (and ``redact_dsn``) per input shape and size.

    Returns ``{"sizes_kb": [...], "redact_text": {shape: [s, ...]}, "redact_dsn": {...}}``.
    """
    result: dict[str, Any] = {"sizes_kb": list(sizes_kb), "redact_text": {}, "redact_dsn": {}}
    for name, make in _shapes().items():
        texts = [make(kb * 1024) for kb in sizes_kb]
        result["redact_text"][name] = [
            _best_time(functools.partial(redact_text, t, ["s3cr3t-pw"]), repeats) for t in texts
        ]
        dsns = ["postgresql://u:p@h/db?" + t for t in texts]
        result["redact_dsn"][name] = [
            _best_time(functools.partial(redact_dsn, d), repeats) for d in dsns
        ]
    return result


async def bench_exec_stall(
    size_kb: int = 64, runs: int = 10, *, show_stderr: bool = True
) -> dict[str, float]:
    """Event-loop stalls (seconds: the longest, and the 99th percentile of a 1 ms ticker's
    intervals) while the exec strategy handles *runs* failed runs whose standard error is
    *size_kb* of text without spaces; with *show_stderr* it is scrubbed and shown."""
    from aiohotload.strategies.command import ExecStrategy

    loop = asyncio.get_running_loop()
    failed = asyncio.Event()
    failures = 0

    class _Failures(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            nonlocal failures
            if "keeping the current DSN" in record.getMessage():
                failures += 1
                if failures >= runs:
                    loop.call_soon_threadsafe(failed.set)

    stalls: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls.append(now - last)
            last = now

    handler = _Failures(logging.DEBUG)
    log = logging.getLogger("aiohotload.strategies.command")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "fails.sh"
        program.write_text(
            "#!/bin/sh\n"
            f'if [ -e "{tmp}/ran" ]; then\n'
            f"  head -c {size_kb * 1024} /dev/zero | tr '\\0' x >&2; exit 1\n"
            "fi\n"
            f'touch "{tmp}/ran"; echo postgresql://u:p@h/db\n'
        )
        program.chmod(0o755)
        options = {"interval": "50ms", "show_stderr": str(show_stderr).lower()}
        watch = ExecStrategy().watch(str(program), options)
        tick = asyncio.ensure_future(ticker())
        try:
            await anext(watch)
            following = asyncio.ensure_future(anext(watch))  # the runs go on meanwhile
            await asyncio.wait_for(failed.wait(), 60)
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
        finally:
            await watch.aclose()
            stop.set()
            await tick
            log.removeHandler(handler)
    stalls.sort()
    return {"max_stall_s": stalls[-1], "p99_stall_s": stalls[int(len(stalls) * 0.99)]}


def _print_table(result: dict[str, Any]) -> None:
    sizes = result["sizes_kb"]
    for function in ("redact_text", "redact_dsn"):
        print(f"\n{function}: best seconds per call (ratio to {sizes[0]} KB)")
        print(f"  {'shape':<22}" + "".join(f"{f'{kb} KB':>18}" for kb in sizes))
        for name, times in result[function].items():
            cells = "".join(f"{t:>10.4f} ({t / times[0]:>4.1f}x)" for t in times)
            print(f"  {name:<22}{cells}")


def main() -> None:
    """Print redaction times by shape and size, and the exec strategy's loop stall."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat per measure")
    parser.add_argument("--no-exec", action="store_true", help="skip the exec stall measure")
    args = parser.parse_args()
    result = bench_redaction(repeats=1 if args.quick else 7)
    _print_table(result)
    if not args.no_exec:
        print("\nexec strategy, failed runs writing 64 KB on stderr: event-loop stalls")
        for show in (False, True):
            stall = asyncio.run(bench_exec_stall(show_stderr=show))
            print(
                f"  show_stderr={str(show).lower():<5}  longest {stall['max_stall_s'] * 1000:6.1f} "
                f"ms, 99th percentile {stall['p99_stall_s'] * 1000:5.1f} ms"
            )


if __name__ == "__main__":
    main()
