"""collector.http_async.AsyncFetcher on the wire: loopback servers that the tests script byte
for byte, so framing, keep-alive, failures, proxies and TLS are what a server really sends."""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from collector import http_async
from collector.http import USER_AGENT
from collector.http_async import MAX_REDIRECTS, AsyncFetcher
from collector.retry import Failure

# ------------------------------------------------------------------------------ helpers


def on_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """pytest-asyncio is not a dependency: each async test runs in its own asyncio.run."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's proxy and CA bundle variables would route or verify these loopback
    requests; the tests that want them set their own."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@dataclass
class Request:
    line: str
    headers: list[tuple[str, str]]  # as sent: repeated names stay repeated

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server running ``handler`` on each connection. It counts connections
    accepted and those ended (``hangups``) and keeps the requests read, which is how the tests
    see connection reuse."""

    def __init__(self, handler: Handler, *, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.accepts = 0
        self.hangups = 0
        self.requests: list[Request] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port: int = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, path: str = "/") -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    async def request(self, reader: asyncio.StreamReader) -> Request | None:
        """The next request's head; None when the client has closed the connection."""
        line = await reader.readline()
        if not line:
            return None
        headers = []
        while (raw := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = raw.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        request = Request(line.decode("latin-1").rstrip("\r\n"), headers)
        self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, ssl.SSLError):
            pass  # the client went away, as several tests make it do
        except asyncio.CancelledError:
            pass  # by __aexit__; ended quietly, or asyncio logs each such task as an error
        finally:
            self._tasks.discard(task)
            writer.close()
            self.hangups += 1


def keep_alive(respond: Callable[[Server, Request], bytes | None]) -> Handler:
    """Answers each request with ``respond``'s bytes, on one connection, until the client
    closes it; None closes it without answering."""

    async def handle(server: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (request := await server.request(reader)) is not None:
            answer = respond(server, request)
            if answer is None:
                return
            w.write(answer)
            await w.drain()

    return handle


def always(answer: bytes) -> Handler:
    return keep_alive(lambda _server, _request: answer)


def http(status: int = 200, body: bytes = b"", *headers: str, length: bool = True) -> bytes:
    """A response; ``length=False`` leaves framing to ``headers`` or to the end of the
    connection."""
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *headers]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return "\r\n".join([*head, "", ""]).encode("latin-1") + body


@contextmanager
def fetching(url: str, **options: Any) -> Iterator[AsyncFetcher]:
    options.setdefault("timeout_secs", 5.0)  # a hang fails the test in seconds
    fetcher = AsyncFetcher(url, **options)
    try:
        yield fetcher
    finally:
        fetcher.close()


async def failure_of(fetcher: AsyncFetcher) -> Failure:
    with pytest.raises(Failure) as caught:
        await fetcher.get()
    return caught.value


async def until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def numbered(server: Server, _request: Request) -> bytes:
    """Tells which connection answered: leftovers of another answer would show."""
    return http(200, f"connection {server.accepts}".encode())


# ------------------------------------------------------------------------------ framing


@on_loop
async def test_content_length_body_is_exact_and_gets_share_one_connection() -> None:
    body = bytes(range(256)) * 800  # binary, CRLFs inside, several reads long
    async with Server(always(http(200, body))) as server:
        with fetching(server.url("/feed.json")) as fetcher:
            for _ in range(5):
                assert await fetcher.get() == body
    assert server.accepts == 1
    assert len(server.requests) == 5


@on_loop
async def test_chunked_body_with_extensions_and_trailers() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
        b"1\r\n \r\n"
        b'0A ; quoted="x;y"\r\n0123456789\r\n'
        b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
    )
    async with Server(always(answer)) as server:
        with fetching(server.url()) as fetcher:
            # The second get reads the next answer only if the trailers were all consumed.
            for _ in range(2):
                assert await fetcher.get() == b"hello 0123456789"
    assert server.accepts == 1


@on_loop
async def test_interim_100_continue_is_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + http(200, b"final")
    async with Server(always(answer)) as server:
        with fetching(server.url()) as fetcher:
            assert await fetcher.get() == b"final"
            assert await fetcher.get() == b"final"
    assert server.accepts == 1


async def answer_then_close(server: Server, reader: asyncio.StreamReader, w: Any) -> None:
    if await server.request(reader) is not None:
        w.write(http(200, f"body of connection {server.accepts}".encode(), length=False))


@on_loop
async def test_close_delimited_body_then_the_next_get_opens_a_new_connection() -> None:
    async with Server(answer_then_close) as server:
        with fetching(server.url()) as fetcher:
            assert await fetcher.get() == b"body of connection 1"
            assert await fetcher.get() == b"body of connection 2"
    assert server.accepts == 2


@pytest.mark.parametrize(
    "status_line, connection",
    [
        ("HTTP/1.1 200 OK", "Connection: close"),
        ("HTTP/1.1 200 OK", "Connection: Keep-Alive, Close"),
        ("HTTP/1.0 200 OK", "X-Nothing: 1"),  # 1.0 closes unless it says keep-alive
    ],
)
@on_loop
async def test_a_connection_the_server_said_it_closes_is_not_reused(
    status_line: str, connection: str
) -> None:
    # The server says it will close but keeps the socket open: only a fetcher that heeded
    # the header opens a second connection (one that did not would be answered on the first).
    def respond(server: Server, _request: Request) -> bytes:
        body = f"connection {server.accepts}"
        head = [status_line, connection, f"Content-Length: {len(body)}", "", ""]
        return "\r\n".join(head).encode() + body.encode()

    async with Server(keep_alive(respond)) as server:
        with fetching(server.url()) as fetcher:
            assert await fetcher.get() == b"connection 1"
            assert await fetcher.get() == b"connection 2"
    assert server.accepts == 2


@on_loop
async def test_http10_keep_alive_is_reused() -> None:
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    async with Server(always(answer)) as server:
        with fetching(server.url()) as fetcher:
            assert await fetcher.get() == b"ok"
            assert await fetcher.get() == b"ok"
    assert server.accepts == 1


# ------------------------------------------------------------------------------ encodings


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


PAYLOAD = b'{"sensors": [' + b", ".join(b"%d" % i for i in range(2000)) + b"]}"


@pytest.mark.parametrize(
    "encoding, encoded",
    [
        ("gzip", gzip.compress(PAYLOAD)),
        ("x-gzip", gzip.compress(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)),  # zlib-wrapped, as RFC 9110 says
        ("deflate", _raw_deflate(PAYLOAD)),  # raw, as some servers send it
        ("GZIP", gzip.compress(PAYLOAD)),
    ],
)
@on_loop
async def test_content_encoding_is_decoded(encoding: str, encoded: bytes) -> None:
    async with Server(always(http(200, encoded, f"Content-Encoding: {encoding}"))) as server:
        with fetching(server.url()) as fetcher:
            assert await fetcher.get() == PAYLOAD
            assert server.requests[0].header("Accept-Encoding") == ["gzip, deflate"]


@on_loop
async def test_body_that_does_not_inflate_is_a_connection_failure() -> None:
    answer = http(200, b'{"plain": "json"}', "Content-Encoding: gzip")
    async with Server(always(answer)) as server:
        with fetching(server.url()) as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert "gzip body that does not inflate" in str(failure)


# ------------------------------------------------------------------------------ keep-alive


async def answer_once_then_close(server: Server, reader: asyncio.StreamReader, w: Any) -> None:
    """On the first two connections, one request answered and the connection closed, as a
    server closes a keep-alive connection left idle; later connections closed unanswered."""
    request = await server.request(reader)
    if request is not None and server.accepts <= 2:
        w.write(numbered(server, request))
        await w.drain()


@on_loop
async def test_idle_connection_closed_by_the_server_is_retried_once_on_a_new_one() -> None:
    async with Server(answer_once_then_close) as server:
        with fetching(server.url()) as fetcher:
            assert await fetcher.get() == b"connection 1"
            await until(lambda: server.hangups == 1, "the server to close the idle connection")
            assert await fetcher.get() == b"connection 2"
            await until(lambda: server.hangups == 2, "the server to close the idle connection")
            # The new connection is closed unanswered too: one retry, not more.
            failure = await failure_of(fetcher)
            assert server.accepts == 3
    assert failure.kind == "connection"
    assert "closed the connection without answering" in str(failure)


@on_loop
async def test_fresh_connection_closed_without_an_answer_fails_without_retrying() -> None:
    async with Server(keep_alive(lambda _server, _request: None)) as server:
        with fetching(server.url()) as fetcher:
            failure = await failure_of(fetcher)
            assert server.accepts == 1
    assert failure.kind == "connection"
    assert "closed the connection without answering" in str(failure)


# ------------------------------------------------------------------------------ timeouts


async def never_answer(server: Server, reader: asyncio.StreamReader, _w: Any) -> None:
    await server.request(reader)
    await reader.read()  # until the client gives up


@on_loop
async def test_server_that_never_answers_times_out() -> None:
    async with Server(never_answer) as server:
        with fetching(server.url(), timeout_secs=0.5) as fetcher:
            start = time.monotonic()
            async with asyncio.timeout(2.5):  # a fetcher that hangs fails here
                failure = await failure_of(fetcher)
            elapsed = time.monotonic() - start
            # The fetcher dropped the connection it gave up on.
            await until(lambda: server.hangups == 1, "the abandoned connection to close")
    assert failure.kind == "timeout"
    assert failure.transient
    assert "timed out after 0.5s" in str(failure)
    assert elapsed >= 0.45  # it did wait for the answer


@on_loop
async def test_deadline_bounds_the_whole_response_of_a_trickling_server() -> None:
    sent = 0

    async def trickle(server: Server, reader: asyncio.StreamReader, w: Any) -> None:
        nonlocal sent
        await server.request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            # Each byte well within any per-read timeout; the whole far over the deadline.
            w.write(b"x")
            await w.drain()
            sent += 1
            await asyncio.sleep(0.02)

    async with Server(trickle) as server:
        with fetching(server.url(), timeout_secs=0.5) as fetcher:
            async with asyncio.timeout(2.5):  # a fetcher that hangs fails here
                failure = await failure_of(fetcher)
    assert failure.kind == "timeout"
    assert sent >= 5  # bytes kept coming: it was the whole response that was too slow


# ------------------------------------------------------------------------------ size cap

CAP = 100_000


def _chunked(body: bytes, size: int = 30_000) -> bytes:
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


def _framings(body: bytes) -> dict[str, Handler]:
    async def close_delimited(server: Server, reader: asyncio.StreamReader, w: Any) -> None:
        await server.request(reader)
        w.write(http(200, body, length=False))

    return {
        "content-length": always(http(200, body)),
        "chunked": always(_chunked(body)),
        "close-delimited": close_delimited,
        "gzip": always(http(200, gzip.compress(body), "Content-Encoding: gzip")),
    }


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close-delimited", "gzip"])
@on_loop
async def test_body_of_exactly_max_body_bytes_is_accepted(framing: str) -> None:
    body = b"a" * CAP
    async with Server(_framings(body)[framing]) as server:
        with fetching(server.url(), max_body_bytes=CAP) as fetcher:
            assert await fetcher.get() == body


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close-delimited", "gzip"])
@on_loop
async def test_body_over_max_body_bytes_is_too_large(framing: str) -> None:
    body = b"a" * (CAP + 1)
    async with Server(_framings(body)[framing]) as server:
        with fetching(server.url(), max_body_bytes=CAP) as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "too_large"
    assert f"max_body_bytes {CAP}" in str(failure)
    assert not failure.transient


@on_loop
async def test_declared_length_over_the_cap_fails_before_the_body_is_sent() -> None:
    # Only the head is sent: a fetcher that waited for the body would time out instead.
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n"
    async with Server(keep_alive(lambda _s, _r: answer)) as server:
        with fetching(server.url(), max_body_bytes=CAP, timeout_secs=2.0) as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "too_large"
    assert f"declares 5000000 bytes, over max_body_bytes {CAP}" in str(failure)


@on_loop
async def test_gzip_bomb_is_too_large() -> None:
    bomb = gzip.compress(b"\0" * 50_000_000)
    assert len(bomb) < CAP  # small on the wire: only inflating it goes over
    async with Server(always(http(200, bomb, "Content-Encoding: gzip"))) as server:
        with fetching(server.url(), max_body_bytes=CAP) as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "too_large"
    assert f"max_body_bytes {CAP}" in str(failure)


# ------------------------------------------------------------------------------ statuses


@on_loop
async def test_404_is_permanent_and_its_connection_is_reused() -> None:
    answers = iter([http(404, b"no such patient"), http(200, b"{}")])
    async with Server(keep_alive(lambda _s, _r: next(answers))) as server:
        with fetching(server.url("/patients/9")) as fetcher:
            failure = await failure_of(fetcher)
            assert await fetcher.get() == b"{}"
    assert (failure.kind, failure.status) == ("http_4xx", 404)
    assert not failure.transient
    assert failure.retry_after_secs is None
    assert str(failure) == f"HTTP 404 from {server.url('/patients/9')}: no such patient"
    assert server.accepts == 1


@on_loop
async def test_503_with_retry_after_seconds() -> None:
    async with Server(always(http(503, b"busy", "Retry-After: 7"))) as server:
        with fetching(server.url()) as fetcher:
            failure = await failure_of(fetcher)
    assert (failure.kind, failure.status, failure.retry_after_secs) == ("http_5xx", 503, 7.0)
    assert failure.transient


@on_loop
async def test_retry_after_as_a_date_counts_from_now(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pinned: 120 s before the date the server gives.
    monkeypatch.setattr(http_async, "time", SimpleNamespace(time=lambda: 1_767_225_480.0))
    answer = http(429, b"", "Retry-After: Thu, 01 Jan 2026 00:00:00 GMT")
    async with Server(always(answer)) as server:
        with fetching(server.url()) as fetcher:
            failure = await failure_of(fetcher)
    assert (failure.kind, failure.status, failure.retry_after_secs) == ("http_4xx", 429, 120.0)
    assert failure.transient


@pytest.mark.parametrize("status", [401, 403])
@on_loop
async def test_401_and_403_are_auth(status: int) -> None:
    async with Server(always(http(status, b'{"error": "bad key"}'))) as server:
        with fetching(server.url()) as fetcher:
            failure = await failure_of(fetcher)
    assert (failure.kind, failure.status) == ("auth", status)
    assert not failure.transient
    assert str(failure).endswith(': {"error": "bad key"}')


@on_loop
async def test_html_error_page_is_named_by_its_title() -> None:
    page = (
        b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
        + b"<p>upstream stack trace line</p>" * 200
        + b"</body></html>"
    )
    async with Server(always(http(502, page))) as server:
        with fetching(server.url()) as fetcher:
            failure = await failure_of(fetcher)
    assert str(failure).endswith(": an HTML page (502 Bad Gateway)")
    assert "stack trace" not in str(failure)


@pytest.mark.parametrize("size", [1500, 50_000])
@on_loop
async def test_error_body_over_the_cap_still_fails_by_its_status(size: int) -> None:
    # A 503 is worth retrying whatever the size of its page; the unread rest of the page
    # must not be taken for the next answer.
    page = b"<html><head><title>Maintenance</title></head><body>".ljust(size, b"x")
    answers = iter([http(503, page), http(200, b"back")])
    async with Server(keep_alive(lambda _s, _r: next(answers))) as server:
        with fetching(server.url(), max_body_bytes=1000) as fetcher:
            failure = await failure_of(fetcher)
            assert await fetcher.get() == b"back"
    assert (failure.kind, failure.status) == ("http_5xx", 503)
    assert "Maintenance" in str(failure)
    assert server.accepts == 2


@pytest.mark.parametrize("status", [204, 304])
@on_loop
async def test_answer_without_a_body_does_not_wait_for_one(status: int) -> None:
    # No length and no body (RFC 9112 section 6.3): waiting for the end of the connection
    # would hang until the timeout.
    answers = iter([http(status, length=False), http(200, b"ok")])
    async with Server(keep_alive(lambda _s, _r: next(answers))) as server:
        with fetching(server.url(), timeout_secs=2.0) as fetcher:
            failure = await failure_of(fetcher)
            assert await fetcher.get() == b"ok"
    assert failure.status == status
    assert failure.kind != "timeout"
    assert server.accepts == 1


# ------------------------------------------------------------------------------ redirects


@on_loop
async def test_redirect_to_another_path_on_the_same_connection() -> None:
    def respond(_server: Server, request: Request) -> bytes:
        if request.line.startswith("GET /old "):
            return http(302, b"moved", "Location: /new?x=1")
        return http(200, request.line.encode())

    async with Server(keep_alive(respond)) as server:
        with fetching(server.url("/old")) as fetcher:
            assert await fetcher.get() == b"GET /new?x=1 HTTP/1.1"
            assert await fetcher.get() == b"GET /new?x=1 HTTP/1.1"
    assert server.accepts == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@on_loop
async def test_redirect_to_another_origin(status: int) -> None:
    async with Server(keep_alive(numbered)) as target:
        moved = http(status, b"", f"Location: {target.url('/elsewhere')}")
        async with Server(always(moved)) as origin:
            with fetching(origin.url("/here")) as fetcher:
                assert await fetcher.get() == b"connection 1"
                assert await fetcher.get() == b"connection 2"
    assert [r.line for r in target.requests] == ["GET /elsewhere HTTP/1.1"] * 2
    assert target.requests[0].header("Host") == [f"127.0.0.1:{target.port}"]


@on_loop
async def test_more_than_max_redirects_fails() -> None:
    def respond(_server: Server, request: Request) -> bytes:
        hop = int(request.line.split()[1].rsplit("/", 1)[1])
        return http(302, b"", f"Location: /hop/{hop + 1}")

    async with Server(keep_alive(respond)) as server:
        with fetching(server.url("/hop/0")) as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert f"more than {MAX_REDIRECTS} redirects" in str(failure)
    assert len(server.requests) == MAX_REDIRECTS + 1


# ------------------------------------------------------------------------------ connecting


@on_loop
async def test_connection_refused() -> None:
    with fetching(f"http://127.0.0.1:{free_port()}/feed") as fetcher:
        failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert failure.transient
    assert "connection refused" in str(failure)


@on_loop
async def test_connection_refused_on_every_address_of_a_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As "localhost" on a machine with both ::1 and 127.0.0.1: asyncio tries each address and
    # raises one OSError for all of them.
    port = free_port()
    real = socket.getaddrinfo

    def two_addresses(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "twice.test":
            return real(host, *args, **kwargs)
        stream = (socket.AF_INET, socket.SOCK_STREAM, 6, "")
        return [(*stream, ("127.0.0.1", port)), (*stream, ("127.0.0.2", port))]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    with fetching(f"http://twice.test:{port}/feed") as fetcher:
        failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert "connection refused" in str(failure)


def _resolves_quickly_offline(name: str) -> bool:
    """Whether looking ``name`` up fails within a second here (a resolver that goes out to
    the network, or hangs, would make the test slow or flaky)."""
    done = threading.Event()

    def look_up() -> None:
        try:
            socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
        except OSError:
            done.set()

    threading.Thread(target=look_up, daemon=True).start()
    return done.wait(1.0)


@on_loop
async def test_name_that_does_not_resolve() -> None:
    name = "no-such-feed.invalid"  # RFC 6761: never resolves
    if not _resolves_quickly_offline(name):
        pytest.skip(f"looking up {name} does not fail within a second on this machine")
    with fetching(f"http://{name}/feed") as fetcher:
        failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert "the host name does not resolve" in str(failure)


def test_close_after_the_loop_has_ended_closes_the_connection() -> None:
    # The collector closes its fetchers after their loop is gone; the server is on a thread
    # so that it outlives the loop and can tell when the connection closes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        closed = threading.Event()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(http(200, b"ok"))
                conn.settimeout(10)
                if conn.recv(1) == b"":
                    closed.set()

        threading.Thread(target=serve, daemon=True).start()
        fetcher = AsyncFetcher(f"http://127.0.0.1:{listener.getsockname()[1]}/")
        assert asyncio.run(fetcher.get()) == b"ok"
        fetcher.close()
        assert closed.wait(5.0)


# ------------------------------------------------------------------------------ malformed


@pytest.mark.parametrize(
    "answer, reason",
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP response"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", "over 65536 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", "in the middle of its answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Len", "in the middle of its headers"),
    ],
)
@on_loop
async def test_malformed_answer_is_a_connection_failure(answer: bytes, reason: str) -> None:
    async def once(server: Server, reader: asyncio.StreamReader, w: Any) -> None:
        await server.request(reader)
        w.write(answer)

    async with Server(once) as server:
        with fetching(server.url()) as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert reason in str(failure)


# ------------------------------------------------------------------------------ cancelling


@on_loop
async def test_cancelled_get_drops_its_connection() -> None:
    half_sent = asyncio.Event()

    async def first_half_then_the_rest(
        server: Server, reader: asyncio.StreamReader, w: Any
    ) -> None:
        if server.accepts > 1:
            await keep_alive(numbered)(server, reader, w)
            return
        await server.request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nold-")
        await w.drain()
        half_sent.set()
        # Whatever comes next on this connection gets the rest of the old answer first.
        while await server.request(reader) is not None:
            w.write(b"answer" + http(200, b"old connection"))

    async with Server(first_half_then_the_rest) as server:
        with fetching(server.url()) as fetcher:
            task = asyncio.create_task(fetcher.get())
            await half_sent.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: server.hangups == 1, "the cancelled connection to close")
            assert await fetcher.get() == b"connection 2"
    assert server.accepts == 2


# ------------------------------------------------------------------------------ secrets


SECRET_URL_PATH = "/feed.json?api_key=s3cr3t-key"


@pytest.mark.parametrize(
    "handler, options",
    [
        (always(http(404, b"not found")), {}),
        (always(http(200, b"x" * 2000)), {"max_body_bytes": 1000}),
        (always(http(302, b"", f"Location: {SECRET_URL_PATH}")), {}),
        (never_answer, {"timeout_secs": 0.3}),
        (always(b"garbage\r\n"), {}),
        (None, {}),  # connection refused
    ],
)
@on_loop
async def test_credentials_and_query_never_appear_in_failures(
    handler: Handler | None, options: dict[str, Any]
) -> None:
    async with Server(handler or never_answer) as server:
        port = server.port if handler is not None else free_port()
        url = f"http://feeder:hunter2@127.0.0.1:{port}{SECRET_URL_PATH}"
        with fetching(url, **options) as fetcher:
            failure = await failure_of(fetcher)
    message = str(failure)
    assert f"http://127.0.0.1:{port}/feed.json" in message
    for secret in ("s3cr3t", "api_key", "hunter2", "feeder"):
        assert secret not in message


# ------------------------------------------------------------------------------ requests


@on_loop
async def test_request_line_host_user_agent_and_configured_headers() -> None:
    async with Server(always(http(200, b"{}"))) as server:
        headers = {"X-Api-Key": "k1", "accept": "application/geo+json"}
        with fetching(server.url("/v2/patients/3?fields=all&x=%20"), headers=headers) as f:
            await f.get()
    [request] = server.requests
    assert request.line == "GET /v2/patients/3?fields=all&x=%20 HTTP/1.1"
    assert request.header("Host") == [f"127.0.0.1:{server.port}"]
    assert request.header("User-Agent") == [USER_AGENT]
    assert request.header("X-Api-Key") == ["k1"]
    # Header names are case-insensitive: the configured one replaces the default.
    assert request.header("Accept") == ["application/geo+json"]


@on_loop
async def test_configured_user_agent_replaces_the_default() -> None:
    async with Server(always(http(200, b"{}"))) as server:
        with fetching(server.url(), headers={"User-Agent": "probe/1"}) as fetcher:
            await fetcher.get()
    assert server.requests[0].header("User-Agent") == ["probe/1"]


# ------------------------------------------------------------------------------ proxies


@on_loop
async def test_http_through_a_proxy_in_absolute_form_with_basic_auth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Server(always(http(200, b"via proxy"))) as proxy:
        monkeypatch.setenv("http_proxy", f"http://ops:p%40ss@127.0.0.1:{proxy.port}")
        with fetching("http://feeds.example:8080/gbfs.json?key=k") as fetcher:
            assert await fetcher.get() == b"via proxy"
            assert await fetcher.get() == b"via proxy"
        with fetching("http://feeds.example/gbfs.json") as fetcher:
            assert await fetcher.get() == b"via proxy"
    first, _, default_port = proxy.requests
    assert first.line == "GET http://feeds.example:8080/gbfs.json?key=k HTTP/1.1"
    assert first.header("Host") == ["feeds.example:8080"]
    assert first.header("Proxy-Authorization") == [
        "Basic " + base64.b64encode(b"ops:p@ss").decode()
    ]
    assert default_port.line == "GET http://feeds.example/gbfs.json HTTP/1.1"
    assert default_port.header("Host") == ["feeds.example"]
    assert proxy.accepts == 2  # one kept-alive connection per fetcher


@on_loop
async def test_proxy_without_a_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    # "host:port", as curl and requests take it.
    async with Server(always(http(200, b"via proxy"))) as proxy:
        monkeypatch.setenv("http_proxy", f"localhost:{proxy.port}")
        with fetching("http://feeds.example/x") as fetcher:
            assert await fetcher.get() == b"via proxy"
    assert proxy.requests[0].line == "GET http://feeds.example/x HTTP/1.1"


@on_loop
async def test_no_proxy_bypasses_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with (
        Server(always(http(200, b"via proxy"))) as proxy,
        Server(always(http(200, b"direct"))) as origin,
    ):
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("NO_PROXY", "feeds.example,127.0.0.1")
        with fetching(origin.url("/x")) as fetcher:
            assert await fetcher.get() == b"direct"
    assert (proxy.accepts, origin.accepts) == (0, 1)


@on_loop
async def test_environment_is_read_once_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    async with Server(always(http(200, b"via proxy"))) as proxy:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        fetcher = AsyncFetcher("http://feeds.example/x", timeout_secs=5.0)
        monkeypatch.delenv("http_proxy")
        monkeypatch.setenv("no_proxy", "*")
        try:
            assert await fetcher.get() == b"via proxy"
        finally:
            fetcher.close()


@on_loop
async def test_unsupported_proxy_scheme_fails_without_its_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("https_proxy", "socks5://ops:pw-secret@127.0.0.1:1080")
    with fetching("https://feeds.example/x") as fetcher:
        failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert "only http:// proxies" in str(failure)
    assert "pw-secret" not in str(failure)


@on_loop
async def test_proxy_refusing_the_tunnel(monkeypatch: pytest.MonkeyPatch) -> None:
    refusal = http(403, b"<html><title>Denied</title></html>")
    async with Server(always(refusal)) as proxy:
        monkeypatch.setenv("https_proxy", f"http://ops:pw@127.0.0.1:{proxy.port}")
        with fetching("https://feeds.example/gbfs.json?key=k") as fetcher:
            failure = await failure_of(fetcher)
            await until(lambda: proxy.hangups == 1, "the refused tunnel to close")
    assert failure.kind == "connection"
    assert "the proxy refused the tunnel (HTTP 403)" in str(failure)
    [connect] = proxy.requests
    assert connect.line == "CONNECT feeds.example:443 HTTP/1.1"
    assert connect.header("Host") == ["feeds.example:443"]
    assert connect.header("Proxy-Authorization") == [
        "Basic " + base64.b64encode(b"ops:pw").decode()
    ]


@on_loop
async def test_proxy_silent_on_connect_times_out_and_its_connection_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Server(never_answer) as proxy:
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
        with fetching("https://feeds.example/x", timeout_secs=0.3) as fetcher:
            failure = await failure_of(fetcher)
            await until(lambda: proxy.hangups == 1, "the abandoned tunnel to close")
    assert failure.kind == "timeout"


# ------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a self-signed certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def _server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@on_loop
async def test_tls_certificate_not_trusted_fails(certificate: tuple[Path, Path]) -> None:
    async with Server(always(http(200, b"secure")), tls=_server_tls(certificate)) as server:
        with fetching(server.url()) as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert "TLS failed: CERTIFICATE_VERIFY_FAILED" in str(failure)


@on_loop
async def test_tls_unverified_when_asked(certificate: tuple[Path, Path]) -> None:
    async with Server(always(http(200, b"secure")), tls=_server_tls(certificate)) as server:
        with fetching(server.url(), verify_tls=False) as fetcher:
            assert await fetcher.get() == b"secure"
            assert await fetcher.get() == b"secure"
    assert server.accepts == 1


@on_loop
async def test_tls_verified_against_requests_ca_bundle(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    async with Server(always(http(200, b"secure")), tls=_server_tls(certificate)) as server:
        with fetching(server.url()) as fetcher:
            assert await fetcher.get() == b"secure"
        # The same trusted certificate, for another name: the host name is checked too.
        with fetching(f"https://localhost:{server.port}/") as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert "TLS failed" in str(failure)


@on_loop
async def test_https_through_a_proxy_tunnel(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def tunnel(server: Server, reader: asyncio.StreamReader, w: Any) -> None:
        connect = await server.request(reader)
        assert connect is not None
        host, port = connect.line.split()[1].rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, w))
        finally:
            up_writer.close()

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    async with (
        Server(keep_alive(numbered), tls=_server_tls(certificate)) as origin,
        Server(tunnel) as proxy,
    ):
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
        with fetching(origin.url("/secure?key=k")) as fetcher:
            assert await fetcher.get() == b"connection 1"
            assert await fetcher.get() == b"connection 1"
    assert proxy.requests[0].line == f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1"
    assert [r.line for r in origin.requests] == ["GET /secure?key=k HTTP/1.1"] * 2
    assert (proxy.accepts, origin.accepts) == (1, 1)


@on_loop
async def test_a_dead_proxy_is_named_not_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    # The source listens; only the proxy refuses. "Nothing listens" on the source's URL alone
    # sent a new user looking at the wrong server.
    async with Server(always(http(200, b"direct"))) as origin:
        monkeypatch.setenv("http_proxy", f"http://ops:pw-secret@127.0.0.1:{free_port()}")
        with fetching(origin.url("/x")) as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "connection" and failure.transient
    assert "the proxy http://127.0.0.1:" in str(failure)
    assert "http_proxy" in str(failure) and "connection refused" in str(failure)
    assert "pw-secret" not in str(failure)
    assert origin.accepts == 0


@on_loop
async def test_https_to_a_plain_http_port_says_so() -> None:
    async def plain_http(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # As http.server answers a TLS hello: in plain text, then it hangs up.
        await reader.read(1024)
        writer.write(b"HTTP/1.0 400 Bad request version\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with Server(plain_http) as server:
        with fetching(server.url("/x").replace("http://", "https://")) as fetcher:
            failure = await failure_of(fetcher)
    assert failure.kind == "connection"
    assert "does not speak TLS on that port" in str(failure)
