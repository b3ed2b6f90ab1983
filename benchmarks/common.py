"""What the benchmark scripts share: the throwaway PostgreSQL servers, DSN writers, percentiles.

This is the one module that names where the server helper lives, so moving that helper means
changing the import below and nothing else.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohotload.testing import PgServer, PgTemplate, start_all  # noqa: E402

__all__ = [
    "PASSWORD",
    "ROLE",
    "PgServer",
    "median",
    "pct",
    "two_servers",
    "write_atomic",
    "write_in_place",
]

#: The login role every benchmark uses on both servers.
ROLE = "bench"
PASSWORD = "bench-pw"


@contextlib.contextmanager
def two_servers() -> Iterator[tuple[Path, PgServer, PgServer]]:
    """A temp dir and two started throwaway servers (``max_connections`` 1200: the many-pools
    row proves each of 1000 pools' new DSN at once, one login each), removed after."""
    with tempfile.TemporaryDirectory(prefix="aiohotload-bench-") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o777)
        template = PgTemplate.create(tmp / "template")
        a = PgServer(tmp / "a", template=template, settings={"max_connections": "1200"})
        b = PgServer(tmp / "b", template=template, settings={"max_connections": "1200"})
        try:
            start_all([a, b])
            yield tmp, a, b
        finally:
            for s in (a, b):
                s.cleanup()


def write_in_place(path: Path, dsn: str) -> None:
    """Overwrite *path* in place (a reader may see it half-written)."""
    with open(path, "w") as f:
        f.write(dsn + "\n")


def write_atomic(path: Path, dsn: str) -> None:
    """Write *path* as config tools do: a temp file renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dsn + "\n")
    os.replace(tmp, path)


def median(xs: list[float]) -> float:
    """The median, NaN for no samples."""
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    """The *q* quantile by nearest rank (p95 of 20 samples is the 19th), NaN for no samples."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, min(len(s), math.ceil(q * len(s))) - 1)]
