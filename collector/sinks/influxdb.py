"""Line protocol into InfluxDB 2.x (``/api/v2/write`` via influxdb-client) or 1.x (``/write``).

Both share one write path: batches of at most ``batch_lines``, gzip at a cheap level, retries
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
_BEYOND_RETENTION = re.compile(r"points beyond retention policy dropped=(\d+)")


def _beyond_retention(failure: Failure) -> int | None:
    if failure.status not in (400, 422):
        return None
    match = _BEYOND_RETENTION.search(str(failure))
    return int(match.group(1)) if match else None


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
            if failure.status == 400 and "writing requires points" in str(failure):
                return
            if failure.kind == "auth":
                raise AuthError(self.refused(f"writing to {name!r}", failure)) from None
            if failure.status == 404:
                kind = "database" if self.settings.api == "v1" else "bucket"
                raise Failure(
                    "rejected",
                    f"{kind} {name!r} does not exist: run `collector setup`",
                    stage="write",
                    status=404,
                ) from None
            raise

    def refused(self, doing: str, failure: Failure) -> str:
        """What to check when the server refuses the credentials, in this API's terms."""
        where = f"InfluxDB at {redact_url(self.settings.url)} refused the credentials"
        if self.settings.api == "v1":
            what = (
                "check username and password_file (or token), and that the user has the "
                "privilege this needs"
            )
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


class InfluxV1Writer(InfluxWriter):
    """InfluxDB 1.x: ``POST /write?db=&rp=&precision=`` (1.6 has no /api/v2 at all)."""

    def __init__(self, settings: InfluxDBSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._session = requests.Session()
        self._session.verify = settings.verify_tls
        token = settings.resolved_token()
        if settings.username:
            self._session.auth = (settings.username, settings.resolved_password() or "")
        elif token:
            self._session.headers["Authorization"] = f"Token {token}"

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
        self._check(resp, (204,))
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
    return InfluxV2Writer(settings, **kwargs)
