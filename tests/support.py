"""Test helpers: a real InfluxDB 1.x server, a scriptable HTTP server, polling with a deadline."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
DATA = Path(__file__).resolve().parent / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- InfluxDB 1.x


class InfluxD:
    """Debian's ``influxd`` (1.x) in a temp dir, on free loopback ports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("influxd")
        if binary is None:
            raise RuntimeError("influxd not found: apt-get install influxdb")
        for _attempt in range(5):  # a free port can be taken between probe and bind
            self.port = free_port()
            config = self.workdir / "influxdb.conf"
            config.write_text(
                f"""
reporting-disabled = true
bind-address = "127.0.0.1:{free_port()}"
[meta]
  dir = "{self.workdir}/meta"
[data]
  dir = "{self.workdir}/data"
  wal-dir = "{self.workdir}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  log-enabled = false
"""
            )
            log = (self.workdir / "influxd.log").open("ab")
            self.proc = subprocess.Popen(
                [binary, "run", "-config", str(config)], stdout=log, stderr=log
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if requests.get(f"{self.url}/ping", timeout=1).status_code == 204:
                        return
                except requests.RequestException:
                    pass
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"influxd did not start; see {self.workdir / 'influxd.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def query(self, q: str, db: str | None = None, epoch: str = "s") -> list[dict[str, Any]]:
        """InfluxQL; rows of the first statement as dicts (time in ``epoch`` units)."""
        params = {"q": q, "epoch": epoch}
        if db:
            params["db"] = db
        resp = requests.post(f"{self.url}/query", data=params, timeout=10)
        resp.raise_for_status()
        result = resp.json()["results"][0]
        assert "error" not in result, result["error"]
        rows = []
        for series in result.get("series", []):
            for values in series.get("values", []):
                row = dict(zip(series["columns"], values, strict=True))
                row.update(series.get("tags") or {})
                rows.append(row)
        return rows

    def drop(self, db: str) -> None:
        self.query(f'DROP DATABASE "{db}"')


# ------------------------------------------------------------------------ scriptable HTTP


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_secs: float = 0.0  # before the headers, so clients see a slow server
    gate: threading.Event | None = None  # wait for it before answering


Route = Reply | Callable[["Request"], Reply]


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class FeedServer:
    """Serves scripted replies by path; records every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    self.command, path, query, dict(self.headers.items()), self.rfile.read(length)
                )
                with server._lock:
                    server.requests.append(request)
                route = server.routes.get(path)
                if route is None:
                    reply = Reply(404, b'{"error": "not found"}')
                elif callable(route):
                    reply = route(request)
                else:
                    reply = route
                if reply.gate is not None:
                    reply.gate.wait(30)
                if reply.delay_secs:
                    time.sleep(reply.delay_secs)
                try:
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    if reply.body and self.command != "HEAD":
                        self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_HEAD = do_PATCH = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FeedServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path == path)

    def serve_folder(self, folder: Path, prefix: str) -> str:
        """Serve the JSON files of a hand-written fixture under ``prefix``, with ``{BASE}/<folder
        name>`` in them pointing here; returns the URL of its gbfs.json."""
        for file in folder.glob("*.json"):
            body = file.read_bytes().replace(
                f"{{BASE}}/{folder.name}".encode(), f"{self.url}{prefix}".encode()
            )
            self.routes[f"{prefix}/{file.name}"] = Reply(200, body)
        return f"{self.url}{prefix}/gbfs.json"
