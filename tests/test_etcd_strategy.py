"""The etcd strategy without an etcd server: options, keys, failures at start, the parsing
of watch messages (compaction, cancellations) and what a change logs."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import PackageNotFoundError, entry_points, metadata

import anyio
import pytest

from aiohotload.errors import InvalidOptionError, InvalidURLError, SourceError
from aiohotload.strategies.etcd import (
    EtcdStrategy,
    _backoff,
    _BadTokenError,
    _CompactedError,
    _DeniedError,
    _Etcd,
    _Event,
    _key_of,
    _new_value,
    _parse_options,
    _UnavailableError,
)

PASSWORD = "s3cr3t-pw"


async def start(path: str = "/app/dsn", **options: str) -> str:
    """The first value the strategy yields (or the error it raises at start)."""
    gen = EtcdStrategy().watch(path, options)
    try:
        with anyio.fail_after(10):
            return await anext(gen)
    finally:
        await gen.aclose()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.fixture
async def etcd() -> AsyncIterator[_Etcd]:
    client = _Etcd(_parse_options({"user": "app", "password": PASSWORD}), None)
    yield client
    await client.aclose()


def test_defaults_and_endpoint_forms() -> None:
    opts = _parse_options({})
    assert opts.endpoints == ("http://127.0.0.1:2379",)
    assert opts.timeout == 5.0
    assert opts.user is None and not opts.tls
    opts = _parse_options(
        {"endpoints": " a:1, https://b:2 ,[::1],, http://c ,a:1", "timeout": "250ms"}
    )
    assert opts.endpoints == ("http://a:1", "https://b:2", "http://[::1]:2379", "http://c:2379")
    assert opts.timeout == 0.25
    tls = _parse_options({"endpoints": "a:1,https://b", "ca_file": "/ca.pem"})
    assert tls.endpoints == ("https://a:1", "https://b:2379")


def test_password_is_not_in_repr() -> None:
    opts = _parse_options({"user": "app", "password": PASSWORD})
    assert PASSWORD not in repr(opts)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"endpoint": "a:1"}, r"unknown option 'endpoint'.*known: ca_file, cert_file, endpoints"),
        ({"timeout": "soon"}, "option 'timeout' must be a duration"),
        ({"timeout": "0"}, "option 'timeout' must be a duration > 0"),
        ({"key_file": "/k.pem"}, "option 'key_file' needs 'cert_file'"),
        ({"ca_file": " "}, "option 'ca_file' is empty"),
        ({"user": "app"}, "option 'user' needs option 'password'"),
        ({"password": PASSWORD}, "option 'password' needs option 'user'"),
        ({"user": "", "password": PASSWORD}, "option 'user' is empty"),
        ({"endpoints": " , "}, "option 'endpoints' names no endpoint"),
        ({"endpoints": "a:99999"}, "'a:99999' is not host:port"),
        ({"endpoints": "a:port"}, "'a:port' is not host:port"),
        ({"endpoints": "ftp://a:1"}, "'ftp://a:1' is not host:port"),
        ({"endpoints": "a:1/v3"}, "'a:1/v3' is not host:port"),
        ({"endpoints": "http://a:1", "ca_file": "/ca.pem"}, "'http://a:1' is plain http://"),
    ],
)
def test_bad_options(options: dict[str, str], match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        _parse_options(options)


def test_credentials_in_an_endpoint_are_refused_without_echoing_them() -> None:
    with pytest.raises(InvalidOptionError, match="give them as the user and password") as info:
        _parse_options({"endpoints": f"http://app:{PASSWORD}@a:1"})
    assert PASSWORD not in str(info.value)


async def test_unreadable_tls_files_name_the_option() -> None:
    with pytest.raises(InvalidOptionError, match=r"option 'ca_file'.*/nonexistent/ca\.pem"):
        await start(ca_file="/nonexistent/ca.pem")
    with pytest.raises(InvalidOptionError, match="options 'cert_file' and 'key_file'"):
        await start(cert_file="/nonexistent/c.pem", key_file="/nonexistent/k.pem")


def test_key_is_the_path_after_the_drivers_slash() -> None:
    assert _key_of("/app/dsn") == "app/dsn"
    assert _key_of("//app/dsn") == "/app/dsn"
    with pytest.raises(InvalidURLError, match="needs a key"):
        _key_of("/")


async def test_unreachable_endpoints_fail_at_start_naming_each(closed_port: int) -> None:
    endpoints = f"127.0.0.1:{closed_port},localhost:{closed_port}"
    with pytest.raises(SourceError) as info:
        await start(endpoints=endpoints, user="app", password=PASSWORD)
    message = str(info.value)
    assert "'app/dsn'" in message
    assert f"http://127.0.0.1:{closed_port}: ConnectError" in message
    assert f"http://localhost:{closed_port}:" in message
    assert PASSWORD not in message


async def test_silent_endpoint_fails_within_the_timeout(silent_port: int) -> None:
    with pytest.raises(SourceError, match=r"no answer within 0\.2s"):
        await start(endpoints=f"127.0.0.1:{silent_port}", timeout="200ms")


def test_backoff_tries_every_endpoint_before_waiting() -> None:
    assert [_backoff(n, 3) for n in (1, 2, 4, 5)] == [0.0] * 4
    waits = [_backoff(n, 1) for n in range(1, 10)]
    for n, wait in enumerate(waits):
        assert 0.8 * min(5.0, 0.1 * 2**n) <= wait <= 1.2 * min(5.0, 0.1 * 2**n)
    assert _backoff(1000, 1) <= 1.2 * 5.0


def message(**result: object) -> str:
    return json.dumps({"result": result})


async def test_compacted_watch_reports_the_revision(etcd: _Etcd) -> None:
    with pytest.raises(_CompactedError) as info:
        etcd._watch_result(message(canceled=True, compact_revision="7"))
    assert info.value.revision == 7


@pytest.mark.parametrize(
    ("reason", "error"),
    [
        ("rpc error: code = Unauthenticated desc = etcdserver: invalid auth token", _BadTokenError),
        ("rpc error: code = PermissionDenied desc = etcdserver: permission denied", _DeniedError),
        ("rpc error: code = InvalidArgument desc = etcdserver: user name is empty", _DeniedError),
        ("etcdserver: no leader", _UnavailableError),
    ],
)
async def test_cancelled_watch_is_classified(
    etcd: _Etcd, reason: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        etcd._watch_result(message(created=True, canceled=True, cancel_reason=reason))
    assert "rpc error" not in str(info.value)


async def test_watch_messages(etcd: _Etcd) -> None:
    assert etcd._watch_result(message(created=True))["created"] is True
    error = {"error": {"grpc_code": 14, "message": f"etcdserver: no leader {PASSWORD}"}}
    with pytest.raises(_UnavailableError) as info:
        etcd._watch_result(json.dumps(error))
    assert PASSWORD not in str(info.value)  # scrubbed, should anything ever echo it
    with pytest.raises(_UnavailableError, match="not JSON"):
        etcd._watch_result("<html>")


def test_changes_are_logged_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohotload.strategies.etcd")
    old = f"postgresql://app:{PASSWORD}@db1/app"
    new = f"host=db2 user=app password={PASSWORD}"
    assert _new_value("k", _Event(False, new.encode(), 5), old) == new
    assert _new_value("k", _Event(False, old.encode(), 6), old) is None
    assert _new_value("k", _Event(True, b"", 7), old) is None
    assert _new_value("k", _Event(False, b" \n", 8), old) is None
    assert _new_value("k", _Event(False, b"\xff", 9), old) is None
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "etcd key 'k' changed (revision 5): host=db2 user=app password=********"
    assert caplog.records[0].levelno == logging.INFO
    assert "deleted (revision 7)" in messages[2]
    assert "is empty (revision 8)" in messages[3]
    assert "is not valid UTF-8 (revision 9)" in messages[4]
    assert all(PASSWORD not in m for m in messages)


def test_entry_point_names_the_strategy() -> None:
    try:
        extras = metadata("aiohotload").get_all("Provides-Extra") or []
    except PackageNotFoundError:
        pytest.skip("aiohotload is not installed")
    if "etcd" not in extras:
        pytest.skip("the installed metadata predates the etcd extra; reinstall the project")
    (ep,) = [ep for ep in entry_points(group="aiohotload.strategies") if ep.name == "etcd"]
    assert ep.load() is EtcdStrategy
