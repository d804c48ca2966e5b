"""A local stand-in for InfluxDB 3 Core / Enterprise's HTTP API, as InfluxData documents it.

Pages followed (docs.influxdata.com, Core and Enterprise share them):
- /influxdb3/core/write-data/http-api/v3-write-lp/: ``POST /api/v3/write_lp?db=&precision=
  &accept_partial=&no_sync=``; precisions auto, nanosecond, microsecond, millisecond, second;
  ``Content-Encoding: gzip``; 204 on success; with ``accept_partial=true`` (the default) the
  good lines are written and the answer is 400 ``{"error": "partial write of line protocol
  occurred", "data": [{"original_line", "line_number", "error_message"}]}``; with
  ``accept_partial=false`` nothing is written and the answer is 400 ``{"error": "parsing
  failed for write_lp endpoint", "data": {...}}``. A field written as another type than the
  table already has is refused with "invalid column type for column '<f>', expected
  iox::column_type::field::<t>, got iox::column_type::field::<t>".
- /influxdb3/core/admin/databases/create/: ``POST /api/v3/configure/database`` with JSON
  ``{"db", "retention_period"}`` (an admin token), 200; retention units m h d w mo y, "none".
- /influxdb3/core/admin/databases/list/: ``GET /api/v3/configure/database?format=json`` ->
  200 ``[{"db", "retention_period"}]``.
- /influxdb3/enterprise/admin/tokens/resource/create/: ``POST /api/v3/enterprise/configure/token``
  with ``{"token_name", "permissions": [{"resource_type": "db", "resource_identifier": [...],
  "actions": [...]}], "expiry_secs"?}``, the answer carrying ``token``; "Resource tokens are
  user-defined and available only in InfluxDB 3 Enterprise" (Core has no such route: 404).
- /influxdb3/enterprise/admin/identify-version/: ``GET /ping`` -> 200, headers
  ``x-influxdb-version`` and ``x-influxdb-build`` (Core or Enterprise), JSON ``version``;
  it requires authentication.
- /influxdb3/core/api/authentication/: ``Authorization: Bearer`` works with all endpoints,
  ``Token`` too.
- Databases are created by the first write when missing (Core and Enterprise's implicit
  schema mode); that is why the collector's probe looks first and never writes there.

Not documented, and so chosen here and said where used: how an empty write body is answered
once the token is accepted (400 here, as a body with no lines to parse), and the body of a
401/403 (``{"error": ...}``, the shape every other error has).
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

VERSION = "3.9.2"
PRECISIONS = ("auto", "nanosecond", "microsecond", "millisecond", "second")
_PERIOD = re.compile(r"^(none|\d+(m|h|d|w|mo|y))$")


@dataclass
class Write:
    db: str
    precision: str
    accept_partial: str | None
    lines: list[str]
    gzipped: bool
    authorization: str


def _field_type(value: str) -> str:
    if value.startswith('"'):
        return "string"
    if re.fullmatch(r"-?\d+i", value):
        return "integer"
    if re.fullmatch(r"\d+u", value):
        return "uinteger"
    if value in ("t", "f", "true", "false", "T", "F", "TRUE", "FALSE", "True", "False"):
        return "boolean"
    return "float"


@dataclass
class FakeInfluxDB3:
    token: str = "apiv3_admin"
    enterprise: bool = False
    databases: dict[str, str] = field(default_factory=dict)  # name -> retention_period
    tokens: dict[str, dict] = field(default_factory=dict)  # resource tokens by secret
    writes: list[Write] = field(default_factory=list)
    created_by_write: list[str] = field(default_factory=list)
    script: deque[Reply] = field(default_factory=deque)  # replies for the next write requests
    _columns: dict[tuple[str, str, str], str] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.server = FeedServer()
        routes = self.server.routes
        routes["/ping"] = self._ping
        routes["/health"] = Reply(200, b"OK")
        routes["/api/v3/write_lp"] = self._write
        routes["/api/v3/configure/database"] = self._database
        routes["/api/v3/enterprise/configure/token"] = self._create_token

    def start(self) -> FakeInfluxDB3:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def lines(self, db: str | None = None) -> list[str]:
        with self._lock:
            return [line for w in self.writes if db in (None, w.db) for line in w.lines]

    # -- helpers
    @staticmethod
    def _error(status: int, message: str, data: object = None) -> Reply:
        doc: dict[str, object] = {"error": message}
        if data is not None:
            doc["data"] = data
        return Reply(status, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def _who(self, request: Request) -> str | None:
        """ "admin", a resource token's secret, or None when refused."""
        header = request.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme not in ("Bearer", "Token"):
            return None
        if secret == self.token:
            return "admin"
        return secret if secret in self.tokens else None

    def _may(self, who: str, action: str, db: str) -> bool:
        if who == "admin":
            return True
        return any(
            p["resource_type"] == "db"
            and (db in p["resource_identifier"] or "*" in p["resource_identifier"])
            and action in p["actions"]
            for p in self.tokens[who]["permissions"]
        )

    # -- endpoints
    def _ping(self, request: Request) -> Reply:
        if self._who(request) is None:
            return self._error(401, "Unauthorized")
        build = "Enterprise" if self.enterprise else "Core"
        body = json.dumps({"version": VERSION, "revision": "fake", "process_id": "0"}).encode()
        return Reply(
            200,
            body,
            {
                "Content-Type": "application/json",
                "x-influxdb-version": VERSION,
                "x-influxdb-build": build,
            },
        )

    def _write(self, request: Request) -> Reply:
        if request.method != "POST":
            return self._error(405, "method not allowed")
        with self._lock:
            if self.script:
                return self.script.popleft()
        who = self._who(request)
        if who is None:
            return self._error(401, "Unauthorized")
        query = {k: v[0] for k, v in parse_qs(request.query).items()}
        db = query.get("db")
        if not db:
            return self._error(400, "missing query parameter: db")
        if not self._may(who, "write", db):
            return self._error(403, "Forbidden")
        precision = query.get("precision", "auto")
        if precision not in PRECISIONS:
            return self._error(400, f"invalid precision: {precision}")
        body = request.body
        gzipped = request.headers.get("Content-Encoding") == "gzip"
        if gzipped:
            body = gzip.decompress(body)
        if not body.strip():
            return self._error(400, "no lines in the write body")  # undocumented: see above
        accept_partial = query.get("accept_partial")
        lines = body.decode("utf-8").split("\n")
        good: list[str] = []
        errors: list[dict[str, object]] = []
        with self._lock:
            columns = dict(self._columns)
        for number, line in enumerate(lines, 1):
            message = self._refusal(db, line, columns)
            if message:
                errors.append(
                    {"original_line": line, "line_number": number, "error_message": message}
                )
            else:
                good.append(line)
        if errors and accept_partial == "false":
            return self._error(400, "parsing failed for write_lp endpoint", errors[0])
        with self._lock:
            self._columns = columns
            if db not in self.databases:
                self.databases[db] = "none"
                self.created_by_write.append(db)
            if good:
                self.writes.append(
                    Write(
                        db,
                        precision,
                        accept_partial,
                        good,
                        gzipped,
                        request.headers["Authorization"],
                    )
                )
        if errors:
            return self._error(400, "partial write of line protocol occurred", errors)
        return Reply(204)

    @staticmethod
    def _refusal(db: str, line: str, columns: dict[tuple[str, str, str], str]) -> str | None:
        """Why the server would refuse ``line`` (None: taken), recording new column types."""
        parts = re.split(r"(?<!\\) ", line)
        if len(parts) < 2 or not parts[1]:
            return "No fields were provided"
        table = re.split(r"(?<!\\),", parts[0])[0]
        for pair in re.split(r"(?<!\\),(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", parts[1]):
            name, _, value = pair.partition("=")
            if not value:
                return "No fields were provided"
            got = _field_type(value)
            expected = columns.setdefault((db, table, name), got)
            if expected != got:
                return (
                    f"invalid column type for column '{name}', expected "
                    f"iox::column_type::field::{expected}, got iox::column_type::field::{got}"
                )
        return None

    def _database(self, request: Request) -> Reply:
        if self._who(request) != "admin":  # managing databases takes the admin token
            return self._error(401, "Unauthorized")
        if request.method == "GET":
            with self._lock:
                rows = [{"db": n, "retention_period": p} for n, p in self.databases.items()]
            return Reply(200, json.dumps(rows).encode(), {"Content-Type": "application/json"})
        if request.method != "POST":
            return self._error(405, "method not allowed")
        doc = json.loads(request.body)
        name, period = doc.get("db"), doc.get("retention_period", "none")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_/-]{0,63}", name):
            return self._error(400, "invalid database name")
        if not _PERIOD.match(str(period)):
            return self._error(400, f"invalid retention period: {period}")
        with self._lock:
            if name in self.databases:
                return self._error(409, "attempted to create a resource that already exists")
            self.databases[name] = period
        return Reply(200, json.dumps({"db": name, "retention_period": period}).encode())

    def _create_token(self, request: Request) -> Reply:
        if not self.enterprise:
            return self._error(404, "not found")
        if self._who(request) != "admin":
            return self._error(401, "Unauthorized")
        doc = json.loads(request.body)
        names = [t["token_name"] for t in self.tokens.values()]
        if doc.get("token_name") in names:
            return self._error(409, "token name already exists")
        for p in doc.get("permissions", []):
            if p.get("resource_type") != "db" or not set(p.get("actions", [])) <= {
                "read",
                "write",
            }:
                return self._error(400, "invalid permission")
        secret = f"apiv3_resource_{next(self._ids)}"
        with self._lock:
            self.tokens[secret] = doc
        answer = {"token_name": doc["token_name"], "token": secret, "id": len(self.tokens)}
        return Reply(201, json.dumps(answer).encode(), {"Content-Type": "application/json"})
