"""Backfills that land: the trips bucket, the retention pre-flight (real 1.x, 2.x at the wire),
``--shift-to-now``, and the issue's acceptance run of a real month into a fresh set-up."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from collector import replay
from collector.settings import InfluxDBSettings
from tests.fake_influxdb2 import FakeInfluxDB2
from tests.support import InfluxD

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
    with pytest.raises(replay.PreflightError, match="database 'nowhere' does not exist"):
        replay.read_retention(default, "nowhere")
    influxd.drop("rp_probe")
