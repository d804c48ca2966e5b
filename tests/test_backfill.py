"""Backfills that land: the trips bucket, the retention pre-flight (real 1.x, 2.x at the wire),
``--shift-to-now``, and the issue's acceptance run of a real month into a fresh set-up."""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from collector import replay
from collector.contract import BUCKETS
from collector.settings import InfluxDBSettings
from tests.fake_influxdb2 import FakeInfluxDB2
from tests.support import InfluxD, run_cli
from tests.test_trips import TRIPS, _independent_totals

FEB_2021 = "JC-202102-citibike-tripdata.csv"
JAN_2018 = "JC-201801-citibike-tripdata.csv"
DAY = 86400


# --------------------------------------------------------------------- the check itself


def test_check_retention_refuses_what_the_server_would_drop() -> None:
    now = 1_800_000_000.0
    kept_30_days = replay.Retention("trips", 30 * DAY, "http://db:8086")
    # Inside the retention: fine; forever: fine whatever the age.
    replay.check_retention(kept_30_days, now - 29 * DAY, now, source="f.csv", now=now)
    replay.check_retention(replay.Retention("trips", 0, "x"), 0, 1, source="f.csv", now=now)
    with pytest.raises(replay.PreflightError) as refused:
        replay.check_retention(
            kept_30_days,
            1_612_137_600,  # 2021-02-01 00:00 UTC
            1_614_556_740,  # 2021-02-28 23:59 UTC
            source="f.csv",
            now=now,
            config_key="trips",
        )
    message = str(refused.value)
    assert "\n" not in message
    for part in (
        "f.csv",
        "2021-02-01 00:00 UTC to 2021-02-28 23:59 UTC",
        "bucket 'trips' at http://db:8086 keeps 720h",
        "drop all of it; nothing written",
        "[buckets.trips] retention_hours",
        "--shift-to-now",
    ):
        assert part in message
    # Straddling the cut-off: the message says where the loss starts.
    with pytest.raises(replay.PreflightError, match="everything before 2026-12-16 08:00 UTC"):
        replay.check_retention(
            kept_30_days, now - 31 * DAY, now, source="f.csv", now=now, shift_option=None
        )


# --------------------------------------------------------------- read from the server


@pytest.fixture
def influx2() -> Iterator[FakeInfluxDB2]:
    server = FakeInfluxDB2(token="tok").start()
    yield server
    server.stop()


def test_v2_retention_is_read_from_the_bucket_api(influx2: FakeInfluxDB2) -> None:
    influx2.buckets["trips"] = {
        "id": "0000000000000001",
        "orgID": influx2.org_id,
        "name": "trips",
        "retentionRules": [
            {"type": "expire", "everySeconds": 7 * DAY, "shardGroupDurationSeconds": DAY}
        ],
    }
    influx2.buckets["forever"] = {
        "id": "0000000000000002",
        "orgID": influx2.org_id,
        "name": "forever",
        "retentionRules": [],
    }
    settings = InfluxDBSettings(url=influx2.url, api="v2", org="city", token="tok")
    assert replay.read_retention(settings, "trips").secs == 7 * DAY
    assert replay.read_retention(settings, "forever").secs == 0
    with pytest.raises(replay.PreflightError, match="bucket 'nope' not found in org 'city'"):
        replay.read_retention(settings, "nope")
    now = time.time()
    with pytest.raises(replay.PreflightError, match="keeps 168h"):
        replay.retention_preflight(settings, "trips", now - 8 * DAY, now, source="f.csv")
    assert not influx2.writes
    requests = [r for r in influx2.server.requests if r.path == "/api/v2/buckets"]
    assert all("org=city" in r.query for r in requests)


@pytest.mark.influxdb
def test_v1_retention_is_read_from_the_retention_policy(influxd: InfluxD) -> None:
    influxd.query('DROP DATABASE "rp_probe"')
    influxd.query('CREATE DATABASE "rp_probe" WITH DURATION 48h NAME "two_days"')
    influxd.query('CREATE RETENTION POLICY "week" ON "rp_probe" DURATION 168h REPLICATION 1')
    default = InfluxDBSettings(url=influxd.url, api="v1")
    assert replay.read_retention(default, "rp_probe").secs == 48 * 3600
    chosen = InfluxDBSettings(url=influxd.url, api="v1", retention_policy="week")
    assert replay.read_retention(chosen, "rp_probe").secs == 168 * 3600
    with pytest.raises(
        replay.PreflightError,
        match=r"database 'nowhere' not found at .*, or these credentials may not read it",
    ):
        replay.read_retention(default, "nowhere")
    influxd.drop("rp_probe")


# ------------------------------------------------------------- against a real InfluxDB 1.x

NEW_YORK = ZoneInfo("America/New_York")
SCHEMAS = {
    FEB_2021: ("started_at", "ended_at", "start_station_id", "end_station_id"),
    JAN_2018: ("starttime", "stoptime", "start station id", "end station id"),
}


@pytest.fixture
def fresh_v1(influxd: InfluxD) -> Iterator[InfluxD]:
    for name in BUCKETS:
        influxd.drop(name)
    yield influxd
    for name in BUCKETS:
        influxd.drop(name)


def _config(tmp_path: Path, influxd: InfluxD, extra: str = "") -> Path:
    path = tmp_path / "backfill.toml"
    path.write_text(f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\n{extra}')
    return path


def _set_up_trips(tmp_path: Path, influxd: InfluxD, retention_hours: int) -> Path:
    config = _config(tmp_path, influxd, f"[buckets.trips]\nretention_hours = {retention_hours}\n")
    assert run_cli("setup", config=config).returncode == 0
    return config


def _stored(influxd: InfluxD, system: str) -> dict[tuple[str, int], tuple[int, int]]:
    query = 'SELECT "undocks", "docks", "station_id" FROM "station_flow" WHERE "system" = '
    rows = influxd.query(f"{query}'{system}'", "trips")
    return {(r["station_id"], r["time"]): (r["undocks"], r["docks"]) for r in rows}


def _per_station(stored: dict[tuple[str, int], tuple[int, int]]) -> tuple[Counter, Counter]:
    undocks: Counter[str] = Counter()
    docks: Counter[str] = Counter()
    for (station, _t), (u, d) in stored.items():
        undocks[station] += u
        docks[station] += d
    return +undocks, +docks


@pytest.mark.influxdb
@pytest.mark.parametrize("name", [FEB_2021, JAN_2018])
def test_backfill_of_a_real_month_into_a_fresh_setup_stores_every_trip(
    tmp_path: Path, fresh_v1: InfluxD, shared_fixtures: Path, name: str
) -> None:
    path = shared_fixtures / "trips" / name
    undocks, docks, _no_end, _negative = _independent_totals(path, *SCHEMAS[name])
    config = _config(tmp_path, fresh_v1)
    assert run_cli("setup", config=config).returncode == 0
    result = run_cli(
        "replay", "trips", str(path), "--backfill", "--system", "citibike-jc", config=config
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    (done,) = [line for line in result.stderr.splitlines() if "event=replay_done" in line]
    assert " not_confirmed=0" in done and " refused=" not in done and " unsent=" not in done
    assert _per_station(_stored(fresh_v1, "citibike-jc")) == (undocks, docks)


@pytest.mark.influxdb
def test_short_retention_stops_before_writing(
    tmp_path: Path, fresh_v1: InfluxD, shared_fixtures: Path
) -> None:
    path = shared_fixtures / "trips" / FEB_2021
    config = _set_up_trips(tmp_path, fresh_v1, retention_hours=720)
    result = run_cli("replay", "trips", str(path), "--system", "citibike-jc", config=config)
    assert result.returncode == 2, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("collector: ")]
    first, last = _independent_span(path)
    # One trip of the month docks in May: the span is the data's, not the file name's.
    assert f"{path}: data from {first} to {last}, but" in line
    assert "bucket 'trips'" in line and "keeps 720h" in line
    assert "[buckets.trips] retention_hours" in line and "--shift-to-now" in line
    assert "event=write" not in result.stderr and "Traceback" not in result.stderr
    assert fresh_v1.query("SHOW MEASUREMENTS", "trips") == []


def _independent_span(path: Path) -> tuple[str, str]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["end_station_id"]]
    times = [r["started_at"][:16] for r in rows] + [r["ended_at"][:16] for r in rows]
    return tuple(  # type: ignore[return-value]  # always two times: first and last
        datetime.fromisoformat(t)
        .replace(tzinfo=NEW_YORK)
        .astimezone(UTC)
        .strftime("%Y-%m-%d %H:%M UTC")
        for t in (min(times), max(times))
    )


def _independent_minutes(path: Path) -> Counter[tuple[str, int]]:
    """Undocks per (station, epoch minute) read straight from the 2021 CSV."""
    undocks: Counter[tuple[str, int]] = Counter()
    with path.open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            if not row["end_station_id"] or row["ended_at"] < row["started_at"]:
                continue
            start = datetime.fromisoformat(row["started_at"][:16]).replace(tzinfo=NEW_YORK)
            undocks[(row["start_station_id"], int(start.timestamp()))] += 1
    return undocks


@pytest.mark.influxdb
def test_shift_to_now_lands_every_trip_moved_by_one_offset(
    tmp_path: Path, fresh_v1: InfluxD, shared_fixtures: Path
) -> None:
    path = shared_fixtures / "trips" / FEB_2021
    # 120 days: the month (with its trip docked in May) fits once shifted, not as it is.
    config = _set_up_trips(tmp_path, fresh_v1, retention_hours=2880)
    refused = run_cli("replay", "trips", str(path), "--system", "jc", config=config)
    assert refused.returncode == 2 and "keeps 2880h" in refused.stderr
    before = int(time.time()) // 60 * 60
    result = run_cli(
        "replay", "trips", str(path), "--system", "jc", "--shift-to-now", config=config
    )
    after = int(time.time()) // 60 * 60
    assert result.returncode == 0, result.stderr
    offset = int(re.search(r"event=replay_shift offset_secs=(\d+)", result.stderr).group(1))  # type: ignore[union-attr]  # the CLI always logs it
    stored = _stored(fresh_v1, "jc")
    assert before <= max(t for _s, t in stored) <= after  # the last minute is now
    expected = _independent_minutes(path)
    got = Counter({(s, t - offset): u for (s, t), (u, _d) in stored.items() if u})
    assert got == expected


def _v2_replay_config(tmp_path: Path, server: FakeInfluxDB2) -> Path:
    path = tmp_path / "v2.toml"
    path.write_text(f'[influxdb]\nurl = "{server.url}"\napi = "v2"\norg = "city"\ntoken = "tok"\n')
    return path


@pytest.mark.parametrize(("retention_secs", "lands"), [(30 * DAY, False), (0, True)])
def test_v2_bucket_rules_decide_whether_a_replay_writes(
    tmp_path: Path, influx2: FakeInfluxDB2, retention_secs: int, lands: bool
) -> None:
    rules = [{"type": "expire", "everySeconds": retention_secs}] if retention_secs else []
    influx2.buckets["trips"] = {
        "id": "00000000000000aa",
        "orgID": influx2.org_id,
        "name": "trips",
        "retentionRules": rules,
    }
    path = TRIPS / "new-schema.csv"  # February 2021
    result = run_cli("replay", "trips", str(path), config=_v2_replay_config(tmp_path, influx2))
    if lands:
        assert result.returncode == 0, result.stderr
        assert len(influx2.lines("trips")) == 3
    else:
        assert result.returncode == 2
        assert "bucket 'trips'" in result.stderr and "keeps 720h" in result.stderr
        assert influx2.writes == []


def test_a_live_replay_is_not_held_to_the_files_dates(
    tmp_path: Path, influx2: FakeInfluxDB2
) -> None:
    # --speed stamps each minute with the moment it is written: 2021 trips fit a 30-day bucket.
    influx2.buckets["trips"] = {
        "id": "00000000000000ab",
        "orgID": influx2.org_id,
        "name": "trips",
        "retentionRules": [{"type": "expire", "everySeconds": 30 * DAY}],
    }
    path = TRIPS / "new-schema.csv"
    config = _v2_replay_config(tmp_path, influx2)
    before = time.time()
    result = run_cli("replay", "trips", str(path), "--speed", "1e9", config=config)
    assert result.returncode == 0, result.stderr
    stamps = [int(line.rsplit(" ", 1)[1]) for line in influx2.lines("trips")]
    assert len(stamps) == 3 and all(s >= before * 1000 - 1000 for s in stamps)
