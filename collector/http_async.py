"""HTTP GET on asyncio, for sources polled several times a second (patients).

300 patients at 0.3 s are 1,000 GETs a second. On a thread per patient each cost 0.6-0.7 ms of
CPU (urllib3's 0.33 ms, the rest the GIL handed between 300 threads), so one collector topped
out near 300. On one event loop, with a keep-alive connection per patient and its request
built once, a GET costs 0.21-0.24 ms (issue #13; BENCHMARKS.md "Foot pressure on one event
loop"). The HTTP here is what such polls need and no more: GET; HTTP/1.1 keep-alive with one
retry when the server has closed an idle connection; bodies framed by Content-Length, chunked
or the end of the connection; gzip and deflate; redirects; ``HTTP(S)_PROXY`` / ``NO_PROXY``
(CONNECT for https); TLS checked against the same bundle as ``collector.http.Fetcher``.
Failures are classified as ``Fetcher`` classifies them (``collector.retry``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import re
import socket
import ssl
import time
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

from collector.http import (
    DEFAULT_HEADERS,
    ca_bundle,
    describe_body,
    proxy_for,
    reason_of,
    redact_url,
)
from collector.retry import Failure, kind_of_status, parse_retry_after

__all__ = ["AsyncFetcher"]

# As Fetcher (and requests) follow them.
MAX_REDIRECTS = 30
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Longest status or header line accepted (asyncio's own default limit).
_LINE_LIMIT = 64 * 1024
# How much of an error page over max_body_bytes is read to describe it.
_SNIPPET = 2000
# No body whatever the headers say (RFC 9112 section 6.3); 1xx are skipped before.
_NO_BODY = frozenset({204, 304})
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _Closed(ConnectionError):
    """The server closed the connection before the status line: on a reused connection,
    the server timed it out while idle, and the request is sent again on a new one."""


class _Protocol(ConnectionError):
    """Bytes that are not HTTP/1.x where a response was due."""


@dataclass(frozen=True)
class _Route:
    scheme: str
    host: str
    port: int
    proxy: str | None  # an http:// proxy URL, or None for a direct connection


@dataclass
class _Connection:
    route: _Route
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    loop: asyncio.AbstractEventLoop

    def close(self) -> None:
        if not self.loop.is_closed():
            self.writer.close()
            return
        # The loop has ended and a transport closes through its loop (RuntimeError now): the
        # socket is shut down so the server sees the end at once; the transport's finalizer
        # releases the descriptor.
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class AsyncFetcher:
    """GET one URL, again and again, on one keep-alive connection. Used from one event loop,
    one ``get`` at a time; ``close`` on that loop (or after it ended)."""

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_secs: float = 10.0,
        max_body_bytes: int = 32 * 1024 * 1024,
        verify_tls: bool = True,
    ) -> None:
        self._url = url
        self._where = redact_url(url)
        self._headers = _overridden(DEFAULT_HEADERS, headers or {})
        self._timeout_secs = timeout_secs
        self._max_body_bytes = max_body_bytes
        # The bundle named now, loaded at the first https connection: 19 ms a load, once per
        # bundle rather than once per patient (300 patients would start 6 s late).
        self._tls = (verify_tls, ca_bundle())
        # The environment read once, as Fetcher does.
        self._proxies = urllib.request.getproxies()
        self._routes: dict[tuple[str, str, int], _Route] = {}
        self._requests: dict[str, bytes] = {}  # url -> the request's bytes, built once
        self._conn: _Connection | None = None

    async def get(self) -> bytes:
        """The body of a 200; raises ``Failure`` for anything else, and is cancellable."""
        where = self._where
        whole = False  # the last answer read to its end: the connection can carry the next
        try:
            async with asyncio.timeout(self._timeout_secs):
                body = await self._follow(self._url)
            whole = True
            return body
        except Failure as failure:
            whole = failure.status is not None  # an HTTP status, with all of its body
            raise
        except TimeoutError as exc:
            raise Failure("timeout", f"{where} timed out after {self._timeout_secs:g}s") from exc
        except _Protocol as exc:
            raise Failure("connection", f"{where}: {exc}") from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise Failure("connection", f"{where}: {_reason(exc)}") from exc
        finally:
            if not whole:
                # Cancelled, cut or refused part-way: what is left unread would be taken for
                # the next answer, so the connection goes.
                self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _follow(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            answer = await self._exchange(url)
            location = answer.headers.get("location")
            if answer.status in _REDIRECTS and location:
                url = urljoin(url, location)
                continue
            if answer.status == 200:
                return answer.body
            raise Failure(
                kind_of_status(answer.status),
                f"HTTP {answer.status} from {self._where}: {describe_body(answer.body[:_SNIPPET])}",
                status=answer.status,
                retry_after_secs=parse_retry_after(answer.headers.get("retry-after"), time.time()),
            )
        raise Failure("connection", f"{self._where}: more than {MAX_REDIRECTS} redirects")

    async def _exchange(self, url: str) -> _Answer:
        route = self._route(url)
        request = self._requests.get(url) or self._request(url, route)
        reused = self._conn is not None and self._conn.route == route
        if not reused:
            self.close()
        for attempt in range(2):
            conn = self._conn if self._conn is not None else await self._open(route)
            self._conn = conn
            conn.writer.write(request)
            try:
                answer, keep = await self._response(conn.reader)
            except (_Closed, ConnectionResetError, BrokenPipeError):
                self.close()
                if reused and attempt == 0:
                    reused = False  # the server dropped it while idle: once more, anew
                    continue
                raise
            if not keep:
                self.close()
            return answer
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _route(self, url: str) -> _Route:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Failure("http_4xx", f"{redact_url(url)}: not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, parts.hostname, port)
        route = self._routes.get(key)
        if route is None:
            proxy = proxy_for(self._proxies, parts.scheme, parts.hostname)
            if proxy and urlsplit(proxy).scheme != "http":
                raise Failure(
                    "connection",
                    f"{redact_url(url)}: only http:// proxies are supported here "
                    f"({parts.scheme}_proxy is {redact_url(proxy)})",
                )
            route = _Route(parts.scheme, parts.hostname, port, proxy or None)
            self._routes[key] = route
        return route

    def _request(self, url: str, route: _Route) -> bytes:
        parts = urlsplit(url)
        default = 443 if route.scheme == "https" else 80
        host = route.host if ":" not in route.host else f"[{route.host}]"
        authority = host if route.port == default else f"{host}:{route.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = _overridden({"Host": authority}, self._headers)
        if route.proxy is not None and route.scheme == "http":
            # A plain-http proxy is sent the whole URL (RFC 9112 section 3.2.2).
            target = f"http://{authority}{target}"
            headers.update(_proxy_auth(route.proxy))
        lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        request = "\r\n".join(lines).encode("latin-1")
        if len(self._requests) < MAX_REDIRECTS + 1:
            self._requests[url] = request
        return request

    async def _open(self, route: _Route) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = _tls_context(*self._tls) if route.scheme == "https" else None
        if route.proxy is None:
            try:
                reader, writer = await asyncio.open_connection(
                    route.host, route.port, ssl=tls, limit=_LINE_LIMIT
                )
            except ssl.SSLError as exc:
                raise Failure("connection", f"{self._where}: {_tls_reason(exc)}") from exc
            return _Connection(route, reader, writer, loop)
        proxy = urlsplit(route.proxy)
        try:
            reader, writer = await asyncio.open_connection(
                proxy.hostname, proxy.port or 80, limit=_LINE_LIMIT
            )
        except OSError as exc:
            # Else "connection refused" would name the source, which may well be listening.
            raise Failure(
                "connection",
                f"{self._where}: the proxy {redact_url(route.proxy)} (the environment's "
                f"{route.scheme}_proxy) failed: {_reason(exc)}",
            ) from exc
        if tls is None:
            return _Connection(route, reader, writer, loop)
        try:
            # https through the proxy: a tunnel (RFC 9110 section 9.3.6), then TLS inside it.
            authority = f"{route.host}:{route.port}"
            head = {"Host": authority, **_proxy_auth(route.proxy)}
            lines = [f"CONNECT {authority} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
            writer.write(("\r\n".join([*lines, "", ""])).encode("latin-1"))
            status, _ = await _head(reader)
            if status != 200:
                raise Failure(
                    "connection", f"{self._where}: the proxy refused the tunnel (HTTP {status})"
                )
            await writer.start_tls(tls, server_hostname=route.host)
        except BaseException:
            # Refused, cut, timed out or cancelled: not yet the fetcher's to close.
            writer.close()
            raise
        return _Connection(route, reader, writer, loop)

    async def _response(self, reader: asyncio.StreamReader) -> tuple[_Answer, bool]:
        """The next response and whether the connection may carry another."""
        while True:
            status, headers = await _head(reader)
            if not 100 <= status < 200:
                break
        version_11 = headers.pop(":version") == "HTTP/1.1"
        connection = headers.get("connection", "").lower()
        keep = ("close" not in connection) if version_11 else ("keep-alive" in connection)
        body, whole = await self._body(reader, status, headers)
        encoding = headers.get("content-encoding", "").lower()
        if encoding in ("gzip", "x-gzip", "deflate") and body:
            body, inflated = self._decoded(body, encoding)
            whole = whole and inflated
        if not whole:
            # Over max_body_bytes: a 200 is refused, and any other answer is still classified
            # by its status, from the part read. The unread rest must not pass for the next
            # answer.
            if status == 200:
                raise self._too_large()
            keep = False
        return _Answer(status, headers, body), keep

    async def _body(
        self, reader: asyncio.StreamReader, status: int, headers: Mapping[str, str]
    ) -> tuple[bytes, bool]:
        """The body, up to max_body_bytes, and whether that is all of it."""
        cap = self._max_body_bytes
        if status in _NO_BODY:
            return b"", True
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await self._chunked(reader)
        if "content-length" not in headers:
            return await self._to_end(reader)
        declared = headers["content-length"]
        if not (declared.isascii() and declared.isdigit()):
            raise _Protocol("a Content-Length that is not a number")
        length = int(declared)
        if length <= cap:
            return await reader.readexactly(length), True
        if status == 200:
            raise Failure(
                "too_large", f"{self._where} declares {length} bytes, over max_body_bytes {cap}"
            )
        return await reader.readexactly(min(length, _SNIPPET)), False

    async def _chunked(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        body = bytearray()
        while True:
            size_text = (await _line(reader)).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise _Protocol("a chunked body with a bad chunk size")
            size = int(size_text, 16)
            if size == 0:
                while (await _line(reader)) not in (b"\r\n", b"\n", b""):
                    pass  # trailers, unused
                return bytes(body), True
            room = self._max_body_bytes - len(body)
            if size > room:
                body += await reader.readexactly(room)
                return bytes(body), False
            body += await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk

    async def _to_end(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        body = bytearray()
        while chunk := await reader.read(64 * 1024):
            body += chunk
            if len(body) > self._max_body_bytes:
                return bytes(body[: self._max_body_bytes]), False
        return bytes(body), True

    def _decoded(self, body: bytes, encoding: str) -> tuple[bytes, bool]:
        """The body inflated, up to max_body_bytes, and whether that is all of it."""
        cap = self._max_body_bytes
        # 47: a gzip or zlib header, found by zlib; -15: raw deflate, which some servers send.
        for wbits in (47, -15):
            inflate = zlib.decompressobj(wbits)
            try:
                out = inflate.decompress(body, cap + 1)
            except zlib.error:
                continue
            return out[:cap], len(out) <= cap
        raise _Protocol(f"a {encoding} body that does not inflate")

    def _too_large(self) -> Failure:
        return Failure(
            "too_large", f"{self._where} sent over max_body_bytes {self._max_body_bytes}"
        )


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """A status line and its headers (names lower-cased; ``:version`` the HTTP version)."""
    line = await _line(reader)
    if not line:
        raise _Closed("the server closed the connection without answering")
    version, _, rest = line.decode("latin-1").partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
        raise _Protocol(f"not an HTTP response ({describe_body(line[:80])})")
    headers = {":version": version}
    while True:
        raw = await _line(reader)
        if raw in (b"\r\n", b"\n"):
            return int(code), headers
        if not raw:
            raise _Closed("the server closed the connection in the middle of its headers")
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # what readline makes of a line over its limit
        raise _Protocol(f"a status, header or chunk-size line over {_LINE_LIMIT} bytes") from None


def _overridden(defaults: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
    """``defaults`` and ``headers``, a default dropped where ``headers`` names it in any case:
    a header sent twice is either refused or read as a list."""
    given = {name.lower() for name in headers}
    return {**{k: v for k, v in defaults.items() if k.lower() not in given}, **headers}


def _proxy_auth(proxy: str) -> dict[str, str]:
    parts = urlsplit(proxy)
    if parts.username is None:
        return {}
    user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(user.encode()).decode()}


@functools.cache
def _tls_context(verify: bool, bundle: str) -> ssl.SSLContext:
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=bundle)


def _tls_reason(exc: ssl.SSLError) -> str:
    reason = reason_of(exc)
    if exc.reason == "WRONG_VERSION_NUMBER":
        # What OpenSSL says when the other end answers in plain text.
        return f"{reason} (the server does not speak TLS on that port: http:// rather?)"
    return reason


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the server closed the connection in the middle of its answer"
    text = str(exc)
    if type(exc) is OSError and text.startswith("Multiple exceptions: "):
        # asyncio tried each address of the name, and (before 3.12) kept only their messages.
        refused = text.count(f"[Errno {errno.ECONNREFUSED}]")
        if refused and refused == text.count("[Errno "):
            return reason_of(ConnectionRefusedError())
    return reason_of(exc)
