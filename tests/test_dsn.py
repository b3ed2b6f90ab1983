"""libpq key=value DSNs converted to URLs that asyncpg reads."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiohotload import InvalidOptionError
from aiohotload.dsn import is_key_value, key_value_to_url, parse_key_value


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
    ("dsn", "bad"), [("host", "host"), ("=x", "nothing"), ("password='open", "password")]
)
def test_errors_name_the_keyword_not_the_value(dsn: str, bad: str) -> None:
    with pytest.raises(InvalidOptionError, match=bad) as info:
        parse_key_value(dsn)
    assert "open" not in str(info.value) or bad == "password"


def test_unterminated_quote_does_not_echo_the_value() -> None:
    with pytest.raises(InvalidOptionError) as info:
        parse_key_value("password='hunter2")
    assert "hunter2" not in str(info.value)


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
