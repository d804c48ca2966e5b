"""No data lost: the spool, outages and crashes of a real InfluxDB 1.x, slow and throttling
servers, dead letters, the spool's bound."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from collector.retry import Backoff
from collector.settings import InfluxDBSettings
from collector.simulators.pressure import PressureSimulator
from collector.simulators.serve import Background
from collector.sinks.base import Fatal
from collector.sinks.influxdb import make_writer
from collector.sinks.spool import DeadLetters, Spool, SpoolBusy, SpoolingSink
from collector.telemetry import Counters
from tests.fake_influxdb2 import FakeInfluxDB2
from tests.support import InfluxD, Reply, collector_process, run_cli, wait_for

LINES = [f"m,k={i} v={i}i {1_700_000_000 + i}" for i in range(10)]


# ------------------------------------------------------------------------------------ spool


def test_spool_keeps_order_survives_reopen_and_settles(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10_000_000)
    spool.put("bikes", "s", [LINES[:3], LINES[3:5]])
    spool.put("pressure", "ms", [['m s="two\nlines"']])
    spool.close()
    spool = Spool(tmp_path, 10_000_000)  # as after a crash and restart
    first = spool.oldest()
    assert first is not None and (first.bucket, first.precision, first.lines) == (
        "bikes",
        "s",
        LINES[:3],
    )
    spool.settle(first.id, [LINES[1:2]])  # the server took two of the three
    second = spool.oldest()
    assert second is not None and second.lines == LINES[3:5]
    spool.settle(second.id)
    third = spool.oldest()
    assert third is not None and third.lines == ['m s="two\nlines"']  # newline intact
    spool.settle(third.id)
    again = spool.oldest()
    assert again is not None and again.lines == LINES[1:2] and again.bucket == "bikes"
    spool.settle(again.id)
    assert spool.oldest() is None and spool.stats().lines == 0


def test_spool_is_held_by_one_collector_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1000)
    with pytest.raises(SpoolBusy):
        Spool(tmp_path, 1000)
    spool.close()
    Spool(tmp_path, 1000).close()


def test_full_spool_drops_the_oldest_counts_and_keeps_the_newest(tmp_path: Path) -> None:
    batches = [[f"m,batch={b} v={i}i {b * 100 + i}" for i in range(50)] for b in range(20)]
    one = len(zlib.compress(orjson.dumps(batches[0]), 1))
    spool = Spool(tmp_path, max_bytes=one * 5)  # room for about five batches
    dropped = sum(spool.put("bikes", "s", [batch]) for batch in batches)
    stats = spool.stats()
    assert 4 <= stats.batches <= 5
    assert dropped == stats.dropped_lines == 50 * (20 - stats.batches)
    kept = []
    while (batch := spool.oldest()) is not None:
        kept.append(batch.lines)
        spool.settle(batch.id)
    assert kept == batches[-stats.batches :]  # the newest, in order


# ---------------------------------------------------------------- the sink at the wire (v2)


@pytest.fixture
def influx2() -> Iterator[FakeInfluxDB2]:
    server = FakeInfluxDB2(token="tok").start()
    server.buckets["bikes"] = {"id": "1", "name": "bikes"}
    yield server
    server.stop()


def _sink(server: FakeInfluxDB2, tmp_path: Path, **settings: object) -> SpoolingSink:
    writer = make_writer(InfluxDBSettings(url=server.url, api="v2", token="tok", **settings))
    return SpoolingSink(
        writer,
        Spool(tmp_path / "spool", 50_000_000),
        DeadLetters(tmp_path / "spool" / "dead-letter.lp", 1_000_000),
        backoff=Backoff(base_secs=0.05, max_secs=0.2),
        fatal=Fatal(),
        counters=Counters(),
    )


def test_outage_spools_then_drains_everything_once(influx2: FakeInfluxDB2, tmp_path: Path) -> None:
    influx2.script.extend([Reply(503)] * 3)
    sink = _sink(influx2, tmp_path)
    try:
        first = sink.write("bikes", LINES[:5], "s")
        assert (first.written, first.spooled, first.failed) == (0, 5, 0)
        second = sink.write("bikes", LINES[5:], "s")  # queued behind, no request made
        assert second.spooled == 5
        wait_for(lambda: sorted(influx2.lines()) == sorted(LINES), what="drain")
        wait_for(lambda: sink.metrics().spool.lines == 0, what="empty spool")
        assert sink.write("bikes", ["m,k=z v=1i 1"], "s").written == 1  # direct again
    finally:
        sink.close()
    assert len(influx2.lines()) == len(LINES) + 1  # nothing twice


def test_retry_after_is_a_floor_for_the_drainer(influx2: FakeInfluxDB2, tmp_path: Path) -> None:
    # The direct write meets the first 503, the drainer the second, then the 429.
    influx2.script.extend([Reply(503), Reply(503), Reply(429, headers={"Retry-After": "1"})])
    sink = _sink(influx2, tmp_path)
    try:
        assert sink.write("bikes", LINES, "s").spooled == len(LINES)
        wait_for(lambda: len(influx2.lines()) == len(LINES), what="drain after 429")
        assert sink.waits[0] < 1 <= sink.waits[1]  # backoff, then at least Retry-After
    finally:
        sink.close()


def test_slow_database_times_out_and_nothing_is_lost(
    influx2: FakeInfluxDB2, tmp_path: Path
) -> None:
    influx2.script.extend([Reply(204, delay_secs=1.5), Reply(204, delay_secs=1.5)])
    sink = _sink(influx2, tmp_path, timeout_secs=0.3)
    try:
        report = sink.write("bikes", LINES, "s")
        assert report.spooled == len(LINES) and report.errors[0].kind == "timeout"
        wait_for(lambda: len(set(influx2.lines())) == len(LINES), timeout=20, what="drain")
    finally:
        sink.close()
    # A timed-out write may have reached the server: at most a repeat, which InfluxDB
    # overwrites in place (same series, same time).
    assert set(influx2.lines()) == set(LINES)


def test_refused_batches_go_to_dead_letters_and_do_not_block(
    influx2: FakeInfluxDB2, tmp_path: Path
) -> None:
    influx2.script.extend(
        [Reply(503), Reply(400, b'{"code":"invalid","message":"unable to parse x"}')]
    )
    sink = _sink(influx2, tmp_path)
    try:
        sink.write("bikes", LINES[:4], "s")  # spooled, then refused when drained
        sink.write("bikes", LINES[4:], "s")  # spooled behind it
        wait_for(lambda: influx2.lines() == LINES[4:], what="the next batch")
    finally:
        sink.close()
    dead = (tmp_path / "spool" / "dead-letter.lp").read_text().splitlines()
    assert dead[0].startswith("# ") and "status=400" in dead[0] and "unable to parse x" in dead[0]
    assert dead[1:] == LINES[:4]


def test_spool_bound_with_the_database_down(tmp_path: Path) -> None:
    writer = make_writer(InfluxDBSettings(url="http://127.0.0.1:9", api="v1"))
    batches = [[f"m,k=a v={i}i {n * 1000 + i}" for i in range(200)] for n in range(6)]
    # Room for exactly the three newest batches.
    bound = sum(len(Spool._pack(batch)) for batch in batches[-3:])
    sink = SpoolingSink(
        writer,
        Spool(tmp_path, bound),
        DeadLetters(tmp_path / "d.lp", 1000),
        backoff=Backoff(base_secs=30, max_secs=30),
        fatal=Fatal(),
        counters=Counters(),
    )
    try:
        reports = [sink.write("bikes", batch, "s") for batch in batches]
        stats = sink.metrics().spool
        kept = []
        while (batch := sink.spool.oldest()) is not None:
            kept.append(batch.lines)
            sink.spool.settle(batch.id)
    finally:
        sink.close()
    assert sum(r.spooled for r in reports) == 6 * 200
    assert stats.batches == 3
    assert stats.dropped_lines == sum(r.failed for r in reports) == 3 * 200
    assert kept == batches[-3:]


# ------------------------------------------------------------- a real server, stopped


@pytest.fixture
def own_influxd(tmp_path: Path) -> Iterator[InfluxD]:
    """A server of this test's own, which it may stop and start."""
    if not InfluxD.available():
        pytest.skip("influxd not installed")
    server = InfluxD(tmp_path / "influxd")
    (tmp_path / "influxd").mkdir()
    server.start()
    yield server
    server.stop()


def _pressure_config(tmp_path: Path, influxd: InfluxD, url: str) -> Path:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\ntimeout_secs = 1\nretry_base_secs = 0.2\n'
        "retry_max_secs = 1\n\n"
        f'[pressure]\nurl = "{url}"\npatients = [1, 2]\ninterval_secs = 0.1\n'
        "flush_interval_secs = 0.3\n\n"
        f'[spool]\ndir = "{tmp_path / "spool"}"\n'
    )
    return config


def _stored(influxd: InfluxD) -> dict[str, list[tuple]]:
    rows = influxd.query(
        'SELECT "value", "anomaly", "sensor", "patient_id" FROM "pressure"', "pressure", epoch="ms"
    )
    readings: dict[str, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        readings[row["patient_id"]][row["time"]][row["sensor"]] = (row["value"], row["anomaly"])
    return {p: [dict(sorted(r.items())) for _, r in sorted(t.items())] for p, t in readings.items()}


def _served(sim: PressureSimulator) -> dict[str, list[dict]]:
    served: dict[str, list[dict]] = defaultdict(list)
    for patient, body in list(sim.served):
        served[str(patient)].append(
            dict(sorted((s["name"], (s["value"], s["anomaly"])) for s in body["trace"]["sensors"]))
        )
    return served


@pytest.mark.influxdb
def test_database_outage_loses_nothing(tmp_path: Path, own_influxd: InfluxD) -> None:
    sim = PressureSimulator(5, record=True)
    with Background(sim) as url:
        config = _pressure_config(tmp_path, own_influxd, url)
        assert run_cli("setup", config=config).returncode == 0
        with collector_process(config) as running:
            wait_for(
                lambda: own_influxd.query('SELECT count("value") FROM "pressure"', "pressure"),
                what="first points",
            )
            own_influxd.stop()
            before = len(sim.served)
            # The collector goes on polling while the database is away.
            wait_for(lambda: len(sim.served) >= before + 60, what="polls during the outage")
            own_influxd.start(same_port=True)
            wait_for(
                lambda: (
                    _stored(own_influxd)
                    and sum(map(len, _stored(own_influxd).values())) >= before + 60
                ),
                timeout=30,
                what="drain after the outage",
            )
    log = running.log
    stored, served = _stored(own_influxd), _served(sim)
    assert set(stored) == set(served) == {"1", "2"}
    for patient in served:
        assert stored[patient] == served[patient], patient  # every reading, once, in order
    assert "spool_retry" in log or "write_failed" in log or "spooled=" in log


@pytest.mark.influxdb
def test_sigkill_while_the_database_is_down_loses_nothing_spooled(
    tmp_path: Path, own_influxd: InfluxD
) -> None:
    sim = PressureSimulator(6, record=True)
    with Background(sim) as url:
        config = _pressure_config(tmp_path, own_influxd, url)
        assert run_cli("setup", config=config).returncode == 0
        own_influxd.stop()
        cli = [sys.executable, "-m", "collector.cli", "run", "--config", str(config)]
        proc = subprocess.Popen(cli, stderr=subprocess.DEVNULL)
        spool = tmp_path / "spool" / "spool.sqlite"

        def pending() -> list[str]:
            if not spool.exists():
                return []
            try:
                with sqlite3.connect(f"file:{spool}?mode=ro", uri=True) as db:
                    payloads = db.execute("SELECT payload FROM batches").fetchall()
            except sqlite3.OperationalError:  # the file exists, its table not yet
                return []
            return [line for (p,) in payloads for line in orjson.loads(zlib.decompress(p))]

        wait_for(lambda: len(pending()) >= 60, what="a spool to build up")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        spooled = pending()
        assert spooled
        own_influxd.start(same_port=True)
        again = subprocess.Popen(cli, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: not pending(), timeout=30, what="the old spool to drain")
            again.send_signal(signal.SIGTERM)
            assert again.wait(timeout=10) == 0
        finally:
            if again.poll() is None:
                again.kill()
    rows = own_influxd.query(
        'SELECT "value", "sensor", "patient_id" FROM "pressure"', "pressure", epoch="ms"
    )
    stored = {(r["patient_id"], r["sensor"], r["time"], r["value"]) for r in rows}
    for line in spooled:
        tags, fields, time_ms = line.split(" ")
        tag = dict(kv.split("=") for kv in tags.split(",")[1:])
        value = int(fields.split("value=")[1].rstrip("i"))
        key = (tag["patient_id"], tag["sensor"], int(time_ms), value)
        assert key in stored, line
