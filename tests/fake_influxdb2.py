"""A local stand-in for InfluxDB 2.x's HTTP API: the documented endpoints, strict about requests.

It checks what a real server checks (token, org, bucket, precision, gzip body) and can be told
to answer the next writes with other documented status codes (429, 503, 413, 400, 401).
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
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
    dbrps: list[dict] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)
    authorizations: list[dict] = field(default_factory=list)
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
        routes["/api/v2/buckets/"] = self._authorized(self._bucket)
        routes["/api/v2/dbrps"] = self._authorized(self._dbrps)
        routes["/api/v2/tasks"] = self._authorized(self._tasks)
        routes["/api/v2/tasks/"] = self._authorized(self._task)
        routes["/api/v2/authorizations"] = self._authorized(self._authorizations)

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

    def _authorized(self, handler):  # type: ignore[no-untyped-def]  # handlers of several shapes
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
        if not body:
            # http/write_handler.go (influxdb v2): authorisation and bucket first, then an
            # empty body is EInvalid "writing requires points".
            return self._error(400, "invalid", "writing requires points")
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
        # GET /api/v2/buckets (API reference, "List buckets"): filtered by `name`, in the org
        # named by `org` or `orgID`; an unknown org is a 404. Each bucket carries its
        # `retentionRules` ([{type: "expire", everySeconds, shardGroupDurationSeconds}], empty =
        # forever), which is what the replay's retention pre-flight reads.
        query = {k: v[0] for k, v in parse_qs(request.query).items()}
        if query.get("org", self.org) != self.org or query.get("orgID", self.org_id) != self.org_id:
            return self._error(
                404, "not found", f'organization name "{query.get("org")}" not found'
            )
        found = list(self.buckets.values())
        if "name" in query:
            found = [b for b in found if b["name"] == query["name"]]
        return Reply(
            200, json.dumps({"buckets": found}).encode(), {"Content-Type": "application/json"}
        )

    # -- set-up endpoints, as documented in the InfluxDB 2 API reference
    @staticmethod
    def _json(status: int, doc: object) -> Reply:
        return Reply(status, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def _new_id(self) -> str:
        return f"{next(self._ids):016x}"

    def _bucket(self, request: Request) -> Reply:
        bucket_id = request.path.rsplit("/", 1)[1]
        bucket = next((b for b in self.buckets.values() if b["id"] == bucket_id), None)
        if bucket is None:
            return self._error(404, "not found", "bucket not found")
        if request.method != "PATCH":
            return self._json(200, bucket)
        patch = json.loads(request.body)
        for rule in patch.get("retentionRules", []):
            if rule.get("type") != "expire" or rule.get("everySeconds", 0) < 3600:
                return self._error(422, "unprocessable entity", "retention policy is invalid")
        with self._lock:
            bucket["retentionRules"] = patch.get("retentionRules", bucket["retentionRules"])
        return self._json(200, bucket)

    def _dbrps(self, request: Request) -> Reply:
        if request.method == "POST":
            doc = json.loads(request.body)
            required = {"orgID", "bucketID", "database", "retention_policy"}
            if not required <= doc.keys() or doc["orgID"] != self.org_id:
                return self._error(400, "invalid", f"dbrp needs {sorted(required)}")
            mapping = {"id": self._new_id(), "default": doc.get("default", False), **doc}
            with self._lock:
                self.dbrps.append(mapping)
            return self._json(201, mapping)
        query = {k: v[0] for k, v in parse_qs(request.query).items()}
        if query.get("orgID") != self.org_id:
            return self._error(400, "invalid", "orgID is required")
        found = [d for d in self.dbrps if d["database"] == query.get("db", d["database"])]
        return self._json(200, {"content": found})

    def _tasks(self, request: Request) -> Reply:
        if request.method == "POST":
            doc = json.loads(request.body)
            if doc.get("orgID") != self.org_id or "flux" not in doc:
                return self._error(400, "invalid", "task needs orgID and flux")
            match = re.search(r'option task = \{name: "([^"]+)"', doc["flux"])
            if match is None:
                return self._error(400, "invalid", "flux has no option task with a name")
            task = {
                "id": self._new_id(),
                "orgID": self.org_id,
                "name": match.group(1),
                "flux": doc["flux"],
                "status": doc.get("status", "active"),
            }
            with self._lock:
                self.tasks.append(task)
            return self._json(201, task)
        query = {k: v[0] for k, v in parse_qs(request.query).items()}
        found = [t for t in self.tasks if t["name"] == query.get("name", t["name"])]
        return self._json(200, {"tasks": found})

    def _task(self, request: Request) -> Reply:
        task_id = request.path.rsplit("/", 1)[1]
        task = next((t for t in self.tasks if t["id"] == task_id), None)
        if task is None:
            return self._error(404, "not found", "task not found")
        if request.method == "PATCH":
            with self._lock:
                task.update(
                    {k: v for k, v in json.loads(request.body).items() if k in ("flux", "status")}
                )
        return self._json(200, task)

    def _authorizations(self, request: Request) -> Reply:
        if request.method != "POST":
            return self._json(200, {"authorizations": self.authorizations})
        doc = json.loads(request.body)
        bucket_ids = {b["id"] for b in self.buckets.values()}
        for permission in doc.get("permissions", []):
            resource = permission.get("resource", {})
            if (
                permission.get("action") not in ("read", "write")
                or resource.get("id") not in bucket_ids
            ):
                return self._error(400, "invalid", f"bad permission {permission}")
        if doc.get("orgID") != self.org_id or not doc.get("permissions"):
            return self._error(400, "invalid", "authorization needs orgID and permissions")
        auth = {
            "id": self._new_id(),
            "token": f"tok-{next(self._ids)}-secret",
            "status": "active",
            "orgID": self.org_id,
            "description": doc.get("description", ""),
            "permissions": doc["permissions"],
        }
        with self._lock:
            self.authorizations.append(auth)
        return self._json(201, auth)
