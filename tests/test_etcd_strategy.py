"""The etcd strategy without an etcd server: options, keys, failures at start, the parsing
of watch messages (compaction, cancellations), what a change logs, and the shared watch
against a scripted client (shared reads, what each subscriber sees, a silent member)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from importlib.metadata import PackageNotFoundError, entry_points, metadata

import anyio
import pytest

from aiohotload.errors import InvalidOptionError, InvalidURLError, SourceError, StrategyError
from aiohotload.strategies.etcd import EtcdStrategy, _shared_watch
from aiohotload.strategies.etcd._client import (
    BadTokenError,
    Batch,
    CompactedError,
    DeniedError,
    EtcdClient,
    Event,
    Read,
    UnavailableError,
)
from aiohotload.strategies.etcd._options import key_of, parse_options
from aiohotload.strategies.etcd._shared_watch import retry_delay, subscribe
from aiohotload.strategies.etcd._strategy import _new_value

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
async def etcd() -> AsyncIterator[EtcdClient]:
    client = EtcdClient(parse_options({"user": "app", "password": PASSWORD}), None)
    yield client
    await client.aclose()


def test_defaults_and_endpoint_forms() -> None:
    opts = parse_options({})
    assert opts.endpoints == ("http://127.0.0.1:2379",)
    assert opts.timeout == 5.0
    assert opts.keepalive == 10.0
    assert parse_options({"keepalive": "0"}).keepalive == 0
    assert opts.user is None and not opts.tls
    opts = parse_options(
        {"endpoints": " a:1, https://b:2 ,[::1],, http://c ,a:1", "timeout": "250ms"}
    )
    assert opts.endpoints == ("http://a:1", "https://b:2", "http://[::1]:2379", "http://c:2379")
    assert opts.timeout == 0.25
    tls = parse_options({"endpoints": "a:1,https://b", "ca_file": "/ca.pem"})
    assert tls.endpoints == ("https://a:1", "https://b:2379")


def test_password_is_not_in_repr() -> None:
    opts = parse_options({"user": "app", "password": PASSWORD})
    assert PASSWORD not in repr(opts)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"endpoint": "a:1"}, r"unknown option 'endpoint'.*known: ca_file, cert_file, endpoints"),
        ({"timeout": "soon"}, "option 'timeout' must be a duration"),
        ({"timeout": "0"}, "option 'timeout' must be a duration > 0"),
        ({"keepalive": "soon"}, "option 'keepalive' must be a duration >= 0"),
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
        parse_options(options)


def test_credentials_in_an_endpoint_are_refused_without_echoing_them() -> None:
    with pytest.raises(InvalidOptionError, match="give them as the user and password") as info:
        parse_options({"endpoints": f"http://app:{PASSWORD}@a:1"})
    assert PASSWORD not in str(info.value)


async def test_unreadable_tls_files_name_the_option() -> None:
    with pytest.raises(InvalidOptionError, match=r"option 'ca_file'.*/nonexistent/ca\.pem"):
        await start(ca_file="/nonexistent/ca.pem")
    with pytest.raises(InvalidOptionError, match="options 'cert_file' and 'key_file'"):
        await start(cert_file="/nonexistent/c.pem", key_file="/nonexistent/k.pem")


def test_key_is_the_path_after_the_drivers_slash() -> None:
    assert key_of("/app/dsn") == "app/dsn"
    assert key_of("//app/dsn") == "/app/dsn"
    with pytest.raises(InvalidURLError, match="needs a key"):
        key_of("/")


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
    assert [retry_delay(n, 3) for n in (1, 2, 4, 5)] == [0.0] * 4
    waits = [retry_delay(n, 1) for n in range(1, 10)]
    for n, wait in enumerate(waits):
        assert 0.8 * min(5.0, 0.1 * 2**n) <= wait <= 1.2 * min(5.0, 0.1 * 2**n)
    assert retry_delay(1000, 1) <= 1.2 * 5.0


def message(**result: object) -> str:
    return json.dumps({"result": result})


async def test_compacted_watch_reports_the_revision(etcd: EtcdClient) -> None:
    with pytest.raises(CompactedError) as info:
        etcd._watch_result(message(canceled=True, compact_revision="7"))
    assert info.value.revision == 7


@pytest.mark.parametrize(
    ("reason", "error"),
    [
        ("rpc error: code = Unauthenticated desc = etcdserver: invalid auth token", BadTokenError),
        ("rpc error: code = PermissionDenied desc = etcdserver: permission denied", DeniedError),
        ("rpc error: code = InvalidArgument desc = etcdserver: user name is empty", DeniedError),
        ("etcdserver: no leader", UnavailableError),
    ],
)
async def test_cancelled_watch_is_classified(
    etcd: EtcdClient, reason: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        etcd._watch_result(message(created=True, canceled=True, cancel_reason=reason))
    assert "rpc error" not in str(info.value)


async def test_watch_messages(etcd: EtcdClient) -> None:
    assert etcd._watch_result(message(created=True))["created"] is True
    error = {"error": {"grpc_code": 14, "message": f"etcdserver: no leader {PASSWORD}"}}
    with pytest.raises(UnavailableError) as info:
        etcd._watch_result(json.dumps(error))
    assert PASSWORD not in str(info.value)  # scrubbed, should anything ever echo it
    with pytest.raises(UnavailableError, match="not JSON"):
        etcd._watch_result("<html>")


def test_changes_are_logged_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohotload.strategies.etcd")
    old = f"postgresql://app:{PASSWORD}@db1/app"
    new = f"host=db2 user=app password={PASSWORD}"
    assert _new_value("k", Event(False, new.encode(), 5), old) == new
    assert _new_value("k", Event(False, old.encode(), 6), old) is None
    assert _new_value("k", Event(True, b"", 7), old) is None
    assert _new_value("k", Event(False, b" \n", 8), old) is None
    assert _new_value("k", Event(False, b"\xff", 9), old) is None
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


# ---------------------------------------------------------------------------- the shared watch


class ScriptedClient:
    """Stands in for EtcdClient: reads answer from ``values`` (or raise ``read_error``), and
    each watch yields the batches put in its queue, then waits, as a quiet stream does."""

    def __init__(self, endpoints: int = 2) -> None:
        self.value = b"postgresql://u@db1/app"
        self.revision = 10
        self.reads = 0
        self.read_started = asyncio.Event()
        self.release_read = asyncio.Event()
        self.release_read.set()
        self.read_error: Exception | None = None
        self.watches: list[tuple[int, int]] = []  # (endpoint index, start revision)
        self.batches: asyncio.Queue[Batch] = asyncio.Queue()
        self.index = 0
        self._endpoints = endpoints
        self.closed = False

    @property
    def endpoint(self) -> str:
        return f"http://member{self.index}:2379"

    @property
    def endpoints(self) -> int:
        return self._endpoints

    def next_endpoint(self) -> None:
        self.index = (self.index + 1) % self._endpoints

    async def read_any(self, key: str) -> Read:
        return await self.read(key)

    async def read(self, key: str) -> Read:
        self.reads += 1
        self.read_started.set()
        await self.release_read.wait()
        if self.read_error is not None:
            error, self.read_error = self.read_error, None
            raise error
        return Read(self.value, self.revision)

    async def watch(self, key: str, start: int) -> AsyncGenerator[Batch, None]:
        self.watches.append((self.index, start))
        yield Batch((), start - 1)
        while True:
            yield await self.batches.get()

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> ScriptedClient:
    scripted = ScriptedClient()
    monkeypatch.setattr(_shared_watch, "EtcdClient", lambda opts, context: scripted)
    return scripted


def change(value: str, revision: int) -> Batch:
    return Batch((Event(False, value.encode(), revision),), revision)


async def test_concurrent_subscribers_share_one_read_and_one_watch(client: ScriptedClient) -> None:
    client.release_read.clear()
    opts = parse_options({"endpoints": "a:1,b:2"})
    async with AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(subscribe(opts, "k")) for _ in range(5)]
        reads = [asyncio.ensure_future(sub.first_read()) for sub in subs]
        await client.read_started.wait()
        client.release_read.set()
        with anyio.fail_after(5):
            assert {(await r).revision for r in reads} == {10}
            await wait(lambda: client.watches)
        assert client.reads == 1
        assert client.watches == [(0, 11)]
        # Another key, or other options, is another watch.
        other = await stack.enter_async_context(subscribe(opts, "other"))
        assert other.watch is not subs[0].watch
        assert all(sub.watch is subs[0].watch for sub in subs)
    assert client.closed


async def test_a_subscriber_gets_only_changes_newer_than_its_read(client: ScriptedClient) -> None:
    opts = parse_options({})
    async with subscribe(opts, "k") as early:
        await early.first_read()
        await wait(lambda: client.watches)
        client.revision = 12  # the late one's read sees revision 12, the stream is at 10
        async with subscribe(opts, "k") as late:
            await late.first_read()
            await client.batches.put(change("postgresql://u@db2/app", 12))
            with anyio.fail_after(5):
                assert (await early.next_event()).revision == 12
            await client.batches.put(change("postgresql://u@db3/app", 13))
            await client.batches.put(change("postgresql://u@db4/app", 14))
            with anyio.fail_after(5):
                # Revision 12 is in its read; 13 was superseded before it looked.
                assert (await late.next_event()).value == b"postgresql://u@db4/app"
                assert (await early.next_event()).value == b"postgresql://u@db4/app"


async def test_a_silent_member_that_cannot_answer_a_read_is_left(
    client: ScriptedClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohotload.strategies.etcd")
    opts = parse_options({"endpoints": "a:1,b:2", "keepalive": "50ms", "timeout": "1s"})
    async with subscribe(opts, "k") as sub:
        await sub.first_read()
        await wait(lambda: client.watches)
        # The stream stays quiet; the read that checks on it fails as a frozen member's would.
        client.read_error = UnavailableError("no answer within 1s")
        await wait(lambda: len(client.watches) == 2)
        assert client.watches == [(0, 11), (1, 11)]
        (lost,) = [r.getMessage() for r in caplog.records if "lost the watch" in r.getMessage()]
        assert lost == (
            "lost the watch on etcd key 'k' through http://member0:2379: no answer within 1s "
            "to a read after the watch was silent for 0.05s; retrying (attempt 1)"
        )
        # Checks that succeed keep the watch where it is.
        reads = client.reads
        await wait(lambda: client.reads >= reads + 3)
        assert len(client.watches) == 2


async def test_denied_ends_the_watch_for_every_subscriber(client: ScriptedClient) -> None:
    opts = parse_options({"keepalive": "50ms"})
    async with subscribe(opts, "k") as a, subscribe(opts, "k") as b:
        await a.first_read()
        await b.first_read()
        await wait(lambda: client.watches)
        client.read_error = DeniedError("permission denied")
        for sub in (a, b):
            with anyio.fail_after(5), pytest.raises(StrategyError, match="'k': permission denied"):
                await sub.next_event()
        # Retired: a newcomer starts a watch of its own.
        async with subscribe(opts, "k") as c:
            assert c.watch is not a.watch


async def wait(condition: Callable[[], object], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)
