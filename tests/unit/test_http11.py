"""facilitator/http11.py against real sockets: a raw asyncio server that answers with exactly the
bytes each test picks (framings, closes, garbage, silence), and TLS with a self-signed
certificate."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from facilitator.http11 import Http11Client, HttpError, NotConnectedError

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


class RawServer:
    """Reads each request (head + Content-Length body) and lets `handler` answer; counts
    connections. The handler returns False to stop serving that connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.handler(request, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def start(self, tls: ssl.SSLContext | None = None) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[tuple[RawServer, str]]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler, *, tls: ssl.SSLContext | None = None, path: str = "/rpc") -> tuple[RawServer, str]:
        server = RawServer(handler)
        port = await server.start(tls)
        servers.append(server)
        return server, f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}"

    yield start
    for s in servers:
        assert s.server is not None
        s.server.close()


def answer(raw: bytes) -> Handler:
    async def handler(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return True

    return handler


async def test_connections_are_kept_alive_and_reused(serve) -> None:
    server, url = await serve(answer(OK))
    client = Http11Client(url)
    for _ in range(5):
        got = await client.post(b'{"a":1}')
        assert (got.status, got.body, got.headers["content-type"]) == (200, b'{"ok":true}', "application/json")
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:") and first.endswith(b'\r\n\r\n{"a":1}')
    assert b"Content-Length: 7\r\n" in first and b"Content-Type: application/json\r\n" in first
    await client.close()


async def test_chunked_and_close_delimited_answers_are_read_whole(serve) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"
    _, url = await serve(answer(chunked))
    client = Http11Client(url)
    assert (await client.post(b"{}")).body == b'{"a":1}'
    assert (await client.post(b"{}")).body == b'{"a":1}'  # and the connection is still good

    async def until_close(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[1,2,")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"3]")
        return False  # the close ends the body

    server, url = await serve(until_close)
    client = Http11Client(url)
    assert (await client.post(b"{}")).body == b"[1,2,3]"
    assert (await client.post(b"{}")).body == b"[1,2,3]"
    assert server.connections == 2  # "Connection: close" is honoured


async def test_a_connection_the_server_closed_while_idle_is_not_reused(serve) -> None:
    async def once(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK)  # keep-alive by default, then closed anyway (an idle timeout)
        await writer.drain()
        return False

    server, url = await serve(once)
    client = Http11Client(url)
    await client.post(b"{}")
    await asyncio.sleep(0.1)
    assert (await client.post(b"{}")).status == 200
    assert server.connections == 2


async def test_silence_times_out_and_the_connection_is_dropped(serve) -> None:
    calls = 0

    async def silent_first(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(1.0)  # too late: the client gave up on this connection
        writer.write(OK)
        await writer.drain()
        return True

    server, url = await serve(silent_first)
    client = Http11Client(url, timeout_s=0.3)
    with pytest.raises(HttpError, match="no answer within"):
        await client.post(b"{}")
    assert (await client.post(b"{}")).status == 200  # on a new connection: the late answer is never read as this one
    assert server.connections == 2


@pytest.mark.parametrize("raw", [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"])
async def test_garbage_or_a_cut_answer_is_an_error(serve, raw: bytes) -> None:
    async def bad(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return False

    _, url = await serve(bad)
    with pytest.raises(HttpError):
        await Http11Client(url).post(b"{}")


async def test_an_answer_over_the_limit_is_an_error(serve) -> None:
    _, url = await serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000))
    with pytest.raises(HttpError, match="larger than"):
        await Http11Client(url, max_bytes=4096).post(b"{}")


async def test_informational_answers_are_skipped_and_errors_come_with_their_body(serve) -> None:
    _, url = await serve(answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"))
    got = await Http11Client(url).post(b"{}")
    assert (got.status, got.body) == (503, b"busy")


async def test_no_more_than_limit_connections_at_once(serve) -> None:
    async def slow(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        writer.write(OK)
        await writer.drain()
        return True

    server, url = await serve(slow)
    client = Http11Client(url, limit=2)
    answers = await asyncio.gather(*(client.post(b"{}") for _ in range(8)))
    assert all(a.status == 200 for a in answers)
    assert server.most_open == 2 and server.connections == 2


async def test_credentials_in_the_url_become_basic_auth_and_refusal_is_an_error(serve) -> None:
    server, url = await serve(answer(OK))
    await Http11Client(url.replace("http://", "http://us%40er:p%3Ass@")).post(b"{}")
    assert b"Authorization: Basic " + base64.b64encode(b"us@er:p:ss") + b"\r\n" in server.requests[0]
    assert server.requests[0].startswith(b"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:")
    assert server.server is not None
    server.server.close()
    await server.server.wait_closed()
    with pytest.raises(HttpError, match="ConnectionRefusedError"):
        await Http11Client(url).post(b"{}")


async def test_https_with_a_trusted_certificate(serve, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server, url = await serve(answer(OK), tls=server_tls)
    with pytest.raises(HttpError):  # not trusted by default
        await Http11Client(url).post(b"{}")
    trusting = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    client = Http11Client(url, ssl_context=trusting)
    assert (await client.post(b"{}")).body == b'{"ok":true}'
    assert (await client.post(b"{}")).status == 200
    await client.close()


def test_only_http_urls() -> None:
    for bad in ("ftp://x/", "http://", "/relative"):
        with pytest.raises(ValueError):
            Http11Client(bad)


def test_under_uvloop_as_the_services_run() -> None:
    """The gateway and the facilitator run uvloop, whose transports are not asyncio's classes."""
    import uvloop

    async def scenario() -> None:
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        server = RawServer(answer(chunked))
        port = await server.start()
        client = Http11Client(f"http://127.0.0.1:{port}/")
        for _ in range(3):
            assert (await client.post(b"{}")).body == b"{}"
        assert server.connections == 1
        await client.close()
        assert server.server is not None
        server.server.close()
        with pytest.raises(HttpError):
            await Http11Client(f"http://127.0.0.1:{port}/", timeout_s=1).post(b"{}")

    uvloop.run(scenario())


async def test_a_client_outlives_its_first_event_loop(serve) -> None:
    """Connections made under a loop that ended are not reused (a CLI runs asyncio.run twice)."""
    server, url = await serve(answer(OK))
    client = Http11Client(url)
    assert (await client.post(b"{}")).status == 200
    ended = asyncio.new_event_loop()
    ended.close()
    for conn in client._idle:
        conn.loop = ended  # as if made under a loop that has ended since
    assert (await client.post(b"{}")).status == 200
    assert server.connections == 2  # a new connection under this loop


# -- streamed answers (the upstream path) -----------------------------------------------------


async def read_all(streamed: Any) -> bytes:
    out = b""
    while chunk := await streamed.read_chunk():
        out += chunk
    return out


async def test_a_streamed_answer_comes_in_pieces_and_its_connection_is_kept(serve) -> None:
    async def sse(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        return True

    server, url = await serve(sse, path="/base")
    client = Http11Client(url)
    for _ in range(2):
        streamed = await client.open("POST", b"{}", path="/base/v1/x", headers={"content-type": "application/json"},
                                     connect_timeout_s=5, read_timeout_s=5)
        assert streamed.status == 200 and (b"Content-Type", b"text/event-stream") in streamed.raw_headers
        first = await streamed.read_chunk()
        assert first == b"data: 1\n\n"  # as it came, before the rest was sent
        assert await read_all(streamed) == b"data: 2\n\n"
        streamed.release()
    assert server.connections == 1 and server.requests[0].startswith(b"POST /base/v1/x HTTP/1.1\r\n")
    assert b"content-type: application/json\r\n" in server.requests[0] and b"Content-Type" not in server.requests[0]


async def test_a_streamed_answer_released_early_closes_its_connection(serve) -> None:
    server, url = await serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc"))  # 3 bytes missing
    client = Http11Client(url)
    streamed = await client.open("POST", b"{}", headers={}, connect_timeout_s=5, read_timeout_s=5)
    assert await streamed.read_chunk() == b"abc"
    streamed.release()
    streamed = await client.open("POST", b"{}", headers={}, connect_timeout_s=5, read_timeout_s=5)
    streamed.release()
    assert server.connections == 2


async def test_a_cut_or_silent_streamed_body_raises(serve) -> None:
    async def cut(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.05)
        return False  # closed mid-body

    _, url = await serve(cut)
    streamed = await Http11Client(url).open("POST", b"{}", headers={}, connect_timeout_s=5, read_timeout_s=5)
    with pytest.raises(HttpError, match="middle of the answer"):
        await read_all(streamed)
    streamed.release()

    async def silent(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n01")
        await writer.drain()
        await asyncio.sleep(2)
        return False

    _, url = await serve(silent)
    streamed = await Http11Client(url).open("POST", b"{}", headers={}, connect_timeout_s=5, read_timeout_s=0.2)
    assert await streamed.read_chunk() == b"01"
    with pytest.raises(TimeoutError):
        await streamed.read_chunk()
    streamed.release()


async def test_not_connected_is_told_apart(serve) -> None:
    async def drop(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False  # read the request, answered nothing, closed

    _, url = await serve(drop)
    with pytest.raises(NotConnectedError, match="dropped before answering"):
        await Http11Client(url).open("POST", b"{}", headers={}, connect_timeout_s=5, read_timeout_s=5)
    server, url = await serve(answer(OK))
    assert server.server is not None
    server.server.close()
    await server.server.wait_closed()
    with pytest.raises(NotConnectedError):
        await Http11Client(url).open("POST", b"{}", headers={}, connect_timeout_s=5, read_timeout_s=5)


async def test_a_big_streamed_answer_read_slowly_arrives_whole(serve) -> None:
    blob = bytes(range(256)) * 8192  # 2 MiB: the socket is paused and resumed on the way

    async def big(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(blob) + blob)
        await writer.drain()
        return True

    _, url = await serve(big)
    streamed = await Http11Client(url).open("POST", b"{}", headers={}, connect_timeout_s=5, read_timeout_s=5)
    got = b""
    while chunk := await streamed.read_chunk():
        got += chunk
        await asyncio.sleep(0.001)
    streamed.release()
    assert got == blob


async def test_until_close_streamed_body(serve) -> None:
    async def until_close(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart1")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part2")
        return False

    _, url = await serve(until_close)
    streamed = await Http11Client(url).open("POST", b"{}", headers={}, connect_timeout_s=5, read_timeout_s=5)
    assert await read_all(streamed) == b"part1part2"
    streamed.release()
