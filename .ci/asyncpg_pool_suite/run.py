"""asyncpg's own pool tests against HotPool, side by side with asyncpg's pool.

    python .ci/asyncpg_pool_suite/run.py /path/to/asyncpg/tests/test_pool.py [more test files]

Take ``tests/test_pool.py`` from the asyncpg release installed (a checkout at its tag), and
any other of its test files that make pools (``test_adversity.py``, ``test_listeners.py``,
``test_cache_invalidation.py``, ``test_connect.py``); ``tests/certs`` is copied along. One
throwaway PostgreSQL server is started (``aiohotload.testing``); the tests run twice, with
asyncpg's pool and with HotPool, and the outcomes are compared: exit 1 if a test fails with
HotPool only. Tests that fail with both (a test newer than the release, a server it cannot
manage) are listed, not counted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from aiohotload.testing import PgServer, PgTemplate

HERE = Path(__file__).resolve().parent
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", "--timeout=120"]
_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|SUBFAILED\S*|SUBPASSED\S*) (\S+)", re.M)


def outcomes(log: str) -> dict[str, str]:
    """Test id -> its worst outcome."""
    seen: dict[str, str] = {}
    for outcome, test in _OUTCOME.findall(log):
        bad = outcome.startswith(("FAILED", "ERROR", "SUBFAILED"))
        if bad or test not in seen:
            seen[test] = "failed" if bad else outcome.lower().split("(")[0]
    return seen


def main(test_files: list[Path]) -> int:
    work = Path(tempfile.mkdtemp(prefix="aiohotload-asyncpg-suite-"))
    work.chmod(0o711)  # as root, the server runs as 'postgres', who must reach it
    suite = work / "suite"
    suite.mkdir()
    shutil.copy(HERE / "conftest.py", suite / "conftest.py")
    for test_file in test_files:
        shutil.copy(test_file, suite / test_file.name)
    certs = test_files[0].parent / "certs"
    if certs.is_dir():
        shutil.copytree(certs, suite / "certs")
    server = PgServer(work / "server", template=PgTemplate.create(work / "template"))
    server.start_sync()
    try:
        env = dict(
            os.environ,
            PGHOST=server.host,
            PGPORT=str(server.port),
            PGUSER="postgres",
            PGPASSWORD=server.password,
            PGDATABASE="postgres",
        )
        results: dict[str, dict[str, str]] = {}
        for mode in ("bare", "hot"):
            run = subprocess.run(
                [*PYTEST, *(test_file.name for test_file in test_files)],
                check=False,  # failing tests are what is compared
                cwd=suite,
                env={**env, "APG_POOL": mode},
                capture_output=True,
                text=True,
            )
            (work / f"{mode}.log").write_text(run.stdout + run.stderr)
            results[mode] = outcomes(run.stdout)
            summary = run.stdout.strip().splitlines()[-1:] or ["(no output)"]
            print(f"{mode:>4}: {summary[0]}")
        bare, hot = results["bare"], results["hot"]
        both = sorted(t for t, o in hot.items() if o == "failed" and bare.get(t) == "failed")
        hot_only = sorted(t for t, o in hot.items() if o == "failed" and bare.get(t) != "failed")
        for test in both:
            print(f"fails with both: {test}")
        for test in hot_only:
            print(f"FAILS WITH HOTPOOL ONLY: {test}")
        print(f"logs: {work}/bare.log, {work}/hot.log")
        return 1 if hot_only else 0
    finally:
        server.cleanup()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main([Path(arg) for arg in sys.argv[1:]]))
