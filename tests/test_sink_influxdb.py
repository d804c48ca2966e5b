"""The writers at the wire: request shape, retries, Retry-After, 413 splits, 4xx, auth.

v2 runs against ``FakeInfluxDB2`` (the documented API, strict about requests); v1 status codes
against scripted replies on ``/write``, and plain v1 writes against the real server.
"""

from __future__ import annotations

import base64
import gzip
import logging
from collections.abc import Iterator

import pytest

from collector.settings import InfluxDBSettings
from collector.sinks.influxdb import AuthError, InfluxV1Writer, InfluxV2Writer, make_writer
from tests.fake_influxdb2 import FakeInfluxDB2
from tests.support import FeedServer, InfluxD, Reply, free_port

TOKEN = "t0k3n-very-secret"


@pytest.fixture
def influx2() -> Iterator[FakeInfluxDB2]:
    server = FakeInfluxDB2(token=TOKEN).start()
    server.buckets["bikes"] = {"id": "0000000000000001", "name": "bikes"}
    yield server
    server.stop()


def _v2(server: FakeInfluxDB2, sleeps: list[float], **overrides: object) -> InfluxV2Writer:
    settings = InfluxDBSettings(
        url=server.url, api="v2", org="city", token=TOKEN, retry_base_secs=1, **overrides
    )
    writer = make_writer(settings, sleep=sleeps.append)
    assert isinstance(writer, InfluxV2Writer)
    return writer


LINES = [
    f"station_status,station_id={i},system=t bikes_available={i}i 1700000000" for i in range(5)
]


def test_v2_request_is_as_documented(influx2: FakeInfluxDB2) -> None:
    writer = _v2(influx2, [])
    report = writer.write("bikes", LINES, "s")
    assert (report.written, report.rejected, report.failed) == (5, 0, 0)
    (write,) = influx2.writes
    assert (write.org, write.bucket, write.precision, write.gzipped) == ("city", "bikes", "s", True)
    assert write.lines == LINES
    request = next(r for r in influx2.server.requests if r.path == "/api/v2/write")
    assert request.headers["Authorization"] == f"Token {TOKEN}"
    assert request.headers["Content-Type"].startswith("text/plain")
    assert gzip.decompress(request.body).decode() == "\n".join(LINES)


def test_v2_uncompressed_when_gzip_level_zero(influx2: FakeInfluxDB2) -> None:
    _v2(influx2, [], gzip_level=0).write("bikes", LINES, "s")
    assert influx2.writes[0].gzipped is False
    assert influx2.lines() == LINES


def test_429_waits_at_least_retry_after(influx2: FakeInfluxDB2) -> None:
    influx2.script.append(Reply(429, b'{"code":"too many requests"}', {"Retry-After": "7"}))
    sleeps: list[float] = []
    report = _v2(influx2, sleeps).write("bikes", LINES, "s")
    assert report.written == 5
    assert len(sleeps) == 1 and sleeps[0] >= 7
    assert influx2.lines() == LINES  # delivered once


def test_503_backs_off_exponentially_then_succeeds(influx2: FakeInfluxDB2) -> None:
    influx2.script.extend([Reply(503), Reply(503), Reply(503)])
    sleeps: list[float] = []
    report = _v2(influx2, sleeps, retry_max_secs=60).write("bikes", LINES, "s")
    assert report.written == 5 and report.failed == 0
    # Equal jitter: attempt n waits between half and all of base * 2**n.
    assert [0.5 <= sleeps[0] <= 1, 1 <= sleeps[1] <= 2, 2 <= sleeps[2] <= 4] == [True] * 3
    assert influx2.lines() == LINES


def test_persistent_5xx_is_counted_as_failed_after_retries(
    influx2: FakeInfluxDB2, caplog: pytest.LogCaptureFixture
) -> None:
    influx2.script.extend([Reply(500)] * 3)
    sleeps: list[float] = []
    with caplog.at_level(logging.WARNING):
        report = _v2(influx2, sleeps, max_retries=2).write("bikes", LINES, "s")
    assert (report.written, report.failed, report.rejected) == (0, 5, 0)
    assert len(sleeps) == 2
    assert report.errors[0].kind == "http_5xx"
    assert any(r.getMessage() == "write_failed" for r in caplog.records)


def test_413_splits_until_accepted(influx2: FakeInfluxDB2) -> None:
    influx2.max_lines = 2
    report = _v2(influx2, []).write("bikes", LINES, "s")
    assert report.written == 5
    assert [len(w.lines) for w in influx2.writes] == [2, 1, 2]  # 5 -> 2 + 3 -> 2 + 1 + 2
    assert influx2.lines() == LINES  # every line once, in order


def test_400_is_rejected_with_the_servers_message_and_not_retried(
    influx2: FakeInfluxDB2, caplog: pytest.LogCaptureFixture
) -> None:
    sleeps: list[float] = []
    with caplog.at_level(logging.ERROR):
        report = _v2(influx2, sleeps).write("bikes", ["no-fields-here"], "s")
    assert (report.written, report.rejected, report.failed) == (0, 1, 0)
    assert sleeps == []
    rejected = [r for r in caplog.records if r.getMessage() == "write_rejected"]
    assert len(rejected) == 1
    assert "unable to parse 'no-fields-here'" in rejected[0].detail  # type: ignore[attr-defined]  # fields set by logs.event


def test_unknown_bucket_is_rejected_with_message(influx2: FakeInfluxDB2) -> None:
    report = _v2(influx2, []).write("nope", LINES, "s")
    assert report.rejected == 5
    assert 'bucket "nope" not found' in str(report.errors[0])


def test_401_stops_with_a_clear_message_and_no_secret(
    influx2: FakeInfluxDB2, caplog: pytest.LogCaptureFixture
) -> None:
    influx2.token = "another"
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthError) as raised:
        _v2(influx2, []).write("bikes", LINES, "s")
    message = str(raised.value)
    assert "refused the credentials (HTTP 401)" in message and "'bikes'" in message
    assert TOKEN not in message
    assert TOKEN not in caplog.text


def test_batches_hold_at_most_batch_lines(influx2: FakeInfluxDB2) -> None:
    lines = [f"m,k=a v={i}i {i}" for i in range(12_001)]
    report = _v2(influx2, []).write("bikes", lines, "s")
    assert report.written == 12_001
    assert [len(w.lines) for w in influx2.writes] == [5000, 5000, 2001]
    assert influx2.lines() == lines


def test_connection_refused_is_transient(caplog: pytest.LogCaptureFixture) -> None:
    sleeps: list[float] = []
    settings = InfluxDBSettings(
        url=f"http://127.0.0.1:{free_port()}", api="v2", token=TOKEN, max_retries=2
    )
    report = make_writer(settings, sleep=sleeps.append).write("bikes", LINES, "s")
    assert report.failed == 5 and len(sleeps) == 2
    assert report.errors[0].kind == "connection"


def test_slow_server_times_out(influx2: FakeInfluxDB2) -> None:
    influx2.script.append(Reply(204, delay_secs=2))
    report = _v2(influx2, [], timeout_secs=0.3, max_retries=0).write("bikes", LINES, "s")
    assert report.failed == 5
    assert report.errors[0].kind == "timeout"


def test_v2_ping_reports_the_version(influx2: FakeInfluxDB2) -> None:
    assert _v2(influx2, []).ping() == "v2.7.12"


def test_v2_points_beyond_retention_422_counted_not_retried(influx2: FakeInfluxDB2) -> None:
    message = b'{"code":"unprocessable entity","message":"failure writing points to database: '
    message += b'partial write: points beyond retention policy dropped=2"}'
    influx2.script.append(Reply(422, message))
    sleeps: list[float] = []
    report = _v2(influx2, sleeps).write("bikes", LINES, "s")
    assert (report.written, report.rejected, report.failed) == (3, 2, 0)
    assert report.errors[0].reason == "beyond_retention"
    assert sleeps == []


# --------------------------------------------------------------------------------- v1


def _v1_scripted(feeds: FeedServer, replies: list[Reply]) -> None:
    pending = list(replies)
    feeds.routes["/write"] = lambda request: pending.pop(0) if pending else Reply(204)


def _v1(url: str, sleeps: list[float], **overrides: object) -> InfluxV1Writer:
    writer = make_writer(InfluxDBSettings(url=url, api="v1", **overrides), sleep=sleeps.append)
    assert isinstance(writer, InfluxV1Writer)
    return writer


def test_v1_request_shape_and_basic_auth(feeds: FeedServer) -> None:
    _v1_scripted(feeds, [])
    writer = _v1(feeds.url, [], username="writer", password="pw", retention_policy="raw")
    assert writer.write("bikes", LINES, "s").written == 5
    (request,) = feeds.requests
    assert request.path == "/write"
    assert sorted(request.query.split("&")) == ["db=bikes", "precision=s", "rp=raw"]
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"writer:pw").decode()
    assert request.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(request.body).decode() == "\n".join(LINES)


def test_v1_statuses(feeds: FeedServer) -> None:
    _v1_scripted(
        feeds,
        [
            Reply(429, headers={"Retry-After": "3"}),
            Reply(503),
            Reply(204),
            Reply(400, b'{"error":"partial write: field type conflict"}'),
        ],
    )
    sleeps: list[float] = []
    writer = _v1(feeds.url, sleeps)
    first = writer.write("bikes", LINES, "s")
    assert first.written == 5 and sleeps[0] >= 3 and len(sleeps) == 2
    second = writer.write("bikes", LINES, "s")
    assert second.rejected == 5
    assert "field type conflict" in str(second.errors[0])
    _v1_scripted(feeds, [Reply(403, b'{"error":"authorization failed"}')])
    with pytest.raises(AuthError, match="HTTP 403"):
        writer.write("bikes", LINES, "s")


@pytest.mark.influxdb
def test_v1_real_server_write_and_ensure_database(influxd: InfluxD) -> None:
    writer = _v1(influxd.url, [])
    assert writer.ping().startswith("1.")
    influxd.query('CREATE DATABASE "sinktest"')
    report = writer.write("sinktest", LINES, "s")
    assert report.written == 5
    rows = influxd.query("SELECT bikes_available, station_id FROM station_status", "sinktest")
    assert sorted((r["station_id"], r["bikes_available"]) for r in rows) == [
        (str(i), i) for i in range(5)
    ]
    bad = writer.write("sinktest", ["station_status bikes_available=1.5 1700000000"], "s")
    assert bad.rejected == 1  # float into an integer field: the server says so
    assert "conflict" in str(bad.errors[0])
