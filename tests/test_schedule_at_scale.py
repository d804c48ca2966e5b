"""What lets one collector hold the world catalogue: first polls spread over the interval, a
bounded worker pool, and skipped polls counted and summarised at INFO (speed is measured in
bench/gbfs_scale.py, not here)."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from collector.jobs import GbfsJob, TelemetryJob, spread_offset_secs
from collector.scheduler import SHARED_WORKERS, pool_size
from collector.settings import GbfsSystemSettings, Settings
from collector.sinks.stdout import StdoutSink
from collector.sources.gbfs import GbfsSystem
from collector.telemetry import Counters
from tests.support import DATA, FeedServer, Reply, Request


def test_first_polls_are_spread_over_the_interval() -> None:
    names = [f"system-{i}" for i in range(1520)]
    offsets = [spread_offset_secs(name, 60.0) for name in names]
    assert all(0 <= o < 60 for o in offsets)
    per_6s = Counter(int(o // 6) for o in offsets)
    # Uniform: each tenth of the minute holds 152 +- 40% of the systems, not all in one.
    assert all(0.6 * 152 < per_6s[k] < 1.4 * 152 for k in range(10)), per_6s
    assert spread_offset_secs("oslo", 60.0) == spread_offset_secs("oslo", 60.0)


def test_the_pool_is_bounded_but_frequent_jobs_keep_a_thread_each() -> None:
    def jobs(n: int, interval_secs: float) -> list[SimpleNamespace]:
        return [SimpleNamespace(interval_secs=interval_secs) for _ in range(n)]

    assert pool_size(jobs(1520, 60.0)) == SHARED_WORKERS + 1  # type: ignore[arg-type]
    assert pool_size(jobs(3, 60.0)) == 4  # type: ignore[arg-type]
    both = jobs(1520, 60.0) + jobs(300, 0.3)
    assert pool_size(both) == 300 + SHARED_WORKERS + 1  # type: ignore[arg-type]


def test_fresh_skips_are_counted_and_summarised_at_info(
    feeds: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    spec = DATA / "gbfs" / "v2.3"
    feeds.serve_folder(spec, "/v2.3")
    doc = json.loads((spec / "station_status.json").read_bytes())
    doc["ttl"] = 300  # longer than the interval: the next slots are fresh
    feeds.routes["/v2.3/station_status.json"] = Reply(200, json.dumps(doc).encode())
    clock = SimpleNamespace(now=1_700_000_310.0)
    settings = GbfsSystemSettings(name="oslo", url=f"{feeds.url}/v2.3/gbfs.json", interval_secs=60)
    counters = Counters()
    system = GbfsSystem(settings, clock=lambda: clock.now)
    job = GbfsJob(system, StdoutSink(), counters, clock=lambda: clock.now)
    report = TelemetryJob(Settings(), StdoutSink(), counters, [], ["oslo"])
    outcomes = []
    for k, late_secs in enumerate((0, 1, 9)):  # the third starts 15% of its interval late
        clock.now = job.start_secs + 60 * k + late_secs
        outcomes.append(job.run().outcome)
    assert outcomes == ["new", "fresh", "fresh"]
    assert counters.get("oslo", "poll", "fresh") == 2
    assert counters.get("oslo", "schedule", "on_time") == 2
    assert counters.get("oslo", "schedule", "late") == 1
    with caplog.at_level(logging.INFO):
        report.run()
    (record,) = [r for r in caplog.records if r.getMessage() == "systems"]
    assert record.levelno == logging.INFO
    fields = ("systems", "polls", "late", "fresh", "backing_off", "failed")
    assert [getattr(record, f) for f in fields] == [1, 3, 1, 2, 0, 0]


def test_the_writer_keeps_a_connection_for_every_concurrent_write(
    feeds: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    # 24 writes in flight at once (the server answers none until all 24 have arrived): with
    # requests' default pool of 10, 14 connections would be discarded on their way back,
    # each with urllib3's "Connection pool is full" warning, and reopened on the next write.
    from collector.settings import InfluxDBSettings
    from collector.sinks.influxdb import WRITER_CONNECTIONS, make_writer

    writes = 24
    assert writes < WRITER_CONNECTIONS
    barrier = threading.Barrier(writes, timeout=10)

    def answer(_request: Request) -> Reply:
        barrier.wait()  # all writes hold their connection at the same time
        return Reply(204)

    feeds.routes["/write"] = answer
    writer = make_writer(InfluxDBSettings(url=feeds.url, api="v1", max_retries=0))
    try:
        with caplog.at_level(logging.WARNING), ThreadPoolExecutor(writes) as pool:
            reports = list(
                pool.map(lambda i: writer.write("bikes", [f"m f={i}i"], "s"), range(writes))
            )
    finally:
        writer.close()
    assert [r.written for r in reports] == [1] * writes
    assert not [r for r in caplog.records if "pool is full" in r.getMessage().lower()]
