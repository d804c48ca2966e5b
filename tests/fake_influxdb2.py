"""A local stand-in for InfluxDB 2.x's HTTP API: the documented endpoints, strict about requests.

It checks what a real server checks (token, org, bucket, precision, gzip body) and can be told
to answer the next writes with other documented status codes (429, 503, 413, 400, 401).
"""

from __future__ import annotations

import gzip
import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from tests.support import FeedServer, Reply, Request

VERSION = "v2.7.12"


@dataclass
class Write:
    org: str
    bucket: str
    precision: str
    lines: list[str]
    gzipped: bool


@dataclass
class FakeInfluxDB2:
    token: str = "t0k3n"
    org: str = "city"
    org_id: str = "0a1b2c3d4e5f6071"
    max_lines: int | None = None  # above this, answer 413 like a server's max body size
    buckets: dict[str, dict] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    script: deque[Reply] = field(default_factory=deque)  # replies for the next write requests
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.server = FeedServer()
        routes = self.server.routes
        routes["/ping"] = Reply(204, headers={"X-Influxdb-Version": VERSION})
        routes["/health"] = Reply(200, json.dumps({"status": "pass", "version": VERSION}).encode())
        routes["/api/v2/write"] = self._write
        routes["/api/v2/orgs"] = self._authorized(self._orgs)
        routes["/api/v2/buckets"] = self._authorized(self._buckets)

    def start(self) -> FakeInfluxDB2:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def lines(self, bucket: str | None = None) -> list[str]:
        with self._lock:
            return [line for w in self.writes if bucket in (None, w.bucket) for line in w.lines]

    # -- endpoints
    @staticmethod
    def _error(status: int, code: str, message: str) -> Reply:
        body = json.dumps({"code": code, "message": message}).encode()
        return Reply(status, body, {"Content-Type": "application/json"})

    def _unauthorized(self, request: Request) -> Reply | None:
        if request.headers.get("Authorization") != f"Token {self.token}":
            return self._error(401, "unauthorized", "unauthorized access")
        return None

    def _authorized(self, handler):  # type: ignore[no-untyped-def]
        return lambda request: self._unauthorized(request) or handler(request)

    def _write(self, request: Request) -> Reply:
        if request.method != "POST":
            return self._error(405, "method not allowed", "")
        with self._lock:
            if self.script:
                return self.script.popleft()
        denied = self._unauthorized(request)
        if denied:
            return denied
        query = {k: v[0] for k, v in parse_qs(request.query).items()}
        if query.get("org") not in (self.org, None) or "bucket" not in query:
            return self._error(
                404, "not found", f'organization name "{query.get("org")}" not found'
            )
        if query["bucket"] not in self.buckets:
            return self._error(404, "not found", f'bucket "{query["bucket"]}" not found')
        if query.get("precision", "ns") not in ("ns", "us", "ms", "s"):
            return self._error(400, "invalid", "invalid precision")
        body = request.body
        gzipped = request.headers.get("Content-Encoding") == "gzip"
        if gzipped:
            body = gzip.decompress(body)
        lines = body.decode("utf-8").split("\n")
        if self.max_lines is not None and len(lines) > self.max_lines:
            return self._error(413, "request too large", "unable to read data: too large")
        for line in lines:
            if " " not in line:
                return self._error(400, "invalid", f"unable to parse '{line}': missing fields")
        with self._lock:
            self.writes.append(
                Write(
                    query.get("org", ""),
                    query["bucket"],
                    query.get("precision", "ns"),
                    lines,
                    gzipped,
                )
            )
        return Reply(204)

    def _orgs(self, request: Request) -> Reply:
        query = parse_qs(request.query)
        orgs = [{"id": self.org_id, "name": self.org}]
        if "org" in query and query["org"][0] != self.org:
            orgs = []
        return Reply(200, json.dumps({"orgs": orgs}).encode(), {"Content-Type": "application/json"})

    def _buckets(self, request: Request) -> Reply:
        if request.method == "POST":
            doc = json.loads(request.body)
            if doc.get("orgID") != self.org_id:
                return self._error(404, "not found", "organization not found")
            if doc["name"] in self.buckets:
                return self._error(
                    422, "conflict", f"bucket with name {doc['name']} already exists"
                )
            bucket = {
                "id": f"{next(self._ids):016x}",
                "orgID": self.org_id,
                "name": doc["name"],
                "retentionRules": doc.get("retentionRules", []),
            }
            with self._lock:
                self.buckets[doc["name"]] = bucket
            return Reply(201, json.dumps(bucket).encode(), {"Content-Type": "application/json"})
        query = parse_qs(request.query)
        found = list(self.buckets.values())
        if "name" in query:
            found = [b for b in found if b["name"] == query["name"][0]]
        return Reply(
            200, json.dumps({"buckets": found}).encode(), {"Content-Type": "application/json"}
        )
