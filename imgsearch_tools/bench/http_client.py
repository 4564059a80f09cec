"""A lean keep-alive HTTP/1.1 client for load on the JSON door: prebuilt request bytes, a pool
of connections, replies read by Content-Length.

The load generator shares the cores with the servers it measures, so its own cost per request
weighs on the tail it reports. A general client (aiohttp's) spends several hundred
microseconds per call on headers, cookies, timeouts and its connector; this one writes one
buffer per request and reads one reply per connection at a time, which is all an open-loop
driver of ``POST`` requests needs.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from urllib.parse import urlsplit


class HttpClientError(ConnectionError):
    """The connection broke or the reply was not HTTP/1.1 with a Content-Length."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpClientError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            reply = self._reply()
        except HttpClientError as exc:
            self.waiter.set_exception(exc)
            return
        if reply is not None:
            self.waiter.set_result(reply)

    def _reply(self) -> tuple[int, bytes, bool] | None:
        """(status, body, keep-alive) once the whole reply is in the buffer, else None."""
        end_of_head = self.buffer.find(b"\r\n\r\n")
        if end_of_head < 0:
            return None
        head = bytes(self.buffer[:end_of_head]).lower()
        if not head.startswith(b"http/1.1 "):
            raise HttpClientError(f"not an HTTP/1.1 reply: {head[:40]!r}")
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise HttpClientError("a reply without Content-Length")
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end > 0 else len(head)])
        end = end_of_head + 4 + length
        if len(self.buffer) < end:
            return None
        body = bytes(self.buffer[end_of_head + 4 : end])
        del self.buffer[:end]
        return int(head[9:12]), body, b"\r\nconnection: close" not in head

    def send(self, data: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


class HttpClient:
    """``POST`` JSON bodies to one origin over a pool of keep-alive connections.

    Parameters
    ----------
    url:
        The address requests go to (``http://`` or ``https://``).
    ssl:
        The client's TLS context for ``https://`` (default: the system's).
    """

    def __init__(self, url: str, ssl: ssl_module.SSLContext | None = None):
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if secure else 80)
        self.ssl = (ssl or ssl_module.create_default_context()) if secure else None
        self.path = parts.path or "/"
        self.idle: list[_Connection] = []

    def request_bytes(self, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        """The whole ``POST`` request of ``body``, to build once and send many times."""
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def send(self, request: bytes, timeout: float) -> tuple[int, bytes]:
        """Send prebuilt ``request`` bytes; returns the reply's status and body.

        Raises
        ------
        HttpClientError
            When the connection breaks or the reply cannot be read.
        TimeoutError
            When no whole reply came within ``timeout`` seconds.
        """
        connection = None
        while self.idle and connection is None:
            connection = self.idle.pop()
            connection = None if connection.closed else connection
        connection = connection or await self._connect()
        waiter = connection.send(request)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            status, body, keep_alive = await waiter
        except BaseException:
            connection.transport.close()
            raise
        finally:
            timer.cancel()
        if keep_alive and not connection.closed:
            self.idle.append(connection)
        else:
            connection.transport.close()
        return status, body

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            _Connection, self.host, self.port, ssl=self.ssl
        )
        return connection

    def close(self) -> None:
        """Close the idle connections."""
        for connection in self.idle:
            connection.transport.close()
        self.idle.clear()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no reply within the timeout"))
