"""A loopback TCP proxy the tests control, to inject network faults between a pool and a server.

``TcpProxy(host, port)`` listens on a free port of 127.0.0.1 and forwards each connection to
``host:port``. Point a DSN at ``proxy.port`` instead of the server's and change the network
under the pool while it runs:

- ``proxy.mode = "pass"``: forward (the default).
- ``proxy.mode = "blackhole"``: the network stalls. New connections are accepted (the TCP
  handshake completes, as a server that is up but hung does) but nothing reaches the server
  and nothing comes back; established connections stop forwarding in both directions. Bytes
  already read are held, not dropped, so going back to ``"pass"`` resumes every stream intact
  (like a partition that heals: TCP retransmits).
- ``proxy.mode = "reset"``: new connections are accepted and reset at once (RST), as a
  firewall's REJECT does; established connections are left alone.
- ``proxy.cut()``: reset every established connection, both towards the client and towards
  the server; ``proxy.cut(client_port=p)`` only the one whose client end is port *p*.
- ``proxy.hold_server_close = True``: when the server closes a connection, everything it sent
  reaches the client but its close does not (a lost FIN): the client sees the server's last
  words on a socket that stays open. ``proxy.server_closed`` counts those closes.

Pure asyncio; every task it starts is named ``tcpproxy:<port>`` (so leak checks can leave
them out) and ends in :meth:`TcpProxy.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Literal

__all__ = ["Mode", "TcpProxy"]

Mode = Literal["pass", "blackhole", "reset"]

_CHUNK = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close *writer*'s socket with a RST rather than a FIN, as a cut cable looks to a peer
    once it notices."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: the client's end and, once connected, the server's end."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.client_port: int = client.get_extra_info("peername")[1]
        self.client_open = True  # no EOF or error from the client yet
        self.closed = False

    def reset(self) -> None:
        self.closed = True
        _reset(self.client)
        if self.server is not None:
            _reset(self.server)


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of ``host:port`` (see the module docstring)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._mode: Mode = "pass"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        """Connections accepted so far, in any mode."""
        self.hold_server_close = False
        self.server_closed = 0
        """Connections the server closed, their data all passed on to the client."""

    @property
    def port(self) -> int:
        """The port the proxy listens on (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def mode(self) -> Mode:
        """``"pass"``, ``"blackhole"`` or ``"reset"``; see the module docstring."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in ("pass", "blackhole", "reset"):
            raise ValueError(f"unknown proxy mode {mode!r}")
        self._mode = mode
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()

    @property
    def active(self) -> int:
        """Connections whose client end is still open (the client has not closed or reset it,
        and :meth:`cut` has not either), in any mode."""
        return sum(1 for link in self._links if link.client_open and not link.closed)

    def client_ports(self) -> list[int]:
        """The client-side ports of the connections counted by :attr:`active`."""
        return sorted(
            link.client_port for link in self._links if link.client_open and not link.closed
        )

    def cut(self, *, client_port: int | None = None) -> int:
        """Reset established connections (all, or the one from *client_port*) at both ends;
        returns how many."""
        links = [
            link
            for link in self._links
            if not link.closed and (client_port is None or link.client_port == client_port)
        ]
        for link in links:
            link.reset()
        return len(links)

    async def start(self) -> TcpProxy:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening, reset every connection and end every task."""
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        if not task.get_name().startswith("tcpproxy:"):
            task.set_name(f"tcpproxy:{self.port}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        this = asyncio.current_task()
        assert this is not None
        this.set_name(f"tcpproxy:{self.port}")
        self._track(this)
        self.accepted += 1
        # close() cancels it; ending normally spares asyncio's stream callback, which logs a
        # cancelled handler as an error.
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "reset":
            _reset(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        to_server: asyncio.Queue[bytes] = asyncio.Queue()
        to_client: asyncio.Queue[bytes] = asyncio.Queue()
        tasks = [self._track(asyncio.ensure_future(self._read(reader, to_server, link, True)))]
        try:
            # Blackholed: accepted, but the server hears nothing until the network flows again.
            await self._flowing.wait()
            if link.closed:
                return
            try:
                server_reader, link.server = await asyncio.open_connection(*self.target)
            except OSError:
                _reset(writer)  # the server refuses: so does the proxy
                return
            if link.closed:  # cut while connecting
                _reset(link.server)
                return
            tasks += [
                self._track(asyncio.ensure_future(t))
                for t in (
                    self._read(server_reader, to_client, link, False),
                    self._forward(to_server, link.server, link, False),
                    self._forward(to_client, writer, link, True),
                )
            ]
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            self._links.discard(link)
            if not link.closed:
                link.closed = True
                writer.close()
                if link.server is not None:
                    link.server.close()

    async def _read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[bytes], link: _Link, client: bool
    ) -> None:
        """Read one direction into *queue*, whatever the mode, so a peer's close is seen; an
        empty chunk marks the end."""
        try:
            while data := await reader.read(_CHUNK):
                queue.put_nowait(data)
        except OSError:
            pass
        finally:
            if client:
                link.client_open = False
            queue.put_nowait(b"")

    async def _forward(
        self,
        queue: asyncio.Queue[bytes],
        writer: asyncio.StreamWriter,
        link: _Link,
        to_client: bool,
    ) -> None:
        """Write what *queue* holds while the network flows; pass an end on as an EOF."""
        try:
            while True:
                data = await queue.get()
                await self._flowing.wait()
                if link.closed:
                    return
                if not data:
                    if to_client:
                        self.server_closed += 1
                        if self.hold_server_close:
                            await asyncio.Event().wait()  # until cut() or close()
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
