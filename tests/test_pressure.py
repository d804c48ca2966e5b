"""Foot-pressure parsing, personal data, and the simulators (no database needed here)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import requests

from collector.contract import ANOMALY, PATIENT, PRESSURE, SENSORS
from collector.lineprotocol import Encoder
from collector.retry import Failure
from collector.simulators.gbfs import GbfsSimulator
from collector.simulators.pressure import PressureSimulator
from collector.simulators.serve import Background
from collector.sources import gbfs, pressure

# ------------------------------------------------------------------ recorded real responses


def _kubek(shared: Path) -> list[dict[str, str]]:
    with (shared / "pressure" / "MikolajKubek_PPDV_data_2021-01-03.csv").open(
        encoding="utf-8"
    ) as f:
        return list(csv.DictReader(f))


def _response(row: dict[str, str]) -> bytes:
    """The API's JSON, rebuilt from one recorded row (personal fields included)."""
    return json.dumps(
        {
            "birthdate": row["birthdate"],
            "disabled": row["disabled"] == "True",
            "firstname": row["firstname"],
            "id": int(row["id"]),
            "lastname": row["lastname"],
            "trace": {
                "id": int(row["trace_id"]),
                "name": row["trace_name"],
                "sensors": [
                    {
                        "id": i,
                        "value": int(row[f"{s}_value"]),
                        "anomaly": row[f"{s}_anomaly"] == "True",
                    }
                    for i, s in enumerate(SENSORS)
                ],
            },
        },
        ensure_ascii=False,
    ).encode()


def test_recorded_responses_give_exact_points_and_no_personal_data(shared_fixtures: Path) -> None:
    recorded = _kubek(shared_fixtures)
    assert len(recorded) == 30
    encoder, anomaly_encoder = Encoder(PRESSURE), Encoder(ANOMALY)
    flagged_total = 0
    for n, row in enumerate(recorded):
        patient = int(row["patient_id"])
        time_ms = 1_609_706_871_978 + n
        reading = pressure.parse_reading(_response(row), patient, time_ms)
        assert reading.person is None
        pressure_rows, anomaly_rows = pressure.rows(reading)
        lines, empty = encoder.lines(pressure_rows)
        assert empty == 0
        expected = []
        for s in SENSORS:
            foot = "left" if s[0] == "L" else "right"
            flag = "true" if row[f"{s}_anomaly"] == "True" else "false"
            expected.append(
                f"pressure,foot={foot},patient_id={patient},sensor={s} "
                f"anomaly={flag},value={int(row[f'{s}_value'])}i {time_ms}"
            )
        assert lines == expected
        anomaly_lines, _ = anomaly_encoder.lines(anomaly_rows)
        assert anomaly_lines == [
            line.replace("pressure,", "anomaly,", 1) for line in expected if "anomaly=true" in line
        ]
        flagged_total += len(anomaly_lines)
        for personal in (row["firstname"], row["lastname"]):
            assert all(personal not in line for line in lines + anomaly_lines)
    assert flagged_total > 0  # the recording has flagged sensors: the comparison meant something


def test_personal_data_only_when_asked_and_only_in_patient(shared_fixtures: Path) -> None:
    row = _kubek(shared_fixtures)[1]  # Elżbieta Kochalska, disabled
    reading = pressure.parse_reading(_response(row), 2, 5, keep_person=True)
    assert reading.person == pressure.Person("Elżbieta", "Kochalska", "1976", True)
    assert reading.person is not None
    (line,) = Encoder(PATIENT).lines([pressure.person_row(reading, reading.person)])[0]
    assert line == (
        'patient,patient_id=2 birthdate="1976",disabled=true,'
        'firstname="Elżbieta",lastname="Kochalska" 5'
    )
    assert pressure.parse_reading(_response(row), 2, 5).person is None  # no patient row


def _sensors(**override: object) -> list[dict[str, object]]:
    sensors = [{"id": i, "value": 100 + i, "anomaly": False} for i in range(6)]
    for key, value in override.items():
        index, field = key.split("_", 1)
        sensors[int(index[1:])][field] = value
    return sensors


@pytest.mark.parametrize(
    ("body", "kind", "reason"),
    [
        (b"<html>502</html>", "not_json", "not_json"),
        (b'{"trace": {"sensors": [', "not_json", "not_json"),
        (b'{"firstname": "x"}', "schema", "no_trace"),
        (b'{"trace": {"id": 1}}', "schema", "no_sensors"),
        (json.dumps({"trace": {"sensors": _sensors()[:5]}}).encode(), "schema", "sensor_count"),
        (
            json.dumps({"trace": {"sensors": [*_sensors(), _sensors()[0]]}}).encode(),
            "schema",
            "sensor_count",
        ),
        (
            json.dumps({"trace": {"sensors": _sensors(s2_value=1024)}}).encode(),
            "schema",
            "value_range",
        ),
        (
            json.dumps({"trace": {"sensors": _sensors(s2_value=-1)}}).encode(),
            "schema",
            "value_range",
        ),
        (
            json.dumps({"trace": {"sensors": _sensors(s3_value=12.5)}}).encode(),
            "schema",
            "value_type",
        ),
        (
            json.dumps({"trace": {"sensors": _sensors(s3_value="12")}}).encode(),
            "schema",
            "value_type",
        ),
        (
            json.dumps({"trace": {"sensors": _sensors(s3_value=True)}}).encode(),
            "schema",
            "value_type",
        ),
        (json.dumps({"trace": {"sensors": _sensors(s4_id=3)}}).encode(), "schema", "sensor_id"),
        (json.dumps({"trace": {"sensors": _sensors(s4_id=7)}}).encode(), "schema", "sensor_id"),
        (
            json.dumps({"trace": {"sensors": _sensors(s0_anomaly="no")}}).encode(),
            "schema",
            "anomaly_type",
        ),
    ],
)
def test_bad_responses_are_refused_whole(body: bytes, kind: str, reason: str) -> None:
    with pytest.raises(Failure) as raised:
        pressure.parse_reading(body, 1, 0)
    assert (raised.value.kind, raised.value.reason, raised.value.stage) == (kind, reason, "parse")


def test_boundary_values_are_accepted() -> None:
    body = json.dumps({"trace": {"sensors": _sensors(s0_value=0, s5_value=1023)}}).encode()
    reading = pressure.parse_reading(body, 4, 0)
    assert reading.values == (0, 101, 102, 103, 104, 1023)


# ------------------------------------------------------------------------- pressure simulator


def test_simulator_speaks_the_api_and_is_deterministic() -> None:
    clock = [1_700_000_000.0]
    one = PressureSimulator(7, clock=lambda: clock[0])
    two = PressureSimulator(7, clock=lambda: clock[0])
    other = PressureSimulator(8, clock=lambda: clock[0])
    series = []
    for step in range(40):
        clock[0] = 1_700_000_000.0 + step * 0.37
        first = one.response(3)
        assert first == two.response(3)
        series.append(first)
    assert [r["trace"]["sensors"] for r in series] != [
        other.response(3, now=1_700_000_000.0 + s * 0.37)["trace"]["sensors"] for s in range(40)
    ]
    sample = series[0]
    assert set(sample) == {"birthdate", "disabled", "firstname", "id", "lastname", "trace"}
    assert sample["id"] == 12 and sample["firstname"] == "Albert"
    assert [s["name"] for s in sample["trace"]["sensors"]] == list(SENSORS)
    # The trace id encodes the sample's time: hhmmss + ddmmyyyy.
    assert str(sample["trace"]["id"]).endswith("14112023")
    # Parsed by our own source without complaint.
    pressure.parse_reading(json.dumps(sample).encode(), 3, 0)


def test_simulator_serves_several_samples_a_second_and_404s() -> None:
    with Background(PressureSimulator(1, sample_hz=3.0)) as url:
        assert requests.get(f"{url}/7", timeout=5).status_code == 404
        assert requests.get(f"{url}/abc", timeout=5).status_code == 404
        response = requests.get(f"{url}/1", timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
    sim = PressureSimulator(1, epoch=0.0, clock=lambda: 0.0)
    samples = {json.dumps(sim.response(1, now=t / 10)["trace"]["sensors"]) for t in range(10)}
    assert 2 <= len(samples) <= 4  # polled ten times in one second


def _stats(sim: PressureSimulator, patient: int, hours: float) -> dict[str, object]:
    """Statistics over one sample per second, as the 2024 recording has."""
    samples = []
    for second in range(int(hours * 3600)):
        sensors = sim.response(patient, now=second + 0.5)["trace"]["sensors"]
        samples.append(([s["value"] for s in sensors], [s["anomaly"] for s in sensors]))
    return _summary(samples)


def _summary(samples: list[tuple[list[int], list[bool]]]) -> dict[str, object]:
    n = len(samples)
    values = list(zip(*(v for v, _ in samples), strict=True))
    flags = [f[0] for _, f in samples]
    runs, current = [], 0
    for flag in [*flags, False]:
        if flag:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return {
        "saturated": [sum(1 for x in v if x == 1023) / n for v in values],
        "p5": [sorted(v)[n // 20] for v in values],
        "median": [statistics.median(v) for v in values],
        "left_loaded": sum(1 for v, _ in samples if max(v[:3]) > 200) / n,
        "right_loaded": sum(1 for v, _ in samples if max(v[3:]) > 200) / n,
        "anomaly_share": sum(flags) / n,
        "runs": runs,
        "all_six": all(len(set(f)) == 1 for _, f in samples),
    }


def _recording(shared: Path, patient: str) -> dict[str, object]:
    path = shared / "pressure" / "stasiekq_traces_2024-01_patients_1_3.csv"
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["patient_id"] == patient]
    return _summary(
        [([int(r[s]) for s in SENSORS], [r[f"{s}_anom"] == "1" for s in SENSORS]) for r in rows]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulator_statistics_match_the_recordings(shared_fixtures: Path, seed: int) -> None:
    sim = PressureSimulator(seed, epoch=0.0, clock=lambda: 0.0)
    real_walker, real_sitter = _recording(shared_fixtures, "1"), _recording(shared_fixtures, "3")
    walker, sitter = _stats(sim, 1, 2.0), _stats(sim, 3, 2.0)

    # Patient 1 walks and stands: front and heel saturate about half the time (recording:
    # 0.49-0.57), the middle almost never (0.00-0.04). Tolerance: 0.15 absolute.
    for i in (0, 2, 3, 5):
        assert abs(walker["saturated"][i] - real_walker["saturated"][i]) <= 0.15, (i, walker)
    for i in (1, 4):
        assert walker["saturated"][i] <= real_walker["saturated"][i] + 0.05
    # Each foot loaded (any sensor > 200) about 72% of the time. Tolerance: 0.10.
    for foot in ("left_loaded", "right_loaded"):
        assert abs(walker[foot] - real_walker[foot]) <= 0.10, (foot, walker[foot])
    # Unloaded baseline: 5th percentile within 5-110 (recording: 20-23; REFERENCE: 5-100).
    assert all(5 <= p <= 110 for p in walker["p5"]), walker["p5"]
    # Patient 3 mostly sits: medians 100-300 (recording 131-223), rarely saturated (<= 0.10).
    assert all(100 <= m <= 300 for m in sitter["median"]), sitter["median"]
    assert all(s <= 0.10 for s in sitter["saturated"]), sitter["saturated"]
    assert real_sitter["median"] and all(100 <= m <= 300 for m in real_sitter["median"])
    # Anomalies: all six flagged together, runs of 12-99 s (+-1 s of sampling), 0.5-11% of the
    # samples (recording: runs 12-39 s, 0.6-4.5%).
    for stats in (walker, sitter):
        assert stats["all_six"]
        assert stats["runs"] and all(11 <= r <= 100 for r in stats["runs"]), stats["runs"]
        assert 0.005 <= stats["anomaly_share"] <= 0.11, stats["anomaly_share"]


def test_gait_right_foot_half_a_stride_behind() -> None:
    sim = PressureSimulator(0, epoch=0.0, clock=lambda: 0.0, sample_hz=50)
    model = sim.models[1]
    walking = next(
        t
        for t in range(0, 3600, 5)
        if model.activity(t) == "walking" and model.activity(t + 4) == "walking"
    )
    stride = model.stride_secs
    heel = [
        sim.response(1, now=walking + i / 50)["trace"]["sensors"] for i in range(int(stride * 50))
    ]
    left = [s[2]["value"] for s in heel]
    right = [s[5]["value"] for s in heel]
    # The right heel's curve is the left heel's shifted by half a stride (within a few samples).
    shift = round(stride * 25)
    best = min(
        range(len(left)),
        key=lambda d: sum(abs(left[i] - right[(i + d) % len(right)]) for i in range(len(left))),
    )
    assert abs(best - shift) <= 3, (best, shift)


# ---------------------------------------------------------------------------- GBFS simulator


@pytest.mark.parametrize("version", ["2.3", "3.0"])
def test_gbfs_simulator_is_consistent_and_moves(version: str) -> None:
    clock = [1_700_000_000.0]
    sim = GbfsSimulator(5, stations=120, version=version, clock=lambda: clock[0])
    with Background(sim) as url:
        discovery = gbfs.parse_discovery(requests.get(f"{url}/gbfs.json", timeout=5).content)
        assert discovery.version == version
        catalog = gbfs.parse_station_information(
            requests.get(discovery.feeds["station_information"], timeout=5).content, "sim"
        )
        ebike_types = gbfs.parse_vehicle_types(
            requests.get(discovery.feeds["vehicle_types"], timeout=5).content
        )
        assert ebike_types == {"ebike"}
        snapshots = []
        for hour in (0, 2, 4):
            clock[0] = 1_700_000_000.0 + hour * 3600
            body = requests.get(discovery.feeds["station_status"], timeout=5).content
            snapshots.append(gbfs.parse_station_status(body, "sim", catalog, clock[0], ebike_types))
    capacity = {s.tags[0][1]: s.capacity for s in catalog.stations.values()}
    for snapshot in snapshots:
        assert len(snapshot.rows) == 120
        assert not snapshot.quality  # clean by construction: no fault of any kind
        assert snapshot.last_updated is not None
    for station in sim.stations:
        assert (
            station.bikes + station.disabled + station.docks + station.docks_disabled
            == station.capacity
        )
        assert (
            min(station.bikes, station.docks, station.ebikes) >= 0
            and station.ebikes <= station.bikes
        )
    bikes = [{r[0][0][1]: r[1][0] for r in s.rows} for s in snapshots]
    assert bikes[0] != bikes[1] != bikes[2]  # bikes moved
    assert capacity == {s.id: s.capacity for s in sim.stations}
    assert any(s.bikes == 0 for s in sim.stations) or any(s.docks == 0 for s in sim.stations)
    assert any(not s.installed for s in sim.stations)


def test_gbfs_simulator_is_deterministic() -> None:
    a = GbfsSimulator(9, stations=50, clock=lambda: 1_700_003_600.0, epoch=1_700_000_000.0)
    b = GbfsSimulator(9, stations=50, clock=lambda: 1_700_003_600.0, epoch=1_700_000_000.0)
    assert a.document("station_status", "http://x") == b.document("station_status", "http://x")


def test_gbfs_rush_hour_moves_bikes_to_work() -> None:
    # 05:00 to 10:00 local: the morning rush empties homes into the centre.
    start = 1_700_017_200.0  # 2023-11-15 03:00 UTC = 04:00 local (UTC+1)
    clock = [start]
    sim = GbfsSimulator(2, stations=200, clock=lambda: clock[0], epoch=start)
    work = [s for s in sim.stations if s.work > 0.5]
    before = sum(s.bikes for s in work) / sum(s.capacity for s in work)
    clock[0] = start + 6 * 3600
    sim.advance()
    after = sum(s.bikes for s in work) / sum(s.capacity for s in work)
    assert after > before + 0.05, (before, after)
    assert not math.isnan(after)


def test_unknown_patient_and_bad_input_are_counted_every_time_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from collector import settings as settings_module
    from collector.scheduler import Scheduler
    from tests.support import FeedServer, MemorySink, Reply

    feeds = FeedServer().start()
    feeds.routes["/2"] = Reply(200, b"<html>oops</html>")
    with Background(PressureSimulator(1)) as url:
        feeds.routes["/1"] = lambda _r: Reply(200, requests.get(f"{url}/1", timeout=5).content)
        path = tmp_path / "c.toml"
        path.write_text(f'[pressure]\nurl = "{feeds.url}"\npatients = [1, 2, 9]\n')
        sink = MemorySink()
        collector = Scheduler.from_settings(settings_module.load(path), sink, once=True)
        by_name = {job.name: job for job in collector.jobs}
        with caplog.at_level("WARNING"):
            for _ in range(3):
                assert by_name["patient-1"].run().ok
                assert not by_name["patient-2"].run().ok
                assert not by_name["patient-9"].run().ok
        collector.close()
    feeds.stop()
    counters = collector.counters
    assert counters.get("patient-1", "fetch", "ok") == 3
    assert counters.get("patient-2", "parse", "not_json") == 3
    assert counters.get("patient-9", "fetch", "http_4xx") == 3  # 404: no such patient
    failed = [(r.source, r.error) for r in caplog.records if r.getMessage() == "poll_failed"]
    assert sorted(failed) == [("patient-2", "not_json"), ("patient-9", "http_4xx")]
    # Patient 1's three readings all arrived, untouched by the others' failures.
    assert len(sink.lines("pressure,foot=left,patient_id=1,sensor=L0 ")) == 3
    assert not sink.lines("pressure,foot=left,patient_id=2,")
