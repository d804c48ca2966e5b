"""Pressure simulator -> collector (a real process) -> real InfluxDB 1.x, stopped with SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from collector import settings as settings_module
from collector.contract import SENSORS
from collector.scheduler import Scheduler
from collector.simulators.pressure import PressureSimulator
from collector.simulators.serve import Background
from tests.support import InfluxD, MemorySink, run_until_sigterm, wait_for

PATIENTS = (1, 2, 3, 5)


def _readings(
    influxd: InfluxD, db: str, measurement: str
) -> dict[str, dict[int, dict[str, tuple]]]:
    """patient -> time -> sensor -> (value, anomaly), straight from the server."""
    found: dict[str, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
    q = f'SELECT "value", "anomaly", "sensor", "patient_id", "foot" FROM "{measurement}"'
    for row in influxd.query(q, db, epoch="ms"):
        found[row["patient_id"]][row["time"]][row["sensor"]] = (
            row["value"],
            row["anomaly"],
            row["foot"],
        )
    return found


@pytest.mark.influxdb
def test_every_served_sample_is_stored_and_anomalies_kept(tmp_path: Path, influxd: InfluxD) -> None:
    # An anomaly run starts about every second on average, so a short run sees some.
    sim = PressureSimulator(11, anomaly_runs_per_hour=3600, record=True)
    for db in ("pressure", "anomalies"):
        influxd.query(f'DROP DATABASE "{db}"')
    with Background(sim) as url:
        config = tmp_path / "c.toml"
        config.write_text(
            f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\n\n'
            f'[pressure]\nurl = "{url}"\npatients = {list(PATIENTS)}\ninterval_secs = 0.1\n'
            "flush_interval_secs = 0.5\n"
        )
        cli = [sys.executable, "-m", "collector.cli"]
        subprocess.run([*cli, "setup", "--config", str(config)], check=True, capture_output=True)
        # Run until every patient has had 20 responses served, then stop it.
        run_until_sigterm(
            config,
            lambda: all(sum(1 for p, _ in sim.served if p == pid) >= 20 for pid in PATIENTS),
            what="20 readings per patient",
        )

    served: dict[str, list[dict[str, tuple]]] = defaultdict(list)
    for patient, body in sim.served:
        served[str(patient)].append(
            {s["name"]: (s["value"], s["anomaly"]) for s in body["trace"]["sensors"]}
        )
    stored = _readings(influxd, "pressure", "pressure")
    anomalies = _readings(influxd, "anomalies", "anomaly")
    flagged = 0
    for patient in map(str, PATIENTS):
        times = sorted(stored[patient])
        # One point per sensor per served reading: none lost, none overwritten by another.
        assert len(times) == len(served[patient]), patient
        for time_ms, sent in zip(times, served[patient], strict=True):
            got = stored[patient][time_ms]
            assert set(got) == set(SENSORS)
            assert {s: v[:2] for s, v in got.items()} == sent
            assert {v[2] for s, v in got.items() if s.startswith("L")} == {"left"}
            flagged_here = {s: v for s, v in got.items() if v[1]}
            assert anomalies[patient].get(time_ms, {}) == flagged_here
            flagged += len(flagged_here)
    assert flagged > 0, "no anomaly was served: the anomaly check proved nothing"
    # No personal data by default.
    assert not influxd.query('SHOW MEASUREMENTS WITH MEASUREMENT = "patient"', "pressure")


def _readings_of(sink: MemorySink, patient: int) -> int:
    return len(sink.lines(f"pressure,foot=left,patient_id={patient},sensor=L0 "))


def test_a_slow_patient_does_not_slow_the_others(tmp_path: Path) -> None:
    sim = PressureSimulator(3, slow_patients={2: 2.0})
    with Background(sim) as url:
        path = tmp_path / "c.toml"
        path.write_text(
            f'[pressure]\nurl = "{url}"\npatients = [1, 2, 3]\ninterval_secs = 0.3\n'
            "timeout_secs = 5\nflush_interval_secs = 0.2\n"
        )
        sink = MemorySink()
        collector = Scheduler.from_settings(settings_module.load(path), sink)
        stop = threading.Event()
        runner = threading.Thread(target=collector.run, args=(stop,))
        runner.start()
        try:
            wait_for(
                lambda: min(_readings_of(sink, 1), _readings_of(sink, 3)) >= 10,
                timeout=20,
                what="10 readings",
            )
        finally:
            stop.set()
            runner.join(timeout=15)
    counters = collector.counters
    for fast in ("patient-1", "patient-3"):
        on_time = counters.get(fast, "schedule", "on_time")
        late = counters.get(fast, "schedule", "late")
        assert on_time >= 10 and late <= 1, (fast, on_time, late)
    # The slow one answered at most twice in that time, and its lateness is its own.
    assert _readings_of(sink, 2) <= 2
    assert counters.get("patient-2", "schedule", "late") <= 2
