"""DSNs from secret values: plain DSNs and the JSON AWS rotation functions write."""

from __future__ import annotations

import json
from urllib.parse import unquote, urlsplit

import pytest

from aiohotload.strategies._secret import SecretFormatError, dsn_from_secret, passwords_in_secret

HOSTILE = "p@:/%?#'\" \\&=+;é€日本"


def rds(**fields: object) -> str:
    base: dict[str, object] = {
        "engine": "postgres",
        "host": "db.example.com",
        "port": 5432,
        "username": "app",
        "password": "pw",
        "dbname": "app",
    }
    return json.dumps({**base, **fields})


@pytest.mark.parametrize(
    "text", ["postgresql://u:pw@h/d", "  postgres://h/d\n", "host=h user=u password='{x}'"]
)
def test_anything_but_a_json_object_is_the_dsn(text: str) -> None:
    assert dsn_from_secret(text) == text.strip()


def test_rds_json_becomes_a_url_with_every_part_encoded() -> None:
    dsn = dsn_from_secret(rds(username="app user", password=HOSTILE, dbname="my/db"))
    parts = urlsplit(dsn)
    assert dsn.startswith("postgresql://app%20user:")
    assert (parts.hostname, parts.port) == ("db.example.com", 5432)
    assert unquote(parts.password or "") == HOSTILE
    assert unquote(parts.path) == "/my/db"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"port": "6432"}, "postgresql://app:pw@db.example.com:6432/app"),
        ({"port": None}, "postgresql://app:pw@db.example.com:5432/app"),
        ({"dbname": None}, "postgresql://app:pw@db.example.com:5432"),
        ({"password": ""}, "postgresql://app@db.example.com:5432/app"),
        ({"host": "::1"}, "postgresql://app:pw@[::1]:5432/app"),
        ({"engine": "aurora-postgresql"}, "postgresql://app:pw@db.example.com:5432/app"),
        ({"engine": None}, "postgresql://app:pw@db.example.com:5432/app"),
    ],
)
def test_rds_json_variants(fields: dict[str, object], expected: str) -> None:
    assert dsn_from_secret(rds(**fields)) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is empty"),
        ('{"host": "h", "password": "s3cret"', "starts with '{' but is not valid JSON"),
        ("[1]", None),  # not an object and not starting with '{': passed on as a DSN
        (rds(host=None), "is a JSON object without 'host'"),
        (rds(username=""), "is a JSON object without 'username'"),
        (rds(port=0), "has a 'port' that is not a number from 1 to 65535"),
        (rds(port="5432x"), "has a 'port' that is not a number from 1 to 65535"),
        (rds(port=True), "has a 'port' that is not a number from 1 to 65535"),
        (rds(password=12), "has 'password' of type int, not a string"),
        (rds(engine="mysql"), "is for engine 'mysql', not PostgreSQL"),
    ],
)
def test_unusable_values_say_why_without_quoting_them(text: str, reason: str | None) -> None:
    if reason is None:
        assert dsn_from_secret(text) == text
        return
    with pytest.raises(SecretFormatError) as info:
        dsn_from_secret(text)
    assert info.value.reason == reason
    assert "s3cret" not in str(info.value)


def test_passwords_in_secret() -> None:
    assert passwords_in_secret(rds(password="a b")) == ("a b", "a%20b")
    assert passwords_in_secret(rds(password="")) == ()
    assert passwords_in_secret("postgresql://u:pw@h/d") == ()
    assert passwords_in_secret("[1]") == ()
