"""The etcd strategy against a real etcd server: replicas, restarts, deletes, compaction,
endpoint failover, authentication and TLS."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import quote

import anyio
import pytest

import aiohotload
from aiohotload.strategies import register_strategy, unregister_strategy
from aiohotload.strategies.etcd import EtcdStrategy
from aiohotload.testing import PgServer, RoleFactory, hostile_password, port_of, wait_until

from .etcd_server import EtcdServer, connections_to, find_etcd, make_tls_files
from .tcpproxy import TcpProxy

pytestmark = [pytest.mark.timeout(60), pytest.mark.source]

ETCD = find_etcd()
if ETCD is None:
    _MESSAGE = "no etcd binary: install etcd-server (apt) or put etcd on PATH"
    if os.environ.get("CI"):
        pytest.fail(_MESSAGE, pytrace=False)
    pytest.skip(_MESSAGE, allow_module_level=True)

LOGGER = "aiohotload.strategies.etcd"


@pytest.fixture(scope="module", autouse=True)
def _etcd_strategy() -> Iterator[None]:
    """Register the strategy by hand where the installed metadata predates its entry point."""
    if any(ep.name == "etcd" for ep in entry_points(group="aiohotload.strategies")):
        yield
        return
    register_strategy("etcd", EtcdStrategy())
    yield
    unregister_strategy("etcd")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """An etcd server shared by the module's tests; each uses keys of its own."""
    assert ETCD is not None
    server = EtcdServer(tmp_path_factory.mktemp("etcd"), binary=ETCD)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def etcd_disposable(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd server for this test alone: it may be restarted or have auth turned on."""
    assert ETCD is not None
    server = EtcdServer(tmp_path / "etcd", binary=ETCD)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
async def proxy(etcd: EtcdServer) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the shared server, whose connections a test can cut."""
    proxy = await TcpProxy("127.0.0.1", etcd.port).start()
    yield proxy
    await proxy.close()


def endpoint(proxy: TcpProxy) -> str:
    return f"127.0.0.1:{proxy.port}"


def cut(proxy: TcpProxy) -> None:
    """The network to etcd fails: every connection reset, and each new one, until resumed."""
    proxy.mode = "reset"
    proxy.cut()


@pytest.fixture
def key() -> str:
    return f"hl/{secrets.token_hex(4)}/dsn"


@dataclass(frozen=True)
class Targets:
    """DSNs of one role (same name and password) on ``pg_a`` and on ``pg_b``."""

    a: str
    a_kv: str
    b: str
    port_a: int
    port_b: int
    password: str


@pytest.fixture
async def targets(pg_a: PgServer, pg_b: PgServer, role: RoleFactory) -> Targets:
    name, password = await role(pg_a)
    await role(pg_b, name=name, password=password)
    return Targets(
        a=pg_a.dsn(name, password),
        a_kv=pg_a.kv_dsn(name, password),
        b=pg_b.dsn(name, password),
        port_a=pg_a.port,
        port_b=pg_b.port,
        password=password,
    )


def url_for(key: str, endpoints: str, **options: str) -> str:
    query = "&".join(
        f"{k}={quote(v, safe='')}" for k, v in {"endpoints": endpoints, **options}.items()
    )
    return f"etcd://postgres/{key}?{query}"


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


def watch(key: str, **options: str) -> AsyncGenerator[str, None]:
    return EtcdStrategy().watch("/" + key, options)


async def next_value(gen: AsyncGenerator[str, None], timeout: float = 10.0) -> str:
    with anyio.fail_after(timeout):
        return await anext(gen)


async def test_replicas_all_follow_a_put(
    etcd: EtcdServer,
    targets: Targets,
    key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohotload")
    await etcd.put(key, targets.a)
    url = url_for(key, etcd.endpoint)
    pools = await asyncio.gather(
        *(aiohotload.create_pool(url, name=f"replica{i}", min_size=1, max_size=2) for i in range(3))
    )
    try:
        assert [await port_of(p) for p in pools] == [targets.port_a] * 3
        swaps = [asyncio.ensure_future(p.wait_for_swap(timeout=10)) for p in pools]
        await etcd.put(key, targets.b)
        assert await asyncio.gather(*swaps) == [1, 1, 1]
        assert [await port_of(p) for p in pools] == [targets.port_b] * 3
    finally:
        await asyncio.gather(*(p.close() for p in pools))
    changes = logged(caplog, "changed")
    assert len(changes) == 3 and all(r.levelno == logging.INFO for r in changes)
    assert all(str(targets.port_b) in r.getMessage() for r in changes)
    for record in caplog.records:
        assert targets.password not in record.getMessage()


async def test_follows_the_key_across_an_etcd_restart(
    etcd_disposable: EtcdServer,
    targets: Targets,
    key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = etcd_disposable
    await server.put(key, targets.a)
    async with aiohotload.create_pool(
        url_for(key, server.endpoint), min_size=1, max_size=2
    ) as pool:
        await server.put(key, targets.b)
        assert await pool.wait_for_swap(timeout=10) == 1
        await asyncio.to_thread(server.stop)
        await wait_until(lambda: logged(caplog, "lost the watch"), timeout=10)
        await asyncio.to_thread(server.start)
        await server.put(key, targets.a_kv)
        assert await pool.wait_for_swap(timeout=15) == 2
        assert await port_of(pool) == targets.port_a
        assert pool.last_error is None


async def test_deleted_key_keeps_the_pool_until_recreated(
    etcd: EtcdServer,
    targets: Targets,
    key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await etcd.put(key, targets.a)
    async with aiohotload.create_pool(url_for(key, etcd.endpoint), min_size=1, max_size=2) as pool:
        await etcd.delete(key)
        await wait_until(lambda: logged(caplog, "was deleted"), timeout=10)
        await etcd.put(key, "  \n")
        await wait_until(lambda: logged(caplog, "is empty"), timeout=10)
        assert await port_of(pool) == targets.port_a
        assert pool.generation == 0
        await etcd.put(key, targets.b)
        assert await pool.wait_for_swap(timeout=10) == 1
        assert await port_of(pool) == targets.port_b


async def test_compaction_while_disconnected_rereads_the_key(
    etcd: EtcdServer, proxy: TcpProxy, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    await etcd.put(key, "postgresql://u@db1/app")
    gen = watch(key, endpoints=endpoint(proxy))
    try:
        assert await next_value(gen) == "postgresql://u@db1/app"
        pending = asyncio.ensure_future(next_value(gen))
        await wait_until(lambda: logged(caplog, "watch created"), timeout=10)
        cut(proxy)
        await wait_until(lambda: logged(caplog, "lost the watch"), timeout=10)
        # Changes the watcher cannot see, then the history it would resume from is dropped.
        for n in (2, 3, 4):
            await etcd.put(key, f"postgresql://u@db{n}/app")
        await etcd.put(f"{key}-other", "x")
        await etcd.compact()
        proxy.mode = "pass"
        assert await pending == "postgresql://u@db4/app"
        assert logged(caplog, "compacted")
        await etcd.put(key, "postgresql://u@db5/app")
        assert await next_value(gen) == "postgresql://u@db5/app"
    finally:
        await gen.aclose()


async def test_moves_to_the_next_endpoint_when_one_fails(
    etcd: EtcdServer, proxy: TcpProxy, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    await etcd.put(key, "postgresql://u@db1/app")
    gen = watch(key, endpoints=f"{endpoint(proxy)},{etcd.endpoint}")
    try:
        assert await next_value(gen) == "postgresql://u@db1/app"
        pending = asyncio.ensure_future(next_value(gen))
        await wait_until(lambda: logged(caplog, "watch created"), timeout=10)
        cut(proxy)
        await etcd.put(key, "postgresql://u@db2/app")
        assert await pending == "postgresql://u@db2/app"
        assert logged(caplog, f"through http://{endpoint(proxy)}")
        assert logged(caplog, f"again through http://{etcd.endpoint}")
    finally:
        await gen.aclose()


async def test_member_without_a_leader_is_left_and_watched_again(
    tmp_path: Path, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    assert ETCD is not None
    members = EtcdServer.cluster(tmp_path, binary=ETCD, size=3)
    watched, *others = members
    try:
        EtcdServer.start_all(members)
        await watched.put(key, "postgresql://u@db1/app")
        endpoints = ",".join(m.endpoint for m in members)
        gen = watch(key, endpoints=endpoints, timeout="1s")
        try:
            assert await next_value(gen) == "postgresql://u@db1/app"
            pending = asyncio.ensure_future(next_value(gen, timeout=30))
            await wait_until(lambda: logged(caplog, "watch created"), timeout=10)
            # Without a quorum the member has no leader: a watch on it would silently stall.
            for member in others:
                member.kill()
            await wait_until(lambda: logged(caplog, "no leader"), timeout=10)
            for member in others:
                member.launch()
            # One of them is enough for a quorum again; the other may take seconds to catch up.
            await asyncio.to_thread(others[0].wait_ready)
            await others[0].put(key, "postgresql://u@db2/app")
            assert await pending == "postgresql://u@db2/app"
        finally:
            await gen.aclose()
    finally:
        for member in members:
            member.kill()  # a graceful stop may wait seconds for a leadership transfer
            member.cleanup()


async def test_start_fails_clearly(etcd: EtcdServer, key: str) -> None:
    with pytest.raises(aiohotload.SourceError, match=f"'{key}' does not exist"):
        await asyncio.wait_for(aiohotload.create_pool(url_for(key, etcd.endpoint)), timeout=10)
    await etcd.put(key, " ")
    with pytest.raises(aiohotload.SourceError, match=f"'{key}' holds a value that is empty"):
        await asyncio.wait_for(aiohotload.create_pool(url_for(key, etcd.endpoint)), timeout=10)
    with pytest.raises(aiohotload.InvalidOptionError, match="endponts"):
        await asyncio.wait_for(
            aiohotload.create_pool(f"etcd://postgres/{key}?endponts={etcd.endpoint}"), timeout=10
        )
    # Credentials for an etcd without authentication are ignored, as etcdctl does.
    await etcd.put(key, "postgresql://u@db0/app")
    gen = watch(key, endpoints=etcd.endpoint, user="app", password="unused")
    try:
        assert await next_value(gen) == "postgresql://u@db0/app"
    finally:
        await gen.aclose()
    # Two slashes after the driver: the key is '/<key>'.
    await etcd.put("/" + key, "postgresql://u@db1/app")
    gen = EtcdStrategy().watch("//" + key, {"endpoints": etcd.endpoint})
    try:
        assert await next_value(gen) == "postgresql://u@db1/app"
    finally:
        await gen.aclose()


async def test_authentication_and_its_password_stays_secret(
    etcd_disposable: EtcdServer,
    targets: Targets,
    key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = etcd_disposable
    etcd_password = hostile_password()
    await server.put(key, targets.a)
    await server.enable_auth("app", etcd_password, readable=key)
    seen: list[str] = []

    with pytest.raises(aiohotload.SourceError, match="give the user and password") as info:
        await aiohotload.create_pool(url_for(key, server.endpoint))
    seen.append(str(info.value))
    wrong = url_for(key, server.endpoint, user="app", password=etcd_password + "x")
    with pytest.raises(aiohotload.SourceError, match="authentication failed") as info:
        await aiohotload.create_pool(wrong)
    seen.append(str(info.value))
    other = url_for(f"{key}-other", server.endpoint, user="app", password=etcd_password)
    with pytest.raises(aiohotload.SourceError, match="permission denied") as info:
        await aiohotload.create_pool(other)
    seen.append(str(info.value))

    url = url_for(key, server.endpoint, user="app", password=etcd_password, timeout="2s")
    async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
        seen.append(repr(pool))
        await server.put(key, targets.b)
        assert await pool.wait_for_swap(timeout=10) == 1
        # A restarted etcd has forgotten the token: the watcher must authenticate again.
        await asyncio.to_thread(server.restart)
        await server.put(key, targets.a)
        assert await pool.wait_for_swap(timeout=15) == 2
        assert await port_of(pool) == targets.port_a
    seen += [r.getMessage() for r in caplog.records]
    seen += [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert any("lost the watch" in s for s in seen)
    assert any("authenticating again" in s for s in seen)
    for text in seen:
        assert etcd_password not in text
        assert quote(etcd_password, safe="") not in text
        assert targets.password not in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_with_client_certificates(tmp_path: Path, key: str) -> None:
    assert ETCD is not None
    tls = make_tls_files(tmp_path / "tls")
    server = EtcdServer(tmp_path / "etcd", binary=ETCD, tls=tls)
    server.start()
    try:
        await server.put(key, "postgresql://u@db1/app")
        files = {"ca_file": str(tls.ca), "cert_file": str(tls.client_cert)}
        gen = watch(key, endpoints=server.endpoint, key_file=str(tls.client_key), **files)
        try:
            assert await next_value(gen) == "postgresql://u@db1/app"
            await server.put(key, "postgresql://u@db2/app")
            assert await next_value(gen) == "postgresql://u@db2/app"
        finally:
            await gen.aclose()
        # Without a client certificate the server refuses the handshake.
        with pytest.raises(aiohotload.SourceError, match=server.url):
            await anext(watch(key, endpoints=server.endpoint, ca_file=str(tls.ca)))
    finally:
        server.cleanup()


# ---------------------------------------------------------------------------- a hung member


async def test_hung_member_is_left_for_one_that_answers(
    tmp_path: Path, targets: Targets, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    assert ETCD is not None
    members = EtcdServer.cluster(tmp_path, binary=ETCD, size=3)
    hung, other, _ = members
    try:
        EtcdServer.start_all(members)
        await other.put(key, targets.a)
        # The first endpoint is the one the watch starts on.
        url = url_for(key, ",".join(m.endpoint for m in members), keepalive="500ms", timeout="1s")
        async with aiohotload.create_pool(url, min_size=1, max_size=2) as pool:
            await wait_until(lambda: logged(caplog, f"watch created on etcd key {key!r} through"))
            assert logged(caplog, f"through {hung.url}")
            # Alive for TCP, answering nothing: the open watch stream just goes quiet.
            hung.freeze()
            swapped = asyncio.ensure_future(pool.wait_for_swap(timeout=30))
            # The others may first have to elect a leader in its place.
            await wait_until(lambda: other.put(key, targets.b), timeout=20, ignore=(Exception,))
            assert await swapped == 1
            assert await port_of(pool) == targets.port_b
            assert pool.last_error is None
        (lost,) = [r for r in logged(caplog, "lost the watch") if r.levelno == logging.WARNING]
        assert hung.url in lost.getMessage()
        assert "no answer within 1s to a read after the watch was silent" in lost.getMessage()
        assert logged(caplog, "watching etcd key")  # again, through another member
    finally:
        for member in members:
            member.kill()
            member.cleanup()


# ---------------------------------------------------------------------------- sharing


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="counts sockets in /proc")
async def test_pools_on_one_key_share_one_watch_and_one_connection(
    etcd_disposable: EtcdServer, targets: Targets, key: str
) -> None:
    server = etcd_disposable
    streams = "etcd_debugging_mvcc_watch_stream_total"
    await server.put(key, targets.a)
    url = url_for(key, server.endpoint)
    pools = await asyncio.gather(
        *(aiohotload.create_pool(url, name=f"tenant{i}", min_size=1, max_size=1) for i in range(50))
    )
    try:
        await wait_until(lambda: server.metric(streams), lambda n: n == 1)
        # The first reads' connection goes idle and is closed; the stream's stays.
        await wait_until(lambda: connections_to(server.port), lambda n: n == 1)
        swaps = [asyncio.ensure_future(p.wait_for_swap(timeout=20)) for p in pools]
        await server.put(key, targets.b)
        assert await asyncio.gather(*swaps) == [1] * 50
        assert {await port_of(p) for p in pools} == {targets.port_b}
        # A pool leaving does not end the watch of the others.
        await pools.pop().close()
        swaps = [asyncio.ensure_future(p.wait_for_swap(timeout=20)) for p in pools]
        await server.put(key, targets.a_kv)
        assert await asyncio.gather(*swaps) == [2] * 49
        assert await server.metric(streams) == 1
    finally:
        await asyncio.gather(*(p.close() for p in pools))
    # The last one out ends the watch and closes its connection.
    await wait_until(lambda: server.metric(streams), lambda n: n == 0)
    assert connections_to(server.port) == 0
