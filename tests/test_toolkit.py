"""The strategies' shared toolkit: option checks, backoff, TLS contexts, quoting and
describing errors."""

from __future__ import annotations

import ssl
from pathlib import Path

import certifi
import pytest

from aiohotload.errors import InvalidOptionError
from aiohotload.strategies.toolkit import (
    Backoff,
    OptionReader,
    check_options,
    describe_error,
    quoted,
    tls_context,
)

PASSWORD = "s3cr3t-pw"


def reader(**options: str) -> OptionReader:
    return OptionReader("demo", options, ("interval", "retries", "tls", "force_tls", "name"))


# ---------------------------------------------------------------------------- unknown options


def test_unknown_option_names_the_strategy_and_the_known_ones() -> None:
    with pytest.raises(InvalidOptionError) as info:
        check_options("demo", {"interval": "1", "intreval": "1"}, ("interval", "timeout"))
    assert str(info.value) == (
        "unknown option 'intreval' for the demo strategy; known: interval, timeout"
    )


def test_a_strategy_without_options_says_so() -> None:
    with pytest.raises(InvalidOptionError) as info:
        check_options("demo", {"b": "1", "a": "2"}, ())
    assert str(info.value) == "the demo strategy takes no options; got 'a', 'b'"
    check_options("demo", {}, ())


def test_an_unknown_option_name_is_quoted_safely() -> None:
    name = f"password={PASSWORD}" + "x" * 200
    with pytest.raises(InvalidOptionError) as info:
        check_options("demo", {name: "1"}, ("interval",))
    assert PASSWORD not in str(info.value)
    assert len(str(info.value)) < 200


# ---------------------------------------------------------------------------- values


def test_absent_options_take_their_default() -> None:
    opts = reader()
    assert opts.duration("interval", 60.0) == 60.0
    assert opts.integer("retries", 3, minimum=0, maximum=10) == 3
    assert opts.boolean("tls", True, "force_tls") is True
    assert opts.text("name") is None
    assert "name" not in opts


def test_given_options_are_parsed() -> None:
    opts = reader(interval="500ms", retries=" 7 ", force_tls="off", name="x")
    assert opts.duration("interval", 60.0) == 0.5
    assert opts.integer("retries", 3, minimum=0, maximum=10) == 7
    assert opts.boolean("tls", True, "force_tls") is False
    assert opts.text("name") == "x"
    assert "name" in opts


@pytest.mark.parametrize(
    ("options", "read", "message"),
    [
        (
            {"interval": "0"},
            lambda o: o.duration("interval", 1.0),
            "option 'interval' must be a duration > 0 in seconds",
        ),
        (
            {"interval": "soon"},
            lambda o: o.duration("interval", 1.0, allow_zero=True),
            "option 'interval' must be a duration >= 0 in seconds (e.g. 30, 2.5, 500ms, 1m); "
            "got 'soon'",
        ),
        (
            {"retries": "11"},
            lambda o: o.integer("retries", 3, minimum=0, maximum=10),
            "option 'retries' must be a whole number from 0 to 10; got '11'",
        ),
        (
            {"retries": "1.5"},
            lambda o: o.integer("retries", 3, minimum=1, maximum=5, unit="attempts"),
            "option 'retries' must be a whole number of attempts from 1 to 5; got '1.5'",
        ),
        (
            {"force_tls": "maybe"},
            lambda o: o.boolean("tls", True, "force_tls"),
            "option 'force_tls' must be a boolean (true/false, 1/0, yes/no, on/off); got 'maybe'",
        ),
        (
            {"tls": "1", "force_tls": "1"},
            lambda o: o.boolean("tls", True, "force_tls"),
            "options 'tls' and 'force_tls' mean the same; give one",
        ),
    ],
)
def test_bad_values_name_the_option_and_quote_the_value(
    options: dict[str, str], read: object, message: str
) -> None:
    opts = reader(**options)
    with pytest.raises(InvalidOptionError) as info:
        read(opts)  # type: ignore[operator]
    assert str(info.value).startswith(message)


def test_a_bad_value_holding_a_password_is_not_echoed() -> None:
    opts = reader(retries=f"postgresql://app:{PASSWORD}@db/app")
    with pytest.raises(InvalidOptionError) as info:
        opts.integer("retries", 3, minimum=0, maximum=10)
    assert PASSWORD not in str(info.value)


# ---------------------------------------------------------------------------- text


def test_quoted_cuts_long_text_after_redacting_it() -> None:
    assert quoted("short") == "'short'"
    assert quoted("a\nb") == "'a\\nb'"
    long = "x" * 100
    assert quoted(long) == repr("x" * 77 + "...")
    assert quoted(long, limit=10) == repr("x" * 7 + "...")
    # The '@' that marks the password is past the cut: redacting first still hides it.
    dsn = f"postgresql://app:{PASSWORD * 20}@db/app"
    assert PASSWORD not in quoted(dsn)


def test_describe_error() -> None:
    assert describe_error(ValueError("bad value")) == "ValueError: bad value"
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert describe_error(PermissionError(13, "Permission denied", "/x")) == "Permission denied"
    assert describe_error(FileNotFoundError("no such thing")) == "FileNotFoundError: no such thing"
    described = describe_error(RuntimeError(f"token {PASSWORD} password={PASSWORD}"), [PASSWORD])
    assert PASSWORD not in described
    assert describe_error(RuntimeError(f"dsn host=h password={PASSWORD}")).endswith("********")


# ---------------------------------------------------------------------------- backoff


def test_backoff_doubles_up_to_its_maximum_with_jitter() -> None:
    backoff = Backoff(first=0.25, maximum=15.0, jitter=0.2)
    middles = [backoff.delay(n, jitter=False) for n in range(1, 10)]
    assert middles == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    for n, middle in enumerate(middles, start=1):
        for _ in range(20):
            assert 0.8 * middle <= backoff.delay(n) <= 1.2 * middle
    assert backoff.delay(10**6, jitter=False) == 15.0  # no overflow after a long outage
    assert backoff.delay(0, jitter=False) == 0.25


def test_backoff_spreads_its_delays() -> None:
    backoff = Backoff(first=1.0, maximum=1.0, jitter=0.5)
    assert len({backoff.delay(1) for _ in range(20)}) > 1


def test_backoff_below_never_waits_longer_than_the_nominal_delay() -> None:
    backoff = Backoff(first=1.0, maximum=8.0, jitter=0.5, below=True)
    nominals = [backoff.delay(n, jitter=False) for n in range(1, 7)]
    assert nominals == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for n, nominal in enumerate(nominals, start=1):
        delays = {backoff.delay(n) for _ in range(20)}
        assert all(nominal / 2 <= delay <= nominal for delay in delays)
        assert len(delays) > 1


# ---------------------------------------------------------------------------- TLS


def test_tls_context_verifies_servers_with_the_given_ca_or_the_systems() -> None:
    for context in (tls_context(None), tls_context(certifi.where())):
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.check_hostname
    assert tls_context(certifi.where()).get_ca_certs()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"^option 'ca_file': cannot load '.*nope\.pem': No such file or directory$"),
        ({"ca_option": "option 'ca_file' (or X_CA)"}, r"^option 'ca_file' \(or X_CA\): "),
    ],
)
def test_an_unreadable_ca_file_names_the_option(
    tmp_path: Path, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        tls_context(str(tmp_path / "nope.pem"), **kwargs)


def test_a_ca_file_that_is_not_pem_names_the_option(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text(f"not a certificate, password={PASSWORD}\n")
    with pytest.raises(InvalidOptionError, match=r"^option 'ca_file': cannot load ") as info:
        tls_context(str(tmp_path / "ca.pem"))
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("key", "cert_option", "named"),
    [
        (False, None, "option 'cert_file'"),
        (True, None, "options 'cert_file' and 'key_file'"),
        (True, "option 'cert_file' (or X_CERT)", "option 'cert_file' (or X_CERT)"),
    ],
)
def test_an_unloadable_client_certificate_names_the_options(
    tmp_path: Path, key: bool, cert_option: str | None, named: str
) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not a certificate\n")
    key_file = str(tmp_path / "client.key") if key else None
    with pytest.raises(InvalidOptionError) as info:
        tls_context(None, str(cert), key_file, cert_option=cert_option)
    assert str(info.value).startswith(f"{named}: cannot load the client certificate: ")
