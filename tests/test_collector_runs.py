"""The collector as a whole: bad feeds beside good ones, isolation, shutdown, refused auth."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from collector import settings as settings_module
from collector.scheduler import Scheduler
from collector.sinks.influxdb import InfluxV1Writer
from collector.telemetry import Counters
from tests.fake_influxdb2 import FakeInfluxDB2
from tests.support import (
    DATA,
    FeedServer,
    InfluxD,
    MemorySink,
    Reply,
    run_until_sigterm,
    wait_for,
)

SPEC = DATA / "gbfs" / "v2.3"


def _serve_spec(feeds: FeedServer, prefix: str = "/v2.3") -> str:
    return feeds.serve_folder(SPEC, prefix)


def _settings(toml: str, tmp_path: Path) -> settings_module.Settings:
    path = tmp_path / "collector.toml"
    path.write_text(toml)
    return settings_module.load(path)


BAD_FEEDS = {
    # name: (reply for its station_status, stage, kind)
    "html": (Reply(200, b"<!doctype html><h1>Maintenance</h1>"), "parse", "not_json"),
    "truncated": (
        Reply(200, b'{"last_updated": 1, "data": {"stations": [{"station_'),
        "parse",
        "not_json",
    ),
    "wrongtypes": (
        Reply(200, b'{"last_updated": 1, "data": {"stations": "none today"}}'),
        "parse",
        "schema",
    ),
    "notfound": (Reply(404, b"gone"), "fetch", "http_4xx"),
    "broken": (Reply(500, b"Internal Server Error"), "fetch", "http_5xx"),
    "slow": (Reply(200, b"{}", delay_secs=2.0), "fetch", "timeout"),
    # Headers at once, then a byte every 50 ms: each read is quick, the whole is endless.
    "trickle": (
        Reply(200, b'{"data": {"stations": []}}' * 4, trickle_secs=0.05),
        "fetch",
        "timeout",
    ),
    "huge": (Reply(200, b"[" + b"1," * 200_000 + b"1]"), "fetch", "too_large"),
}


@pytest.mark.influxdb
def test_bad_feeds_are_counted_and_good_data_still_arrives(
    tmp_path: Path, influxd: InfluxD, feeds: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    good_url = _serve_spec(feeds)
    systems = [f'[[gbfs.systems]]\nname = "good"\nurl = "{good_url}"\n']
    for name, (reply, _stage, _kind) in BAD_FEEDS.items():
        feeds.routes[f"/{name}/status.json"] = reply
        systems.append(
            f'[[gbfs.systems]]\nname = "{name}"\n'
            f'station_status_url = "{feeds.url}/{name}/status.json"\n'
            "timeout_secs = 0.5\nmax_body_bytes = 100000\n"
        )
    config = _settings(
        f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\n' + "\n".join(systems), tmp_path
    )
    writer = InfluxV1Writer(config.influxdb)
    # Made anew: another module may have left "bikes" with a retention that drops 2023 points.
    influxd.query('DROP DATABASE "bikes"')
    influxd.query('CREATE DATABASE "bikes"')
    collector = Scheduler.from_settings(config, writer, once=True)
    with caplog.at_level(logging.INFO):
        summaries = {s.source: s for s in collector.run_once()}

    assert summaries["good"].ok and summaries["good"].written == 4
    rows = influxd.query("SELECT bikes_available, station_id FROM station_status", "bikes")
    assert sorted((r["station_id"], r["bikes_available"]) for r in rows) == [
        ("2350", 20),
        ("2351", 10),
        ("new-9", 1),
        ("v1", 2),
    ]
    for name, (_reply, stage, kind) in BAD_FEEDS.items():
        assert not summaries[name].ok, name
        assert collector.counters.get(name, stage, kind) == 1, name
        failed = [r for r in caplog.records if r.getMessage() == "poll_failed" and r.source == name]  # type: ignore[attr-defined]  # fields set by logs.event
        assert len(failed) == 1, name
        assert (failed[0].stage, failed[0].error) == (stage, kind)  # type: ignore[attr-defined]  # fields set by logs.event
    assert collector.counters.get("good", "fetch", "ok") == 1
    assert collector.counters.get("good", "quality", "unknown_station") == 1


def test_a_slow_system_does_not_delay_the_others(tmp_path: Path, feeds: FeedServer) -> None:
    fast_url = _serve_spec(feeds, "/fast")
    gate = threading.Event()
    feeds.routes["/slow/status.json"] = Reply(200, b"{}", gate=gate)
    config = _settings(
        f"""
[[gbfs.systems]]
name = "slow"
station_status_url = "{feeds.url}/slow/status.json"
interval_secs = 1
timeout_secs = 60

[[gbfs.systems]]
name = "oslo"
url = "{fast_url}"
interval_secs = 1
""",
        tmp_path,
    )
    sink = MemorySink()
    collector = Scheduler.from_settings(config, sink)
    # New data each poll, so each poll writes.
    counter = iter(range(1_700_000_300, 1_800_000_000, 10))
    status = (SPEC / "station_status.json").read_text()
    feeds.routes["/fast/station_status.json"] = lambda _r: Reply(
        200, status.replace("1700000300", str(next(counter))).encode()
    )
    stop = threading.Event()
    runner = threading.Thread(target=collector.run, args=(stop,))
    runner.start()
    try:
        # Three polls of the fast system while the slow one has not answered once.
        wait_for(
            lambda: len(sink.lines("station_status,station_id=2351,system=oslo ")) >= 3,
            timeout=20,
            what="3 fast polls",
        )
        assert not gate.is_set() and not any("system=slow" in line for line in sink.lines())
    finally:
        gate.set()
        stop.set()
        runner.join(timeout=15)
    assert not runner.is_alive()


@pytest.mark.influxdb
def test_sigterm_stops_cleanly_after_writing(
    tmp_path: Path, influxd: InfluxD, feeds: FeedServer
) -> None:
    url = _serve_spec(feeds)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\n\n'
        '[buckets.bikes]\nname = "bikes"\nretention_hours = 0  # the fixture is from 2023\n\n'
        f'[[gbfs.systems]]\nname = "sigterm"\nurl = "{url}"\ninterval_secs = 1\n'
    )
    subprocess.run(
        [sys.executable, "-m", "collector.cli", "setup", "--config", str(config)],
        check=True,
        capture_output=True,
    )
    stderr = run_until_sigterm(
        config,
        lambda: influxd.query(
            "SELECT count(bikes_available) FROM station_status WHERE \"system\"='sigterm'",
            "bikes",
        ),
        what="first write",
    )
    assert "event=stopping" in stderr and "event=stopped" in stderr
    # Its own metrics: the last report is written on the way out.
    events = influxd.query(
        'SELECT last("count") FROM events WHERE "source"=\'sigterm\' GROUP BY "stage", "result"',
        "collector",
    )
    counts = {(row["stage"], row["result"]): row["last"] for row in events}
    assert counts[("fetch", "ok")] >= 1 and counts[("write", "ok")] >= 4
    (feed,) = influxd.query(
        "SELECT last(stations) AS stations, last(age_secs) AS age FROM feed "
        "WHERE \"system\"='sigterm'",
        "collector",
    )
    assert feed["stations"] == 4 and feed["age"] > 0
    writes = influxd.query(
        "SELECT sum(batches) AS batches FROM writes WHERE \"bucket\"='bikes'", "collector"
    )
    assert writes and writes[0]["batches"] >= 1


def test_refused_credentials_stop_the_collector_with_exit_2(
    tmp_path: Path, feeds: FeedServer
) -> None:
    url = _serve_spec(feeds)
    influx2 = FakeInfluxDB2(token="right").start()
    influx2.buckets["bikes"] = {"id": "1", "name": "bikes"}
    try:
        config = tmp_path / "c.toml"
        config.write_text(
            f'[influxdb]\nurl = "{influx2.url}"\napi = "v2"\ntoken = "wrong-secret-token"\n\n'
            f'[[gbfs.systems]]\nname = "oslo"\nurl = "{url}"\n'
        )
        proc = subprocess.run(
            [sys.executable, "-m", "collector.cli", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        influx2.stop()
    assert proc.returncode == 2
    assert "refused the credentials (HTTP 401)" in proc.stderr
    assert "wrong-secret-token" not in proc.stderr + proc.stdout


def test_telemetry_rows_are_exact() -> None:
    counters = Counters()
    counters.add("oslo", "fetch", "ok", 3)
    counters.add("oslo", "quality", "over_capacity", 2)
    counters.feed("oslo", 1_700_000_000, 250)
    rows = counters.rows(1_700_000_042.5, MemorySink().metrics())
    ok = (("result", "ok"), ("source", "oslo"), ("stage", "fetch"))
    quality = (("result", "over_capacity"), ("source", "oslo"), ("stage", "quality"))
    # A 0 one second before each counter's first value: its first increase is visible.
    assert rows["events"][:2] == [(ok, (0,), 1_700_000_041), (quality, (0,), 1_700_000_041)]
    del rows["events"][:2]
    assert rows == {
        "events": [
            ((("result", "ok"), ("source", "oslo"), ("stage", "fetch")), (3,), 1_700_000_042),
            (
                (("result", "over_capacity"), ("source", "oslo"), ("stage", "quality")),
                (2,),
                1_700_000_042,
            ),
        ],
        "feed": [((("system", "oslo"),), (42.5, 250), 1_700_000_042)],
        "writes": [],
    }
    counters.add("oslo", "fetch", "timeout")
    later = counters.rows(1_700_000_052, MemorySink().metrics())["events"]
    timeout = (("result", "timeout"), ("source", "oslo"), ("stage", "fetch"))
    assert [row for row in later if row[1] == (0,)] == [(timeout, (0,), 1_700_000_051)]
