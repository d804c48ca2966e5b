"""Downsampling that catches up: points written 90 minutes late, as a drained spool writes them,
end up in ``bikes_1h`` and ``pressure_1m`` with exactly the mean/min/max of all the points.

InfluxDB 1.x: the generated continuous queries are run against a real server for each window
the server's scheduler would give them, computed as ``ExecuteContinuousQuery`` does
(influxdata/influxdb ``services/continuous_querier/service.go``): for a run due at ``nextRun``
(the service polls every second, so a run starts at its boundary, ``now == nextRun``),

    startTime = (nextRun + interval - resampleFor - 1ns).Truncate(interval)
    endTime   = (now + interval - resampleEvery).Truncate(interval)

with ``resampleEvery`` clamped to the GROUP BY ``interval``. The same model run on the old
statement (``FOR 3900s``) shows the hole the issue describes, so the model is not vacuous.

InfluxDB 2.x: the generated task Flux passes InfluxData's checker and recomputes whole
intervals back to the configured lookback.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from collector.contract import BIKES_1H_BUCKET, DOWNSAMPLES, PRESSURE_1M_BUCKET, Downsample
from collector.provision.influxdb import (
    continuous_query,
    duration_secs,
    flux_task,
    lookback_secs,
)
from collector.settings import InfluxDBSettings, Settings
from collector.sinks.influxdb import make_writer
from tests.flux import assert_valid
from tests.support import InfluxD

NS = 1_000_000_000
LATE_SECS = 90 * 60
LOOKBACK_HOURS = Settings().setup.downsample_lookback_hours


def cq_window(statement: str, now: int) -> tuple[int, int] | None:
    """[start, end) in seconds of the run due at ``now`` (seconds), as service.go computes it
    for a CQ with no GROUP BY offset."""
    every = duration_secs(re.search(r"RESAMPLE EVERY (\S+)", statement).group(1))  # type: ignore[union-attr]  # every generated query has it
    found_for = re.search(r" FOR (\S+)", statement)
    interval = duration_secs(re.search(r"GROUP BY time\((\w+)\)", statement).group(1))  # type: ignore[union-attr]  # every generated query has it
    resample_for = duration_secs(found_for.group(1)) if found_for else max(every, interval)
    resample_every = min(every, interval)

    def truncate(ns: int) -> int:
        return ns - ns % (interval * NS)

    start = truncate((now + interval - resample_for) * NS - 1)
    end = truncate((now + interval - resample_every) * NS)
    return (start // NS, end // NS) if end > start else None


def run_as_server(influxd: InfluxD, statement: str, db: str, now: int) -> None:
    """The CQ's SELECT ... INTO over the window of its run at ``now``."""
    window = cq_window(statement, now)
    if window is None:
        return
    select = statement.split(" BEGIN ", 1)[1].removesuffix(" END")
    select = select.replace(
        " GROUP BY", f" WHERE time >= {window[0]}s AND time < {window[1]}s GROUP BY"
    )
    influxd.query(select, db)


def test_the_model_reproduces_the_rounded_down_for() -> None:
    # The finding: FOR 3900s with GROUP BY time(1h) is FOR 1h; each hour is computed
    # once, at the next hh:00.
    old = "RESAMPLE EVERY 1h FOR 3900s BEGIN SELECT mean(x) INTO a FROM b GROUP BY time(1h) END"
    assert cq_window(old, 36000) == (32400, 36000)
    new = "RESAMPLE EVERY 1h FOR 10800s BEGIN SELECT mean(x) INTO a FROM b GROUP BY time(1h) END"
    assert cq_window(new, 36000) == (25200, 36000)


def test_lookback_is_whole_intervals_and_at_least_two() -> None:
    hourly, minutely = (next(d for d in DOWNSAMPLES if d.every == e) for e in ("1h", "1m"))
    assert lookback_secs(hourly, 0) == 7200
    assert lookback_secs(hourly, 2.5) == 3 * 3600
    assert lookback_secs(minutely, 0) == 120
    assert lookback_secs(minutely, 1.51) == 91 * 60


@pytest.fixture
def dbs(influxd: InfluxD) -> Iterator[dict[str, str]]:
    """Databases of their own, without the CQs themselves: only this test runs the statements,
    so the server's own scheduler cannot race it."""
    names = {logical: f"late_{logical}" for logical in Settings().buckets.names()}
    for name in names.values():
        influxd.query(f'CREATE DATABASE "{name}"')
    yield names
    for name in names.values():
        influxd.drop(name)


def _late_points(
    influxd: InfluxD,
    names: dict[str, str],
    ds: Downsample,
    statement: str,
    on_time: list[str],
    late: list[str],
    start: int,
) -> None:
    """Write ``on_time``; run the CQ as the server would at every boundary until the late
    points arrive ``LATE_SECS`` after the window's end; write them; keep running it until a
    run no longer reaches the window."""
    every = duration_secs(ds.every)
    writer = make_writer(InfluxDBSettings(url=influxd.url, api="v1"), bucket_names=names)
    assert writer.write(ds.source.bucket, on_time, ds.source.precision).written == len(on_time)
    arrival = start + every - 10 + LATE_SECS
    run = start + every
    while run <= arrival:
        run_as_server(influxd, statement, names[ds.source.bucket], run)
        run += every
    assert writer.write(ds.source.bucket, late, ds.source.precision).written == len(late)
    while (window := cq_window(statement, run)) is not None and window[0] <= start:
        run_as_server(influxd, statement, names[ds.source.bucket], run)
        run += every
    writer.close()


def _hour_and_minute() -> tuple[int, int]:
    # Hours before the present (the databases keep everything), on whole intervals.
    now = int(time.time())
    return (now // 3600 - 10) * 3600, (now // 60 - 600) * 60


@pytest.mark.influxdb
@pytest.mark.parametrize("statement_kind", ["generated", "old FOR 3900s"])
def test_bikes_1h_gets_points_written_90_minutes_late(
    influxd: InfluxD, dbs: dict[str, str], statement_kind: str
) -> None:
    ds = next(d for d in DOWNSAMPLES if d.target.bucket == BIKES_1H_BUCKET)
    _db, _name, statement = continuous_query(ds, dbs, "autogen", lookback_secs(ds, LOOKBACK_HOURS))
    if statement_kind != "generated":
        statement = re.sub(r" FOR \S+ ", " FOR 3900s ", statement)
    hour, _minute = _hour_and_minute()
    line = "station_status,station_id=72,system=jc bikes_available={}i,docks_available={}i {}"
    on_time = [line.format(4, 10, hour + 10), line.format(2, 12, hour + 1800)]
    late = [line.format(9, 5, hour + 3590)]  # the last poll of the hour, drained 90 min late
    _late_points(influxd, dbs, ds, statement, on_time, late, hour)
    (row,) = influxd.query('SELECT * FROM "station_status"', dbs[BIKES_1H_BUCKET])
    assert row["time"] == hour
    got = (row["bikes_available_mean"], row["bikes_available_min"], row["bikes_available_max"])
    if statement_kind == "generated":
        assert got == (5.0, 2, 9)
        assert (row["docks_available_mean"], row["docks_available_max"]) == (9.0, 12)
    else:  # the hole: the late poll never reaches bikes_1h
        assert got == (3.0, 2, 4)


@pytest.mark.influxdb
def test_pressure_1m_gets_points_written_90_minutes_late(
    influxd: InfluxD, dbs: dict[str, str]
) -> None:
    ds = next(d for d in DOWNSAMPLES if d.target.bucket == PRESSURE_1M_BUCKET)
    _db, _name, statement = continuous_query(ds, dbs, "autogen", lookback_secs(ds, LOOKBACK_HOURS))
    _hour, minute = _hour_and_minute()
    ms = minute * 1000
    line = "pressure,foot=left,patient_id=2,sensor=L2 anomaly=false,value={}i {}"
    on_time = [line.format(100, ms + 5000), line.format(300, ms + 30000)]
    late = [line.format(1023, ms + 59900), line.format(40, ms + 59950)]
    _late_points(influxd, dbs, ds, statement, on_time, late, minute)
    (row,) = influxd.query('SELECT * FROM "pressure"', dbs[PRESSURE_1M_BUCKET])
    assert (row["time"], row["patient_id"], row["sensor"]) == (minute, "2", "L2")
    assert row["value_mean"] == (100 + 300 + 1023 + 40) / 4 and row["value_max"] == 1023


# ------------------------------------------------------------------------------ InfluxDB 2.x


def test_v2_tasks_recompute_whole_intervals_back_to_the_lookback() -> None:
    names = Settings().buckets.names()
    scripts = {}
    for ds in DOWNSAMPLES:
        lookback = lookback_secs(ds, LOOKBACK_HOURS)
        name, flux = flux_task(ds, names, 300, lookback)
        # Both ends on whole intervals, the start the whole lookback back: a run recomputes
        # every window that late data can still land in, and never writes a partial one.
        assert f"start = date.truncate(t: -{lookback}s, unit: task.every)" in flux
        assert "stop = date.truncate(t: now(), unit: task.every)" in flux
        assert "|> range(start: start, stop: stop)" in flux
        assert "range(start: -task.every)" not in flux
        assert flux.count("aggregateWindow(every: task.every") == len(ds.functions)
        assert lookback - duration_secs(ds.every) >= LATE_SECS
        scripts[name] = flux
    assert_valid(scripts)
