"""The raw archive: what the collector fetched, kept and replayed through today's parsers.

The round trip runs the real collector process against both simulators and a real InfluxDB
1.x, drops the databases, and compares what ``replay archive`` restores point by point.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
import pytest

from collector import settings as settings_module
from collector.archive import Archive, Reader, list_files, open_archive
from collector.contract import ANOMALY, PRESSURE, STATION_STATUS
from collector.scheduler import Scheduler
from collector.settings import Settings
from collector.simulators.gbfs import GbfsSimulator
from collector.simulators.pressure import PressureSimulator
from collector.simulators.serve import Background
from collector.sinks.base import Sink
from collector.telemetry import Counters
from tests.support import (
    DATA,
    FeedServer,
    InfluxD,
    MemorySink,
    Reply,
    run_cli,
    run_until_sigterm,
)

HOUR = 3600
# Pinned: 2026-12-01T10:00:00Z, so that hours and file names are known.
T0 = 1_796_119_200


class Recording:
    """A WSGI app's responses as served, in order: (path, body). ``before`` runs with each
    request's path first."""

    def __init__(
        self, app: Callable[..., Iterable[bytes]], before: Callable[[str], object]
    ) -> None:
        self.app = app
        self.before = before
        self.served: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self._lock:
            self.before(environ["PATH_INFO"])
            body = b"".join(self.app(environ, start_response))
            self.served.append((environ["PATH_INFO"], body))
        return [body]

    def bodies(self, path: str) -> list[bytes]:
        with self._lock:
            return [body for p, body in self.served if p == path]


@contextmanager
def scheduled(settings: Settings, sink: Sink) -> Iterator[Scheduler]:
    """What ``collector run --once`` wires: the archive opened from the settings and handed to
    every job, closed (its gzip streams ended) after them."""
    counters = Counters()
    archive = open_archive(settings.archive, counters)
    scheduler = Scheduler.from_settings(
        settings, sink, counters=counters, archive=archive, once=True
    )
    try:
        yield scheduler
    finally:
        scheduler.close()
        if archive is not None:
            archive.close()


def _archived(directory: Path) -> dict[tuple[str, str], list[Any]]:
    """(kind, source) -> its records, in the order the files and records were written."""
    found: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for entry in list_files(directory):
        reader = Reader(entry.path)
        found[(entry.kind, entry.source)] += list(reader)
        assert not reader.truncated, entry.path
    return found


def _points(influxd: InfluxD) -> dict[str, list[tuple]]:
    """Every point of the data measurements, as sorted (time, tags and fields) tuples."""
    found = {}
    for measurement in (STATION_STATUS, PRESSURE, ANOMALY):
        rows = influxd.query(f'SELECT * FROM "{measurement.name}"', measurement.bucket, "ms")
        found[measurement.name] = sorted(
            tuple(sorted((k, v) for k, v in row.items() if v is not None)) for row in rows
        )
    return found


def _assert_all_but_a_cut_last(kept: list[Any], served: list[Any]) -> None:
    assert kept == served[: len(kept)]
    assert len(served) - len(kept) <= 1


@pytest.mark.influxdb
def test_a_run_archives_every_response_and_replay_restores_its_points(
    tmp_path: Path, influxd: InfluxD
) -> None:
    # The city's clock moves 10 s (one simulation step) per status request, an hour ago: each
    # poll sees a new snapshot, without waiting 10 s for one.
    clock = [time.time() - HOUR]

    def tick(path: str) -> None:
        clock[0] += 10 * (path == "/station_status.json")

    gbfs_sim = Recording(GbfsSimulator(5, stations=40, clock=lambda: clock[0]), tick)
    pressure_sim = PressureSimulator(7, anomaly_runs_per_hour=3600, record=True)
    archive_dir = tmp_path / "archive"
    for db in (STATION_STATUS.bucket, PRESSURE.bucket, ANOMALY.bucket):
        influxd.drop(db)
    with Background(gbfs_sim) as gbfs_url, Background(pressure_sim) as pressure_url:
        config = tmp_path / "collector.toml"
        config.write_text(
            f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\n\n'
            f'[archive]\ndir = "{archive_dir}"\n\n'
            # max_ttl_secs 0: a status poll every second instead of every ttl (10 s).
            f'[[gbfs.systems]]\nname = "simcity"\nurl = "{gbfs_url}/gbfs.json"\n'
            "interval_secs = 1\nmax_ttl_secs = 0\n\n"
            f'[pressure]\nurl = "{pressure_url}"\npatients = [1, 2]\ninterval_secs = 0.1\n'
            "flush_interval_secs = 0.3\n"
        )
        assert run_cli("setup", config=config).returncode == 0
        run_until_sigterm(
            config,
            lambda: (
                len(gbfs_sim.bodies("/station_status.json")) >= 4 and len(pressure_sim.served) >= 30
            ),
            what="4 status polls and 30 readings",
        )

    # Every response is in the archive, in order; pressure bodies without personal data. The
    # shutdown cuts a fetch in flight: a response served at that moment never arrived.
    archived = _archived(archive_dir)
    gbfs_records = archived[("gbfs", "simcity")]
    for feed, path in (
        ("discovery", "/gbfs.json"),
        ("station_information", "/station_information.json"),
        ("vehicle_types", "/vehicle_types.json"),
        ("station_status", "/station_status.json"),
    ):
        bodies = [r.body for r in gbfs_records if r.feed == feed]
        _assert_all_but_a_cut_last(bodies, gbfs_sim.bodies(path))
        assert all(r.url == f"{gbfs_url}{path}" for r in gbfs_records if r.feed == feed)
    for patient in (1, 2):
        served = [body for p, body in pressure_sim.served if p == patient]
        kept = [orjson.loads(r.body) for r in archived[("pressure", f"patient-{patient}")]]
        _assert_all_but_a_cut_last(kept, [{"id": b["id"], "trace": b["trace"]} for b in served])
    raw = b"".join(gzip.decompress(e.path.read_bytes()) for e in list_files(archive_dir))
    for person in pressure_sim.models[1].patient, pressure_sim.models[2].patient:
        assert person.lastname.encode() not in raw
    assert b"birthdate" not in raw

    before = _points(influxd)
    assert len(before[STATION_STATUS.name]) >= 2 * 40
    readings = sum(len(archived[("pressure", f"patient-{p}")]) for p in (1, 2))
    assert len(before[PRESSURE.name]) == 6 * readings  # every archived reading was written
    assert before[ANOMALY.name], "no anomaly was served: the anomaly check proved nothing"

    for db in (STATION_STATUS.bucket, PRESSURE.bucket, ANOMALY.bucket):
        influxd.drop(db)
    assert run_cli("setup", config=config).returncode == 0
    assert _points(influxd) == {m: [] for m in before}

    first = run_cli("replay", "archive", str(archive_dir), config=config)
    assert first.returncode == 0, first.stderr
    assert _points(influxd) == before
    # Same timestamps: a second replay overwrites every point with itself.
    second = run_cli("replay", "archive", str(archive_dir), config=config)
    assert second.returncode == 0, second.stderr
    assert _points(influxd) == before
    assert "event=replay_done" in second.stderr


def _secret_feeds(feeds: FeedServer) -> str:
    """The hand-written 2.3 feed, its gbfs.json listing feed URLs that carry the API key, as
    some systems do; answers 401 to requests without the key and the header token."""
    gbfs_url = feeds.serve_folder(DATA / "gbfs" / "v2.3", "/v2.3")
    doc = json.loads(feeds.routes["/v2.3/gbfs.json"].body)  # type: ignore[union-attr]  # a Reply on this route
    for feed in doc["data"]["nb"]["feeds"]:
        feed["url"] += "?api_key=SECRET-KEY-123"
    feeds.routes["/v2.3/gbfs.json"] = Reply(200, json.dumps(doc).encode())
    for path, route in list(feeds.routes.items()):

        def guarded(request: Any, reply: Reply = route) -> Reply:  # type: ignore[assignment]  # a handler where a Reply was
            ok = "api_key=SECRET-KEY-123" in request.query
            ok = ok and request.headers.get("Authorization") == "Bearer HEADER-TOKEN-456"
            return reply if ok else Reply(401, b"no key")

        feeds.routes[path] = guarded
    person = {"firstname": "Janek", "lastname": "Grzegorczyk", "birthdate": 1981}
    sensors = [{"id": i, "value": 100 + i, "anomaly": False} for i in range(6)]
    body = {**person, "disabled": False, "id": 12, "trace": {"id": 1, "sensors": sensors}}
    feeds.routes["/p/1"] = Reply(200, json.dumps(body).encode())
    feeds.routes["/p/2"] = Reply(200, b"<html>Janek Grzegorczyk is not found</html>")
    return gbfs_url + "?api_key=SECRET-KEY-123"


def test_credentials_query_strings_and_personal_data_never_reach_the_archive(
    tmp_path: Path, feeds: FeedServer
) -> None:
    url = _secret_feeds(feeds)
    archive_dir = tmp_path / "archive"
    config = tmp_path / "collector.toml"
    config.write_text(
        f'[archive]\ndir = "{archive_dir}"\n\n'
        f'[[gbfs.systems]]\nname = "keyed"\nurl = "{url}"\n'
        'headers = { "Authorization" = "Bearer HEADER-TOKEN-456" }\n\n'
        f'[pressure]\nurl = "{feeds.url}/p"\npatients = [1, 2]\n'
        'headers = { "X-Api-Token" = "PRESSURE-TOKEN-789" }\n'
    )
    with scheduled(settings_module.load(config), MemorySink()) as collector:
        summaries = collector.run_once()
    assert [s.ok for s in summaries] == [True, True, False]  # patient 2 answers HTML

    archived = _archived(archive_dir)
    feeds_kept = [r.feed for r in archived[("gbfs", "keyed")]]
    assert feeds_kept == ["discovery", "station_information", "vehicle_types", "station_status"]
    assert archived[("gbfs", "keyed")][0].url == f"{feeds.url}/v2.3/gbfs.json"
    assert b"/v2.3/station_status.json" in archived[("gbfs", "keyed")][0].body
    (reading,) = archived[("pressure", "patient-1")]
    assert set(orjson.loads(reading.body)) == {"id", "trace"}
    # Not a JSON object: its personal parts cannot be told apart, so it is withheld, counted.
    assert ("pressure", "patient-2") not in archived
    assert collector.counters.get("patient-2", "archive", "withheld") == 1
    for entry in list_files(archive_dir):
        for text in (entry.path.read_bytes(), gzip.decompress(entry.path.read_bytes())):
            for secret in (b"SECRET-KEY", b"HEADER-TOKEN", b"PRESSURE-TOKEN", b"api_key"):
                assert secret not in text, (entry.path, secret)
            for personal in (b"Janek", b"Grzegorczyk", b"birthdate", b"1981"):
                assert personal not in text, (entry.path, personal)


def _fill(archive: Archive, hours: Iterable[int], body: bytes) -> None:
    for hour in hours:
        archive.record("gbfs", "oslo", "station_status", "http://x/s", T0 + hour * HOUR, body)


def test_retention_removes_the_hours_past_it_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collector.archive")
    clock = [T0 + 10 * HOUR + 5]
    counters = Counters()
    archive = Archive(
        tmp_path, retention_days=0.25, max_bytes=10**9, counters=counters, clock=lambda: clock[0]
    )
    _fill(archive, range(11), b'{"data": {}}')  # hours 0..10; 6 h kept: hours 4..10
    names = [e.path.name for e in list_files(tmp_path)]
    assert names == [f"2026-12-01T{h:02d}Z.raw.gz" for h in range(14, 21)]
    assert counters.get("oslo", "archive", "removed_retention") == 4
    removed = [r for r in caplog.records if r.getMessage() == "archive_removed"]
    assert [(r.reason, Path(r.file).name) for r in removed] == [  # type: ignore[attr-defined]  # fields set by logs.event
        ("retention", f"2026-12-01T{h:02d}Z.raw.gz") for h in range(10, 14)
    ]
    # A restart later, once hour 4 ended more than 6 h ago: it goes at start-up.
    archive.close()
    clock[0] += HOUR
    Archive(tmp_path, retention_days=0.25, max_bytes=10**9, clock=lambda: clock[0]).close()
    assert list_files(tmp_path)[0].path.name == "2026-12-01T15Z.raw.gz"


def test_many_sources_rolling_over_together_prune_once_per_hour(tmp_path: Path) -> None:
    # A prune reads every file's name: once per source at each new hour, 300 patients with
    # two weeks of files held the event loop for minutes (a new user's walk, #13).
    archive = Archive(tmp_path, retention_days=0.25, max_bytes=10**9, clock=lambda: T0 + HOUR)
    prunes: list[float] = []
    prune = archive._prune
    archive._prune = lambda now: (prunes.append(now), prune(now))[1]  # type: ignore[method-assign]
    for hour in (0, 1):
        for patient in range(50):
            archive.record(
                "pressure", f"patient-{patient}", "reading", "http://x/1", T0 + hour * HOUR, b"{}"
            )
    assert len(prunes) == 2  # hour 0's first file, hour 1's first file
    assert len(list_files(tmp_path)) == 100
    archive.close()


def test_the_size_bound_removes_the_oldest_files_first_never_the_open_one(
    tmp_path: Path,
) -> None:
    counters = Counters()
    archive = Archive(
        tmp_path, retention_days=30, max_bytes=300_000, counters=counters, clock=lambda: T0
    )
    for hour in range(8):  # 100 kB of incompressible data an hour
        _fill(archive, [hour], os.urandom(100_000))
    hours = [e.hour for e in list_files(tmp_path)]
    assert hours == [T0 + h * HOUR for h in (6, 7)]  # the newest closed hour and the open one
    assert counters.get("oslo", "archive", "removed_max_bytes") == 6
    assert archive.total_bytes == sum(e.path.stat().st_size for e in list_files(tmp_path))
    assert archive.total_bytes <= 300_000
    archive.close()


def test_a_restart_within_the_hour_starts_a_new_file_and_replay_reads_both(
    tmp_path: Path,
) -> None:
    for n in range(2):
        archive = Archive(tmp_path, retention_days=30, max_bytes=10**9, clock=lambda: T0)
        archive.record("gbfs", "oslo", "station_status", "http://x/s", T0 + n, b"%d" % n)
        archive.close()
    files = list_files(tmp_path)
    assert [e.path.name for e in files] == ["2026-12-01T10Z.raw.gz", "2026-12-01T10Z-1.raw.gz"]
    assert all(e.path.stat().st_mode & 0o077 == 0 for e in files)  # the owner's only
    assert (tmp_path / "gbfs" / "oslo").stat().st_mode & 0o077 == 0
    assert [r.body for e in files for r in Reader(e.path)] == [b"0", b"1"]


def _status(last_updated: int, bikes: int) -> bytes:
    station = {"station_id": "a", "num_bikes_available": bikes, "num_docks_available": 3}
    return orjson.dumps({"last_updated": last_updated, "data": {"stations": [station]}})


def _config(tmp_path: Path, influxd: InfluxD | None = None) -> Path:
    config = tmp_path / "collector.toml"
    url = influxd.url if influxd else "http://127.0.0.1:9"
    config.write_text(f'[influxdb]\nurl = "{url}"\napi = "v1"\n')
    return config


def test_a_corrupt_file_is_reported_by_path_and_skipped_with_exit_1(tmp_path: Path) -> None:
    directory = tmp_path / "archive"
    archive = Archive(directory, retention_days=30, max_bytes=10**9, clock=lambda: T0)
    for hour in range(3):
        stamp = T0 + hour * HOUR
        archive.record("gbfs", "oslo", "station_status", "http://x/s", stamp, _status(stamp, 7))
    archive.close()
    good, bad, cut = (e.path for e in list_files(directory))
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum no longer matches
    bad.write_bytes(bytes(data))
    # A collector killed mid-record: its complete records are kept, with a warning.
    stamp = T0 + 2 * HOUR + 60
    with gzip.open(cut, "ab") as extra:
        extra.write(b'{"fetched_at": %d, "feed": "station_status", "url": "", "bytes": 9' % stamp)
    cut.write_bytes(cut.read_bytes()[:-8])  # the trailer of the last member, gone

    result = run_cli(
        "replay", "archive", str(directory), "--dry-run", config=_config(tmp_path), timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert f"event=archive_file_corrupt file={bad}" in result.stderr
    assert f"event=archive_file_truncated file={cut}" in result.stderr
    written = [line for line in result.stdout.splitlines() if line.startswith("station_status")]
    assert [line.rsplit(" ", 1)[1] for line in written] == [str(T0), str(T0 + 2 * HOUR)]
    assert "corrupt_files=1" in result.stderr
    assert str(good) not in result.stderr


def test_from_and_to_select_records_and_station_facts_come_from_before(tmp_path: Path) -> None:
    directory = tmp_path / "archive"
    archive = Archive(directory, retention_days=30, max_bytes=10**9, clock=lambda: T0)
    info = {"data": {"stations": [{"station_id": "a", "name": "Torget", "lat": 1, "lon": 2}]}}
    archive.record("gbfs", "oslo", "station_information", "http://x/i", T0, orjson.dumps(info))
    for minute in range(0, 180, 30):
        stamp = T0 + minute * 60
        archive.record("gbfs", "oslo", "station_status", "http://x/s", stamp, _status(stamp, 1))
    archive.record("gbfs", "bergen", "station_status", "http://x/s", T0 + 5400, _status(T0, 2))
    archive.close()

    result = run_cli(
        "replay",
        "archive",
        str(directory),
        "--system",
        "oslo",
        "--from",
        "2026-12-01T11:00Z",
        "--to",
        "2026-12-01T12:00:00+00:00",
        "--dry-run",
        config=_config(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    stamps = [line.rsplit(" ", 1)[1] for line in result.stdout.splitlines()]
    assert stamps == [str(T0 + HOUR), str(T0 + HOUR + 1800)]
    assert all(
        'name="Torget"' in line and "system=oslo" in line for line in result.stdout.splitlines()
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "yesterday"], "--from yesterday: not an ISO 8601 time"),
        (["--from", "2026-12-02", "--to", "2026-12-01"], "is not before --to"),
        (["--speed", "60"], "are for trips, not the archive"),
    ],
)
def test_bad_replay_options_exit_2_with_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run_cli("replay", "archive", str(tmp_path), *args, config=_config(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_a_missing_archive_directory_exits_2(tmp_path: Path) -> None:
    result = run_cli("replay", "archive", str(tmp_path / "nope"), config=_config(tmp_path))
    assert result.returncode == 2
    assert str(tmp_path / "nope") in result.stderr


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('dir = "{blocked}/archive"', "archive.dir"),
        ('dir = "{tmp}/a"\nretention_days = 0', "archive.retention_days"),
        ('dir = "{tmp}/a"\nmax_bytes = 1000', "archive.max_bytes"),
    ],
)
def test_bad_archive_settings_stop_start_up_naming_the_key(
    tmp_path: Path, section: str, key: str
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    config = tmp_path / "collector.toml"
    config.write_text(
        "[archive]\n"
        + section.format(blocked=blocked, tmp=tmp_path)
        + '\n\n[[gbfs.systems]]\nname = "x"\nurl = "http://127.0.0.1:9/gbfs.json"\n'
    )
    result = run_cli("run", "--once", "--dry-run", config=config)
    assert result.returncode == 2
    assert key in result.stderr


@pytest.mark.influxdb
def test_replay_beyond_retention_stops_before_writing(tmp_path: Path, influxd: InfluxD) -> None:
    directory = tmp_path / "archive"
    now = os.path.getmtime(tmp_path)  # about now; pressure keeps 24 h by default
    archive = Archive(directory, retention_days=30, max_bytes=10**9)
    sensors = [{"id": i, "value": 5, "anomaly": False} for i in range(6)]
    body = orjson.dumps({"id": 12, "trace": {"id": 1, "sensors": sensors}})
    for days_ago in (3, 0):
        archive.record(
            "pressure", "patient-1", "reading", "http://p/1", now - days_ago * 86400, body
        )
    archive.close()
    influxd.drop(PRESSURE.bucket)
    config = _config(tmp_path, influxd)
    assert run_cli("setup", config=config).returncode == 0

    result = run_cli("replay", "archive", str(directory), config=config)
    assert result.returncode == 2, result.stderr
    assert "'pressure'" in result.stderr and "24h" in result.stderr and "--from" in result.stderr
    assert influxd.query('SELECT * FROM "pressure"', PRESSURE.bucket) == []


def _reading(person: dict[str, Any]) -> bytes:
    sensors = [{"id": i, "value": 10 * i, "anomaly": i == 0} for i in range(6)]
    return orjson.dumps({**person, "id": 12, "trace": {"id": 1, "sensors": sensors}})


@pytest.mark.parametrize("store_personal_data", [False, True])
def test_replay_writes_patient_data_only_when_it_may_be_stored(
    tmp_path: Path, store_personal_data: bool
) -> None:
    directory = tmp_path / "archive"
    archive = Archive(directory, retention_days=30, max_bytes=10**9, clock=lambda: T0)
    body = _reading({"firstname": "Ewa", "lastname": "Nowak", "birthdate": "1970"})
    archive.record("pressure", "patient-4", "reading", "http://p/4", T0 + 0.123, body)
    archive.close()
    config = _config(tmp_path)
    config.write_text(
        config.read_text()
        + f"\n[pressure]\nstore_personal_data = {str(store_personal_data).lower()}\n"
    )
    result = run_cli("replay", "archive", str(directory), "--dry-run", config=config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    stamp = str(T0 * 1000 + 123)
    assert [line.split(",")[0] for line in lines].count("pressure") == 6
    assert all(line.endswith(" " + stamp) for line in lines)
    assert [line.split(",")[0] for line in lines].count("anomaly") == 1
    patient = [line for line in lines if line.startswith("patient,")]
    assert len(patient) == (1 if store_personal_data else 0)
    assert ('lastname="Nowak"' in result.stdout) is store_personal_data


def test_responses_the_parsers_refuse_are_counted_and_do_not_fail_the_replay(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "archive"
    archive = Archive(directory, retention_days=30, max_bytes=10**9, clock=lambda: T0)
    archive.record("gbfs", "oslo", "station_status", "http://x/s", T0, b"<html>Maintenance")
    archive.record("gbfs", "oslo", "station_status", "http://x/s", T0 + 15, _status(T0 + 15, 4))
    archive.close()
    result = run_cli("replay", "archive", str(directory), "--dry-run", config=_config(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].endswith(f" {T0 + 15}")
    assert "unparsable=oslo:not_json:1" in result.stderr
    assert result.stderr.count("event=replay_unparsable") == 1


def test_an_archive_that_cannot_be_written_counts_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counters = Counters()
    archive = Archive(tmp_path, retention_days=30, max_bytes=10**9, counters=counters)
    (tmp_path / "gbfs" / "oslo").write_text("a file where the folder should be")
    for n in range(3):
        archive.record("gbfs", "oslo", "station_status", "http://x/s", T0 + n, b"{}")
    archive.close()
    assert counters.get("oslo", "archive", "error") == 3
    assert caplog.text.count("archive_failed") == 1


def test_a_system_with_no_archive_files_exits_2(tmp_path: Path) -> None:
    archive = Archive(tmp_path, retention_days=30, max_bytes=10**9, clock=lambda: T0)
    archive.record("gbfs", "oslo", "station_status", "http://x/s", T0, _status(T0, 1))
    archive.close()
    result = run_cli(
        "replay", "archive", str(tmp_path), "--system", "olso", config=_config(tmp_path)
    )
    assert result.returncode == 2
    assert "no archive files of system 'olso'" in result.stderr


def _influx_that_refuses_writes(feeds: FeedServer) -> None:
    """A 1.x that answers the retention pre-flight (everything kept forever) and 503 to every
    write: a database going down as the replay starts."""
    databases = [[STATION_STATUS.bucket], [PRESSURE.bucket], [ANOMALY.bucket]]
    policy = ["autogen", "0s", "168h0m0s", 1, True]

    def query(request: Any) -> Reply:
        q = parse_qs(request.body.decode())["q"][0]
        if q.startswith("SHOW DATABASES"):
            series = {"name": "databases", "columns": ["name"], "values": databases}
        else:
            columns = ["name", "duration", "shardGroupDuration", "replicaN", "default"]
            series = {"columns": columns, "values": [policy]}
        return Reply(200, json.dumps({"results": [{"series": [series]}]}).encode())

    feeds.routes["/query"] = query
    feeds.routes["/ping"] = Reply(204)
    feeds.routes["/write"] = Reply(503, b'{"error": "shutting down"}')


def test_replay_takes_the_live_sink_path_and_spools_what_the_database_cannot_take(
    tmp_path: Path, feeds: FeedServer, own_state_dir: Path
) -> None:
    directory = tmp_path / "archive"
    archive = Archive(directory, retention_days=30, max_bytes=10**9, clock=lambda: T0)
    for n in range(3):
        stamp = T0 + 15 * n
        archive.record("gbfs", "oslo", "station_status", "http://x/s", stamp, _status(stamp, n))
    archive.close()
    _influx_that_refuses_writes(feeds)
    config = tmp_path / "collector.toml"
    config.write_text(f'[influxdb]\nurl = "{feeds.url}"\napi = "v1"\nmax_retries = 0\n')

    result = run_cli("replay", "archive", str(directory), config=config)
    assert result.returncode == 0, result.stderr
    assert "spooled=3" in result.stderr
    spool = own_state_dir / "livestack-collector" / "spool" / "spool.sqlite"
    with sqlite3.connect(spool) as db:
        ((lines,),) = db.execute("SELECT SUM(lines) FROM batches").fetchall()
    assert lines == 3  # a collector started later drains them, as it drains its own


@pytest.mark.parametrize("feed", ["velib-2024", "citibike-2019-v1.0", "oslo-2022-v2.2-intbool"])
def test_replay_of_a_real_feed_gives_the_lines_the_live_poll_wrote(
    tmp_path: Path, feeds: FeedServer, shared_fixtures: Path, feed: str
) -> None:
    # Vélib' has no last_updated (points take the fetch time, which the archive keeps),
    # Citi Bike 2019 is 1.0 without gbfs.json, Oslo 2022 sends 0/1 booleans.
    folder = shared_fixtures / "gbfs" / feed
    for name in ("station_information", "station_status"):
        feeds.routes[f"/{feed}/{name}.json"] = Reply(200, (folder / f"{name}.json").read_bytes())
    config = tmp_path / "collector.toml"
    config.write_text(
        f'[influxdb]\nurl = "http://127.0.0.1:9"\napi = "v1"\n\n'
        f'[archive]\ndir = "{tmp_path / "archive"}"\n\n'
        f'[[gbfs.systems]]\nname = "real"\n'
        f'station_information_url = "{feeds.url}/{feed}/station_information.json"\n'
        f'station_status_url = "{feeds.url}/{feed}/station_status.json"\n'
    )
    sink = MemorySink()
    with scheduled(settings_module.load(config), sink) as collector:
        collector.run_once()
    live = sink.lines("station_status,")
    assert len(live) > 100

    result = run_cli("replay", "archive", str(tmp_path / "archive"), "--dry-run", config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == live
