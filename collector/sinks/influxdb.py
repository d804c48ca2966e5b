"""Line protocol into InfluxDB 2.x (``/api/v2/write`` via influxdb-client), 1.x (``/write``) or
3.x Core/Enterprise (``/api/v3/write_lp``).

All share one write path: batches of at most ``batch_lines``, gzip at a cheap level, retries
of transient failures with backoff and jitter honouring ``Retry-After``, 413 answered by
splitting the batch, 401/403 raised to stop the collector, other 4xx logged with the server's
message and counted. We send our own batches synchronously rather than use the client's
batching mode, whose failed batches vanish into a callback (REFERENCE.md section 4).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import requests
import urllib3
from influxdb_client import InfluxDBClient
from influxdb_client.client.exceptions import InfluxDBError
from influxdb_client.rest import ApiException
from influxdb_client.service.write_service import WriteService

from collector.contract import Precision
from collector.http import describe_body, reason_of, redact_url
from collector.logs import event
from collector.retry import Backoff, Failure, kind_of_status, parse_retry_after
from collector.settings import InfluxDBSettings
from collector.sinks.base import AuthError, SinkMetrics, WriteReport

log = logging.getLogger(__name__)


def _server_message(body: bytes | str | None) -> str:
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except ValueError:
        # Not InfluxDB's JSON: a proxy's or another server's page, named by its title.
        return describe_body(text.encode("utf-8"))
    if isinstance(parsed, dict):
        return str(parsed.get("message") or parsed.get("error") or parsed)[:300]
    return text.strip()[:300]


# 1.x answers 400, 2.x 422; the points not named were written.
# Connections kept to the server: every source thread may write at once (the scheduler's
# shared workers, patients' flusher, the spool's drainer, the report). requests' default of 10
# logs "connection pool is full" and opens a fresh socket per write past it.
WRITER_CONNECTIONS = 64

_BEYOND_RETENTION = re.compile(r"points beyond retention policy dropped=(\d+)")


def _beyond_retention(failure: Failure) -> int | None:
    if failure.status not in (400, 422):
        return None
    match = _BEYOND_RETENTION.search(str(failure))
    return int(match.group(1)) if match else None


class PartialWrite(Failure):
    """InfluxDB 3's 400 "partial write of line protocol occurred": the lines it names (by their
    1-based number in the request body, with the reason) were refused, all others written."""

    def __init__(self, message: str, refused: Mapping[int, str], status: int) -> None:
        super().__init__("rejected", message, stage="write", status=status)
        self.refused = dict(refused)


class InfluxWriter:
    """Writes batches of lines; subclasses send one encoded batch.

    ``bucket`` arguments are the contract's names; ``bucket_names`` maps them to the
    configured ones.
    """

    def __init__(
        self,
        settings: InfluxDBSettings,
        *,
        bucket_names: Mapping[str, str] | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.settings = settings
        self._names = dict(bucket_names or {})
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self._latency_lock = threading.Lock()
        self._latencies: dict[str, list[float]] = {}
        self._backoff = Backoff(settings.retry_base_secs, settings.retry_max_secs)

    # -- to implement
    def _send(self, bucket: str, body: bytes, gzipped: bool, precision: Precision) -> None:
        raise NotImplementedError

    def ping(self) -> str:
        """The server's version; raises Failure when it cannot be reached."""
        raise NotImplementedError

    def close(self) -> None:
        self._stopping.set()

    def probe(self, bucket: str) -> None:
        """Prove that these credentials may write to ``bucket`` (a contract name), writing
        nothing: an empty write is authorised and the bucket looked up before the body is read
        (1.x answers 204; 2.x, http/write_handler.go, 400 "writing requires points").
        Raises AuthError or Failure naming what is wrong."""
        name = self._names.get(bucket, bucket)
        try:
            self._send(name, b"", False, "s")
        except Failure as failure:
            if self._authorised_empty_write(failure):
                return
            if failure.kind == "auth":
                raise AuthError(self.refused(f"writing to {name!r}", failure)) from None
            if failure.status == 404:
                kind = "bucket" if self.settings.api == "v2" else "database"
                raise Failure(
                    "rejected",
                    f"{kind} {name!r} does not exist: run `collector setup`",
                    stage="write",
                    status=404,
                ) from None
            raise

    def _authorised_empty_write(self, failure: Failure) -> bool:
        """The answer to an empty write that still proves the credentials were accepted."""
        return failure.status == 400 and "writing requires points" in str(failure)

    def refused(self, doing: str, failure: Failure) -> str:
        """What to check when the server refuses the credentials, in this API's terms."""
        where = f"InfluxDB at {redact_url(self.settings.url)} refused the credentials"
        if self.settings.api == "v1":
            what = (
                "check username and password_file (or token), and that the user has the "
                "privilege this needs"
            )
        elif self.settings.api == "v3":
            what = "check the token (an admin token, or a database token that may write there)"
        else:
            what = f"check the token, its permission on the bucket, and org {self.settings.org!r}"
        return f"{where} (HTTP {failure.status}) {doing}: {what}"

    def metrics(self) -> SinkMetrics:
        """Latencies (ms) of the write requests accepted since the last call, per bucket."""
        with self._latency_lock:
            latencies, self._latencies = self._latencies, {}
        return SinkMetrics(latencies_ms=latencies)

    # -- shared
    def stop_retrying(self) -> None:
        """Make pending retries give up at once (shutdown)."""
        self._stopping.set()

    def write(
        self, bucket: str, lines: Sequence[str], precision: Precision, *, retry: bool = True
    ) -> WriteReport:
        """Write ``lines`` in batches. ``retry=False``: a transient failure is not retried here
        but reported in ``unsent`` (for the spool, which retries on its own schedule)."""
        bucket = self._names.get(bucket, bucket)
        report = WriteReport()
        size = self.settings.batch_lines
        retries = self.settings.max_retries if retry else 0
        for start in range(0, len(lines), size):
            report.add(self._write_batch(bucket, lines[start : start + size], precision, retries))
        return report

    def _write_batch(
        self, bucket: str, lines: Sequence[str], precision: Precision, retries: int
    ) -> WriteReport:
        body = "\n".join(lines).encode("utf-8")
        level = self.settings.gzip_level
        if level:
            body = gzip.compress(body, compresslevel=level, mtime=0)
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                self._send(bucket, body, bool(level), precision)
            except Failure as failure:
                if failure.kind == "auth":
                    raise AuthError(self.refused(f"writing to {bucket!r}", failure)) from None
                if isinstance(failure, PartialWrite):
                    return self._partial(bucket, lines, failure)
                dropped = _beyond_retention(failure)
                if dropped is not None:
                    return self._beyond(bucket, lines, failure, dropped)
                if failure.kind == "too_large" and len(lines) > 1:
                    middle = len(lines) // 2
                    event(log, logging.INFO, "write_split", bucket=bucket, lines=len(lines))
                    report = self._write_batch(bucket, lines[:middle], precision, retries)
                    report.add(self._write_batch(bucket, lines[middle:], precision, retries))
                    return report
                if failure.transient and attempt < retries:
                    if self._stopping.is_set():
                        return self._give_up(bucket, lines, failure, attempt, retries)
                    wait = self._backoff.delay(attempt, failure.retry_after_secs)
                    event(
                        log,
                        logging.WARNING,
                        "write_retry",
                        bucket=bucket,
                        lines=len(lines),
                        attempt=attempt + 1,
                        wait_secs=round(wait, 2),
                        error=failure.kind,
                        status=failure.status,
                    )
                    attempt += 1
                    self._sleep(wait)
                    continue
                return self._give_up(bucket, lines, failure, attempt, retries)
            latency_ms = (time.monotonic() - started) * 1000
            with self._latency_lock:
                self._latencies.setdefault(bucket, []).append(latency_ms)
            event(
                log,
                logging.DEBUG,
                "write",
                bucket=bucket,
                lines=len(lines),
                latency_ms=round(latency_ms, 1),
            )
            return WriteReport(written=len(lines))

    def _beyond(
        self, bucket: str, lines: Sequence[str], failure: Failure, dropped: int
    ) -> WriteReport:
        """Points older than the retention period: the server kept the others; a retry of
        the old ones can only fail again."""
        dropped = min(dropped, len(lines))
        event(
            log,
            logging.WARNING,
            "write_beyond_retention",
            bucket=bucket,
            lines=len(lines),
            dropped=dropped,
            detail=str(failure),
        )
        rejected = Failure(
            "rejected",
            str(failure),
            stage="write",
            status=failure.status,
            reason="beyond_retention",
        )
        return WriteReport(
            written=len(lines) - dropped,
            rejected=dropped,
            errors=[rejected],
            refused=[(list(lines), rejected)],
        )

    def _partial(self, bucket: str, lines: Sequence[str], failure: PartialWrite) -> WriteReport:
        """InfluxDB 3 kept every line it did not name; each named one is dead-lettered with the
        server's own reason (a retry of it can only fail again)."""
        refused: list[tuple[list[str], Failure]] = []
        for number, message in sorted(failure.refused.items()):
            if not 1 <= number <= len(lines):
                continue  # a number beyond this batch cannot be one of our lines
            refused.append(
                (
                    [lines[number - 1]],
                    Failure(
                        "rejected",
                        f"HTTP {failure.status}: line {number}: {message}",
                        stage="write",
                        status=failure.status,
                        reason="partial_write",
                    ),
                )
            )
        event(
            log,
            logging.ERROR,
            "write_partial",
            bucket=bucket,
            lines=len(lines),
            refused=len(refused),
            detail=str(refused[0][1]) if refused else str(failure),
        )
        return WriteReport(
            written=len(lines) - len(refused),
            rejected=len(refused),
            errors=[f for _, f in refused],
            refused=refused,
        )

    def _give_up(
        self, bucket: str, lines: Sequence[str], failure: Failure, attempts: int, retries: int
    ) -> WriteReport:
        transient = failure.transient
        event(
            log,
            # Not retried here (retries=0): the spool retries and logs each attempt itself.
            logging.DEBUG if transient and not retries else logging.ERROR,
            "write_failed" if transient else "write_rejected",
            bucket=bucket,
            lines=len(lines),
            attempts=attempts + 1,
            error=failure.kind,
            status=failure.status,
            detail=str(failure),
        )
        if transient:
            return WriteReport(failed=len(lines), errors=[failure], unsent=[list(lines)])
        return WriteReport(rejected=len(lines), errors=[failure], refused=[(list(lines), failure)])


class _SessionWriter(InfluxWriter):
    """Plain HTTP through one requests session (1.x and 3.x need no client library)."""

    def __init__(self, settings: InfluxDBSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._session = requests.Session()
        # requests' default adapter keeps 10 connections per host: see WRITER_CONNECTIONS.
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=WRITER_CONNECTIONS)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.verify = settings.verify_tls

    def close(self) -> None:
        super().close()
        self._session.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self.settings.url + path
        try:
            return self._session.request(method, url, timeout=self.settings.timeout_secs, **kwargs)
        except requests.Timeout as exc:
            raise Failure("timeout", f"{redact_url(url)} timed out", stage="write") from exc
        except requests.RequestException as exc:
            where = redact_url(url)
            raise Failure("connection", f"{where}: {reason_of(exc)}", stage="write") from exc

    @staticmethod
    def _check(resp: requests.Response, ok: tuple[int, ...]) -> None:
        if resp.status_code in ok:
            return
        raise Failure(
            kind_of_status(resp.status_code),
            f"HTTP {resp.status_code}: {_server_message(resp.content)}",
            stage="write",
            status=resp.status_code,
            retry_after_secs=parse_retry_after(resp.headers.get("Retry-After"), time.time()),
        )


class InfluxV1Writer(_SessionWriter):
    """InfluxDB 1.x: ``POST /write?db=&rp=&precision=`` (1.6 has no /api/v2 at all)."""

    def __init__(self, settings: InfluxDBSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        token = settings.resolved_token()
        if settings.username:
            self._session.auth = (settings.username, settings.resolved_password() or "")
        elif token:
            self._session.headers["Authorization"] = f"Token {token}"

    def _send(self, bucket: str, body: bytes, gzipped: bool, precision: Precision) -> None:
        params = {"db": bucket, "precision": precision}
        if self.settings.retention_policy:
            params["rp"] = self.settings.retention_policy
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        resp = self._request("POST", "/write", params=params, data=body, headers=headers)
        self._check(resp, (204,))

    def query(self, influxql: str, database: str | None = None) -> list[dict[str, Any]]:
        """Run InfluxQL; returns the ``results`` list. Raises Failure on an error."""
        params = {"q": influxql, "epoch": "s"}
        if database:
            params["db"] = database
        resp = self._request("POST", "/query", data=params)
        self._check(resp, (200,))
        results: list[dict[str, Any]] = resp.json().get("results", [])
        for result in results:
            if "error" in result:
                raise Failure("rejected", f"InfluxQL error: {result['error']}", stage="write")
        return results

    def ping(self) -> str:
        resp = self._request("GET", "/ping")
        # 1.x answers 204; 3.x answers 200, and its version header is how api_mismatch tells.
        self._check(resp, (200, 204))
        return resp.headers.get("X-Influxdb-Version", "1.x")


class InfluxV2Writer(InfluxWriter):
    """InfluxDB 2.x through influxdb-client's generated write service."""

    def __init__(self, settings: InfluxDBSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        # enable_gzip would compress again at level 9 (~14x slower than level 1 on a 5,000-line
        # batch); we compress ourselves and say so in Content-Encoding.
        self._client = InfluxDBClient(
            url=settings.url,
            token=settings.resolved_token() or "",
            org=settings.org,
            timeout=int(settings.timeout_secs * 1000),
            verify_ssl=settings.verify_tls,
            retries=False,
            enable_gzip=False,
            connection_pool_maxsize=WRITER_CONNECTIONS,
        )
        self._write_service = WriteService(self._client.api_client)

    def close(self) -> None:
        super().close()
        self._client.close()

    @property
    def client(self) -> InfluxDBClient:
        return self._client

    def call(self, what: str, func: Callable[[], Any]) -> Any:
        """Run an influxdb-client call, its failures classified as ours."""
        try:
            return func()
        except ApiException as exc:
            status = exc.status or 0
            headers: Mapping[str, str] = exc.headers or {}
            raise Failure(
                kind_of_status(status),
                f"{what}: HTTP {status}: {_server_message(exc.body)}",
                stage="write",
                status=status,
                retry_after_secs=parse_retry_after(headers.get("Retry-After"), time.time()),
            ) from None
        except InfluxDBError as exc:  # raised by the client itself, e.g. org not found
            raise Failure("rejected", f"{what}: {exc}", stage="write") from None
        except urllib3.exceptions.NewConnectionError as exc:
            # Checked first: urllib3 makes it a subclass of ConnectTimeoutError.
            raise Failure("connection", f"{what}: {reason_of(exc)}", stage="write") from exc
        except (urllib3.exceptions.TimeoutError, TimeoutError) as exc:
            raise Failure("timeout", f"{what}: timed out", stage="write") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Failure("connection", f"{what}: {reason_of(exc)}", stage="write") from exc

    def _send(self, bucket: str, body: bytes, gzipped: bool, precision: Precision) -> None:
        self.call(
            "write",
            lambda: self._write_service.post_write(
                org=self.settings.org,
                bucket=bucket,
                body=body,
                precision=precision,
                content_encoding="gzip" if gzipped else "identity",
                content_type="text/plain; charset=utf-8",
            ),
        )

    def ping(self) -> str:
        return str(self.call("ping", self._client.version))


# InfluxDB 3's names for the contract's precisions ("Use the v3 write_lp API to write data",
# docs.influxdata.com/influxdb3/core/write-data/http-api/v3-write-lp/: auto, nanosecond,
# microsecond, millisecond, second). Always sent: "auto" guesses from the magnitude.
_V3_PRECISION: dict[str, str] = {
    "s": "second",
    "ms": "millisecond",
    "us": "microsecond",
    "ns": "nanosecond",
}
_V3_PARTIAL = "partial write of line protocol occurred"


def _partial_lines(body: bytes) -> dict[int, str]:
    """Line number -> reason, from InfluxDB 3's partial-write answer (400 with
    ``{"error": "partial write of line protocol occurred", "data": [{"original_line",
    "line_number", "error_message"}]}``, same page, "Accept partial writes"); empty when the
    400 is anything else."""
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(doc, dict) or doc.get("error") != _V3_PARTIAL:
        return {}
    data = doc.get("data")
    refused: dict[int, str] = {}
    for item in data if isinstance(data, list) else []:
        if isinstance(item, dict) and isinstance(item.get("line_number"), int):
            refused[item["line_number"]] = str(item.get("error_message") or "refused")[:300]
    return refused


class InfluxV3Writer(_SessionWriter):
    """InfluxDB 3 Core and Enterprise (one HTTP API): ``POST /api/v3/write_lp?db=&precision=``
    with ``accept_partial=true`` (the default, said explicitly), so that a line the server
    refuses costs that line only; databases, retention periods and tokens under
    ``/api/v3/configure/``. Tokens are sent as ``Authorization: Bearer``."""

    def __init__(self, settings: InfluxDBSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        token = settings.resolved_token()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def _send(self, bucket: str, body: bytes, gzipped: bool, precision: Precision) -> None:
        params = {"db": bucket, "precision": _V3_PRECISION[precision], "accept_partial": "true"}
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        resp = self._request("POST", "/api/v3/write_lp", params=params, data=body, headers=headers)
        if resp.status_code == 400:
            refused = _partial_lines(resp.content)
            if refused:
                raise PartialWrite(f"HTTP 400: {_V3_PARTIAL}", refused, 400)
        # The docs show 204; any 2xx is a write the server took.
        self._check(resp, (200, 204))

    def _authorised_empty_write(self, failure: Failure) -> bool:
        # Authentication is answered first (401/403); how 3.x answers an empty body once
        # authorised is not documented, so any other 4xx but 404 still proves the token.
        return failure.kind == "http_4xx" and failure.status != 404

    def probe(self, bucket: str) -> None:
        """As for 1.x/2.x, and first: the database must exist, because InfluxDB 3 creates a
        missing one at the first write, silently, with no retention period. Listing needs an
        admin token; with a database token that may not list, the write probe alone answers."""
        name = self._names.get(bucket, bucket)
        try:
            databases = self.databases()
        except Failure as failure:
            if failure.kind != "auth":
                raise
        else:
            if name not in databases:
                raise Failure(
                    "rejected",
                    f"database {name!r} does not exist: run `collector setup` (InfluxDB 3 "
                    "would create it at the first write, with no retention period)",
                    stage="write",
                    status=404,
                )
        super().probe(bucket)

    def configure(self, method: str, path: str, doc: Mapping[str, Any] | None = None) -> Any:
        """A ``/api/v3/configure/...`` or ``/api/v3/enterprise/configure/...`` call; its JSON
        answer (None when it has no body)."""
        resp = self._request(method, path, json=doc, headers={"Accept": "application/json"})
        self._check(resp, (200, 201, 204))
        return resp.json() if resp.content.strip() else None

    def databases(self) -> dict[str, str | None]:
        """Database name -> its retention period as the server says it ("30d", "none"; None
        when not given). ``GET /api/v3/configure/database?format=json`` ("List databases"):
        newer servers answer ``[{"db", "retention_period"}]``, older ``[{"iox::database"}]``."""
        resp = self._request("GET", "/api/v3/configure/database", params={"format": "json"})
        self._check(resp, (200,))
        found: dict[str, str | None] = {}
        rows = resp.json()
        for row in rows if isinstance(rows, list) else []:
            name = row.get("db", row.get("iox::database"))
            if isinstance(name, str):
                period = row.get("retention_period")
                found[name] = str(period) if period is not None else None
        return found

    def ping(self) -> str:
        # GET /ping answers 200 with x-influxdb-version (and a JSON body with "version");
        # 1.x/2.x answer 204 with the same header, which is how the flavour is told apart.
        resp = self._request("GET", "/ping")
        self._check(resp, (200, 204))
        version = resp.headers.get("X-Influxdb-Version")
        if not version and resp.content.strip():
            try:
                version = str(resp.json().get("version") or "")
            except (ValueError, AttributeError):
                version = ""
        return version or "unknown"


def api_mismatch(api: str, version: str) -> str | None:
    """Why a server of ``version`` (its /ping header) cannot serve the configured ``api``."""
    major = version.lstrip("v").split(".", 1)[0]
    if api == "v2" and major == "1":
        return (
            f"the server is InfluxDB {version}, which has no v2 API (orgs, buckets, tokens): "
            'set [influxdb] api = "v1"'
        )
    if api == "v1" and major == "2":
        return (
            f"the server is InfluxDB {version}: its databases are buckets, made with the v2 "
            'API: set [influxdb] api = "v2" with org and token'
        )
    if api == "v3" and major in ("1", "2"):
        return (
            f"the server is InfluxDB {version}, which has no v3 API (/api/v3/write_lp, "
            f'databases with retention periods): set [influxdb] api = "v{major}"'
        )
    if api in ("v1", "v2") and major == "3":
        # 3.x also takes /write and /api/v2/write, but setup's retention policies,
        # continuous queries, buckets and tasks do not exist there.
        return (
            f"the server is InfluxDB {version} (3.x Core or Enterprise): set [influxdb] "
            'api = "v3" with its token'
        )
    return None


def flavour_problem(settings: InfluxDBSettings) -> str | None:
    """Why the server cannot serve the configured API, when it answers and says so.

    Asked before setup, run and replays write: against the wrong flavour every write is a
    404 that would look like a refused batch (dead-lettered) rather than a setting to fix.
    A server that does not answer is not a problem here: the spool and retries handle that.
    """
    writer = make_writer(settings)
    try:
        return api_mismatch(settings.api, writer.ping())
    except Failure:
        return None
    finally:
        writer.close()


def make_writer(settings: InfluxDBSettings, **kwargs: Any) -> InfluxWriter:
    if settings.api == "v1":
        return InfluxV1Writer(settings, **kwargs)
    if settings.api == "v3":
        return InfluxV3Writer(settings, **kwargs)
    return InfluxV2Writer(settings, **kwargs)
