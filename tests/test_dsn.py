"""libpq key=value DSNs converted to URLs that asyncpg reads."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from asyncpg import connect_utils
from hypothesis import assume, given
from hypothesis import strategies as st

from aiohotload import InvalidDSNError, check_dsn
from aiohotload import dsn as dsn_module
from aiohotload.dsn import as_url, is_key_value, key_value_to_url, parse_key_value
from aiohotload.redact import secrets_of
from tests.leaks import assert_no_piece_of, leaked


def kv_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_parses_bare_and_quoted_values() -> None:
    params = parse_key_value(r"host=db1 port = 5433 user=app password='p w\'x' dbname=app")
    assert params == {
        "host": "db1",
        "port": "5433",
        "user": "app",
        "password": "p w'x",
        "dbname": "app",
    }


def test_converts_to_url_with_query_for_the_rest() -> None:
    url = key_value_to_url("host=db1 port=5433 user=app password=s3cret dbname=app sslmode=disable")
    assert url == "postgresql://app:s3cret@db1:5433/app?sslmode=disable"


@pytest.mark.parametrize(
    ("dsn", "url"),
    [
        ("host=::1 dbname=x", "postgresql://[::1]/x"),
        ("host=a,b port=5,6 dbname=x", "postgresql://a:5,b:6/x"),
        ("host=a,b port=5 dbname=x", "postgresql://a:5,b:5/x"),
        ("host=/run/pg user=u", "postgresql://u@?host=%2Frun%2Fpg"),
        ("password=only", "postgresql://?password=only"),
    ],
)
def test_url_forms(dsn: str, url: str) -> None:
    assert key_value_to_url(dsn) == url


@pytest.mark.parametrize(
    ("dsn", "said"),
    [
        ("host", "expected '=' after 'host' at character 1"),
        ("=x", "'=' at character 1 has no keyword before it"),
        ("password='hunter2", "the quote at character 10 opening the value of 'password'"),
        # An unknown word may be a piece of a password: not quoted.
        ("password=abc defghij host=h", "expected '=' after the word at character 14"),
    ],
)
def test_errors_name_a_keyword_and_a_position_never_a_value(dsn: str, said: str) -> None:
    with pytest.raises(InvalidDSNError, match=re.escape(said)) as info:
        parse_key_value(dsn)
    assert "hunter2" not in str(info.value)
    assert "defghij" not in str(info.value)


def test_unterminated_quote_does_not_echo_the_value() -> None:
    with pytest.raises(InvalidDSNError) as info:
        parse_key_value("password='hunter2")
    assert "hunter2" not in str(info.value)


def test_only_ascii_blanks_separate_pairs_as_in_libpq() -> None:
    assert parse_key_value("password=a\u2003b host=h") == {"password": "a\u2003b", "host": "h"}


def test_detects_form() -> None:
    assert is_key_value("host=a dbname=b")
    assert not is_key_value("postgresql://u:p=w@h/db")
    assert not is_key_value("postgres://h/db?x=y")


@given(
    user=st.text(min_size=1).filter(lambda s: s.strip() == s and "\x00" not in s),
    password=st.text(min_size=1).filter(lambda s: "\x00" not in s),
)
def test_round_trip_of_hostile_credentials(user: str, password: str) -> None:
    url = key_value_to_url(
        f"host=127.0.0.1 port=5432 user={kv_quote(user)} password={kv_quote(password)} dbname=db"
    )
    parts = urlsplit(url)
    assert unquote(parts.username or "") == user
    assert unquote(parts.password or "") == password
    assert parts.hostname == "127.0.0.1"
    assert parts.port == 5432
    assert parse_qs(parts.query) == {}


# -- check_dsn: a DSN asyncpg would misread is refused, without quoting it --------------------

_SECRET = "Qx7kLmZp2r"


@pytest.mark.parametrize(
    ("dsn", "said"),
    [
        (f"DATABASE_URL=postgresql://app:{_SECRET}@db:5432/app", "looks like KEY=URL"),
        (f"export DATABASE_URL='postgresql://app:{_SECRET}@db/app'", "looks like KEY=URL"),
        (f'DATABASE_URL = "postgres://app:{_SECRET}@db/app"', "looks like KEY=URL"),
        (f"url: postgresql://app:{_SECRET}@db/app", "looks like KEY: URL"),
        (f"\ufeffpostgresql://app:{_SECRET}@db/app", "byte order mark"),
        (f"\ufeffhost=db password={_SECRET}", "byte order mark"),
        (f"postgresql://app:Ab/{_SECRET}@db:5432/app", "'/', '?' or '#' in a password"),
        (f"postgresql://app:Ab?{_SECRET}@db:5432/app", "'/', '?' or '#' in a password"),
        (f"postgresql://app:Ab#{_SECRET}@db:5432/app", "a '#' at character 20"),
        (f"postgresql://app:Ab@{_SECRET}@db:5432/app", "'@' appears more than once"),
        (f"postgresql://app:{_SECRET}@db:99999/app", "out of range"),
        (f"postgresql://app:{_SECRET}@db:54x/app", "port of the host at character 29 is not"),
        (f"postgresql://app:{_SECRET}@db,,db2/app", "empty host"),
        (f"postgresql://app:{_SECRET}@::1/app", "IPv6 address goes in brackets"),
        (f"postgresql://app:{_SECRET}@[::1/app", "no closing ']'"),
        (f"postgresql://app:{_SECRET}@db/app?sslmode=require&{_SECRET}", "has no '='"),
        (f"postgresql://app:{_SECRET}@db/app?sslmode=require&", "empty query parameter"),
        (f"postgresql://app:{_SECRET}@db/app?port=5x", "query parameter 'port'"),
        (f"postgresql://app:{_SECRET}%zz@db/app", "not followed by two hex digits"),
        (f"postgresql://app:{_SECRET}\n@db/app", "control character at character 28"),
        (f"postgresql://app:{_SECRET}\uff20x@db/app", "Unicode normalization"),
        (f"postgresql://app:{_SECRET}[x]@db/app", "'[' or ']' in the user name or password"),
        (f"mysql://app:{_SECRET}@db/app", "scheme must be postgresql"),
        (f"postgresql:app:{_SECRET}@db/app", "two slashes"),
        (f"host=db password={_SECRET} {_SECRET}", "after the word at character 29"),
        (f"host=db port=5x password={_SECRET}", "'port' at character 9 is not a number"),
        (f"host=a,b port=1,2,3 password={_SECRET}", "different number of hosts"),
        (f"host=a@b password={_SECRET}", "'host' at character 1 holds a character"),
        (f"{_SECRET}", "neither a postgresql:// URL nor libpq key=value"),
        (f"db: {{url: 'postgresql://app:{_SECRET}@db/app'}}", "URL starts at character 12"),
        ("", "empty"),
    ],
)
def test_check_names_the_problem_never_the_text(dsn: str, said: str) -> None:
    with pytest.raises(InvalidDSNError, match=re.escape(said)) as info:
        check_dsn(dsn)
    assert isinstance(info.value, ValueError)
    assert_no_piece_of(_SECRET, str(info.value))


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:s3cr3t@db:5432/app",
        "postgres://app:p%40ss%2Fw%3Frd%23@db/app?sslmode=require",
        "POSTGRESQL://db/app",
        "postgresql://app:pass word@db/app",  # a raw space works with asyncpg
        "postgresql://app:p\u00e9ss@db/app",
        "postgresql://app@db1:5432,db2:5433,[::1]:5434/app?target_session_attrs=read-write",
        "postgresql:///app?host=/var/run/postgresql&port=5433",
        "postgresql://app:pw@/app?host=/tmp",
        "postgresql://db/app?user=a@b",  # an '@' in the query, the host part being fine
        "postgresql://db",
        "host=db port=5432 user=app password='p w\\'x' dbname=app sslmode=disable",
        "host=/var/run/postgresql dbname=app",
        "host=::1 dbname=x",
        "host=a,b port=5,6 dbname=x search_path=s",
    ],
)
def test_check_accepts_what_asyncpg_reads(dsn: str) -> None:
    check_dsn(dsn)
    asyncpg_reads(as_url(dsn))


@pytest.mark.parametrize(
    ("dsn", "database"),
    [
        ("postgresql:///?host=db&user=app&dbname=orders", "orders"),
        ("postgresql://db/?dbname=my%20db&sslmode=disable", "my db"),
        ("postgresql://app:pw@db:5432/postgres?dbname=orders", "orders"),  # libpq: query wins
        ("postgresql://db?dbname=a&dbname=b", "b"),
        ("postgresql://db/app?sslmode=disable", "app"),
    ],
)
def test_a_dbname_parameter_names_the_database_asyncpg_connects_to(dsn: str, database: str) -> None:
    """asyncpg ignores ``?dbname=`` after an empty path: it would connect to the database
    named after the user."""
    assert asyncpg_params(as_url(dsn)).database == database


def asyncpg_params(url: str) -> Any:
    """What asyncpg's own parser (private: the point is to agree with it) makes of *url*,
    raising what asyncpg raises."""
    parse = connect_utils._parse_connect_dsn_and_args  # type: ignore[attr-defined]
    arguments: dict[str, object] = {
        "dsn": url,
        "host": None,
        "port": None,
        "user": None,
        "password": None,
        "passfile": "/nonexistent/.pgpass",  # no password from the tester's own file
        "database": None,
        "ssl": None,
        "service": None,
        "servicefile": None,
        "direct_tls": False,
        "server_settings": None,
        "target_session_attrs": None,
        "krbsrvname": None,
        "gsslib": None,
    }
    accepted = inspect.signature(parse).parameters  # asyncpg 0.30 has no service arguments
    _, params = parse(**{k: v for k, v in arguments.items() if k in accepted})
    return params


def asyncpg_reads(url: str) -> tuple[str | None, str | None]:
    """``(user, password)`` as asyncpg reads *url*."""
    params = asyncpg_params(url)
    return params.user, params.password


_ANY_CHAR = st.one_of(
    st.characters(exclude_categories=["Cs"]),
    st.sampled_from([*"@:/%?#[]&=+, \\'\"\t\n", "\uff20", "\ufeff"]),
)
_PASSWORDS = st.text(alphabet=_ANY_CHAR, min_size=1, max_size=16)


def _dsn(form: str, pw: str) -> str:
    """A DSN of *form* holding *pw* as a user would write it (raw forms are often wrong)."""
    return {
        "url-encoded": f"postgresql://app:{quote(pw, safe='')}@db:5432/app",
        "url-raw": f"postgresql://app:{pw}@db:5432/app?sslmode=disable",
        "query-raw": f"postgresql://app@db/app?password={pw}",
        "kv-quoted": f"host=db user=app password={kv_quote(pw)} dbname=app",
        "kv-raw": f"host=db user=app password={pw} dbname=app",
        "dotenv": f"DATABASE_URL=postgresql://app:{quote(pw, safe='')}@db/app",
        "dotenv-raw": f"export DATABASE_URL='postgresql://app:{pw}@db/app'",
        "bom": f"\ufeffpostgresql://app:{quote(pw, safe='')}@db/app",
    }[form]


_FORMS = ["url-encoded", "url-raw", "query-raw", "kv-quoted", "kv-raw", "dotenv", "dotenv-raw"]


# The messages' own words are in the module's source: a password made of their pieces would
# seem to leak, so such passwords are left out.
_MESSAGE_WORDS = Path(dsn_module.__file__).read_text()


@given(pw=_PASSWORDS, form=st.sampled_from([*_FORMS, "bom"]))
def test_a_refused_dsn_never_shows_its_password(pw: str, form: str) -> None:
    assume(not leaked(pw, _MESSAGE_WORDS))
    dsn = _dsn(form, pw)
    try:
        check_dsn(dsn)
    except InvalidDSNError as exc:
        assert_no_piece_of(pw, str(exc))
        return
    assert form not in ("dotenv", "dotenv-raw", "bom")


@given(pw=_PASSWORDS, form=st.sampled_from(_FORMS))
def test_a_dsn_that_passes_reads_the_same_in_asyncpg(pw: str, form: str) -> None:
    dsn = _dsn(form, pw).strip()  # as every source's DSN is
    try:
        check_dsn(dsn)
    except InvalidDSNError:
        return
    _, password = asyncpg_reads(as_url(dsn))  # and asyncpg raises nothing
    found = secrets_of(dsn)
    if password:
        assert password in (pw, *found)
    else:
        assert not found


@given(
    text=st.text(alphabet=_ANY_CHAR, max_size=40),
    prefix=st.sampled_from(["postgresql://", "host=h ", ""]),
)
def test_any_text_is_refused_or_read_by_asyncpg_without_error(text: str, prefix: str) -> None:
    dsn = prefix + text
    try:
        check_dsn(dsn)
    except InvalidDSNError:
        return
    _, password = asyncpg_reads(as_url(dsn.strip()))
    if password:
        assert password in secrets_of(dsn.strip())


def test_hostaddr_is_where_the_connection_goes() -> None:
    # libpq connects to hostaddr (no name lookup) and uses host for the certificate check.
    url = key_value_to_url("host=db.example.com hostaddr=10.0.0.5 port=5433 user=u dbname=d")
    assert url == "postgresql://u@10.0.0.5:5433/d"
    assert key_value_to_url("hostaddr=10.0.0.5 user=u") == "postgresql://u@10.0.0.5"
    with pytest.raises(InvalidDSNError, match="verify-full"):
        key_value_to_url("host=db.example.com hostaddr=10.0.0.5 sslmode=verify-full")
