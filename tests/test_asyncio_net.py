"""The flusher's network backend under httpcore: real sockets, TLS with certificate checks, and each way a
connection fails (a silent server, one that closes, one that stops reading), each as httpcore's own error."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import httpcore
import pytest
import trustme
from anyio.abc import SocketAttribute, SocketStream

from metered_middleware._asyncio_net import _HIGH_WATER, AsyncioBackend
from metered_middleware._sinks import _HTTPXClient

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[("asyncio", {}), ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """asyncio's own loop (the flusher worker's) and uvloop (an in-app flusher under uvicorn's)."""
    return request.param  # type: ignore[no-any-return]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
BODY = b'{"object": "billing.meter_event"}'


def answer(body: bytes = BODY, *, close: bool = False) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (Content-Length framed); b"" when the client closed instead."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length")
        ),
        0,
    )
    return head + await reader.readexactly(length)


@asynccontextmanager
async def serving(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A local server running ``handler`` per connection; yields its port, then stops every handler."""
    handlers: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away, or refused the server's certificate (the TLS tests)
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await read_request(reader):
        writer.write(answer())
        await writer.drain()


def pool(**options: object) -> httpcore.AsyncConnectionPool:
    return httpcore.AsyncConnectionPool(network_backend=AsyncioBackend(), **options)  # type: ignore[arg-type]


def timeouts(seconds: float) -> dict[str, dict[str, float]]:
    return {"timeout": {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}}


async def test_requests_reuse_one_keep_alive_connection() -> None:
    """Ten requests in turn get their answers over one connection, as httpcore's pool keeps it."""
    connections = 0

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await keep_alive(reader, writer)

    async with serving(counted) as port, pool() as http:
        for n in range(10):
            response = await http.request("POST", f"http://127.0.0.1:{port}/v1/x", content=b"n=%d" % n)
            assert (response.status, response.content) == (200, BODY)
    assert connections == 1


async def test_a_connection_the_server_closed_while_idle_is_replaced_not_failed() -> None:
    """A server that closes an idle keep-alive connection (its own idle timeout): the next request goes
    out on a new connection and succeeds, with no error for the caller."""

    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer())
        await writer.drain()

    async with serving(one_then_close) as port, pool() as http:
        first = await http.request("GET", f"http://127.0.0.1:{port}/")
        await asyncio.sleep(0.1)  # the server's close arrives while the connection is idle in the pool
        second = await http.request("GET", f"http://127.0.0.1:{port}/")
    assert (first.status, second.status) == (200, 200)


async def test_a_body_larger_than_the_read_buffer_arrives_whole() -> None:
    """A 3 MiB answer (over the backend's 256 KiB reading pause) is read intact, in order."""
    body = bytes(range(256)) * (3 * 4096)

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(body))
        await writer.drain()

    async with serving(big) as port, pool() as http:
        response = await http.request("GET", f"http://127.0.0.1:{port}/")
    assert response.content == body


async def test_a_slow_reader_holds_a_bounded_buffer_and_still_gets_everything() -> None:
    """The backend stops reading at its high-water mark while nobody reads (the rest waits in the kernel's
    buffers and the server's), and resumes as the reader catches up: 8 MiB arrive whole."""
    body = bytes(range(256)) * (8 * 4096)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(body)
        await writer.drain()

    async with serving(flood) as port:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        await asyncio.sleep(0.3)  # the server writes all it can; the client reads nothing
        buffered = len(stream._protocol.buffer)  # type: ignore[attr-defined]
        assert 0 < buffered <= 2 * _HIGH_WATER
        received = bytearray()
        while len(received) < len(body):
            chunk = await stream.read(65_536, timeout=5)
            assert chunk
            received += chunk
        await stream.aclose()
    assert received == body


async def test_a_server_that_never_answers_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with serving(silent) as port, pool() as http:
        with pytest.raises(httpcore.ReadTimeout):
            await http.request("GET", f"http://127.0.0.1:{port}/", extensions=timeouts(0.2))


async def test_a_server_that_stops_reading_is_a_write_timeout() -> None:
    """A body the server never reads fills the socket buffers; the write waits for room, then times out."""

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with serving(deaf) as port, pool() as http:
        with pytest.raises(httpcore.WriteTimeout):
            await http.request(
                "POST", f"http://127.0.0.1:{port}/", content=b"x" * 64_000_000, extensions=timeouts(0.5)
            )


async def test_a_connection_lost_mid_answer_is_an_error_not_a_short_body() -> None:
    """Half an answer, then the server goes away: httpcore's protocol error, never a truncated body."""

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer()[:-10])
        await writer.drain()

    async with serving(half) as port, pool() as http:
        with pytest.raises(httpcore.RemoteProtocolError):
            await http.request("GET", f"http://127.0.0.1:{port}/")


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with serving(keep_alive) as port:
        pass  # closed: nothing listens on the port now
    async with pool() as http:
        with pytest.raises(httpcore.ConnectError):
            await http.request("GET", f"http://127.0.0.1:{port}/")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, hostname: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(context)
    return context


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_https_checks_the_certificate_and_answers(ca: trustme.CA) -> None:
    """Over TLS (as to api.stripe.com): a certificate for the host, from a trusted CA, gets the answer;
    the stream reports its TLS object, as httpcore reads it to choose the HTTP version."""
    async with (
        serving(keep_alive, server_context(ca, "localhost")) as port,
        pool(ssl_context=client_context(ca)) as http,
    ):
        for _ in range(3):
            response = await http.request("POST", f"https://localhost:{port}/v1/x", content=b"a=1")
            assert (response.status, response.content) == (200, BODY)
        stream = response.extensions["network_stream"]
        assert stream.get_extra_info("ssl_object").version().startswith("TLS")


async def test_https_refuses_a_certificate_for_another_host(ca: trustme.CA) -> None:
    server = serving(keep_alive, server_context(ca, "not-stripe.example"))
    async with server as port, pool(ssl_context=client_context(ca)) as http:
        with pytest.raises(httpcore.ConnectError, match="certificate"):
            await http.request("GET", f"https://localhost:{port}/")


async def test_https_refuses_a_certificate_from_an_untrusted_authority(ca: trustme.CA) -> None:
    server = serving(keep_alive, server_context(trustme.CA(), "localhost"))
    async with server as port, pool(ssl_context=client_context(ca)) as http:
        with pytest.raises(httpcore.ConnectError, match="certificate"):
            await http.request("GET", f"https://localhost:{port}/")


async def test_a_server_that_never_starts_tls_is_a_connect_timeout(ca: trustme.CA) -> None:
    async def plain_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with serving(plain_silent) as port, pool(ssl_context=client_context(ca)) as http:
        with pytest.raises(httpcore.ConnectTimeout):
            await http.request("GET", f"https://localhost:{port}/", extensions=timeouts(0.3))


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_the_flusher_client_goes_through_httpcores_anyio_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flusher runs under trio as well (it is written on anyio): there the backend hands each
    connection to httpcore's anyio backend, and the SDK client's requests get their answers."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            await stream.send(answer(close=True))

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)  # noqa: S610 (anyio's typed attributes, not Django's)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        client = _HTTPXClient(timeout=5, concurrency=2)
        try:
            body, status, headers = await client.request_async(
                "post", f"http://127.0.0.1:{port}/v1/billing/meter_events", {"Content-Length": "3"}, "a=1"
            )
        finally:
            await client.close_async()
        tg.cancel_scope.cancel()
    assert (status, body, headers["content-type"]) == (200, BODY, "application/json")
