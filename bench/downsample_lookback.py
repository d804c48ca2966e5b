"""Cost of recomputing the downsampling lookback: one run of each generated continuous query
over its whole window on a real InfluxDB 1.x (Debian's influxd, started here on a free port).

Data at the collector's default rates: six patients x six sensors at ~3.3 readings/s for
pressure, 300 stations every 15 s for bikes, over the lookback (setup.downsample_lookback_hours,
3 h by default) plus an hour. Each CQ's SELECT ... INTO runs over the window its run covers
(the lookback, whole intervals), as the server runs it every interval.

Run: python bench/downsample_lookback.py [--hours 3] [--patients 6] [--stations 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.contract import DOWNSAMPLES, SENSORS
from collector.provision.influxdb import continuous_query, lookback_secs
from collector.settings import InfluxDBSettings, Settings
from collector.sinks.influxdb import make_writer
from tests.support import InfluxD


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hours", type=float, default=Settings().setup.downsample_lookback_hours)
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--stations", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lookback-"))
    server = InfluxD(work)
    server.start()
    try:
        names = {logical: logical for logical in Settings().buckets.names()}
        for name in names.values():
            server.query(f'CREATE DATABASE "{name}"')
        writer = make_writer(
            InfluxDBSettings(url=server.url, api="v1", timeout_secs=60), bucket_names=names
        )
        now = int(time.time()) // 3600 * 3600
        span_secs = int((args.hours + 1) * 3600)
        pressure = [
            f"pressure,foot={'left' if s < 3 else 'right'},patient_id={p},sensor={SENSORS[s]} "
            f"anomaly=false,value={(t + s * 7 + p) % 1024}i {now * 1000 - t}"
            for t in range(0, span_secs * 1000, 300)
            for p in range(1, args.patients + 1)
            for s in range(6)
        ]
        bikes = [
            f"station_status,station_id={n},system=sim bikes_available={(t + n) % 20}i,"
            f"docks_available={(t * 3 + n) % 20}i,ebikes_available={n % 3}i {now - t}"
            for t in range(0, span_secs, 15)
            for n in range(args.stations)
        ]
        started = time.monotonic()
        written = writer.write("pressure", pressure, "ms").written
        written_bikes = writer.write("bikes", bikes, "s").written
        print(
            f"wrote {written:,} of {len(pressure):,} pressure and {written_bikes:,} of "
            f"{len(bikes):,} bike points in {time.monotonic() - started:.1f} s"
        )
        for ds in DOWNSAMPLES:
            lookback = lookback_secs(ds, args.hours)
            _db, _name, statement = continuous_query(ds, names, "autogen", lookback)
            select = statement.split(" BEGIN ", 1)[1].removesuffix(" END")
            select = select.replace(
                " GROUP BY", f" WHERE time >= {now - lookback}s AND time < {now}s GROUP BY"
            )
            started = time.monotonic()
            server.query(select, names[ds.source.bucket])
            secs = time.monotonic() - started
            print(
                f"{ds.target.bucket}: one run over {lookback / 3600:g} h "
                f"(every {ds.every}) took {secs:.2f} s"
            )
        writer.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
