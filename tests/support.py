"""Test helpers: a real InfluxDB 1.x server, a scriptable HTTP server, polling with a deadline."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests

from collector.simulators.serve import Background
from collector.sinks.base import SinkMetrics, WriteReport

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
DATA = Path(__file__).resolve().parent / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_cpu_secs(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (Linux ``/proc``):
    fields 14 and 15 of stat(5), counted from the state (field 3)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

    def __init__(
        self, workdir: Path, *, auth_enabled: bool = False, data_options: str = ""
    ) -> None:
        self.workdir = workdir
        self.auth_enabled = auth_enabled  # then the first user created must be an admin
        self.data_options = data_options  # more [data] settings, e.g. "max-values-per-tag = 0"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def available() -> bool:
        return shutil.which("influxd") is not None

    def start(self, same_port: bool = False) -> None:
        """Start (or start again, on the same port and data with ``same_port``)."""
        binary = shutil.which("influxd")
        if binary is None:
            raise RuntimeError("influxd not found: apt-get install influxdb")
        for _attempt in range(5):  # a free port can be taken between probe and bind
            if not (same_port and self.port):
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
  {self.data_options}
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  auth-enabled = {"true" if self.auth_enabled else "false"}
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
    trickle_secs: float = 0.0  # send the body a byte at a time, this long apart


Route = Reply | Callable[["Request"], Reply]


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class FeedServer:
    """Serves scripted replies by path and records every request: a WSGI app, served like the
    simulators (``collector.simulators.serve``)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = Background(self)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        request = Request(
            environ["REQUEST_METHOD"],
            environ["PATH_INFO"],
            environ["QUERY_STRING"],
            headers,
            environ["wsgi.input"].read(),
        )
        with self._lock:
            self.requests.append(request)
        route = self.routes.get(request.path)
        if route is None:  # "/api/v2/buckets/" answers "/api/v2/buckets/<id>"
            prefixes = [p for p in self.routes if p.endswith("/") and request.path.startswith(p)]
            route = self.routes[max(prefixes, key=len)] if prefixes else None
        if route is None:
            reply = Reply(404, b'{"error": "not found"}')
        elif callable(route):
            reply = route(request)
        else:
            reply = route
        if reply.gate is not None:
            reply.gate.wait(30)
        if reply.delay_secs:
            time.sleep(reply.delay_secs)  # the server under test is slow on purpose
        phrase = HTTPStatus(reply.status).phrase
        headers = list(reply.headers.items())
        if reply.trickle_secs:
            headers.append(("Content-Length", str(len(reply.body))))
            start_response(f"{reply.status} {phrase}", headers)
            return self._trickle(reply.body, reply.trickle_secs)
        start_response(f"{reply.status} {phrase}", headers)
        return [reply.body]

    @staticmethod
    def _trickle(body: bytes, secs: float) -> Iterator[bytes]:
        for i in range(len(body)):
            time.sleep(secs)  # the server under test is slow on purpose
            yield body[i : i + 1]

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> FeedServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

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


class MemorySink:
    """A sink that keeps every line it is given, for tests of what the collector hands over."""

    def __init__(self) -> None:
        self.written: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def write(self, bucket: str, lines: Sequence[str], precision: str) -> WriteReport:
        with self._lock:
            self.written.extend((bucket, line) for line in lines)
        return WriteReport(written=len(lines))

    def lines(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [line for _, line in self.written if line.startswith(prefix)]

    def metrics(self) -> SinkMetrics:
        return SinkMetrics()

    def stop_retrying(self) -> None:
        pass

    def close(self) -> None:
        pass


def run_cli(*args: str, config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``collector ARGS --config CONFIG`` in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "collector.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Running:
    log: str = ""


@contextmanager
def collector_process(config: Path) -> Iterator[Running]:
    """``collector run`` in a child process for the ``with`` body; on leaving it, SIGTERM:
    the collector must exit 0 within 10 s (Docker's grace period). ``.log`` is its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    running = Running()
    try:
        yield running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        running.log = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in running.log


def run_until_sigterm(
    config: Path, condition: Callable[[], Any], what: str, timeout: float = 30
) -> str:
    """``collector run`` until ``condition`` holds, then SIGTERM; returns what it logged."""
    with collector_process(config) as running:
        wait_for(condition, timeout=timeout, what=what)
    return running.log
