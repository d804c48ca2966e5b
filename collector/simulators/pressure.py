"""A stand-in for the foot-pressure insole API: ``GET /{patient_id}`` for six patients.

Answers in exactly the API's JSON (personal fields included, ``id`` always 12 as the original
does) from a gait model built on REFERENCE.md section 3 and calibrated on public recordings:

- walking: each foot in stance for 60% of its stride, swing 40%; the right foot half a stride
  behind, so two double-support phases of 10%. In stance the heel loads and saturates first,
  the front loads next, saturates and unloads last at toe-off; the middle reaches 40-90% of
  full scale. In swing all three sit at the patient's baseline (5-100) plus noise. Strides of
  1.0-1.25 s, 1.3-1.6 s for disabled walkers;
- standing (both feet loaded, heel heavy) and sitting (flat 120-240);
- each patient has an activity mix (patient 3, like the recording, mostly sits);
- anomaly runs of 12-99 s, all six sensors flagged, at ``anomaly_runs_per_hour``;
- a new sample ``sample_hz`` times a second; polling faster returns the same sample.

Everything is a pure function of (seed, patient, time), so a seed gives the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from collector.contract import SENSOR_MAX, SENSORS

FULL = SENSOR_MAX


@dataclass(frozen=True)
class Patient:
    id: int
    firstname: str
    lastname: str
    birthdate: str
    disabled: bool
    trace_name: str
    # Share of time walking, standing, sitting.
    activity_mix: tuple[float, float, float]


# Names as in the original API (REFERENCE.md section 3); birth years are invented.
PATIENTS: tuple[Patient, ...] = (
    Patient(1, "Janek", "Grzegorczyk", "1982", False, "bach", (0.65, 0.30, 0.05)),
    Patient(2, "Elżbieta", "Kochalska", "1976", True, "ela", (0.55, 0.25, 0.20)),
    Patient(3, "Albert", "Lisowski", "1990", False, "albert", (0.04, 0.04, 0.92)),
    Patient(4, "Ewelina", "Nosowska", "1969", True, "ewelina", (0.45, 0.30, 0.25)),
    Patient(5, "Piotr", "Fokalski", "1985", False, "piotr", (0.70, 0.20, 0.10)),
    Patient(6, "Bartosz", "Moskalski", "1995", False, "bartosz", (0.75, 0.15, 0.10)),
)

WALKING, STANDING, SITTING = "walking", "standing", "sitting"


def _unit(*key: object) -> float:
    """A deterministic number in [0, 1) from ``key``: noise that is the same on every run."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _ramp(x: float, start: float, end: float) -> float:
    """0 before ``start``, 1 after ``end``, smooth in between."""
    if x <= start:
        return 0.0
    if x >= end:
        return 1.0
    u = (x - start) / (end - start)
    return u * u * (3 - 2 * u)


class PatientModel:
    """One patient's gait over time; ``t`` is seconds since the simulator's ``epoch``."""

    def __init__(self, patient: Patient, seed: int, anomaly_runs_per_hour: float) -> None:
        self.patient = patient
        self.seed = seed
        rng = random.Random(f"{seed}:{patient.id}")
        self.baseline = tuple(rng.randint(5, 100) for _ in SENSORS)
        low, high = (1.3, 1.6) if patient.disabled else (1.0, 1.25)
        self.stride_secs = rng.uniform(low, high)
        self.middle_peak = (rng.uniform(0.4, 0.9) * FULL, rng.uniform(0.4, 0.9) * FULL)
        self.sitting_level = tuple(rng.randint(120, 240) for _ in SENSORS)
        self._rng = rng
        self._anomaly_rate = anomaly_runs_per_hour / 3600.0
        # Segments are generated forward in time from the seed as far as asked for.
        self._activity_starts: list[float] = [0.0]
        self._activities: list[str] = [self._next_activity()]
        self._anomaly_runs: list[tuple[float, float]] = []
        self._anomaly_horizon = 0.0
        self._lock = threading.Lock()

    def _next_activity(self) -> str:
        walking, standing, _sitting = self.patient.activity_mix
        u = self._rng.random()
        return WALKING if u < walking else STANDING if u < walking + standing else SITTING

    def activity(self, t: float) -> str:
        with self._lock:
            while self._activity_starts[-1] <= t:
                self._activity_starts.append(self._activity_starts[-1] + self._rng.uniform(20, 180))
                self._activities.append(self._next_activity())
            if len(self._activity_starts) > 512:  # a simulator runs for months: forget the past
                del self._activity_starts[:256], self._activities[:256]
            return self._activities[bisect_right(self._activity_starts, t) - 1]

    def anomalous(self, t: float) -> bool:
        with self._lock:
            while self._anomaly_horizon <= t:
                gap = (
                    -math.log(1.0 - self._rng.random()) / self._anomaly_rate
                    if self._anomaly_rate
                    else math.inf
                )
                start = self._anomaly_horizon + gap
                if math.isinf(start):
                    self._anomaly_horizon = math.inf
                    break
                length = self._rng.uniform(12, 99)
                self._anomaly_runs.append((start, start + length))
                self._anomaly_horizon = start + length
            if len(self._anomaly_runs) > 512:
                del self._anomaly_runs[:256]
            index = bisect_right(self._anomaly_runs, (t, math.inf)) - 1
            return index >= 0 and self._anomaly_runs[index][0] <= t < self._anomaly_runs[index][1]

    def _foot(self, phase: float, side: int, k: int) -> tuple[float, float, float]:
        """(front, middle, heel) load for one foot at ``phase`` of its stride."""
        if phase >= 0.6:  # swing
            return (0.0, 0.0, 0.0)
        heel = _ramp(phase, 0.0, 0.04) * (1 - _ramp(phase, 0.32, 0.42))
        middle = _ramp(phase, 0.08, 0.2) * (1 - _ramp(phase, 0.42, 0.55))
        front = _ramp(phase, 0.14, 0.22) * (1 - _ramp(phase, 0.57, 0.6))
        wobble = 0.9 + 0.3 * _unit(self.seed, self.patient.id, k, side, "w")
        return (front * 1.6 * wobble, middle * self.middle_peak[side] / FULL, heel * 1.6 * wobble)

    def sample(self, t: float, k: int) -> tuple[list[int], list[bool]]:
        """Six values and flags at time ``t`` (seconds), sample number ``k``."""
        activity = self.activity(t)
        loads: list[float]
        if activity == WALKING:
            phase = (t / self.stride_secs) % 1.0
            loads = [*self._foot(phase, 0, k), *self._foot((phase + 0.5) % 1.0, 1, k)]
        elif activity == STANDING:
            # Both feet loaded, heel and front at or near saturation, middle partial.
            sway = [0.8 + 0.4 * _unit(self.seed, self.patient.id, k, i, "s") for i in range(6)]
            loads = [1.15 * sway[0], 0.3 * sway[1], 1.15 * sway[2]]
            loads += [1.15 * sway[3], 0.3 * sway[4], 1.15 * sway[5]]
        else:
            loads = [-1.0] * 6  # sitting: flat, handled below
        values = []
        for i, load in enumerate(loads):
            noise = _unit(self.seed, self.patient.id, k, i, "n")
            if load < 0:
                value = self.sitting_level[i] + int(noise * 20) - 10
            else:
                value = self.baseline[i] + int(noise * 8) + int(load * FULL)
            values.append(max(0, min(FULL, value)))
        flagged = self.anomalous(t)
        return values, [flagged] * 6


class PressureSimulator:
    """The API as a WSGI app. ``clock`` gives wall time; ``served`` records what was answered."""

    def __init__(
        self,
        seed: int = 0,
        *,
        sample_hz: float = 3.0,
        anomaly_runs_per_hour: float = 6.0,
        clock: Callable[[], float] = time.time,
        epoch: float | None = None,
        slow_patients: dict[int, float] | None = None,
        record: bool = False,
        patients: int = len(PATIENTS),
    ) -> None:
        # A negative rate would make the anomaly schedule search forward for ever.
        if not (math.isfinite(anomaly_runs_per_hour) and anomaly_runs_per_hour >= 0):
            raise ValueError(f"anomaly_runs_per_hour must be >= 0, not {anomaly_runs_per_hour}")
        if patients < 1:
            raise ValueError(f"patients must be at least 1, not {patients}")
        # Beyond the original six (for load tests), ids reuse their profiles in turn.
        people = [
            dataclasses.replace(PATIENTS[(i - 1) % len(PATIENTS)], id=i)
            for i in range(1, patients + 1)
        ]
        self.models = {p.id: PatientModel(p, seed, anomaly_runs_per_hour) for p in people}
        self.sample_hz = sample_hz
        self.clock = clock
        # The model's time starts here: the same seed gives the same walk from the start on.
        self.epoch = clock() if epoch is None else epoch
        self.slow_patients = slow_patients or {}
        self.record = record
        self.served: list[tuple[int, dict[str, Any]]] = []
        self._served_lock = threading.Lock()

    def response(self, patient_id: int, now: float | None = None) -> dict[str, Any]:
        model = self.models[patient_id]
        now = self.clock() if now is None else now
        k = math.floor((now - self.epoch) * self.sample_hz)
        t = k / self.sample_hz
        values, flags = model.sample(t, k)
        moment = datetime.fromtimestamp(self.epoch + t, UTC)
        patient = model.patient
        return {
            "birthdate": patient.birthdate,
            "disabled": patient.disabled,
            "firstname": patient.firstname,
            "id": 12,
            "lastname": patient.lastname,
            "trace": {
                "id": int(moment.strftime("%H%M%S%d%m%Y")),
                "name": patient.trace_name,
                "sensors": [
                    {"anomaly": flags[i], "id": i, "name": SENSORS[i], "value": values[i]}
                    for i in range(len(SENSORS))
                ],
            },
        }

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/").strip("/")
        if not path.isdigit() or int(path) not in self.models:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"detail": "Not Found"}']
        patient_id = int(path)
        delay = self.slow_patients.get(patient_id)
        if delay:
            time.sleep(delay)  # a slow patient, as tests ask for
        body = self.response(patient_id)
        if self.record:
            with self._served_lock:
                self.served.append((patient_id, body))
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        )
        return [payload]
