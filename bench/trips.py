"""Trip backfill: throughput and peak memory on a generated 1-million-trip month.

The file (2021+ schema, 800 stations, a month of times, rows half out of order like the real
2021 files) is generated first. Then `collector replay trips` runs as its own process, pinned
to one core when `taskset` exists:
  - into a null sink: --dry-run with line protocol sent to /dev/null (read, aggregate, encode);
  - into a real InfluxDB 1.x (Debian's influxd, started here on a free port).
Peak memory is the replay process's maximum resident set size.

Run: python bench/trips.py [--trips 1000000]
"""

from __future__ import annotations

import argparse
import csv
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import InfluxD


def generate(path: Path, trips: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    stations = [
        (f"JC{n:03d}", f"Station {n}", 40.7 + rng.random() / 10, -74.05 + rng.random() / 10)
        for n in range(800)
    ]
    month = datetime(2021, 2, 1)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "ride_id",
                "rideable_type",
                "started_at",
                "ended_at",
                "start_station_name",
                "start_station_id",
                "end_station_name",
                "end_station_id",
                "start_lat",
                "start_lng",
                "end_lat",
                "end_lng",
                "member_casual",
            ]
        )
        for n in range(trips):
            a, b = rng.choice(stations), rng.choice(stations)
            start = month + timedelta(seconds=rng.randrange(28 * 86400))
            end = start + timedelta(seconds=rng.randrange(60, 3600))
            out.writerow(
                [
                    f"R{n:08X}",
                    "docked_bike",
                    start.strftime("%Y-%m-%d %H:%M:%S"),
                    end.strftime("%Y-%m-%d %H:%M:%S"),
                    a[1],
                    a[0],
                    b[1],
                    b[0],
                    f"{a[2]:.6f}",
                    f"{a[3]:.6f}",
                    f"{b[2]:.6f}",
                    f"{b[3]:.6f}",
                    "member",
                ]
            )


def replay(args: list[str], stdout: object = subprocess.DEVNULL) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one `collector replay` process."""
    command = [sys.executable, "-m", "collector.cli", "replay", "trips", *args]
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    result = subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)
    secs = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of any child so far: run the smaller job first.
    return secs, max(peak, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trips", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-trips-"))
    path = work / "trips.csv"
    started = time.perf_counter()
    generate(path, args.trips)
    print(
        f"generated {args.trips:,} trips ({path.stat().st_size / 1e6:.0f} MB) in "
        f"{time.perf_counter() - started:.0f} s"
    )
    config = work / "c.toml"
    config.write_text("[spool]\nenabled = false\n")
    secs, peak = replay([str(path), "--dry-run", "--config", str(config)])
    print(
        f"null sink (dry run to /dev/null), one core: {secs:.1f} s = "
        f"{args.trips / secs:,.0f} trips/s"
        f" = {args.trips / secs * 60 / 1e6:.2f} M trips/min (target >= 1 M/min); "
        f"peak RSS {peak:.0f} MB (target < 200 MB)"
    )

    server = InfluxD(work / "influxd")
    (work / "influxd").mkdir()
    server.start()
    try:
        config.write_text(
            # The trips database keeps everything by default: a 2021 month fits as it is.
            f'[influxdb]\nurl = "{server.url}"\napi = "v1"\ntimeout_secs = 60\n'
        )
        subprocess.run(
            [sys.executable, "-m", "collector.cli", "setup", "--config", str(config)],
            check=True,
            capture_output=True,
        )
        secs, peak = replay([str(path), "--config", str(config)])
        (row,) = server.query('SELECT sum("undocks") AS u FROM "station_flow"', "trips")
        print(
            f"real InfluxDB 1.x: {secs:.1f} s = {args.trips / secs:,.0f} trips/s = "
            f"{args.trips / secs * 60 / 1e6:.2f} M trips/min; peak RSS {peak:.0f} MB; "
            f"undocks stored: {row['u']:,}"
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
