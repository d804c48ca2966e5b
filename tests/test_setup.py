"""`collector setup`: a real InfluxDB 1.x, InfluxDB 2.x at the wire, the Flux it generates."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.contract import BUCKETS, DOWNSAMPLES
from collector.provision.influxdb import continuous_query, flux_task, lookback_secs
from collector.settings import InfluxDBSettings, Settings, load
from collector.sinks.influxdb import make_writer
from tests.fake_influxdb2 import FakeInfluxDB2
from tests.flux import assert_valid, check
from tests.support import FeedServer, InfluxD, Reply, run_cli

DEFAULT_HOURS = {
    "bikes": 720,
    "pressure": 24,
    "anomalies": 0,
    "collector": 168,
    "bikes_1h": 17520,
    "pressure_1m": 2160,
    "trips": 0,
}


def test_default_retentions_are_as_documented() -> None:
    assert {k: Settings().buckets.of(k).retention_hours for k in BUCKETS} == DEFAULT_HOURS


def _tasks(offset: int = 300, hours: float = 3) -> dict[str, str]:
    names = Settings().buckets.names()
    return dict(flux_task(ds, names, offset, lookback_secs(ds, hours)) for ds in DOWNSAMPLES)


def _cqs(hours: float = 3, names: dict[str, str] | None = None) -> set[str]:
    names = names or Settings().buckets.names()
    return {
        continuous_query(ds, names, "autogen", lookback_secs(ds, hours))[1] for ds in DOWNSAMPLES
    }


def test_generated_flux_tasks_pass_influxdatas_checker() -> None:
    assert_valid(_tasks())


def test_checker_really_rejects_broken_flux() -> None:
    # The checker is what the other Flux tests trust: it must say no when it should.
    results = check(
        [
            'from(bucket: "b") |> range(start: -1h |> filter(fn: (r) => true)',
            'from(bucket: "b") |> range(start: -1h) |> filtr(fn: (r) => true)',
            'from(bucket: "b") |> range(start: -1h) |> mean(column: 3)',
            'from(bucket: "b") |> range(start: -1h) |> mean()',
        ]
    )
    assert [r["semantic"] for r in results] == [False, False, False, True]


def test_downsampled_fields_are_the_contracts() -> None:
    for ds in DOWNSAMPLES:
        assert sorted(ds.target_fields) == sorted(ds.target.fields)
        assert ds.target.tags == ds.source.tags


# ------------------------------------------------------------------------------ InfluxDB 1.x


def _v1_config(tmp_path: Path, influxd: InfluxD, extra: str = "") -> Path:
    path = tmp_path / "setup.toml"
    path.write_text(f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\n{extra}')
    return path


def _policies(influxd: InfluxD) -> dict[str, tuple[str, str, bool]]:
    return {
        name: (rp["duration"], rp["shardGroupDuration"], rp["default"])
        for name in DEFAULT_HOURS
        for rp in influxd.query(f'SHOW RETENTION POLICIES ON "{name}"')
        if rp["name"] == "autogen"
    }


@pytest.fixture
def clean_v1(influxd: InfluxD) -> Iterator[InfluxD]:
    for name in DEFAULT_HOURS:
        influxd.drop(name)
    yield influxd
    for name in DEFAULT_HOURS:
        influxd.drop(name)


@pytest.mark.influxdb
def test_v1_setup_creates_updates_and_is_idempotent(tmp_path: Path, clean_v1: InfluxD) -> None:
    influxd = clean_v1
    first = run_cli("setup", config=_v1_config(tmp_path, influxd))
    assert first.returncode == 0, first.stderr
    assert "database bikes: created (retention 720h)" in first.stdout
    assert "database anomalies: created (retention forever)" in first.stdout
    assert _policies(influxd) == {
        "bikes": ("720h0m0s", "24h0m0s", True),
        "pressure": ("24h0m0s", "1h0m0s", True),
        "anomalies": ("0s", "168h0m0s", True),
        "collector": ("168h0m0s", "24h0m0s", True),
        "bikes_1h": ("17520h0m0s", "168h0m0s", True),
        "pressure_1m": ("2160h0m0s", "24h0m0s", True),
        "trips": ("0s", "168h0m0s", True),
    }
    cqs = {row["name"] for row in influxd.query("SHOW CONTINUOUS QUERIES")}
    expected_cqs = _cqs()
    assert expected_cqs <= cqs

    second = run_cli("setup", config=_v1_config(tmp_path, influxd))
    assert second.returncode == 0
    assert "created" not in second.stdout and "updated" not in second.stdout
    assert second.stdout.count(": unchanged") == len(DEFAULT_HOURS) + len(DOWNSAMPLES)

    changed = _v1_config(
        tmp_path,
        influxd,
        '[buckets.bikes]\nname = "bikes"\nretention_hours = 48\n'
        "[setup]\ndownsample_lookback_hours = 4\n",
    )
    third = run_cli("setup", config=changed)
    assert third.returncode == 0, third.stderr
    assert "database bikes: updated (retention 48h)" in third.stdout
    assert _policies(influxd)["bikes"] == ("48h0m0s", "24h0m0s", True)
    cqs = {row["name"] for row in influxd.query("SHOW CONTINUOUS QUERIES")}
    assert len([cq for cq in cqs if cq.startswith("livestack_")]) == len(DOWNSAMPLES)  # replaced
    assert not expected_cqs & cqs


@pytest.mark.influxdb
def test_v1_continuous_query_computes_the_contract_fields(
    tmp_path: Path, clean_v1: InfluxD
) -> None:
    influxd = clean_v1
    assert run_cli("setup", config=_v1_config(tmp_path, influxd)).returncode == 0
    ds = next(d for d in DOWNSAMPLES if d.source.name == "pressure")
    minute = (int(time.time()) // 60 - 2) * 60
    values = [100, 300, 1023, 7]
    lines = [
        f"pressure,foot=left,patient_id=4,sensor=L0 anomaly=false,value={v}i {minute + i * 10}"
        for i, v in enumerate(values)
    ]
    writer = make_writer(InfluxDBSettings(url=influxd.url, api="v1"))
    assert writer.write("pressure", lines, "s").written == 4
    # Run the CQ's own SELECT ... INTO for that minute instead of waiting for its schedule.
    _db, _name, statement = continuous_query(ds, Settings().buckets.names(), "autogen", 7200)
    select = statement.split(" BEGIN ", 1)[1].removesuffix(" END")
    select = select.replace(
        " GROUP BY", f" WHERE time >= {minute}s AND time < {minute + 60}s GROUP BY"
    )
    influxd.query(select, "pressure")
    (row,) = influxd.query('SELECT * FROM "pressure"', "pressure_1m")
    assert (row["time"], row["patient_id"], row["sensor"], row["foot"]) == (
        minute,
        "4",
        "L0",
        "left",
    )
    assert row["value_mean"] == sum(values) / 4 and row["value_max"] == max(values)
    fields = {
        r["fieldKey"]: r["fieldType"]
        for r in influxd.query('SHOW FIELD KEYS FROM "pressure"', "pressure_1m")
    }
    assert fields == ds.target.fields


@pytest.mark.influxdb
def test_points_beyond_retention_are_counted_not_retried(tmp_path: Path, clean_v1: InfluxD) -> None:
    influxd = clean_v1
    assert run_cli("setup", config=_v1_config(tmp_path, influxd)).returncode == 0
    now = int(time.time())
    lines = [
        f"pressure,foot=left,patient_id=1,sensor=L0 anomaly=false,value={i}i {now - i}"
        for i in range(3)
    ]
    lines.append(
        f"pressure,foot=left,patient_id=1,sensor=L0 anomaly=false,value=9i {now - 3 * 86400}"
    )
    sleeps: list[float] = []
    writer = make_writer(InfluxDBSettings(url=influxd.url, api="v1"), sleep=sleeps.append)
    report = writer.write("pressure", lines, "s")
    assert (report.written, report.rejected, report.failed) == (3, 1, 0)
    assert report.errors[0].reason == "beyond_retention"
    assert sleeps == []
    assert len(influxd.query('SELECT "value" FROM "pressure"', "pressure")) == 3


# ------------------------------------------------------------------------------ InfluxDB 2.x


@pytest.fixture
def influx2() -> Iterator[FakeInfluxDB2]:
    server = FakeInfluxDB2(token="admin-token-secret").start()
    yield server
    server.stop()


def _v2_config(tmp_path: Path, server: FakeInfluxDB2, extra: str = "") -> Path:
    path = tmp_path / "setup2.toml"
    path.write_text(
        f'[influxdb]\nurl = "{server.url}"\napi = "v2"\norg = "city"\n'
        'token = "admin-token-secret"\n'
        f'[setup]\nwriter_token_file = "{tmp_path}/tokens/writer"\n'
        f'reader_token_file = "{tmp_path}/tokens/reader"\n{extra}'
    )
    return path


def test_v2_setup_at_the_wire(tmp_path: Path, influx2: FakeInfluxDB2) -> None:
    config = _v2_config(tmp_path, influx2)
    first = run_cli("setup", config=config)
    assert first.returncode == 0, first.stderr
    assert {
        name: [r["everySeconds"] for r in b["retentionRules"]]
        for name, b in influx2.buckets.items()
    } == {name: ([hours * 3600] if hours else []) for name, hours in DEFAULT_HOURS.items()}
    assert influx2.buckets["pressure"]["retentionRules"][0]["shardGroupDurationSeconds"] == 3600
    assert sorted(d["database"] for d in influx2.dbrps) == sorted(DEFAULT_HOURS)
    assert all(d["retention_policy"] == "autogen" and d["default"] for d in influx2.dbrps)
    assert {t["name"]: t["flux"] for t in influx2.tasks} == _tasks()

    writer_file, reader_file = tmp_path / "tokens" / "writer", tmp_path / "tokens" / "reader"
    for path in (writer_file, reader_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    tokens = {a["token"]: a for a in influx2.authorizations}
    writer_auth, reader_auth = tokens[writer_file.read_text()], tokens[reader_file.read_text()]
    ids = {b["id"]: name for name, b in influx2.buckets.items()}
    assert {(p["action"], ids[p["resource"]["id"]]) for p in writer_auth["permissions"]} == {
        ("write", b) for b in ("bikes", "pressure", "anomalies", "collector", "trips")
    } | {("read", "trips")}  # for the replay's retention pre-flight
    assert {(p["action"], ids[p["resource"]["id"]]) for p in reader_auth["permissions"]} == {
        ("read", b) for b in DEFAULT_HOURS
    }
    for token in tokens:  # secrets never printed
        assert token not in first.stdout + first.stderr
    assert "admin-token-secret" not in first.stdout + first.stderr

    second = run_cli("setup", config=config)
    assert second.returncode == 0
    assert "created" not in second.stdout and "updated" not in second.stdout
    assert second.stdout.count(": kept") == 2
    assert len(influx2.authorizations) == 2 and len(influx2.tasks) == 2
    assert len(influx2.dbrps) == len(DEFAULT_HOURS)
    assert writer_file.read_text() == writer_auth["token"]

    changed = _v2_config(
        tmp_path,
        influx2,
        '\ntask_offset_secs = 60\n[buckets.pressure]\nname = "pressure"\nretention_hours = 6\n',
    )
    third = run_cli("setup", config=changed)
    assert third.returncode == 0, third.stderr
    assert "bucket pressure: updated (retention 6h)" in third.stdout
    assert influx2.buckets["pressure"]["retentionRules"][0]["everySeconds"] == 6 * 3600
    assert third.stdout.count("task livestack downsample") == 2 and "updated" in third.stdout
    assert all("offset: 60s" in t["flux"] for t in influx2.tasks)


def test_v2_setup_fails_clearly_without_the_org(tmp_path: Path, influx2: FakeInfluxDB2) -> None:
    influx2.org = "someone-else"
    result = run_cli("setup", config=_v2_config(tmp_path, influx2))
    assert result.returncode == 1
    assert "organization 'city' not found" in result.stderr
    assert not influx2.buckets


def test_bucket_names_are_configurable_end_to_end(tmp_path: Path, influx2: FakeInfluxDB2) -> None:
    config = _v2_config(
        tmp_path, influx2, '[buckets.bikes]\nname = "city_bikes"\nretention_hours = 24\n'
    )
    assert run_cli("setup", config=config).returncode == 0
    assert "city_bikes" in influx2.buckets and "bikes" not in influx2.buckets
    settings = load(config)
    writer = make_writer(settings.influxdb, bucket_names=settings.buckets.names())
    assert (
        writer.write(
            "bikes", ["station_status,station_id=1,system=x bikes_available=1i 1"], "s"
        ).written
        == 1
    )
    assert influx2.writes[-1].bucket == "city_bikes"
    task = next(t for t in influx2.tasks if "bikes_1h" in t["name"])
    assert 'from(bucket: "city_bikes")' in task["flux"]


# ------------------------------------------------------------------ refused credentials


def test_v2_setup_with_a_refused_token_exits_2(tmp_path: Path, influx2: FakeInfluxDB2) -> None:
    influx2.token = "another-token"  # ours is refused: 401
    result = run_cli("setup", config=_v2_config(tmp_path, influx2))
    assert result.returncode == 2, result.stderr
    assert "HTTP 401" in result.stderr and "Traceback" not in result.stderr
    assert not influx2.buckets


def test_v1_setup_without_admin_rights_exits_2(tmp_path: Path, feeds: FeedServer) -> None:
    # What InfluxDB 1.x answers a non-admin user's CREATE DATABASE
    # (services/httpd/handler.go serveQuery: an authorization error is a 403).
    feeds.routes["/query"] = Reply(
        403,
        b'{"error":"error authorizing query: reader not authorized to execute statement '
        b"'SHOW DATABASES', requires admin privilege\"}",
        {"Content-Type": "application/json"},
    )
    config = tmp_path / "v1.toml"
    config.write_text(
        f'[influxdb]\nurl = "{feeds.url}"\napi = "v1"\nusername = "reader"\npassword = "pw"\n'
    )
    result = run_cli("setup", config=config)
    assert result.returncode == 2, result.stderr
    assert "requires admin privilege" in result.stderr and "Traceback" not in result.stderr
    assert "pw" not in result.stderr


# ------------------------------------------------------------------------- bucket renames


@pytest.mark.influxdb
def test_v1_rename_leaves_one_continuous_query_per_target(
    tmp_path: Path, clean_v1: InfluxD
) -> None:
    influxd = clean_v1
    influxd.drop("bikes_conflict")
    assert run_cli("setup", config=_v1_config(tmp_path, influxd)).returncode == 0
    renamed = _v1_config(
        tmp_path, influxd, '[buckets.bikes]\nname = "bikes_conflict"\nretention_hours = 720\n'
    )
    result = run_cli("setup", config=renamed)
    assert result.returncode == 0, result.stderr
    into_bikes_1h = [
        (row["_db"], row["name"])
        for row in _cq_rows(influxd)
        if re.search(r'INTO "?bikes_1h"?\.', row["query"])
    ]
    # One CQ feeds bikes_1h, from the renamed database; the old one on "bikes" is gone.
    assert len(into_bikes_1h) == 1 and into_bikes_1h[0][0] == "bikes_conflict"
    assert "continuous query bikes." in result.stdout and "dropped" in result.stdout
    influxd.drop("bikes_conflict")


def _cq_rows(influxd: InfluxD) -> list[dict[str, str]]:
    import requests

    resp = requests.post(f"{influxd.url}/query", data={"q": "SHOW CONTINUOUS QUERIES"}, timeout=10)
    return [
        {"_db": series["name"], **dict(zip(series["columns"], values, strict=True))}
        for series in resp.json()["results"][0].get("series", [])
        for values in series.get("values", [])
    ]
