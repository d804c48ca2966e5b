"""Serve a WSGI app with the standard library: a thread per connection, HTTP/1.1 keep-alive.

``wsgiref.simple_server`` answers one request at a time over HTTP/1.0, so one slow patient
would stall all the others and every poll would open a new connection.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def make_server(app: WsgiApp, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle on, a keep-alive client waits for
        # the delayed ACK between them (40 ms a request).
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:
            pass

        def _handle(self) -> None:
            path, _, query = self.path.partition("?")
            length = int(self.headers.get("Content-Length") or 0)
            environ = {
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "SERVER_NAME": host,
                "SERVER_PORT": str(cast(ThreadingHTTPServer, self.server).server_port),
                "SERVER_PROTOCOL": self.request_version,
                "wsgi.input": io.BytesIO(self.rfile.read(length)),
                "wsgi.errors": sys.stderr,
                "wsgi.url_scheme": "http",
                "wsgi.version": (1, 0),
                "wsgi.multithread": True,
                "wsgi.multiprocess": False,
                "wsgi.run_once": False,
                **{
                    "HTTP_" + key.upper().replace("-", "_"): value
                    for key, value in self.headers.items()
                },
            }
            status_headers: list[Any] = []

            def start_response(
                status: str, headers: list[tuple[str, str]], exc_info: object = None
            ) -> None:
                status_headers[:] = [status, headers]

            chunks = iter(app(environ, start_response))
            first = next(chunks, b"")  # start_response has been called by now
            status, headers = status_headers
            # With a Content-Length from the app, the body streams as the app yields it.
            streaming = any(key.lower() == "content-length" for key, _ in headers)
            body = first if streaming else first + b"".join(chunks)
            try:
                self.send_response(int(status.split(" ", 1)[0]), status.split(" ", 1)[1])
                for key, value in headers:
                    self.send_header(key, value)
                if not streaming:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                    if streaming:
                        for chunk in chunks:
                            self.wfile.write(chunk)
                            self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    server = _Server((host, port), Handler)
    server.daemon_threads = True
    return server


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: when a collector polls many systems at the
    # same instant, the connects beyond it are dropped by the kernel and retried a second
    # later, longer than a short timeout_secs, so a random feed "times out".
    request_queue_size = 1024


class Background:
    """A server running on a thread, for tests and benchmarks: ``with Background(app) as url:``."""

    def __init__(self, app: WsgiApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = make_server(app, host, port)
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        # An AF_INET server: its address is (host, port), the host a str.
        host, port = cast(tuple[str, int], self.server.server_address[:2])
        return f"http://{host}:{port}"

    def start(self) -> str:
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
