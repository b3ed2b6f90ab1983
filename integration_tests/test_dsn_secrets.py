"""No piece of a password from a malformed or refused DSN reaches an exception, a log record,
an event or ``last_error``, through a real HotPool on a DSN file.

Passwords are generated with any characters and written the ways people write them: in a URL
(percent-encoded, or raw as copy-pasted), in a URL's query, in key=value form (quoted or
not), as a dotenv or shell line (``DATABASE_URL=...``, ``export ...``), or after a UTF-8 byte
order mark. A "piece" is any substring of 4 or more characters.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest
import sqlalchemy
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import aiohotload
from aiohotload import HotloadError, InvalidDSNError, ReloadFailed
from aiohotload.sqlalchemy import create_async_engine
from aiohotload.testing import PgServer, RoleFactory, wait_until, watch_url

from .faults import EventLog

pytestmark = pytest.mark.timeout(300)

PIECE = 4

_ANY_CHAR = st.one_of(
    st.characters(exclude_categories=["Cs"]),
    st.sampled_from([*"@:/%?#[]&=+, \\'\"\t", "\uff20", "\u2003", "é"]),
)
PASSWORDS = st.text(alphabet=_ANY_CHAR, min_size=PIECE, max_size=20)
FORMS = (
    "url-encoded",
    "url-raw",
    "query-raw",
    "kv-quoted",
    "kv-raw",
    "dotenv",
    "dotenv-raw",
    "export",
    "bom",
)


def dsn_in_form(form: str, pw: str, *, host: str, port: int, user: str, db: str) -> str:
    """A DSN for *user* with password *pw*, written in *form* (raw forms are often wrong)."""
    encoded = quote(pw, safe="")
    kv_quoted = "'" + pw.replace("\\", "\\\\").replace("'", "\\'") + "'"
    url = f"postgresql://{user}:{encoded}@{host}:{port}/{db}"
    return {
        "url-encoded": url,
        "url-raw": f"postgresql://{user}:{pw}@{host}:{port}/{db}",
        "query-raw": f"postgresql://{user}@{host}:{port}/{db}?password={pw}",
        "kv-quoted": f"host={host} port={port} user={user} password={kv_quoted} dbname={db}",
        "kv-raw": f"host={host} port={port} user={user} password={pw} dbname={db}",
        "dotenv": f"DATABASE_URL={url}",
        "dotenv-raw": f"DATABASE_URL=postgresql://{user}:{pw}@{host}:{port}/{db}",
        "export": f"export DATABASE_URL='{url}'",
        "bom": "\ufeff" + url,
    }[form]


def pieces(secret: str) -> set[str]:
    return {secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)}


def _package_text(module: object) -> str:
    root = Path(getattr(module, "__file__", "")).parent
    return "".join(p.read_text(errors="replace") for p in sorted(root.rglob("*.py")))


# Text that any message may hold whatever the password: the words of aiohotload's and
# asyncpg's messages (their sources), the server's, and numbers as the messages print them.
# A password made of its pieces would seem to leak, so such passwords are left out.
_WORDS = "\n".join(
    [
        _package_text(aiohotload),
        _package_text(asyncpg),
        'password authentication failed for user "" role "" does not exist; database "" does '
        "not exist; no pg_hba.conf entry for host; Connect call failed; Name or service not "
        "known; [Errno 111] [Errno -2] connection refused; Multiple exceptions:",
        " ".join(f"character {n}, characters {n} and attempt {n}) {n}.{n}s" for n in range(400)),
    ]
)


def usable(pw: str, *context: str) -> bool:
    """Whether no piece of *pw* is in the fixed text of messages or in *context*."""
    fixed = _WORDS + "\n".join(context)
    return not any(piece in fixed for piece in pieces(pw))


def assert_no_piece(pw: str, what: str, text: str) -> None:
    found = sorted(piece for piece in pieces(pw) if piece in text)
    assert not found, f"{what} shows {found}: {text!r}"


def shown(exc: BaseException) -> Iterator[BaseException]:
    """*exc* and the exceptions a traceback of it prints (its cause or context)."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)


def write(path: Path, text: str) -> None:
    """Replace the file atomically with *text* in UTF-8, as config tools do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode("utf-8") + b"\n")
    os.replace(tmp, path)


class Records(logging.Handler):
    """Every record of the ``aiohotload`` loggers, DEBUG included, formatted as a handler
    would (message, arguments and any exception with its traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.format(record))


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("aiohotload")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


_MANY = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_MANY
@given(pw=PASSWORDS, form=st.sampled_from(FORMS))
@example(pw="Qx7k/Lm9z", form="url-raw")  # asyncpg: invalid literal for int(): 'Qx7k'
@example(pw="Ab?Zp2rTn@x", form="url-raw")  # asyncpg: bad query field: 'Zp2rTn@x@...'
@example(pw="S3cr3tPw", form="dotenv")
@example(pw="S3cr3tPw", form="bom")
async def test_a_first_dsn_never_shows_its_password(
    pw: str, form: str, pg_a: PgServer, records: Records
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dsn"
        assume(usable(pw, str(path), str(pg_a.port)))
        write(
            path, dsn_in_form(form, pw, host="127.0.0.1", port=pg_a.port, user="app_user", db="app")
        )
        records.texts.clear()
        # A refused login may surface as asyncpg raises it; a DSN that does not read, as ours.
        with pytest.raises((HotloadError, asyncpg.PostgresError, OSError)) as info:
            await aiohotload.create_pool(watch_url(path, connect_timeout="10"), min_size=1)
    if form in ("dotenv", "dotenv-raw", "export", "bom"):
        assert isinstance(info.value, InvalidDSNError)
    for exc in shown(info.value):
        assert_no_piece(pw, "the exception", f"{exc!s} {exc!r}")
    for text in records.texts:
        assert_no_piece(pw, "a log record", text)


@dataclass
class Serving:
    """A pool serving a good DSN from *path*, its events, and a count of DSNs written."""

    pool: aiohotload.HotPool
    path: Path
    user: str
    events: EventLog
    written: int = 0


@pytest.fixture
async def serving(pg_a: PgServer, role: RoleFactory, tmp_path: Path) -> AsyncIterator[Serving]:
    user, password = await role(pg_a)
    path = tmp_path / "dsn"
    write(path, pg_a.dsn(user, password))
    async with aiohotload.create_pool(watch_url(path), min_size=1, max_size=2) as pool:
        yield Serving(pool, path, user, EventLog(pool))


@_MANY
@given(pw=PASSWORDS, form=st.sampled_from(FORMS))
@example(pw="Qx7k/Lm9z", form="url-raw")
@example(pw="S3cr3tPw", form="dotenv")
async def test_a_later_dsn_never_shows_its_password(
    pw: str, form: str, pg_a: PgServer, serving: Serving, records: Records
) -> None:
    # One pool serves the good DSN across the examples; each writes a bad one and waits for
    # its first failure.
    pool, events = serving.pool, serving.events
    assume(usable(pw, str(serving.path), serving.user, str(pg_a.port), pool.target or ""))
    generation = pool.generation
    before = len(events.of(ReloadFailed))
    records.texts.clear()
    serving.written += 1  # a new database name each time: every example is a change
    dsn = dsn_in_form(
        form, pw, host="127.0.0.1", port=pg_a.port, user=serving.user, db=f"db{serving.written}"
    )
    write(serving.path, dsn)
    failed = await wait_until(
        lambda: [e for e in events.of(ReloadFailed)[before:] if e.attempt == 1],
        what="the first failure of the new DSN",
        timeout=30,
    )
    assert pool.generation == generation  # still serving the good DSN
    assert await pool.fetchval("SELECT 1") == 1
    assert pool.last_error is not None
    for exc in shown(pool.last_error):
        assert_no_piece(pw, "last_error", f"{exc!s} {exc!r}")
    for event in events.events:
        assert_no_piece(pw, "an event", repr(event))
    for event in failed:
        assert_no_piece(pw, "a ReloadFailed event", f"{event.target} {event.error}")
    for text in records.texts:
        assert_no_piece(pw, "a log record", text)


@pytest.mark.parametrize("form", FORMS)
async def test_the_sqlalchemy_engine_never_shows_the_password(
    form: str, pg_a: PgServer, records: Records, tmp_path: Path
) -> None:
    pw = "Qx7k/Lm9z?Zp2r@Tn"
    path = tmp_path / "dsn"
    write(path, dsn_in_form(form, pw, host="127.0.0.1", port=pg_a.port, user="app", db="app"))
    engine = create_async_engine(watch_url(path, connect_timeout="10"))
    try:
        # SQLAlchemy's own DBAPIError for a login the server refused, as a plain engine.
        with pytest.raises(
            (HotloadError, asyncpg.PostgresError, OSError, sqlalchemy.exc.DBAPIError)
        ) as info:
            await engine.start()
    finally:
        await engine.dispose()
    for exc in shown(info.value):
        assert_no_piece(pw, "the exception", f"{exc!s} {exc!r}")
    for text in records.texts:
        assert_no_piece(pw, "a log record", text)
