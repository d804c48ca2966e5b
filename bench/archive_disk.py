"""Disk cost of the raw archive per bike-share system and per patient, per day.

Runs what a user runs: ``collector simulate gbfs`` (a 300-station city), ``collector simulate
pressure`` (six patients) and ``collector run --dry-run`` with ``[archive] dir`` set and the
default cadences (a system every 15 s, each patient every 0.3 s), for ``--secs`` of wall time,
then SIGTERM. The archive files are measured and extrapolated to a day:

- pressure: bytes x 86,400 / seconds run (a steady stream);
- GBFS: each hour is its own gzip file that starts with the hourly station_information (and
  vehicle_types); their cost is measured by compressing those responses alone, and the rest
  (station_status polls) is scaled to the polls of an hour. A day is 24 such hours (the
  one-time gbfs.json is left out).

Then the archive is replayed (``collector replay archive``) into a real InfluxDB 1.x (Debian's
influxd, started here on a free port): wall time of the command, points written per second.

Run: python bench/archive_disk.py [--secs 300]
"""

from __future__ import annotations

import argparse
import gzip
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.archive import Reader, list_files
from tests.support import InfluxD, free_port, wait_for

CLI = [sys.executable, "-m", "collector.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--secs", type=float, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gbfs_port, pressure_port = free_port(), free_port()
        sims = [
            subprocess.Popen([*CLI, "simulate", api, "--port", str(port)], stderr=subprocess.PIPE)
            for api, port in (("gbfs", gbfs_port), ("pressure", pressure_port))
        ]
        try:
            config = work / "collector.toml"
            config.write_text(
                f'[archive]\ndir = "{work / "archive"}"\n\n'
                f'[[gbfs.systems]]\nname = "simcity"\n'
                f'url = "http://127.0.0.1:{gbfs_port}/gbfs.json"\n\n'
                f'[pressure]\nurl = "http://127.0.0.1:{pressure_port}"\n'
            )
            import requests

            for port in (gbfs_port, pressure_port):
                wait_for(
                    lambda port=port: _up(requests, port), timeout=30, what=f"simulator :{port}"
                )
            run = subprocess.Popen(
                [*CLI, "run", "--dry-run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started = time.monotonic()
            time.sleep(args.secs)  # the measurement is of a run this long
            run.send_signal(signal.SIGTERM)
            run.wait(timeout=30)
            elapsed = time.monotonic() - started
        finally:
            for sim in sims:
                sim.terminate()
                sim.wait()
        report(work / "archive", elapsed)
        replay(work)


def _up(requests: object, port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/1", timeout=1)  # type: ignore[attr-defined]  # the requests module, passed in
    except Exception:
        return False
    return True


def report(directory: Path, elapsed: float) -> None:
    files = list_files(directory)
    gbfs_bytes = sum(e.path.stat().st_size for e in files if e.kind == "gbfs")
    records = [r for e in files if e.kind == "gbfs" for r in Reader(e.path)]
    polls = sum(r.feed == "station_status" for r in records)
    hourly = [r for r in records if r.feed in ("discovery", "station_information", "vehicle_types")]
    hourly_bytes = len(gzip.compress(b"".join(r.body for r in hourly), 6))
    per_poll = (gbfs_bytes - hourly_bytes) / polls
    polls_per_hour = 3600 / 15
    gbfs_day = 24 * (hourly_bytes + per_poll * polls_per_hour)
    raw_status = sum(len(r.body) for r in records if r.feed == "station_status") / polls

    patients = sorted({e.source for e in files if e.kind == "pressure"})
    pressure_bytes = sum(e.path.stat().st_size for e in files if e.kind == "pressure")
    readings = sum(1 for e in files if e.kind == "pressure" for _ in Reader(e.path))
    pressure_day = pressure_bytes * 86_400 / elapsed / len(patients)

    print(f"ran {elapsed:.0f} s")
    print(
        f"gbfs (300 stations): {polls} status polls, {raw_status / 1024:.1f} KiB raw each, "
        f"{per_poll / 1024:.2f} KiB archived each; hourly feeds {hourly_bytes / 1024:.1f} KiB"
    )
    print(f"  per system per day: {gbfs_day / 1024**2:.1f} MiB (extrapolated, 240 polls/h)")
    print(
        f"pressure: {readings} readings from {len(patients)} patients, "
        f"{pressure_bytes / readings:.0f} bytes archived each"
    )
    print(f"  per patient per day: {pressure_day / 1024**2:.1f} MiB (extrapolated)")


def replay(work: Path) -> None:
    server = InfluxD(work / "influxd")
    (work / "influxd").mkdir()
    server.start()
    try:
        config = work / "replay.toml"
        config.write_text(f'[influxdb]\nurl = "{server.url}"\napi = "v1"\n')
        subprocess.run([*CLI, "setup", "--config", str(config)], check=True, capture_output=True)
        started = time.monotonic()
        done = subprocess.run(
            [*CLI, "replay", "archive", str(work / "archive"), "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
        )
        secs = time.monotonic() - started
    finally:
        server.stop()
    written = int(re.search(r"written=(\d+)", done.stderr)[1])  # type: ignore[index]  # the CLI always logs it
    print(
        f"replay into InfluxDB 1.x: {written} points in {secs:.1f} s "
        f"(start-up included): {written / secs:,.0f} points/s"
    )


if __name__ == "__main__":
    main()
