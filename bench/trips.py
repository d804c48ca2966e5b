"""Trip backfill: throughput and peak memory on a generated 1-million-trip month.

The file (2021+ schema, 800 stations, a month of times, rows in random time order, as the real
2021 files are half out of order) is generated first (or reused: --csv). Then
`collector replay trips` runs as its own process, pinned to one core when `taskset` exists:
  - into a null sink: --dry-run with line protocol sent to /dev/null (read, aggregate, encode);
  - into a real InfluxDB 1.x (Debian's influxd, started here on a free port, not pinned), into
    a fresh database each run.
Peak memory is the replay process's own maximum resident set size (wait4), its CPU time the
user + system time it used: CPU / wall time is the share of the core it kept busy (and, from
/proc, the cores influxd kept busy meanwhile).

With --before DIR (a tree of older code, e.g. `git archive <commit> | tar -x -C DIR`), each
measurement runs that code and this tree's alternately, --runs times each, and prints the
medians and their ratio: the same machine, the same minutes, the same file.

Run: python bench/trips.py [--trips 1000000] [--runs 1] [--before DIR] [--csv PATH]
                           [--no-influxdb]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import InfluxD, process_cpu_secs

ROOT = Path(__file__).resolve().parents[1]


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


@dataclass
class Run:
    secs: float
    cpu_secs: float
    peak_mb: float


def replay(tree: Path, args: list[str], config: Path) -> Run:
    """One `collector replay trips` process running the code in ``tree``."""
    command = [sys.executable, "-m", "collector.cli", "replay", "trips", *args, "--config"]
    command.append(str(config))
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        # wait4: this process's own peak RSS and CPU time (RUSAGE_CHILDREN keeps the largest
        # peak of all children so far, which alternating runs would mix up).
        _pid, status, usage = os.wait4(proc.pid, 0)
        secs = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            stderr.seek(0)
            raise SystemExit(stderr.read()[-2000:].decode(errors="replace"))
    return Run(secs, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def _cpu_secs(server: InfluxD) -> float:
    """The server's CPU time so far (Linux's /proc), -inf when it cannot be read."""
    try:
        assert server.proc is not None
        return process_cpu_secs(server.proc.pid)
    except (OSError, AssertionError):
        return float("-inf")


def report(label: str, trips: int, run: Run, extra: str = "") -> None:
    rate = trips / run.secs
    print(
        f"  {label}: {run.secs:.2f} s = {rate:,.0f} trips/s = {rate * 60 / 1e6:.2f} M trips/min; "
        f"peak RSS {run.peak_mb:.0f} MB; CPU {run.cpu_secs:.2f} s ({run.cpu_secs / run.secs:.2f} "
        f"of a core){extra}",
        flush=True,
    )


def summary(name: str, trips: int, runs: dict[str, list[Run]]) -> None:
    medians = {label: statistics.median(r.secs for r in rs) for label, rs in runs.items()}
    for label, secs in medians.items():
        peak = max(r.peak_mb for r in runs[label])
        rate = trips / secs
        print(
            f"{name}, {label}: median {secs:.2f} s = {rate:,.0f} trips/s = "
            f"{rate * 60 / 1e6:.2f} M trips/min over {len(runs[label])} runs; "
            f"peak RSS at most {peak:.0f} MB"
        )
    if "before" in medians:
        print(
            f"{name}: after / before throughput (medians) = "
            f"{medians['before'] / medians['after']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trips", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1, help="runs of each measurement")
    parser.add_argument("--before", type=Path, help="a tree of older code, run alternately")
    parser.add_argument("--csv", type=Path, help="the trip file: reused when it exists")
    parser.add_argument("--no-influxdb", action="store_true", help="the null sink only")
    args = parser.parse_args()
    trees = {"after": ROOT}
    if args.before is not None:
        trees = {"before": args.before.resolve(), "after": ROOT}
    work = Path(tempfile.mkdtemp(prefix="bench-trips-"))
    path = args.csv or work / "trips.csv"
    if not path.exists():
        started = time.perf_counter()
        generate(path, args.trips)
        print(f"generated {args.trips:,} trips in {time.perf_counter() - started:.0f} s")
    print(f"{path}: {args.trips:,} trips, {path.stat().st_size / 1e6:.0f} MB")
    config = work / "c.toml"
    config.write_text("[spool]\nenabled = false\n")
    null: dict[str, list[Run]] = {label: [] for label in trees}
    print("null sink (--dry-run to /dev/null), one core:")
    for _ in range(args.runs):
        for label, tree in trees.items():
            run = replay(tree, [str(path), "--dry-run"], config)
            null[label].append(run)
            report(label, args.trips, run)
    summary("null sink", args.trips, null)
    if args.no_influxdb:
        shutil.rmtree(work, ignore_errors=True)
        return

    server = InfluxD(work / "influxd")
    (work / "influxd").mkdir()
    server.start()
    try:
        # The trips database keeps everything by default: a 2021 month fits as it is.
        config.write_text(f'[influxdb]\nurl = "{server.url}"\napi = "v1"\ntimeout_secs = 60\n')
        into: dict[str, list[Run]] = {label: [] for label in trees}
        print("real InfluxDB 1.x (a fresh database each run), the replay on one core:")
        for _ in range(args.runs):
            for label, tree in trees.items():
                server.drop("trips")
                subprocess.run(
                    [sys.executable, "-m", "collector.cli", "setup", "--config", str(config)],
                    check=True,
                    capture_output=True,
                    cwd=ROOT,
                )
                server_cpu = _cpu_secs(server)
                run = replay(tree, [str(path)], config)
                server_cpu = _cpu_secs(server) - server_cpu
                (row,) = server.query('SELECT sum("undocks") AS u FROM "station_flow"', "trips")
                into[label].append(run)
                server_cores = f"{server_cpu / run.secs:.2f} cores" if server_cpu >= 0 else "?"
                report(label, args.trips, run, f"; influxd {server_cores}; stored {row['u']:,}")
        summary("real InfluxDB 1.x", args.trips, into)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
