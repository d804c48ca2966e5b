"""InfluxDB 3 (Core, Enterprise) as a target, at the wire against tests/fake_influxdb3.py:
writes and partial-write answers, `collector setup`, `collector check`'s flavour detection and
probe, the replay's retention pre-flight, Grafana's datasources."""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.provision.grafana.files import datasource_file
from collector.provision.influxdb import v3_retention, v3_retention_secs
from collector.replay import PreflightError, read_retention
from collector.retry import Backoff
from collector.settings import InfluxDBSettings, Settings, load
from collector.sinks.base import AuthError, Fatal
from collector.sinks.influxdb import InfluxV3Writer, make_writer
from collector.sinks.spool import DeadLetters, Spool, SpoolingSink
from collector.telemetry import Counters
from tests.fake_influxdb2 import FakeInfluxDB2
from tests.fake_influxdb3 import FakeInfluxDB3
from tests.support import Reply, run_cli

ADMIN = "apiv3_admin-secret"
LINES = [
    "station_status,station_id=1,system=oslo bikes_available=3i,docks_available=7i 1767225600",
    "station_status,station_id=2,system=oslo bikes_available=0i,docks_available=12i 1767225600",
]
DEFAULT_PERIODS = {  # the buckets' default retention_hours, as 3.x retention periods
    "bikes": "720h",
    "pressure": "24h",
    "anomalies": "none",
    "collector": "168h",
    "bikes_1h": "17520h",
    "pressure_1m": "2160h",
    "trips": "none",
}


@pytest.fixture
def influx3() -> Iterator[FakeInfluxDB3]:
    server = FakeInfluxDB3(token=ADMIN).start()
    yield server
    server.stop()


def _writer(
    server: FakeInfluxDB3, sleeps: list[float] | None = None, **kw: object
) -> InfluxV3Writer:
    settings = InfluxDBSettings(url=server.url, api="v3", token=ADMIN, **kw)  # type: ignore[arg-type]
    writer = make_writer(settings, sleep=sleeps.append if sleeps is not None else None)
    assert isinstance(writer, InfluxV3Writer)
    return writer


def _config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "v3.toml"
    path.write_text(
        f'[influxdb]\nurl = "{url}"\napi = "v3"\ntoken = "{ADMIN}"\n'
        f'[setup]\nwriter_token_file = "{tmp_path}/tokens/writer"\n'
        f'reader_token_file = "{tmp_path}/tokens/reader"\n{extra}'
    )
    return path


# ------------------------------------------------------------------------------- writes


def test_lines_are_written_to_write_lp_exactly(influx3: FakeInfluxDB3) -> None:
    writer = _writer(influx3)
    try:
        report = writer.write("bikes", LINES, "s")
    finally:
        writer.close()
    assert (report.written, report.rejected, report.failed) == (2, 0, 0)
    (write,) = influx3.writes
    assert write.db == "bikes" and write.precision == "second"
    assert write.accept_partial == "true" and write.gzipped
    assert write.authorization == f"Bearer {ADMIN}"
    assert write.lines == LINES
    request = next(r for r in influx3.server.requests if r.path == "/api/v3/write_lp")
    assert gzip.decompress(request.body).decode() == "\n".join(LINES)


@pytest.mark.parametrize(("ours", "theirs"), [("ms", "millisecond"), ("ns", "nanosecond")])
def test_precisions_have_their_v3_names(influx3: FakeInfluxDB3, ours: str, theirs: str) -> None:
    writer = _writer(influx3)
    try:
        assert writer.write("pressure", ["foot_pressure,patient=p1 value=1.5 1"], ours).written == 1  # type: ignore[arg-type]
    finally:
        writer.close()
    assert influx3.writes[0].precision == theirs


def test_a_partial_write_counts_the_accepted_and_dead_letters_the_refused(
    influx3: FakeInfluxDB3, tmp_path: Path
) -> None:
    """Line 2 has `bikes_available` as a float where the table has an integer: InfluxDB 3
    keeps lines 1 and 3 and names line 2 with its reason; only line 2 is dead-lettered."""
    first = _writer(influx3)
    assert first.write("bikes", LINES[:1], "s").written == 1
    first.close()
    bad = (
        "station_status,station_id=3,system=oslo bikes_available=2.5,docks_available=1i 1767225660"
    )
    batch = [LINES[1], bad, "station_status,station_id=4,system=oslo bikes_available=1i 1767225660"]
    sink = SpoolingSink(
        _writer(influx3),
        Spool(tmp_path / "spool", 1_000_000),
        DeadLetters(tmp_path / "spool" / "dead-letter.lp", 1_000_000),
        backoff=Backoff(base_secs=0.05, max_secs=0.2),
        fatal=Fatal(),
        counters=Counters(),
    )
    try:
        report = sink.write("bikes", batch, "s")
    finally:
        sink.close()
    assert (report.written, report.rejected, report.failed, report.spooled) == (2, 1, 0, 0)
    assert influx3.lines("bikes") == [LINES[0], batch[0], batch[2]]
    dead = (tmp_path / "spool" / "dead-letter.lp").read_text().splitlines()
    assert dead[1:] == [bad]
    assert "status=400" in dead[0] and "line 2:" in dead[0]
    assert (
        "invalid column type for column 'bikes_available', expected "
        "iox::column_type::field::integer, got iox::column_type::field::float"
    ) in dead[0]


def test_transient_answers_are_retried_after_retry_after(influx3: FakeInfluxDB3) -> None:
    influx3.script.extend([Reply(503, headers={"Retry-After": "7"}), Reply(429)])
    sleeps: list[float] = []
    writer = _writer(influx3, sleeps, retry_base_secs=0.01, retry_max_secs=0.02)
    try:
        assert writer.write("bikes", LINES, "s").written == 2
    finally:
        writer.close()
    assert sleeps[0] >= 7 and len(sleeps) == 2
    assert influx3.lines() == LINES


def test_a_refused_token_stops_with_what_to_check(influx3: FakeInfluxDB3) -> None:
    writer = make_writer(InfluxDBSettings(url=influx3.url, api="v3", token="wrong"))
    try:
        with pytest.raises(AuthError, match=r"HTTP 401.*check the token"):
            writer.write("bikes", LINES, "s")
    finally:
        writer.close()
    assert not influx3.writes


# ------------------------------------------------------------------------------- setup


def test_setup_on_core_creates_databases_with_retention_and_says_what_is_manual(
    tmp_path: Path, influx3: FakeInfluxDB3
) -> None:
    config = _config(tmp_path, influx3.url)
    first = run_cli("setup", config=config)
    assert first.returncode == 0, first.stderr
    assert influx3.databases == DEFAULT_PERIODS
    assert "database bikes: created (retention 720h)" in first.stdout
    # Core has no database tokens and 3.x no tasks: said, not faked.
    tokens = [line for line in first.stdout.splitlines() if " token " in line]
    assert len(tokens) == 2 and all("manual (InfluxDB 3 Core has no database" in t for t in tokens)
    assert not (tmp_path / "tokens").exists()
    assert first.stdout.count("downsampling ") == 2 and "README" in first.stdout

    second = run_cli("setup", config=config)
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout
    assert second.stdout.count(": unchanged") == len(DEFAULT_PERIODS)

    changed = _config(
        tmp_path, influx3.url, '[buckets.pressure]\nname = "pressure"\nretention_hours = 6\n'
    )
    third = run_cli("setup", config=changed)
    assert third.returncode == 0, third.stderr
    assert "database pressure: manual (retention is 24h on the server, 6h here" in third.stdout
    assert influx3.databases["pressure"] == "24h"


def test_setup_on_enterprise_creates_scoped_tokens_once(
    tmp_path: Path, influx3: FakeInfluxDB3
) -> None:
    influx3.enterprise = True
    config = _config(tmp_path, influx3.url)
    first = run_cli("setup", config=config)
    assert first.returncode == 0, first.stderr
    writer_file, reader_file = tmp_path / "tokens" / "writer", tmp_path / "tokens" / "reader"
    for path in (writer_file, reader_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    writer_token = influx3.tokens[writer_file.read_text()]
    reader_token = influx3.tokens[reader_file.read_text()]
    assert writer_token["permissions"] == [
        {
            "resource_type": "db",
            "resource_identifier": ["bikes", "pressure", "anomalies", "collector", "trips"],
            "actions": ["write"],
        },
        {"resource_type": "db", "resource_identifier": ["trips"], "actions": ["read"]},
    ]
    assert reader_token["permissions"] == [
        {"resource_type": "db", "resource_identifier": list(DEFAULT_PERIODS), "actions": ["read"]}
    ]
    for secret in influx3.tokens:
        assert secret not in first.stdout + first.stderr
    assert ADMIN not in first.stdout + first.stderr

    second = run_cli("setup", config=config)
    assert second.returncode == 0 and second.stdout.count(": kept") == 2
    assert len(influx3.tokens) == 2

    # The collector's own token may write where it writes, and nowhere else.
    settings = InfluxDBSettings(url=influx3.url, api="v3", token=writer_file.read_text())
    writer = make_writer(settings)
    try:
        assert writer.write("bikes", LINES, "s").written == 2
        with pytest.raises(AuthError, match="HTTP 403"):
            writer.write("bikes_1h", LINES, "s")
    finally:
        writer.close()


def test_setup_with_a_refused_token_exits_2(tmp_path: Path, influx3: FakeInfluxDB3) -> None:
    influx3.token = "another"
    result = run_cli("setup", config=_config(tmp_path, influx3.url))
    assert result.returncode == 2, result.stderr
    assert "HTTP 401" in result.stderr and "Traceback" not in result.stderr
    assert not influx3.databases


# ------------------------------------------------------------------------------- check


def test_check_proves_the_databases_without_creating_them(
    tmp_path: Path, influx3: FakeInfluxDB3
) -> None:
    config = _config(tmp_path, influx3.url, "[pressure]\n")
    before = run_cli("check", config=config)
    assert "influxdb: v3" in before.stdout
    assert "database 'collector' does not exist: run `collector setup`" in before.stdout
    # The probe looked, and did not write: 3.x would have made the database without retention.
    assert influx3.databases == {} and influx3.created_by_write == []

    assert run_cli("setup", config=config).returncode == 0
    after = run_cli("check", config=config)
    assert "ok (version 3.9.2; may write to" in after.stdout, after.stdout
    assert influx3.created_by_write == [] and not influx3.writes


def test_check_names_the_flavour_to_set(tmp_path: Path, influx3: FakeInfluxDB3) -> None:
    v1 = tmp_path / "v1.toml"
    v1.write_text(f'[influxdb]\nurl = "{influx3.url}"\napi = "v1"\ntoken = "{ADMIN}"\n')
    result = run_cli("check", config=v1)
    assert result.returncode == 2
    assert 'InfluxDB 3.9.2 (3.x Core or Enterprise): set [influxdb] api = "v3"' in result.stdout

    v2 = FakeInfluxDB2(token=ADMIN).start()
    try:
        result = run_cli("check", config=_config(tmp_path, v2.url))
    finally:
        v2.stop()
    assert result.returncode == 2
    assert (
        "has no v3 API (/api/v3/write_lp, databases with retention periods): "
        'set [influxdb] api = "v2"' in result.stdout
    )


# --------------------------------------------------------------- retention, Grafana


def test_retention_periods_round_trip() -> None:
    assert [v3_retention(h) for h in (0, 1, 24, 1.5)] == [None, "1h", "24h", "90m"]
    assert [v3_retention_secs(p) for p in ("none", None, "30d", "2w", "1mo", "90m", "1y")] == [
        0,
        0,
        30 * 86400,
        14 * 86400,
        30 * 86400,
        5400,
        365 * 86400,
    ]


def test_replay_preflight_reads_the_database_retention(influx3: FakeInfluxDB3) -> None:
    influx3.databases["trips"] = "30d"
    settings = InfluxDBSettings(url=influx3.url, api="v3", token=ADMIN)
    assert read_retention(settings, "trips").secs == 30 * 86400
    with pytest.raises(PreflightError, match="database 'other' not found"):
        read_retention(settings, "other")


def test_grafana_reads_3x_with_influxql_and_the_reader_token(tmp_path: Path) -> None:
    settings = load(_config(tmp_path, "http://influxdb3:8181"))
    sources = datasource_file(settings)["datasources"]
    assert {s["jsonData"]["dbName"] for s in sources} == set(DEFAULT_PERIODS)
    for source in sources:
        assert source["jsonData"]["version"] == "InfluxQL"
        assert source["jsonData"]["httpHeaderName1"] == "Authorization"
        assert source["secureJsonData"] == {
            "httpHeaderValue1": "Token $__file{/run/tokens/reader/influxdb-reader-token}"
        }
    assert isinstance(settings, Settings)
