"""Spool write and drain rates, and the collector's memory over an hour of polling.

1. Spool write: batches of 5,000 station_status lines put into the spool (SQLite, fsync per
   transaction), points/s.
2. Drain: the same spool drained by the spooling sink into a real InfluxDB 1.x (Debian's
   influxd, started here on a free port), points/s until the spool is empty.
3. Memory: 20 bike-share systems of 2,000 stations polled through the collector's own code
   (GbfsSystem with a fetcher that serves changing payloads, each system's GbfsJob, encoders,
   counters) for an hour of simulated time at 15 s intervals (4,800 polls, 9.6 M station
   rows), into a sink that drops lines. Resident memory (RSS) is sampled after each quarter.

Run: python bench/spool_and_memory.py [--drain-points 500000] [--systems 20] [--minutes 60]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.contract import Precision
from collector.http import Response, Validators
from collector.jobs import GbfsJob
from collector.retry import Backoff
from collector.settings import GbfsSystemSettings, InfluxDBSettings
from collector.sinks.base import Fatal, SinkMetrics, WriteReport
from collector.sinks.influxdb import make_writer
from collector.sinks.spool import DeadLetters, Spool, SpoolingSink
from collector.sources.gbfs import GbfsSystem
from collector.telemetry import Counters
from tests.support import InfluxD, wait_for

NOW = 1_700_000_000


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 1024 / 1024


def station_lines(batch: int, size: int) -> list[str]:
    return [
        f"station_status,station_id={i},system=bench bikes_available={i % 30}i,"
        f'docks_available={30 - i % 30}i,lat=59.9{i},lon=10.7{i},name="Station {i}" '
        f"{NOW - 3600 + batch * 10}"
        for i in range(size)
    ]


def bench_spool(drain_points: int, batch_size: int = 5000) -> None:
    batches = [station_lines(b, batch_size) for b in range(drain_points // batch_size)]
    workdir = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    spool = Spool(workdir / "spool", 4 * 1024**3)
    start = time.perf_counter()
    for batch in batches:
        spool.put("bikes", "s", [batch])
    put_secs = time.perf_counter() - start
    print(
        f"spool write: {len(batches)} batches of {batch_size:,} lines in {put_secs:.2f} s = "
        f"{drain_points / put_secs:,.0f} points/s ({spool.stats().bytes / 1e6:.1f} MB on disk)"
    )

    server = InfluxD(workdir / "influxd")
    (workdir / "influxd").mkdir()
    server.start()
    try:
        server.query('CREATE DATABASE "bikes"')
        writer = make_writer(InfluxDBSettings(url=server.url, api="v1", timeout_secs=30))
        start = time.perf_counter()
        sink = SpoolingSink(
            writer,
            spool,
            DeadLetters(workdir / "dead.lp", 10**6),
            backoff=Backoff(0.1, 1),
            fatal=Fatal(),
            counters=Counters(),
        )
        wait_for(lambda: spool.stats().lines == 0, timeout=600, what="drain")
        drain_secs = time.perf_counter() - start
        sink.close()
        (count,) = server.query('SELECT count("bikes_available") FROM "station_status"', "bikes")
        print(
            f"spool drain into Debian's InfluxDB 1.x: "
            f"{drain_points:,} points in {drain_secs:.2f} s = "
            f"{drain_points / drain_secs:,.0f} points/s "
            f"(target >= 50,000); points stored: {count['count']:,}"
        )
    finally:
        server.stop()


class ChangingFeed:
    """A fetcher serving one system's feeds; each status fetch is a new snapshot."""

    def __init__(self, seed: int, stations: int, clock: list[float]) -> None:
        rng = random.Random(seed)
        self._rng = rng
        self._clock = clock
        self._info = orjson.dumps(
            {
                "last_updated": NOW,
                "ttl": 3600,
                "data": {
                    "stations": [
                        {
                            "station_id": f"{seed}-{i}",
                            "name": f"Street {i} & Avenue {seed}",
                            "lat": 59.9 + rng.random() / 10,
                            "lon": 10.7 + rng.random() / 10,
                            "capacity": 30,
                        }
                        for i in range(stations)
                    ]
                },
            }
        )
        self._stations = [
            {
                "station_id": f"{seed}-{i}",
                "num_bikes_available": 0,
                "num_docks_available": 30,
                "num_bikes_disabled": 0,
                "num_docks_disabled": 0,
                "num_ebikes_available": 0,
                "is_installed": True,
                "is_renting": True,
                "is_returning": True,
                "last_reported": NOW,
            }
            for i in range(stations)
        ]

    def get(self, url: str, validators: Validators | None = None) -> Response:
        if url.endswith("station_information.json"):
            return Response(self._info, Validators(etag='"info"'))
        now = int(self._clock[0])
        for station in self._stations:
            bikes = self._rng.randint(0, 30)
            station.update(
                num_bikes_available=bikes,
                num_docks_available=30 - bikes,
                num_ebikes_available=bikes // 3,
                last_reported=now - 5,
            )
        body = orjson.dumps({"last_updated": now, "ttl": 10, "data": {"stations": self._stations}})
        return Response(body, Validators())

    def close(self) -> None:
        pass


class NullSink:
    def write(self, bucket: str, lines: Sequence[str], precision: Precision) -> WriteReport:
        return WriteReport(written=len(lines))

    def metrics(self) -> SinkMetrics:
        return SinkMetrics()

    def stop_retrying(self) -> None:
        pass

    def close(self) -> None:
        pass


def bench_memory(systems: int, stations: int, minutes: int, interval: float = 15.0) -> None:
    clock = [float(NOW)]
    settings = [
        GbfsSystemSettings(
            name=f"city{n}",
            station_information_url=f"http://sim/{n}/station_information.json",
            station_status_url=f"http://sim/{n}/station_status.json",
            interval_secs=interval,
        )
        for n in range(systems)
    ]
    polled = [
        GbfsSystem(s, fetcher=ChangingFeed(n, stations, clock), clock=lambda: clock[0])  # type: ignore[arg-type]  # a stand-in Fetcher
        for n, s in enumerate(settings)
    ]
    sink, counters = NullSink(), Counters()
    jobs = [GbfsJob(system, sink, counters) for system in polled]
    rounds = int(minutes * 60 / interval)
    samples = []
    start = time.perf_counter()
    for r in range(rounds):
        clock[0] = NOW + r * interval
        for job in jobs:
            assert job.run().ok
        if (r + 1) % (rounds // 4) == 0:
            samples.append(rss_mb())
    secs = time.perf_counter() - start
    print(
        f"memory: {systems} systems x {stations:,} stations, {rounds} polls each "
        f"({minutes} simulated minutes, {rounds * systems * stations / 1e6:.1f} M rows) "
        f"in {secs:.0f} s"
    )
    print("  RSS after each quarter: " + ", ".join(f"{mb:.1f} MB" for mb in samples))
    print(f"  last / first quarter = {samples[-1] / samples[0]:.3f} (target: flat, 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drain-points", type=int, default=500_000)
    parser.add_argument("--systems", type=int, default=20)
    parser.add_argument("--stations", type=int, default=2000)
    parser.add_argument("--minutes", type=int, default=60)
    args = parser.parse_args()
    bench_spool(args.drain_points)
    bench_memory(args.systems, args.stations, args.minutes)


if __name__ == "__main__":
    main()
