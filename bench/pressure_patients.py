"""How many patients one collector sustains at 0.3 s, and its CPU per 1,000 readings.

The pressure simulator runs in its own process (``collector simulate pressure``), as it would
in production on another machine; the collector runs here, in this process, with a sink that
encodes and counts but does not send (the database is not what is measured). For each patient
count, the collector runs ``--secs`` seconds and reports:

- on time: polls that finished within one interval of their scheduled slot, over all slots
  scheduled in that time (a skipped slot counts as missed);
- readings per second, and this process's CPU seconds (all threads) per 1,000 readings.

Run: python bench/pressure_patients.py [--patients 25,50,100,150] [--secs 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from collector import logs
from collector.contract import Precision
from collector.jobs import PatientJob
from collector.scheduler import Scheduler
from collector.settings import PressureSettings, Settings
from collector.sinks.base import SinkMetrics, WriteReport

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import free_port, process_cpu_secs


class NullSink:
    def __init__(self) -> None:
        self.lines = 0

    def write(self, bucket: str, lines: Sequence[str], precision: Precision) -> WriteReport:
        self.lines += len(lines)
        return WriteReport(written=len(lines))

    def metrics(self) -> SinkMetrics:
        return SinkMetrics()

    def stop_retrying(self) -> None:
        pass

    def close(self) -> None:
        pass


def measure(
    url: str, patients: int, secs: float, interval: float, simulator_pid: int
) -> dict[str, float]:
    settings = Settings(
        pressure=PressureSettings(
            url=url, patients=list(range(1, patients + 1)), interval_secs=interval
        )
    )
    sink = NullSink()
    collector = Scheduler.from_settings(settings, sink)
    stop = threading.Event()
    runner = threading.Thread(target=collector.run, args=(stop,))
    cpu0, wall0 = time.process_time(), time.monotonic()
    sim0 = process_cpu_secs(simulator_pid)
    runner.start()
    time.sleep(secs)  # the measured window itself, not a wait for anything
    stopped_at = time.time()
    stop.set()
    runner.join()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    simulator_cpu = process_cpu_secs(simulator_pid) - sim0
    counts = collector.counters.snapshot()
    on_time = sum(
        n for (_, stage, result), n in counts.items() if (stage, result) == ("schedule", "on_time")
    )
    readings = sum(
        n for (_, stage, result), n in counts.items() if (stage, result) == ("fetch", "ok")
    )
    failed = sum(
        n
        for (_, stage, result), n in counts.items()
        if stage in ("fetch", "parse") and result != "ok"
    )
    # Every slot scheduled before polling stopped; each is either done on time or not.
    slots = sum(
        job.cadence.slots(stopped_at) for job in collector.jobs if isinstance(job, PatientJob)
    )
    return {
        "patients": patients,
        "slots": slots,
        "on_time": on_time / slots if slots else 0.0,
        "readings_per_sec": readings / wall,
        "failed": failed,
        "cpu_per_1000": 1000 * cpu / readings if readings else float("nan"),
        "cpu_share": cpu / wall,
        "simulator_share": simulator_cpu / wall,
        "lines": sink.lines,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", default="25,50,100,150")
    parser.add_argument("--secs", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.3)
    args = parser.parse_args()
    logs.configure("ERROR")
    counts = [int(n) for n in args.patients.split(",")]

    port = free_port()
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "collector.cli",
            "simulate",
            "pressure",
            "--port",
            str(port),
            "--patients",
            str(max(counts)),
        ],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"{url}/1", timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        print(
            f"pressure collector at {args.interval} s against the local simulator "
            f"(separate process), {args.secs:g} s per row, {os.cpu_count()} cores"
        )
        print(
            f"{'patients':>8} {'slots':>7} {'on time':>8} {'readings/s':>11} {'failed':>7} "
            f"{'CPU s/1000 readings':>20} {'CPU share':>10} {'simulator CPU':>14}"
        )
        for n in counts:
            r = measure(url, n, args.secs, args.interval, simulator.pid)
            print(
                f"{r['patients']:8d} {r['slots']:7d} {r['on_time']:8.2%} "
                f"{r['readings_per_sec']:11.1f} {r['failed']:7d} "
                f"{r['cpu_per_1000']:20.3f} {r['cpu_share']:10.0%} {r['simulator_share']:14.0%}"
            )
    finally:
        simulator.terminate()
        simulator.wait(10)


if __name__ == "__main__":
    main()
