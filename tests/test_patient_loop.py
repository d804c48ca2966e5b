"""Patients on the scheduler's event loop: their slots, one poll at a time, and shutdown."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from collector import settings as settings_module
from collector.jobs import build_jobs
from collector.scheduler import FETCH_GRACE_SECS, Scheduler
from collector.simulators.pressure import PressureSimulator
from collector.simulators.serve import Background
from collector.sinks.base import Fatal
from collector.telemetry import Counters
from tests.support import MemorySink, wait_for


def _config(tmp_path: Path, url: str, patients: Iterable[int], interval_secs: float) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[pressure]\nurl = "{url}"\npatients = {list(patients)}\n'
        f"interval_secs = {interval_secs}\ntimeout_secs = 30\nflush_interval_secs = 0.1\n"
    )
    return path


def _readings_of(sink: MemorySink, patient: int) -> int:
    return len(sink.lines(f"pressure,foot=left,patient_id={patient},sensor=L0 "))


class _Watched:
    """The simulator, with each patient's requests timed and counted in flight (and their
    peak); ``slow_first`` delays a path's first answer."""

    def __init__(self, app: PressureSimulator, slow_first: dict[str, float] | None = None) -> None:
        self._app = app
        self._slow_first = dict(slow_first or {})  # path -> delay of its first answer
        self.arrivals: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.served: Counter[str] = Counter()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ["PATH_INFO"]
        with self._lock:
            self.in_flight[path] += 1
            self.peak[path] = max(self.peak[path], self.in_flight[path])
            self.arrivals.setdefault(path, []).append(time.monotonic())
            delay = self._slow_first.pop(path, 0.0)
        try:
            time.sleep(delay)  # the slow answer itself, not a wait for anything
            return list(self._app(environ, start_response))
        finally:
            with self._lock:
                self.in_flight[path] -= 1
                self.served[path] += 1


def test_patients_slots_are_spread_evenly_over_the_interval(tmp_path: Path) -> None:
    # A burst of every patient at the same instant made the API answer the last of 400 after
    # their next slot; spread, it sees a steady rate.
    path = _config(tmp_path, "http://127.0.0.1:9", [4, 8, 15, 16], 0.4)
    patients = build_jobs(
        settings_module.load(path), MemorySink(), Counters(), Fatal(), once=True
    ).patients
    first = patients[0].start_secs
    assert [round(job.start_secs - first, 6) for job in patients] == [0.0, 0.1, 0.2, 0.3]
    assert [job.cadence.interval_secs for job in patients] == [0.4] * 4


def test_a_poll_longer_than_its_interval_is_never_doubled_and_skips_missed_slots(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collector.jobs")
    # Patient 2's first answer takes 1.1 s, polled every 0.2 s: no second poll while it is
    # in flight, and the five slots missed meanwhile are skipped, not made up in a burst.
    watched = _Watched(PressureSimulator(2), slow_first={"/2": 1.1})
    with Background(watched) as url:
        collector = Scheduler.from_settings(
            settings_module.load(_config(tmp_path, url, [1, 2], 0.2)), MemorySink()
        )
        stop = threading.Event()
        runner = threading.Thread(target=collector.run, args=(stop,))
        runner.start()
        try:
            wait_for(lambda: watched.served["/2"] >= 6, timeout=20, what="6 answers")
        finally:
            stop.set()
            runner.join(timeout=15)
    assert not runner.is_alive()
    assert watched.peak["/2"] == 1 and watched.peak["/1"] == 1
    arrivals = watched.arrivals["/2"]
    # Made up, the missed slots would come back to back, milliseconds apart. Skipped, any
    # three polls span two slots (0.4 s), less what a loaded machine delays one arrival by.
    spans = [arrivals[i + 2] - arrivals[i] for i in range(1, len(arrivals) - 2)]
    assert spans and min(spans) > 0.15, spans
    # The late poll shows in the INFO line that sums up the patients (written at the stop).
    late = [r.late for r in caplog.records if r.getMessage() == "patients"]  # type: ignore[attr-defined]  # fields set by logs.event
    assert sum(late) == collector.counters.get("patient-2", "schedule", "late") + (
        collector.counters.get("patient-1", "schedule", "late")
    )
    assert sum(late) >= 1
    assert collector.counters.get("patient-2", "schedule", "late") >= 1


def test_a_hanging_patient_is_cut_at_shutdown_and_what_was_fetched_is_kept(
    tmp_path: Path,
) -> None:
    watched = _Watched(PressureSimulator(3, slow_patients={2: 60.0}))
    with Background(watched) as url:
        sink = MemorySink()
        collector = Scheduler.from_settings(
            settings_module.load(_config(tmp_path, url, [1, 2, 3], 0.2)), sink
        )
        stop = threading.Event()
        runner = threading.Thread(target=collector.run, args=(stop,))
        runner.start()
        try:
            wait_for(
                lambda: (
                    min(_readings_of(sink, 1), _readings_of(sink, 3)) >= 5
                    and watched.in_flight["/2"] == 1
                ),
                timeout=20,
                what="readings of 1 and 3 while 2 hangs",
            )
        finally:
            asked = time.monotonic()
            stop.set()
            runner.join(timeout=15)
        took = time.monotonic() - asked
    assert not runner.is_alive()
    # The hanging fetch held the stop for the grace only, not its 30 s timeout.
    assert FETCH_GRACE_SECS <= took < FETCH_GRACE_SECS + 3
    counters = collector.counters
    assert counters.get("patient-2", "fetch", "cancelled") == 1
    assert counters.get("patient-2", "fetch", "ok") == 0
    for patient in (1, 3):
        # Every reading fetched, up to the last poll the stop let finish, was written.
        fetched = counters.get(f"patient-{patient}", "fetch", "ok")
        assert fetched >= 5
        assert _readings_of(sink, patient) == fetched


@pytest.mark.parametrize("patients", [0, 1])
def test_run_once_polls_each_patient_once(tmp_path: Path, patients: int) -> None:
    watched = _Watched(PressureSimulator(3))
    with Background(watched) as url:
        ids = list(range(1, patients + 1))
        path = _config(tmp_path, url, ids, 0.3)
        sink = MemorySink()
        collector = Scheduler.from_settings(settings_module.load(path), sink, once=True)
        summaries = collector.run_once()
        collector.close()
    assert [s.source for s in summaries] == [f"patient-{i}" for i in ids]
    assert all(s.ok and s.written == 6 for s in summaries)
    assert sorted(watched.served) == [f"/{i}" for i in ids]
    assert all(n == 1 for n in watched.served.values())
