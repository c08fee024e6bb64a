"""An httpcore network backend on asyncio's own transports, for the flusher's requests to Stripe.

httpcore runs on asyncio through anyio, and anyio's streams cost more than the HTTP request itself on the
flusher's hot path: a cancel scope with a loop timer around every read and write, a checkpoint (a pass
through the event loop) on every send, and a ``poll`` syscall per idle connection each time the pool looks
for one it can reuse (encode/httpx#3215). This backend is httpcore's documented extension point
(``network_backend=``) written on ``asyncio.Protocol``:

- a read returns what the protocol has buffered, or waits on one future with an optional timer;
- a write hands the bytes to the transport and waits only when the transport pushes back;
- the protocol keeps reading while a connection is idle (up to a high-water mark), so "is this idle
  connection readable", meaning the server closed it or sent something unasked, is answered from state;
- TLS goes through ``loop.start_tls`` with the certificate checks of the context httpcore passes.

Errors are httpcore's own exception types, as the anyio backend raises them, so everything above
(httpcore's pool, the SDK client's mapping to ``APIConnectionError``, the flusher's retries) is unchanged.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any, Final, Literal, cast

import httpcore
import sniffio

__all__ = ["AsyncioBackend"]

# Reading stops while this much is buffered unread, and resumes once a read brings it under the low mark.
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Protocol(asyncio.Protocol):
    """Buffers what arrives and wakes the one reader or writer waiting (httpcore runs one of each at most)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None  # the TLS transport once start_tls has run
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None  # why the connection was lost, if not a clean close
        self.lost = False
        self.paused_reading = False
        self.paused_writing = False
        self.reader: asyncio.Future[None] | None = None
        self.writer: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, so no isinstance check).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # close the transport: HTTP/1.1 has nothing to send after the server's end

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        self.error = exc
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        self._wake_writer()

    async def wait(self, slot: Literal["reader", "writer"], timeout: float | None) -> bool:
        """Wait, as the reader or the writer, to be woken; False when ``timeout`` passed first (one loop
        timer: no task, no cancel scope)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        setattr(self, slot, waiter)
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            return False
        finally:
            setattr(self, slot, None)
            if timer is not None:
                timer.cancel()
        return True

    def _wake_reader(self) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(None)

    def _wake_writer(self) -> None:
        if self.writer is not None and not self.writer.done():
            self.writer.set_result(None)


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        # Nothing buffered and the connection open: wait for data (or its end).
        if not protocol.buffer and not protocol.eof and not await protocol.wait("reader", timeout):
            raise httpcore.ReadTimeout("timed out reading from Stripe")
        buffer = protocol.buffer
        if buffer:
            if len(buffer) <= max_bytes:
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[:max_bytes])
                del buffer[:max_bytes]
            if protocol.paused_reading and len(buffer) < _LOW_WATER and not protocol.lost:
                protocol.paused_reading = False
                self._transport.resume_reading()
            return data
        if protocol.error is not None:
            raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__)
        return b""  # the server closed the connection: h11 decides whether the response was complete

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol = self._protocol
        if protocol.lost or self._transport.is_closing():
            raise httpcore.WriteError(str(protocol.error or "the connection is closed"))
        self._transport.write(buffer)
        if not protocol.paused_writing:
            return
        if not await protocol.wait("writer", timeout):
            raise httpcore.WriteTimeout("timed out writing to Stripe")
        if protocol.lost:
            raise httpcore.WriteError(str(protocol.error or "the connection is closed"))

    async def aclose(self) -> None:
        self._transport.close()
        if not self._protocol.lost:
            # One pass of the loop runs the transport's connection_lost, which closes the socket: without
            # it, a client closed just before its loop ends would leave the socket to the garbage collector.
            await asyncio.sleep(0)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport, self._protocol, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            self._transport.abort()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except OSError as exc:  # ssl.SSLError (a certificate refused) is an OSError
            self._transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc
        if transport is None:  # the connection was closed during the handshake
            self._transport.abort()
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        self._protocol.transport = transport
        return _Stream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        if info == "is_readable":
            # httpcore asks this of idle connections: anything buffered, an end or a loss means the
            # server closed it (or broke protocol), so the pool drops it instead of sending on it.
            protocol = self._protocol
            return bool(protocol.buffer) or protocol.eof
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on asyncio transports (see the module's docstring for why).

    Under another event loop (the flusher runs under trio too), it hands each call to httpcore's anyio
    backend, as httpcore itself would.
    """

    def __init__(self) -> None:
        self._other = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if sniffio.current_async_library() != "asyncio":
            return await self._other.connect_tcp(host, port, timeout, local_address, socket_options)
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(_Protocol, host, port, local_addr=local)
        except TimeoutError:  # before OSError: a TimeoutError is one
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        _apply(transport, socket_options)  # asyncio already sets TCP_NODELAY
        return _Stream(transport, protocol)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if sniffio.current_async_library() != "asyncio":
            return await self._other.connect_unix_socket(path, timeout, socket_options)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(_Protocol, path)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out connecting to {path}") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        _apply(transport, socket_options)
        return _Stream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await self._other.sleep(seconds)  # anyio's, on whichever loop runs


def _apply(transport: asyncio.Transport, options: Iterable[httpcore.SOCKET_OPTION] | None) -> None:
    sock = transport.get_extra_info("socket")
    for option in options or ():
        sock.setsockopt(*option)
