"""Redaction of DSN passwords: URL and key=value forms, free text, and any password."""

from __future__ import annotations

import json
import re
import shlex
from urllib.parse import quote, quote_plus, unquote

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from aiohotload import InvalidDSNError
from aiohotload.dsn import check_dsn
from aiohotload.redact import REDACTED, describe_error, redact_dsn, redact_text, secrets_of
from tests.leaks import assert_no_piece_of, leaked


def _reads(dsn: str) -> bool:
    try:
        check_dsn(dsn)
    except InvalidDSNError:
        return False
    return True


# -- URL DSNs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://user:pw@host:5432/db",
            f"postgresql://user:{REDACTED}@host:5432/db",
        ),
        ("postgres://user:pw@host/db", f"postgres://user:{REDACTED}@host/db"),
        ("POSTGRESQL://user:pw@host/db", f"POSTGRESQL://user:{REDACTED}@host/db"),
        ("postgresql://user@host:5432/db", "postgresql://user@host:5432/db"),
        ("postgresql://host:5432/db", "postgresql://host:5432/db"),
        ("postgresql://user:@host/db", f"postgresql://user:{REDACTED}@host/db"),
        (
            "postgresql://user@host/db?password=pw&sslmode=require",
            f"postgresql://user@host/db?password={REDACTED}&sslmode=require",
        ),
        (
            "postgresql://user@host/db?sslmode=require&PassWord=pw",
            f"postgresql://user@host/db?sslmode=require&PassWord={REDACTED}",
        ),
        (
            "postgresql://user:pw@host/db?password=pw2&password=pw3",
            f"postgresql://user:{REDACTED}@host/db?password={REDACTED}&password={REDACTED}",
        ),
        (
            "postgresql://user@host/db?sslkey=/k.pem&sslpassword=kp",
            f"postgresql://user@host/db?sslkey=/k.pem&sslpassword={REDACTED}",
        ),
        (
            "postgresql://user@host/db?pass%77ord=pw",
            f"postgresql://user@host/db?pass%77ord={REDACTED}",
        ),
        (
            "postgresql://user:pw@host1:5432,host2:5433/db",
            f"postgresql://user:{REDACTED}@host1:5432,host2:5433/db",
        ),
        (
            "postgresql://user:pw@[::1]:5432/db",
            f"postgresql://user:{REDACTED}@[::1]:5432/db",
        ),
        ("postgresql://[::1]:5432/db", "postgresql://[::1]:5432/db"),
        ("postgresql:///db?host=/var/run", "postgresql:///db?host=/var/run"),
        (
            "postgresql://user:pw@/db?host=/var/run/postgresql",
            f"postgresql://user:{REDACTED}@/db?host=/var/run/postgresql",
        ),
        # Unescaped '@', '/', '?', '#' in the password: asyncpg would misread it, and where
        # the password ends is a guess, so the whole DSN is hidden.
        ("postgresql://user:p@s/s?w#d@host:5432/db", REDACTED),
        ("postgresql://user:p/ss@host:5432/db", REDACTED),
        ("\ufeffpostgresql://user:pw@host/db", REDACTED),
        # Another scheme (a hotload URL, say) is not checked as a DSN.
        ("mysql://user:p@s/s@host/db", f"mysql://user:{REDACTED}@host/db"),
        ("  postgresql://user:pw@host/db\n", f"postgresql://user:{REDACTED}@host/db"),
    ],
)
def test_redact_url_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_redact_url_keeps_user_host_port_and_db() -> None:
    out = redact_dsn("postgresql://app_user:s3cr3t@db.example.com:6432/orders?sslmode=verify")
    assert "s3cr3t" not in out
    for part in ("app_user", "db.example.com", "6432", "/orders", "sslmode=verify"):
        assert part in out


def test_query_password_with_raw_at_is_hidden_whole() -> None:
    # An '@' in the query looks like the end of a userinfo; whichever reading wins, no part
    # of the password may survive.
    out = redact_dsn("postgresql://h:5432/db?password=se@cret")
    assert "se" not in out.replace("postgresql", "")
    assert "cret" not in out


def test_password_holding_a_query_password_is_hidden_whole() -> None:
    assert redact_dsn("postgresql://alice:x?password=y@host/db") == REDACTED


@pytest.mark.parametrize(
    "dsn",
    [
        "DATABASE_URL=postgresql://app:S3cr3t@db:5432/app",
        "export DATABASE_URL=postgresql://app:S3cr3t@db:5432/app",
        "host=h password=S3cr3t extra",
        "host=h port=5x password=S3cr3t",
        "postgresql://app:S3cr3t@db:99999/app",
    ],
)
def test_a_dsn_that_does_not_read_cleanly_is_hidden_whole(dsn: str) -> None:
    assert redact_dsn(dsn) == REDACTED


# -- key=value DSNs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("host=h password=secret user=u", f"host=h password={REDACTED} user=u"),
        ("password=secret", f"password={REDACTED}"),
        ("host=h password='p w\\'x' user=u", f"host=h password={REDACTED} user=u"),
        ("host=h password='p w\\\\' user=u", f"host=h password={REDACTED} user=u"),
        ("host=h PASSWORD = x user=u", f"host=h PASSWORD = {REDACTED} user=u"),
        ("host=h password = 'a b' user=u", f"host=h password = {REDACTED} user=u"),
        ("host=h password=a\\ b user=u", f"host=h password={REDACTED} user=u"),
        ("host=h password='unterminated user=u", REDACTED),
        ("sslpassword=kp password=pw", f"sslpassword={REDACTED} password={REDACTED}"),
        ("password=a password=b", f"password={REDACTED} password={REDACTED}"),
        ("host=h user=u dbname=d", "host=h user=u dbname=d"),
        # libpq skips blanks after '=', so the next word is the password.
        ("host=h password= user=u", f"host=h password= {REDACTED}"),
        ("host=h\tpassword=x\u2003y\nuser=u", f"host=h\tpassword={REDACTED}\nuser=u"),
    ],
)
def test_redact_kv_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_redact_kv_keeps_everything_else() -> None:
    out = redact_dsn("host=db.example.com port=6432 user=app dbname=orders password=s3cr3t")
    assert out == f"host=db.example.com port=6432 user=app dbname=orders password={REDACTED}"


# -- secrets_of and redact_text -----------------------------------------------------------


def test_secrets_of_url_gives_raw_and_decoded_forms() -> None:
    assert set(secrets_of("postgresql://u:p%40ss%2Fw@h/db")) == {"p%40ss%2Fw", "p@ss/w"}


def test_secrets_of_collects_every_password() -> None:
    found = set(secrets_of("postgresql://u:one@h/db?password=two+2&sslpassword=th%20ree"))
    assert {"one", "two+2", "two 2", "th%20ree", "th ree"} <= found


def test_secrets_of_kv_unescapes() -> None:
    assert set(secrets_of("host=h password='p w\\'x' user=u")) == {"'p w\\'x'", "p w'x"}
    assert set(secrets_of("password=a\\ b sslpassword=k")) == {"a\\ b", "a b", "k"}


def test_secrets_of_is_longest_first_and_empty_without_password() -> None:
    found = secrets_of("postgresql://u:ab%20c@h/db")
    assert list(found) == sorted(found, key=len, reverse=True)
    assert secrets_of("postgresql://u@h/db") == ()
    assert secrets_of("postgresql://u:@h/db") == ()
    assert secrets_of("host=h user=u") == ()


def test_redact_text_scrubs_given_secrets() -> None:
    text = 'password authentication failed for user "u": got "hunter2" (hunter)'
    out = redact_text(text, ["hunter", "hunter2"])
    assert "hunter" not in out
    assert 'for user "u"' in out
    assert out.count(REDACTED) == 2


def test_redact_text_scrubs_dsn_patterns_without_secrets() -> None:
    out = redact_text("bad option password=x1 in 'postgresql://u@h/db?password=y2&a=b'")
    assert "x1" not in out
    assert "y2" not in out
    assert "a=b" in out


@pytest.mark.parametrize(
    ("text", "password"),
    [
        ("could not connect to postgresql://app:s3cret@db1/app: refused", "s3cret"),
        ("dsn postgres://app:p@ss:w@db1:5432/app?sslmode=require", "p@ss:w"),
        ("('postgresql://u:tok%2Fen@h/db',)", "tok%2Fen"),
    ],
)
def test_redact_text_scrubs_url_passwords_in_free_text(text: str, password: str) -> None:
    out = redact_text(text)
    assert password not in out
    assert REDACTED in out


def test_redact_text_leaves_urls_without_password() -> None:
    text = "see http://example.com/a:b and user@host at 12:30"
    assert redact_text(text) == text


def test_redact_text_with_secrets_of_dsn() -> None:
    dsn = "postgresql://u:p%C3%A9@h/db"
    message = "connect failed with password 'pé' (p%C3%A9)"
    out = redact_text(message, secrets_of(dsn))
    assert "pé" not in out
    assert "p%C3%A9" not in out


def test_redact_text_ignores_empty_secret() -> None:
    assert redact_text("abc", ["", "b"]) == f"a{REDACTED}c"


# -- properties: any password is hidden in every DSN form ---------------------------------

_USER = "alice"
_HOST = "db.example.com"
_SPECIALS = st.sampled_from([*"@:/%?#'\" \\&=+\t\n", "é", "ß", "😀", "\u2003"])
_PASSWORD_CHARS = st.one_of(st.characters(exclude_categories=["Cs"]), _SPECIALS)
_PASSWORD = st.text(alphabet=_PASSWORD_CHARS, min_size=1)


def _escape_quoted(pw: str) -> str:
    return pw.replace("\\", "\\\\").replace("'", "\\'")


def _escape_bare(pw: str) -> str:
    # libpq: a bare value ends at ASCII whitespace; a backslash escapes any character, and a
    # leading quote would start a quoted value.
    return re.sub(r"([ \t\n\r\f\v\\'])", r"\\\1", pw)


def _dsn_forms(pw: str) -> dict[str, tuple[str, str, str]]:
    """Form name -> (DSN with *pw*, that DSN redacted, *pw* as written in the DSN)."""
    forms = {
        "url-encoded": "postgresql://{u}:{p}@{h}:5432/app?sslmode=require",
        "url-raw": "postgresql://{u}:{p}@{h}:5432/app",
        "query-encoded": "postgresql://{u}@{h}:5432/app?sslmode=require&password={p}",
        "query-plus": "postgres://{u}@{h}/app?password={p}&sslmode=require",
        "kv-quoted": "host={h} port=5432 user={u} password={p} dbname=app",
        "kv-bare": "host={h} user={u} password={p} dbname=app",
        "kv-sslpassword": "host={h} user={u} sslpassword={p} dbname=app",
    }
    values = {
        "url-encoded": quote(pw, safe=""),
        "url-raw": pw,
        "query-encoded": quote(pw, safe=""),
        "query-plus": quote_plus(pw, safe=""),
        "kv-quoted": f"'{_escape_quoted(pw)}'",
        "kv-bare": _escape_bare(pw),
        "kv-sslpassword": f"'{_escape_quoted(pw)}'",
    }
    return {
        name: (
            template.format(u=_USER, h=_HOST, p=values[name]),
            template.format(u=_USER, h=_HOST, p=REDACTED),
            values[name],
        )
        for name, template in forms.items()
    }


@given(pw=_PASSWORD)
@example(pw="p@ss:w/rd?#x")
@example(pw="x?password=y")
@example(pw="a&password=b")
@example(pw="'quoted\\'")
@example(pw="sp ace")
@example(pw="a\u2003b")
@example(pw="@")
@example(pw="%41")
def test_any_password_is_redacted_in_every_form(pw: str) -> None:
    for name, (dsn, expected, _written) in _dsn_forms(pw).items():
        out = redact_dsn(dsn)
        encoded = quote(pw, safe="")
        if pw not in expected:
            assert pw not in out, (name, dsn, out)
        if encoded not in expected:
            assert encoded not in out, (name, dsn, out)
        if _reads(dsn):
            if name != "url-raw" or not set(pw) & set("?&"):
                # Unambiguous forms redact exactly the password, nothing else.
                assert out == expected, (name, dsn, out)
            assert out.startswith(expected[:10])
        else:
            assert name == "url-raw", (name, dsn)  # only a raw password can break a DSN
            assert out == REDACTED


@given(pw=_PASSWORD)
@example(pw="x?password=y")
@example(pw="a+b c")
def test_secrets_of_lets_redact_text_scrub_every_form(pw: str) -> None:
    # A '*' could straddle the marker and make a match that was never in the message.
    assume("*" not in pw)
    for name, (dsn, _expected, written) in _dsn_forms(pw).items():
        found = secrets_of(dsn)
        assert pw in found, (name, dsn, found)
        message = f"FATAL: password {pw} rejected; dsn {dsn}"
        out = redact_text(message, found)
        assert pw not in out, (name, message, out)
        assert written not in out, (name, message, out)


def test_text_in_neither_dsn_form_is_hidden_whole() -> None:
    text = "this is not a DSN at all S3cr3t"
    assert redact_dsn(text) == REDACTED
    assert secrets_of(text) == (text,)
    assert "S3cr3t" not in redact_text(f"could not parse {text!r}", secrets_of(text))


# -- secrets in free text: assignments, JSON, YAML, flags ---------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "PGPASSWORD={pw} psql -h db",
        "+ PGPASSWORD={pw}",
        "+ export 'DB_PASSWORD={pw}'",
        "DB_PASSWORD='{pw}'",
        'DB_PASSWORD="{pw}"',
        '{{"username": "app", "password": "{pw}", "host": "db"}}',
        '{{"db_password":"{pw}"}}',
        "password: {pw}",
        "  secret: {pw}",
        "psql --password {pw} -h db",
        "vault write --token={pw}",
        "X-Vault-Token: {pw}",
        "VAULT_TOKEN={pw} vault read db/creds/app",
    ],
)
def test_redact_text_hides_values_named_as_secrets(line: str) -> None:
    pw = "Zq7Lp4Xr"
    out = redact_text(line.format(pw=pw))
    assert pw not in out
    assert REDACTED in out


@pytest.mark.parametrize(
    "text",
    [
        'InvalidPasswordError: password authentication failed for user "app"',
        "passfile not found",
        "no pg_hba.conf entry for host",
    ],
)
def test_redact_text_leaves_messages_about_passwords_alone(text: str) -> None:
    assert redact_text(text) == text


_SECRET_LINES = [
    "PGPASSWORD={q}",
    "DB_PASSWORD={q}",
    '"password": {j}',
    "password: {pw}",
    "--password {q}",
    "+ export {q_assign}",
    "postgresql://app:{u}@db/app",
    "host=db password={kv}",
]


@given(pw=_PASSWORD, shape=st.sampled_from(_SECRET_LINES))
@example(pw="a b", shape="+ export {q_assign}")
@example(pw="x'y", shape="PGPASSWORD={q}")
def test_any_secret_in_a_known_shape_is_hidden(pw: str, shape: str) -> None:
    # A line holds one value; how a shell, JSON or libpq would quote it is theirs.
    assume("\n" not in pw and "\r" not in pw)
    line = shape.format(
        pw=pw.strip() or "x",
        q=shlex.quote(pw),
        j=json.dumps(pw),
        q_assign=shlex.quote(f"PGPASSWORD={pw}"),
        u=quote(pw, safe=""),
        kv=f"'{_escape_quoted(pw)}'",
    )
    assume(not leaked(pw, f"before {shape} after {REDACTED}"))
    out = redact_text(f"before {line} after")
    assert_no_piece_of(pw, out)
    assert out.startswith("before ")


def test_redaction_of_a_long_line_is_correct() -> None:
    # Linear time is measured in benchmarks/redaction.py; here, the result on such input.
    blob = "x" * 65536
    text = f"{blob} postgresql://u:s3cr3t@h/db {blob}?password=s3cr3t&a=b {blob}"
    out = redact_text(text)
    assert "s3cr3t" not in out
    assert out.count(REDACTED) == 2
    assert redact_text(blob) == blob
    assert redact_text("a://b:" * 10000) == "a://b:" * 10000


# -- describe_error: errors raised while connecting with a DSN ----------------------------


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        # asyncpg's own parse errors quote pieces of a password holding '/', '?' or '@'.
        ("postgresql://app:Ab/Qx7kLm@127.0.0.1:5432/app", "invalid literal for int(): 'Qx7kLm'"),
        ("postgresql://app:Ab?Zp2rTn@x@db/app", "bad query field: 'Zp2rTn@x@db/app'"),
        ("DATABASE_URL=postgresql://app:S3cr3tPw@db/app", "could not connect to S3cr3tPw@db"),
        ("host=db password='Qx7k Lm9z'", "unexpected 'Lm9z' and 'Qx7k'"),
        ("postgresql://app:p%C3%A9ss%2Fw0rd@db/app", "got 'péss/w0rd' ('p\\xe9ss')"),
    ],
)
def test_describe_error_removes_every_piece_of_the_password(dsn: str, message: str) -> None:
    out = describe_error(ValueError(message), dsn)
    assert out.startswith("ValueError: ")
    for piece in ("Qx7k", "x7kL", "Zp2r", "S3cr", "Lm9z", "péss", "ss/w", "w0rd", "\\xe9ss"):
        assert piece not in out, out


def test_describe_error_keeps_what_is_not_the_password() -> None:
    dsn = "postgresql://app:Qx7kLmZp@db:5432/app"
    exc = ValueError('password authentication failed for user "app" at db:5432')
    assert describe_error(exc, dsn) == f"ValueError: {exc}"
    assert describe_error(InvalidDSNError("invalid DSN: x"), dsn) == "invalid DSN: x"
    assert describe_error(ConnectionRefusedError(), dsn) == "ConnectionRefusedError"


def test_describe_error_marker_shares_no_character_with_the_password() -> None:
    dsn = "postgresql://app:a%2A%2A%2A%2Ab@db/app"  # the password is a****b
    out = describe_error(ValueError("got a****b"), dsn)
    assert "****" not in out
    assert out.startswith("ValueError: got ")


@given(
    pw=st.text(alphabet=_PASSWORD_CHARS, min_size=4, max_size=24),
    cut=st.tuples(st.integers(0, 24), st.integers(0, 24)),
    form=st.sampled_from(["url-raw", "url-encoded", "kv", "dotenv"]),
    shown=st.sampled_from(["raw", "quoted", "repr", "decoded"]),
)
def test_describe_error_hides_any_piece_in_any_form(
    pw: str, cut: tuple[int, int], form: str, shown: str
) -> None:
    dsn = {
        "url-raw": f"postgresql://app:{pw}@db/app",
        "url-encoded": f"postgresql://app:{quote(pw, safe='')}@db/app",
        "kv": f"host=db password='{_escape_quoted(pw)}'",
        "dotenv": f"DATABASE_URL=postgresql://app:{quote(pw, safe='')}@db/app",
    }[form]
    start, end = sorted(cut)
    piece = pw[start:end]
    printed = {
        "raw": piece,
        "quoted": quote(piece, safe=""),
        "repr": repr(piece),
        "decoded": unquote(piece),
    }[shown]
    out = describe_error(RuntimeError(f"bad value: {printed}!"), dsn)
    assert_no_piece_of(pw, out.removeprefix("RuntimeError: bad value: "))
