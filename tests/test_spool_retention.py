"""What the spool tells a person: dead letters name the configured bucket (issue #12, defect
11), and `collector run` warns at start when spooled batches are older than their bucket's
retention (issue #11): by the points' own time, not when they were spooled."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector import cli, settings
from collector.sinks.base import Fatal
from collector.sinks.spool import Spool, SpoolingSink
from collector.telemetry import Counters
from tests.fake_influxdb2 import FakeInfluxDB2
from tests.support import FeedServer, Reply, run_cli

DAY = 86400


@pytest.fixture
def influx2() -> Iterator[FakeInfluxDB2]:
    server = FakeInfluxDB2(token="tok").start()
    yield server
    server.stop()


def _bucket(server: FakeInfluxDB2, name: str, retention_secs: int) -> None:
    rules = [{"type": "expire", "everySeconds": retention_secs}] if retention_secs else []
    server.buckets[name] = {
        "id": f"{len(server.buckets) + 1:016x}",
        "orgID": server.org_id,
        "name": name,
        "retentionRules": rules,
    }


def _config(tmp_path: Path, server: FakeInfluxDB2, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[influxdb]\nurl = "{server.url}"\napi = "v2"\norg = "city"\ntoken = "tok"\n'
        f'[spool]\ndir = "{tmp_path / "spool"}"\n{extra}'
    )
    return path


def test_dead_letter_header_names_the_configured_bucket(
    tmp_path: Path, influx2: FakeInfluxDB2
) -> None:
    _bucket(influx2, "bikes_conflict", 30 * DAY)
    config = settings.load(_config(tmp_path, influx2, '[buckets.bikes]\nname = "bikes_conflict"\n'))
    sink = cli._database_sink(config, Counters(), Fatal())  # as `collector run` wires it
    assert isinstance(sink, SpoolingSink)
    try:
        report = sink.write("bikes", ["garbage"], "s")
    finally:
        sink.close()
    assert report.rejected == 1
    header = (tmp_path / "spool" / "dead-letter.lp").read_text().splitlines()[0]
    assert " bucket=bikes_conflict precision=s lines=1 " in header


def _spool_old_batch(spool_dir: Path, bucket: str, age_secs: float) -> None:
    # Spooled just now, with points stamped age_secs ago (a feed whose data is that old, or
    # an outage that long): the points' time is what the server's retention judges.
    spool = Spool(spool_dir, 10**7)
    stamp = int(time.time() - age_secs)
    spool.put(
        bucket,
        "s",
        [
            [
                f"station_status,station_id=1,system=sim bikes_available=1i {stamp + 3600}",
                f"station_status,station_id=2,system=sim bikes_available=1i {stamp}",
            ]
        ],
    )
    spool.close()


def test_run_warns_at_start_about_spooled_batches_beyond_retention(
    tmp_path: Path, influx2: FakeInfluxDB2, feeds: FeedServer
) -> None:
    _bucket(influx2, "bikes", 30 * DAY)
    _bucket(influx2, "collector", 7 * DAY)
    _bucket(influx2, "pressure", DAY)
    _spool_old_batch(tmp_path / "spool", "bikes", 40 * DAY)  # beyond 30 days
    _spool_old_batch(tmp_path / "spool", "collector", 2 * DAY)  # within 7 days
    feeds.routes["/gbfs.json"] = Reply(404)
    config = _config(
        tmp_path, influx2, f'[[gbfs.systems]]\nname = "sim"\nurl = "{feeds.url}/gbfs.json"\n'
    )
    result = run_cli("run", "--once", config=config)
    warnings = [x for x in result.stderr.splitlines() if "event=spool_beyond_retention" in x]
    assert len(warnings) == 1, result.stderr
    assert "bucket=bikes " in warnings[0] and "retention=720h" in warnings[0]
    assert "Traceback" not in result.stderr


def test_a_spool_from_before_the_oldest_point_column_still_answers(tmp_path: Path) -> None:
    # The schema as the previous release made it: no oldest_point column.
    import sqlite3
    import zlib

    import orjson

    folder = tmp_path / "spool"
    folder.mkdir()
    with sqlite3.connect(folder / "spool.sqlite") as db:
        db.execute(
            "CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, bucket TEXT NOT NULL, "
            "precision TEXT NOT NULL, lines INTEGER NOT NULL, size INTEGER NOT NULL, "
            "created REAL NOT NULL, payload BLOB NOT NULL)"
        )
        payload = zlib.compress(orjson.dumps(["m f=1i 1000", "m f=2i 500"]))
        db.execute(
            "INSERT INTO batches (bucket, precision, lines, size, created, payload) "
            "VALUES ('bikes', 's', 2, ?, ?, ?)",
            (len(payload), time.time(), payload),
        )
    spool = Spool(folder, 10**7)
    try:
        spool.put("pressure", "ms", [["p v=1i 7000", "p v=2i 9000"]])
        assert spool.oldest_by_bucket() == {"bikes": 500.0, "pressure": 7.0}
    finally:
        spool.close()
