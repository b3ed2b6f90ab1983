"""Parsing of hotload URLs: valid forms, every error, and properties over any input."""

from __future__ import annotations

import math
import string
from urllib.parse import quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from aiohotload import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    HotloadError,
    HotloadURL,
    InvalidOptionError,
    InvalidURLError,
    parse_url,
)
from aiohotload.url import parse_bool, parse_duration

# -- valid URLs ---------------------------------------------------------------------------


def test_parses_strategy_driver_and_absolute_path() -> None:
    url = parse_url("watchfiles://postgres/etc/app/dsn.txt")
    assert url.strategy == "watchfiles"
    assert url.driver == "postgres"
    assert url.path == "/etc/app/dsn.txt"
    assert dict(url.options) == {}
    assert url.force_kill is False
    assert url.drain_timeout == DEFAULT_DRAIN_TIMEOUT
    assert url.connect_timeout == DEFAULT_CONNECT_TIMEOUT


def test_strategy_and_driver_are_lower_cased_but_path_is_not() -> None:
    url = parse_url("WatchFiles://PostGres/Etc/DSN.txt")
    assert (url.strategy, url.driver, url.path) == ("watchfiles", "postgres", "/Etc/DSN.txt")


def test_path_is_percent_decoded() -> None:
    url = parse_url("watchfiles://postgres/etc/my%20app/d%C3%A9j%C3%A0%3F.txt")
    assert url.path == "/etc/my app/déjà?.txt"


def test_plus_in_path_is_kept_literally() -> None:
    assert parse_url("watchfiles://postgres/a+b").path == "/a+b"


def test_surrounding_whitespace_is_ignored() -> None:
    assert parse_url("  watchfiles://postgres/x\n").path == "/x"


def test_fragment_is_dropped() -> None:
    url = parse_url("watchfiles://postgres/x?a=1#frag")
    assert url.path == "/x"
    assert dict(url.options) == {"a": "1"}


def test_go_hotload_form() -> None:
    url = parse_url("fsnotify://postgres/tmp/myconfig.txt?forceKill=true")
    assert url.strategy == "fsnotify"
    assert url.driver == "postgres"
    assert url.path == "/tmp/myconfig.txt"
    assert url.force_kill is True
    # Pool options are consumed, not passed on to the strategy.
    assert dict(url.options) == {}


def test_strategy_options_are_passed_untouched() -> None:
    url = parse_url(
        "watchfiles://postgres/x?Poll=1&debounce_ms=50&empty=&flag&k%20ey=v%26al+ue&drain=x"
    )
    assert dict(url.options) == {
        "Poll": "1",
        "debounce_ms": "50",
        "empty": "",
        "flag": "true",
        "k ey": "v&al ue",
        "drain": "x",
    }


def test_options_mapping_is_read_only() -> None:
    url = parse_url("watchfiles://postgres/x?a=1")
    with pytest.raises(TypeError):
        url.options["a"] = "2"  # type: ignore[index]


def test_empty_query_parts_are_skipped() -> None:
    url = parse_url("watchfiles://postgres/x?&a=1&&")
    assert dict(url.options) == {"a": "1"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("force_kill=true", True),
        ("forceKill=true", True),
        ("forceKill=TRUE", True),
        ("force_kill=1", True),
        ("force_kill=yes", True),
        ("force_kill=on", True),
        ("forceKill", True),
        ("force_kill=false", False),
        ("force_kill=0", False),
        ("forceKill=No", False),
        ("force_kill=off", False),
    ],
)
def test_force_kill(query: str, expected: bool) -> None:
    assert parse_url(f"watchfiles://postgres/x?{query}").force_kill is expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10", 10.0),
        ("2.5", 2.5),
        (".5", 0.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("1m", 60.0),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("1e1", 10.0),
        ("%2010%20s%20", 10.0),
    ],
)
@pytest.mark.parametrize("name", ["drain_timeout", "drainTimeout"])
def test_drain_timeout(name: str, value: str, seconds: float) -> None:
    url = parse_url(f"watchfiles://postgres/x?{name}={value}")
    assert url.drain_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("name", ["connect_timeout", "connectTimeout"])
def test_connect_timeout(name: str) -> None:
    assert parse_url(f"watchfiles://postgres/x?{name}=250ms").connect_timeout == 0.25


def test_all_options_together() -> None:
    url = parse_url(
        "watchfiles://postgres/etc/app/dsn.txt?forceKill=true&drain_timeout=10"
        "&connectTimeout=3&poll=true"
    )
    assert url == HotloadURL(
        strategy="watchfiles",
        driver="postgres",
        path="/etc/app/dsn.txt",
        options={"poll": "true"},
        force_kill=True,
        drain_timeout=10.0,
        connect_timeout=3.0,
    )


def test_equal_urls_hash_equal() -> None:
    a = parse_url("watchfiles://postgres/x?a=1&forceKill")
    b = parse_url("WATCHFILES://postgres/x?force_kill=true&a=1")
    assert a == b
    assert hash(a) == hash(b)
    assert a != parse_url("watchfiles://postgres/x?a=2&forceKill")


def test_repr_hides_secret_option_values() -> None:
    url = parse_url(
        "vault://postgres/db/creds?password=hunter2&api_token=tok-123&client_secret=s3cr3t"
        "&ApiKey=k-456&role=app"
    )
    text = repr(url)
    for secret in ("hunter2", "tok-123", "s3cr3t", "k-456"):
        assert secret not in text
    assert "'password': '********'" in text
    assert "'role': 'app'" in text
    assert "/db/creds" in text
    # The values stay available to the strategy.
    assert url.options["password"] == "hunter2"
    assert str(url) == text


# -- errors -------------------------------------------------------------------------------


def test_error_classes() -> None:
    for cls in (InvalidURLError, InvalidOptionError):
        assert issubclass(cls, ValueError)
        assert issubclass(cls, HotloadError)


@pytest.mark.parametrize("value", [None, 42, b"watchfiles://postgres/x", ["x"]])
def test_not_a_str(value: object) -> None:
    with pytest.raises(InvalidURLError, match=type(value).__name__):
        parse_url(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("", "must look like"),
        ("/etc/app/dsn.txt", r"must look like.*got '/etc/app/dsn\.txt'"),
        ("watchfiles:/postgres/x", "must look like"),
        ("postgresql:user@host", "must look like"),
        ("://postgres/x", "invalid strategy name ''"),
        ("1files://postgres/x", "invalid strategy name '1files'"),
        ("watch_files://postgres/x", "invalid strategy name 'watch_files'"),
        ("watch files://postgres/x", "invalid strategy name 'watch files'"),
        ("watchfiles\n://postgres/x", "invalid strategy name 'watchfiles\\\\n'"),
        ("wätch://postgres/x", "invalid strategy name 'wätch'"),
        ("watchfiles:///etc/x", "names no driver"),
        ("watchfiles://?a=1", "names no driver"),
        ("watchfiles://user@postgres/x", "looks like a DSN"),
        ("watchfiles://postgres:5432/x", "invalid driver name 'postgres:5432'"),
        ("watchfiles://-pg/x", "invalid driver name '-pg'"),
        ("watchfiles://pg\n/x", "invalid driver name 'pg\\\\n'"),
        ("watchfiles://pg%20x/x", "invalid driver name 'pg%20x'"),
        ("watchfiles://postgres", "names no path"),
        ("watchfiles://postgres/", "names no path"),
        ("watchfiles://postgres?a=1", "names no path"),
        ("watchfiles://postgres/#frag", "names no path"),
        ("watchfiles://postgres/a%00b", "NUL"),
        ("watchfiles://postgres/%FF", r"path '%FF' is not valid UTF-8"),
        ("watchfiles://postgres/a%C3", r"path 'a%C3' is not valid UTF-8"),
    ],
)
def test_invalid_url(url: str, match: str) -> None:
    with pytest.raises(InvalidURLError, match=match):
        parse_url(url)


def test_long_urls_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidURLError) as info:
        parse_url("x" * 1000)
    assert len(str(info.value)) < 300
    assert "..." in str(info.value)


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("a=1&a=2", "option 'a' is given more than once"),
        ("force_kill=true&forceKill=true", "option 'forceKill' is given more than once"),
        ("forceKill=1&force_kill=1", "option 'force_kill' is given more than once"),
        ("drain_timeout=1&drainTimeout=2", "option 'drainTimeout' is given more than once"),
        ("connectTimeout=1&connect_timeout=1", "'connect_timeout' is given more than once"),
        ("=1", "empty name"),
        ("force_kill=maybe", "option 'force_kill' must be a boolean.*got 'maybe'"),
        ("forceKill=", "option 'force_kill' must be a boolean.*got ''"),
        ("force_kill=2", "must be a boolean.*got '2'"),
        ("drain_timeout=-1", "option 'drain_timeout' must be a duration >= 0.*got '-1'"),
        ("drainTimeout=-0.5s", "'drain_timeout'.*got '-0.5s'"),
        ("drain_timeout=nan", "'drain_timeout'.*got 'nan'"),
        ("drain_timeout=NaN", "'drain_timeout'.*got 'NaN'"),
        ("drain_timeout=inf", "'drain_timeout'.*got 'inf'"),
        ("drain_timeout=1e400", "'drain_timeout'.*got '1e400'"),
        ("drain_timeout=infinity", "'drain_timeout'.*got 'infinity'"),
        ("drain_timeout=ten", "'drain_timeout'.*got 'ten'"),
        ("drain_timeout=10x", "'drain_timeout'.*got '10x'"),
        ("drain_timeout=10 ms s", "'drain_timeout'.*got '10 ms s'"),
        ("drain_timeout=5.", "'drain_timeout'.*got '5.'"),
        ("drain_timeout=", "'drain_timeout'.*got ''"),
        ("drain_timeout", "'drain_timeout'.*got 'true'"),
        ("drain_timeout=0x10", "'drain_timeout'.*got '0x10'"),
        ("connect_timeout=0", "option 'connect_timeout' must be a duration > 0.*got '0'"),
        ("connectTimeout=0ms", "'connect_timeout' must be a duration > 0.*got '0ms'"),
        ("connect_timeout=-1", "'connect_timeout' must be a duration > 0"),
        ("a=%FF", "option 'a' is not valid UTF-8"),
        ("%C3=1", "option '%C3' is not valid UTF-8"),
        ("ok=%E2%82", "option 'ok' is not valid UTF-8"),
    ],
)
def test_invalid_option(query: str, match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        parse_url(f"watchfiles://postgres/x?{query}")


def test_parse_helpers_directly() -> None:
    assert parse_bool("x", " Yes ") is True
    assert parse_duration("x", "0") == 0.0
    with pytest.raises(InvalidOptionError, match="'x' must be a duration > 0"):
        parse_duration("x", "0s", allow_zero=False)
    with pytest.raises(InvalidOptionError, match=r"got 'aaa.*\.\.\.'"):
        parse_duration("x", "a" * 200)


# -- properties ---------------------------------------------------------------------------

# Text made of URL pieces, to reach past the first checks far more often than st.text().
_URLISH = st.lists(
    st.sampled_from(
        [
            *"azAZ09+-._~:/?#&=%@ \n\x00é",
            *("://", "%FF", "%C3", "%2F", "%20", "forceKill"),
            *("drain_timeout=", "connect_timeout=", "1e999", "ms", "nan"),
        ]
    ),
    max_size=30,
).map("".join)


@given(st.one_of(st.text(), _URLISH, st.builds(lambda s: "watchfiles://postgres/" + s, _URLISH)))
@example("watchfiles://postgres/%FF")
@example("watchfiles://postgres/x?a=%FF")
@example("watchfiles\n://postgres/x")
def test_any_text_parses_or_raises_hotload_error(text: str) -> None:
    # Anything but these two (IndexError, UnicodeError, ...) propagates and fails the test.
    try:
        url: HotloadURL | None = parse_url(text)
    except (InvalidURLError, InvalidOptionError) as exc:
        url, message = None, str(exc)
    if url is None:
        assert message
        return
    assert isinstance(url, HotloadURL)
    assert url.strategy == url.strategy.lower()
    assert url.path.startswith("/")
    assert url.path != "/"
    assert "\x00" not in url.path
    assert url.drain_timeout >= 0
    assert math.isfinite(url.drain_timeout)
    assert url.connect_timeout > 0
    assert math.isfinite(url.connect_timeout)
    repr(url)
    hash(url)


_STRATEGY = st.from_regex(r"[A-Za-z][A-Za-z0-9+.\-]{0,15}", fullmatch=True)
_DRIVER = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+\-]{0,15}", fullmatch=True)
_POOL_OPTION_NAMES = {
    "force_kill",
    "forceKill",
    "drain_timeout",
    "drainTimeout",
    "connect_timeout",
    "connectTimeout",
}
_SEGMENT = st.text(min_size=1).filter(lambda s: "\x00" not in s)
_OPTIONS = st.dictionaries(
    st.text(min_size=1).filter(lambda k: k not in _POOL_OPTION_NAMES), st.text(), max_size=5
)


@given(
    strategy=_STRATEGY,
    driver=_DRIVER,
    segments=st.lists(_SEGMENT, min_size=1, max_size=4),
    options=_OPTIONS,
    force_kill=st.booleans(),
    drain_ms=st.integers(min_value=0, max_value=10**6),
)
def test_valid_parts_round_trip(
    *,
    strategy: str,
    driver: str,
    segments: list[str],
    options: dict[str, str],
    force_kill: bool,
    drain_ms: int,
) -> None:
    path = "/" + "/".join(segments)
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in options.items())
    query += f"&forceKill={str(force_kill).lower()}&drain_timeout={drain_ms}ms"
    text = f"{strategy}://{driver}{quote(path)}?{query}"

    url = parse_url(text)

    assert url.strategy == strategy.lower()
    assert url.driver == driver.lower()
    assert url.path == path
    assert dict(url.options) == options
    assert url.force_kill is force_kill
    assert url.drain_timeout == pytest.approx(drain_ms / 1000)


@given(
    name=st.sampled_from(["password", "db_password", "TOKEN", "client_secret", "sslkey", "apiKey"]),
    value=st.text(),
)
def test_repr_never_shows_secret_option_values(name: str, value: str) -> None:
    url = parse_url(f"s://d/x?{name}={quote(f'<<{value}>>', safe='')}&user=bob")
    shown = repr(url)
    assert "<<" not in shown
    assert f"{name!r}: '********'" in shown
    assert "'user': 'bob'" in shown


def test_printable_ascii_path_round_trips() -> None:
    path = "/" + string.printable.replace("\x00", "")
    assert parse_url("s://d" + quote(path)).path == path


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:hunter2secret@db.example.com:5432/app",
        "postgres://alice:hunter2secret@db.example.com/app?sslmode=require",
        "alice:hunter2secret@db.example.com",
    ],
)
def test_a_dsn_passed_as_url_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(HotloadError) as info:
        parse_url(url)
    assert "hunter2secret" not in str(info.value)
