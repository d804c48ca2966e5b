"""Every dashboard, variable, annotation and alert query, executed on a real InfluxDB 1.x
filled by the collector itself (real GBFS fixtures and the simulators), with Grafana's macros
substituted as Grafana does (tests/grafana_model.py, which cites the Grafana source it
models). Expected figures are computed here straight from the input JSON."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
import yaml

from collector.contract import DOWNSAMPLES, EVENTS, FEED, SENSORS
from collector.lineprotocol import Encoder
from collector.provision import grafana
from collector.provision.influxdb import continuous_query
from collector.scheduler import Scheduler
from collector.settings import GrafanaSettings, Settings, load
from collector.simulators.pressure import PressureSimulator
from collector.simulators.serve import Background
from collector.telemetry import Counters
from tests.grafana_model import (
    Context,
    Frame,
    RuleModel,
    execute,
    frames,
    interpolate,
    write,
)
from tests.support import (
    SHARED_FIXTURES,
    FeedServer,
    InfluxD,
    MemorySink,
    Reply,
    run_cli,
    run_until_sigterm,
)

pytestmark = pytest.mark.influxdb

FIXTURES = SHARED_FIXTURES / "gbfs"
TRIPS = SHARED_FIXTURES / "trips" / "JC-202102-citibike-tripdata.csv"
SYSTEMS = {
    "citibike": "citibike-2019-v1.0",
    "velib": "velib-2024",
    "emptytown": "oslo-2022-v2.2-intbool",
    "closedtown": "oslo-2022-v2.2-intbool",  # reporting, but no station renting or returning
    "nodocks": "oslo-2022-v2.2-intbool",  # a feed that publishes no free docks
}
STEP_SECS = 300
UNKNOWN_STATION = 99_999_999_999  # velib: in station_status only
STEPS = 9  # 40 minutes of polls, 5 minutes apart
PATIENTS = (1, 2)
FILES = grafana.render(Settings())
RULES = {r["uid"]: r for r in yaml.safe_load(FILES["alerting/rules.yaml"])["groups"][0]["rules"]}
DATASOURCES = {
    d["uid"]: d["jsonData"]["dbName"]
    for d in yaml.safe_load(FILES["datasources/influxdb.yaml"])["datasources"]
}


def _status(system: str, stamp: int) -> dict[str, Any]:
    doc = json.loads((FIXTURES / SYSTEMS[system] / "station_status.json").read_text())
    doc["last_updated"] = stamp
    if system == "velib":
        # A station in station_status but not in station_information (the collector's
        # `unknown_station`): stored without a position.
        doc["data"]["stations"].append(
            {**doc["data"]["stations"][0], "station_id": UNKNOWN_STATION}
        )
    if system == "closedtown":  # every count is 0, none unknown
        for station in doc["data"]["stations"]:
            station["is_renting"] = station["is_returning"] = 0
    if system == "nodocks":  # free docks unknown
        for station in doc["data"]["stations"]:
            del station["num_docks_available"]
    if system == "emptytown":  # most stations empty: the "many empty stations" case
        for index, station in enumerate(doc["data"]["stations"]):
            if index % 10 < 7:
                station["num_bikes_available"] = 0
            # and none full: a count of 0 must show 0, not "No data"
            station["num_docks_available"] = max(station["num_docks_available"], 1)
    return doc


class Filled:
    """What the module's database holds, and the input it came from."""

    def __init__(self, influxd: InfluxD, start: int) -> None:
        self.influxd = influxd
        self.start = start  # first poll's feed time
        self.end = start + (STEPS - 1) * STEP_SECS  # last poll's feed time
        self.pressure_span: tuple[int, int] = (0, 0)  # ms
        self.files: dict[str, str] = {}  # what `collector dashboards --config` wrote


def _run_live(data: Filled, tmp: Path, feeds: FeedServer, base: str) -> None:
    """`collector run` against the pressure simulator, a live copy of Vélib' and a dead feed,
    writing its own metrics every second."""
    velib = FIXTURES / SYSTEMS["velib"]
    feeds.routes["/live/status.json"] = lambda _r: Reply(
        200,
        json.dumps(
            {
                **json.loads((velib / "station_status.json").read_text()),
                "last_updated": int(time.time()),
                "ttl": 0,
            }
        ).encode(),
    )
    feeds.routes["/dead/status.json"] = Reply(503, b"down")
    systems = "".join(
        f'[[gbfs.systems]]\nname = "{name}"\ninterval_secs = 1\n'
        f'station_information_url = "{feeds.url}/velib/info.json"\n'
        f'station_status_url = "{feeds.url}/{path}/status.json"\n\n'
        for name, path in (("velib-live", "live"), ("dead", "dead"))
    )
    sim = PressureSimulator(7, anomaly_runs_per_hour=3600, record=True)
    with Background(sim) as url:
        live = tmp / "live.toml"
        live.write_text(
            "telemetry_interval_secs = 1\n" + base + "\n"
            f'[pressure]\nurl = "{url}"\npatients = {list(PATIENTS)}\ninterval_secs = 0.1\n\n'
            + systems
        )
        before = int(time.time() * 1000)
        run_until_sigterm(
            live,
            lambda: (
                all(sum(1 for p, _ in sim.served if p == pid) >= 80 for pid in PATIENTS)
                and feeds.hits("/dead/status.json") >= 3
            ),
            what="80 readings per patient and 3 polls of the dead feed",
        )
        data.pressure_span = (before, int(time.time() * 1000))


@pytest.fixture(scope="module")
def filled(influxd: InfluxD, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    if not FIXTURES.is_dir():
        pytest.skip(f"real-data fixtures not found at {SHARED_FIXTURES}")
    tmp = tmp_path_factory.mktemp("grafana-queries")
    for name in DATASOURCES.values():
        influxd.query(f'DROP DATABASE "{name}"')
    start = (int(time.time()) // 3600 - 2) * 3600  # two whole hours ago
    data = Filled(influxd, start)
    feeds = FeedServer().start()
    clock = {"now": start}
    systems = ""
    for system, folder in SYSTEMS.items():
        info = (FIXTURES / folder / "station_information.json").read_bytes()
        feeds.routes[f"/{system}/info.json"] = Reply(200, info)
        feeds.routes[f"/{system}/status.json"] = lambda _r, s=system: Reply(
            200, json.dumps(_status(s, clock["now"])).encode()
        )
        systems += (
            f'[[gbfs.systems]]\nname = "{system}"\n'
            f'station_information_url = "{feeds.url}/{system}/info.json"\n'
            f'station_status_url = "{feeds.url}/{system}/status.json"\n\n'
        )
    # A spool of its own: the module's collectors must not meet any other collector's.
    base = (
        f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\nmax_retries = 0\n\n'
        f'[spool]\ndir = "{tmp / "spool"}"\n'
    )
    config = tmp / "gbfs.toml"
    config.write_text(base + "[buckets.bikes]\nretention_hours = 0\n\n" + systems)
    try:
        assert run_cli("setup", config=config).returncode == 0
        # The provisioning for the server this config names (1.x: no token), as a user runs it.
        out = tmp / "provisioning"
        assert run_cli("dashboards", "--out", str(out), config=config).returncode == 0
        data.files = {
            p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()
        }
        for step in range(STEPS):
            clock["now"] = start + step * STEP_SECS
            once = run_cli("run", "--once", config=config)
            assert once.returncode == 0, once.stderr
        _run_live(data, tmp, feeds, base)
    finally:
        feeds.stop()
    replayed = run_cli(
        "replay",
        "trips",
        str(TRIPS),
        "--backfill",
        "--system",
        "citibike-jc",
        config=config,
        timeout=300,
    )
    assert replayed.returncode == 0, replayed.stderr
    # The downsampling statements `collector setup` installs, run for the polled hours as
    # the server's continuous queries would.
    names = load(config).buckets.names()
    for ds in DOWNSAMPLES:
        statement = continuous_query(ds, names, "autogen", 7200)[2]
        select = statement.split(" BEGIN ", 1)[1].removesuffix(" END")
        window = f"WHERE time >= {start - 3600}s AND time < {start + 3 * 3600}s GROUP BY"
        influxd.query(select.replace(" GROUP BY", f" {window}", 1), names[ds.source.bucket])

    before = data.pressure_span[0]
    for ds in DOWNSAMPLES:
        if ds.source.bucket == "pressure":
            statement = continuous_query(ds, names, "autogen", 120)[2]
            select = statement.split(" BEGIN ", 1)[1].removesuffix(" END")
            window = f"WHERE time >= {before - 120_000}ms GROUP BY"
            influxd.query(select.replace(" GROUP BY", f" {window}", 1), "pressure")
    yield data


# ------------------------------------------------------------------------- the queries


def _queries(files: dict[str, str]) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(where, dashboard file, target model, panel) for every query of every dashboard."""
    for name, content in files.items():
        if not name.endswith(".json"):
            continue
        dash = json.loads(content)
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                yield f"{name} / {panel['title']}", name, target, panel
        for variable in dash.get("templating", {}).get("list", []):
            if variable["type"] == "query":
                target = {"query": variable["query"], "datasource": variable["datasource"]}
                yield f"{name} / variable {variable['name']}", name, target, {"type": "var"}
        for annotation in dash.get("annotations", {}).get("list", []):
            if "target" in annotation:
                yield (
                    f"{name} / annotation {annotation['name']}",
                    name,
                    annotation["target"],
                    {"type": "annotation"},
                )


PREFERRED = {"system": ("velib", "citibike-jc"), "patient": ("1",)}
DAY_MS = 86_400_000


def _range(filled: Filled, dashboard: str) -> tuple[int, int]:
    """The picked range a user would look at: the data's own moments."""
    if "trip-flows" in dashboard:  # the backfilled month, one time-range change away
        return 1_612_137_600_000, 1_614_556_800_000  # Feb 2021, UTC
    if "pressure" in dashboard or "collector" in dashboard:
        end = filled.pressure_span[1] + 1000
        return end - 5 * 60_000, end
    end = (filled.end + 60) * 1000
    return end - 6 * 3_600_000, end


def _panel_range(picked: tuple[int, int], panel: dict[str, Any]) -> tuple[int, int]:
    """A panel's relative time (``timeFrom``) replaces the picked range, ending at its end."""
    start, end = picked
    span = panel.get("timeFrom")
    if span == "now/d":
        return end - end % DAY_MS, end  # the start of today (UTC here)
    if span:
        return end - int(span[:-1]) * DAY_MS, end
    return start, end


def _variables(filled: Filled, name: str) -> dict[str, str | list[str]]:
    """Each variable from its own query, in order, as Grafana resolves them on load."""
    dash = json.loads(FILES[name])
    picked = _range(filled, name)
    values: dict[str, str | list[str]] = {}
    for variable in dash["templating"].get("list", []):
        if variable["type"] == "textbox":
            values[variable["name"]] = variable["query"]  # its default value
            continue
        if variable["type"] == "custom":
            # "Text : value, ...": the first value, as Grafana selects it by default
            values[variable["name"]] = variable["query"].split(",")[0].split(" : ")[1].strip()
            continue
        query = interpolate(variable["query"], Context(*picked, values))
        db = DATASOURCES[variable["datasource"]["uid"]]
        found_frames = frames(execute(filled.influxd.url, db, query), "time_series", query)
        assert len(found_frames) == 1, f"{name}: variable {variable['name']}: {query}"
        (frame,) = found_frames
        # response_parser.ts (metricFindQuery): a SELECT's values are its second column
        found = sorted(str(v) for v in frame.fields["Value"])
        assert found, f"{name}: variable {variable['name']} has no value"
        preferred = [v for v in PREFERRED.get(variable["name"], ()) if v in found]
        values[variable["name"]] = (preferred or found)[0]
    return values


def _run(filled: Filled, name: str, target: dict[str, Any], panel: dict[str, Any]) -> list[Frame]:
    start, end = _panel_range(_range(filled, name), panel)
    ctx = Context(start, end, _variables(filled, name), min_interval=panel.get("interval"))
    db = DATASOURCES[target["datasource"]["uid"]]
    query = interpolate(target["query"], ctx)
    result = execute(filled.influxd.url, db, query)
    return frames(result, target.get("resultFormat", "time_series"), query)


def test_every_query_runs_and_returns_the_shape_its_panel_needs(filled: Filled) -> None:
    # The files written for this 1.x config carry the same queries as the committed ones,
    # and datasources for 1.x: the same databases, no token header.
    assert {n: c for n, c in filled.files.items() if n.endswith(".json")} == {
        n: c for n, c in FILES.items() if n.endswith(".json")
    }
    assert filled.files["alerting/rules.yaml"] == FILES["alerting/rules.yaml"]
    sources = yaml.safe_load(filled.files["datasources/influxdb.yaml"])["datasources"]
    assert {s["uid"]: s["jsonData"]["dbName"] for s in sources} == DATASOURCES
    assert not any("secureJsonData" in s for s in sources)
    queries = list(_queries(filled.files))
    assert len(queries) >= 30
    empty = []
    for where, name, target, panel in queries:
        found = _run(filled, name, target, panel)
        if not found:
            empty.append(where)
            continue
        if panel["type"] in ("timeseries", "stat"):
            for frame in found:  # time plus numeric values per series
                assert frame.kind == "wide", (where, frame)
                assert all(isinstance(v, int | float) or v is None for v in frame.fields["Value"])
                assert len(frame.fields["Value"]) <= 10 * 1000, f"{where}: past the point limit"
        if panel["type"] in ("geomap", "table", "barchart"):
            assert len(found) == 1, f"{where}: one frame"
    assert len(empty) <= 0.15 * len(queries), f"no data from: {empty}"
    print(f"queries: {len(queries)}, without data: {empty}")


def _expected(system: str, stamp: int) -> dict[str, Any]:
    stations = _status(system, stamp)["data"]["stations"]

    def on(station: dict[str, Any], flag: str) -> bool:
        return bool(station.get("is_installed", True)) and bool(station.get(flag, True))

    renting = [s for s in stations if on(s, "is_renting") and s["num_bikes_available"] >= 0]
    to = stamp + 60
    reported = [
        s for s in stations if on(s, "is_installed") and s.get("last_reported", 0) >= 946_684_800
    ]
    return {
        "silent": sum(1 for s in reported if to - s["last_reported"] > 1800),
        "bikes": sum(s["num_bikes_available"] for s in renting),
        "empty": sum(1 for s in renting if s["num_bikes_available"] == 0),
        "full": sum(
            1 for s in stations if on(s, "is_returning") and s.get("num_docks_available") == 0
        )
        if any("num_docks_available" in s for s in stations)
        else "unknown",
    }


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_counts_equal_the_feed(filled: Filled, system: str) -> None:
    dashboard = "dashboards/livestack/bikes-live.json"
    expected = _expected(system, filled.end)
    stats = {
        panel["title"]: panel
        for panel in json.loads(FILES[dashboard])["panels"]
        if panel["type"] == "stat"
    }
    got = {}
    for title, key in (
        ("Bikes available", "bikes"),
        ("Empty stations", "empty"),
        ("Full stations", "full"),
        ("Stations not reporting (30 min)", "silent"),
    ):
        panel = stats[title]
        ctx = Context(*_range(filled, dashboard), {"system": system})
        query = interpolate(panel["targets"][0]["query"], ctx)
        found = frames(execute(filled.influxd.url, "bikes", query), "time_series")
        # No frame: the stat shows its noValue text (Grafana's own default: "No data").
        no_value = panel["fieldConfig"]["defaults"].get("noValue", "No data")
        got[key] = found[0].fields["Value"][-1] if found else no_value
    assert got == expected
    if system == "emptytown":
        assert expected["full"] == 0  # no station full: 0, not "No data"
    if system == "closedtown":  # nothing matches the filters: 0, not "No data"
        assert expected["bikes"] == expected["empty"] == expected["full"] == 0
    if system == "nodocks":
        assert expected["full"] == "unknown"


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_map_places_the_stations_with_their_colour(filled: Filled, system: str) -> None:
    dashboard = "dashboards/livestack/bikes-live.json"
    panel = next(p for p in json.loads(FILES[dashboard])["panels"] if p["type"] == "geomap")
    ctx = Context(*_range(filled, dashboard), {"system": system, "colour_by": "bikes_available"})
    (frame,) = frames(
        execute(filled.influxd.url, "bikes", interpolate(panel["targets"][0]["query"], ctx)),
        "table",
    )
    info = json.loads((FIXTURES / SYSTEMS[system] / "station_information.json").read_text())
    placed = {str(s["station_id"]) for s in info["data"]["stations"]}
    status = {str(s["station_id"]): s for s in _status(system, filled.end)["data"]["stations"]}
    rows = list(
        zip(
            frame.fields["station_id"],
            frame.fields["lat"],
            frame.fields["lon"],
            frame.fields["colour"],
            strict=True,
        )
    )
    on_map = {sid for sid, lat, lon, _ in rows if lat is not None and lon is not None}
    assert len(on_map & placed) >= 0.99 * len(placed & set(status))
    for sid, _lat, _lon, colour in rows:
        assert colour == status[sid]["num_bikes_available"], sid


# ------------------------------------------------------------------------- alerts


def _rule(filled: Filled, uid: str) -> RuleModel:
    rule = RULES[uid]
    return RuleModel(rule, filled.influxd.url, DATASOURCES[rule["data"][0]["datasourceUid"]])


def test_many_empty_stations_fires_for_that_system_alone_after_its_for(filled: Filled) -> None:
    model = _rule(filled, "livestack-empty-stations")
    firing_at = {}
    for minute in range(0, (filled.end - filled.start) // 60 + 1, 5):  # the polls' cadence
        at = (filled.start + minute * 60 + 30) * 1000
        model.evaluate(at)
        for key in model.firing():
            firing_at.setdefault(key, minute)
    assert set(firing_at) == {(("system", "emptytown"),)}
    # Pending for the rule's `for` (30 m) from the first poll, then firing.
    assert firing_at[(("system", "emptytown"),)] == 30


def test_anomaly_fires_per_patient_and_sensor_and_resolves(filled: Filled) -> None:
    model = _rule(filled, "livestack-pressure-anomaly")
    flagged = filled.influxd.query(
        "SELECT count(value) FROM anomaly GROUP BY patient_id, sensor", "anomalies", epoch="ms"
    )
    assert flagged, "the simulator produced no anomaly"
    last = filled.influxd.query("SELECT last(value) FROM anomaly", "anomalies", epoch="ms")[0]
    model.evaluate(last["time"] + 1)
    expected = {
        (("patient_id", r["patient_id"]), ("sensor", r["sensor"]))
        for r in filled.influxd.query(
            f"SELECT count(value) FROM anomaly WHERE time > {last['time'] - 20_000}ms "
            "GROUP BY patient_id, sensor",
            "anomalies",
        )
    }
    assert model.firing() == expected and expected
    assert {dict(k)["sensor"] for k in expected} <= set(SENSORS)
    model.evaluate(last["time"] + 40_000)  # no flagged reading for 40 s
    assert model.firing() == set()
    assert all(model.instances[k].resolved for k in expected)


def test_collector_silent_fires_when_it_stops(filled: Filled) -> None:
    model = _rule(filled, "livestack-collector-silent")
    model.evaluate(filled.pressure_span[1])
    assert model.firing() == set()
    model.evaluate(filled.pressure_span[1] + 10 * 60_000)
    assert model.no_data and len(model.firing()) == 1


def test_feed_stale_fires_for_the_dead_system_alone_and_keeps_firing(
    influxd: InfluxD, tmp_path: Path, feeds: FeedServer
) -> None:
    db = "feed_stale"  # its own database: the module's collector metrics stay as filled
    influxd.query(f'DROP DATABASE "{db}"')
    influxd.query(f'CREATE DATABASE "{db}"')
    # Feed times must be plausible (not ahead of the real clock): the 8 pinned hours end now.
    start = int(time.time()) - 8 * 3600
    clock = {"now": start}
    spec = FIXTURES / "oslo-2022-v2.2-intbool"
    feeds.routes["/info.json"] = Reply(200, (spec / "station_information.json").read_bytes())

    def status(_request: Any) -> Reply:
        doc = json.loads((spec / "station_status.json").read_text())
        doc["last_updated"] = clock["now"] - 10
        doc["ttl"] = 0  # the poller would otherwise wait out the ttl in real time
        return Reply(200, json.dumps(doc).encode())

    def slow(_request: Any) -> Reply:
        # A ttl of 300 s published a little late: its age climbs past the 300 s threshold
        # before each refresh, then drops; the old "newest point older than 300 s" flapped.
        doc = json.loads((spec / "station_status.json").read_text())
        doc["last_updated"] = clock["now"] - (clock["now"] - start) % 330 - 5
        doc["ttl"] = 0
        return Reply(200, json.dumps(doc).encode())

    feeds.routes["/alive.json"] = status
    feeds.routes["/dead.json"] = status
    feeds.routes["/slow.json"] = slow
    feeds.routes["/never.json"] = Reply(503, b"down")  # dead from the start
    config = tmp_path / "c.toml"
    config.write_text(
        "".join(
            f'[[gbfs.systems]]\nname = "{name}"\n'
            f'station_information_url = "{feeds.url}/info.json"\n'
            f'station_status_url = "{feeds.url}/{name}.json"\n\n'
            for name in ("alive", "dead", "slow", "never")
        )
    )
    sink = MemorySink()
    scheduler = Scheduler.from_settings(
        load(config), sink, counters=Counters(started_secs=start), once=True
    )
    encoder = Encoder(FEED)
    model = RuleModel(RULES["livestack-feed-stale"], influxd.url, db)
    history = []
    restart = 240
    for minute in range(0, 8 * 60, 1):  # 8 hours, a poll and a report a minute
        clock["now"] = start + minute * 60
        if minute == 5:
            feeds.routes["/dead.json"] = Reply(503, b"down")
        if minute == restart:  # a new process: it knows nothing of the feeds' past
            scheduler.close()
            sink = MemorySink()
            scheduler = Scheduler.from_settings(
                load(config), sink, counters=Counters(started_secs=clock["now"]), once=True
            )
        for job in scheduler.jobs:
            job.run()
        lines = encoder.lines(scheduler.counters.rows(clock["now"], sink.metrics())["feed"])[0]
        write(influxd.url, db, lines)
        if minute % 10 == 0:
            history.append((minute, model.evaluate(clock["now"] * 1000)))
    scheduler.close()

    def firing(system: str) -> list[int]:
        return [m for m, states in history if states.get((("system", system),)) == "Alerting"]

    # Dead at minute 5: firing from 2 x 300 s later until the restart; the new process knows
    # only that it has not heard from it since it started, so it fires again 2 x 300 s after.
    assert firing("dead") == [m for m, _ in history if 20 <= m < restart or m >= restart + 20]
    assert firing("never") == [m for m, _ in history if 20 <= m < restart or m >= restart + 20]
    assert firing("alive") == firing("slow") == []
    ages = [
        row["age_secs"]
        for row in influxd.query("SELECT age_secs FROM feed WHERE system = 'slow'", db)
    ]
    assert (
        max(ages)
        > RULES["livestack-feed-stale"]["data"][2]["model"]["conditions"][0]["evaluator"]["params"][
            0
        ]
    ), "the slow feed must cross the threshold, or this proves nothing"


def _panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    return next(p for p in dashboard["panels"] if p["title"] == title)


def _format_time(ms: int, moment_format: str, zone: str) -> str:
    """The moment.js tokens the week profile uses: d (weekday, Sunday 0), HH, ddd."""
    local = datetime.fromtimestamp(ms / 1000, ZoneInfo(zone))
    tokens = {"d": str(local.isoweekday() % 7), "HH": f"{local:%H}", "ddd": f"{local:%a}"}
    return " ".join(tokens[token] for token in moment_format.split(" "))


def test_week_profile_folds_hours_of_the_week_in_the_systems_time_zone(filled: Filled) -> None:
    zone = "America/New_York"  # far from UTC, so a fold in UTC would not match
    files = grafana.render(Settings(grafana=GrafanaSettings(timezone=zone)))
    dashboard = json.loads(files["dashboards/livestack/station-history.json"])
    panel = next(p for p in dashboard["panels"] if p["type"] == "barchart")
    name = "dashboards/livestack/station-history.json"
    (frame,) = _run(filled, name, panel["targets"][0], panel)
    # Grafana's transformations, in the panel's order: formatTime, groupBy (mean), sortBy.
    steps = {t["id"]: t["options"] for t in panel["transformations"]}
    assert list(steps) == ["formatTime", "groupBy", "sortBy"]
    assert steps["formatTime"]["timezone"] == zone
    fold = steps["formatTime"]["outputFormat"]
    groups: dict[str, list[float]] = {}
    for ms, value in zip(frame.fields["Time"], frame.fields["bikes"], strict=True):
        groups.setdefault(_format_time(ms, fold, zone), []).append(value)
    shown = {key: sum(v) / len(v) for key, v in sorted(groups.items())}
    # Independently: hourly means of the raw points of that station, folded the same way.
    station = _variables(filled, name)["station"]
    raw = filled.influxd.query(
        f"SELECT bikes_available FROM station_status WHERE system = 'velib' "
        f"AND station_id = '{station}'",
        "bikes",
        epoch="ms",
    )
    hours: dict[int, list[int]] = {}
    for row in raw:
        hours.setdefault(row["time"] // 3_600_000 * 3_600_000, []).append(row["bikes_available"])
    expected: dict[str, list[float]] = {}
    for hour, values in hours.items():
        expected.setdefault(_format_time(hour, fold, zone), []).append(sum(values) / len(values))
    assert shown == pytest.approx({k: sum(v) / len(v) for k, v in expected.items()})
    assert shown, "no hour of the week shown"


def _run_starts(times_ms: list[int], start_ms: int, step_ms: int = 10_000) -> int:
    """Anomaly runs: maximal sequences of consecutive 10 s steps (aligned on the epoch, as
    InfluxDB's GROUP BY time) holding a flagged reading; one already on at the range's first
    step has no start in the range."""
    steps = {t // step_ms for t in times_ms}
    first = start_ms // step_ms
    return sum(1 for s in steps if s - 1 not in steps and s > first)


def test_anomaly_runs_today_counts_runs_not_readings(filled: Filled) -> None:
    name = "dashboards/livestack/pressure-live.json"
    dashboard = json.loads(FILES[name])
    panel = _panel(dashboard, "Anomaly runs today")
    (frame,) = _run(filled, name, panel["targets"][0], panel)
    start, end = _panel_range(_range(filled, name), panel)
    flagged = filled.influxd.query(
        f"SELECT value FROM anomaly WHERE patient_id = '1' AND time >= {start}ms "
        f"AND time <= {end}ms",
        "anomalies",
        epoch="ms",
    )
    expected = _run_starts(sorted({row["time"] for row in flagged}), start)
    assert frame.fields["Value"] == [expected]
    assert expected < len(flagged)  # runs, not readings
    # The annotation: one marker per run start.
    (annotation,) = [a for a in dashboard["annotations"]["list"] if a["name"] == "Anomaly runs"]
    markers = _run(filled, name, annotation["target"], {})
    assert sum(len(frame.fields["Time"]) for frame in markers) == expected


def test_busiest_stations_equal_the_trip_file(filled: Filled) -> None:
    name = "dashboards/livestack/trip-flows.json"
    panel = _panel(json.loads(FILES[name]), "Busiest stations")
    (frame,) = _run(filled, name, panel["targets"][0], panel)
    undocks: dict[str, int] = {}
    docks: dict[str, int] = {}
    first, last = _range(filled, name)
    new_york = ZoneInfo("America/New_York")  # the file's times; each event at its minute

    def inside(local: str) -> bool:
        moment = datetime.fromisoformat(local).replace(second=0, tzinfo=new_york)
        return first <= moment.timestamp() * 1000 <= last

    with TRIPS.open(newline="") as handle:
        for row in csv.DictReader(handle):
            start, end = row["start_station_id"], row["end_station_id"]
            if not start or not end or row["ended_at"] < row["started_at"]:
                continue
            if inside(row["started_at"]):
                undocks[start] = undocks.get(start, 0) + 1
            if inside(row["ended_at"]):
                docks[end] = docks.get(end, 0) + 1
    trips = {s: undocks.get(s, 0) + docks.get(s, 0) for s in undocks.keys() | docks.keys()}
    top = sorted(trips.values(), reverse=True)[:15]
    assert sorted(frame.fields["top"], reverse=True) == top
    for station, total, out in zip(
        frame.fields["station_id"], frame.fields["top"], frame.fields["undocks"], strict=True
    ):
        assert (total, out) == (trips[station], undocks.get(station, 0)), station


def _write_telemetry(influxd: InfluxD, counters: Counters, now: int) -> None:
    rows = counters.rows(now, MemorySink().metrics())["events"]
    requests.post(
        f"{influxd.url}/write",
        params={"db": "health", "precision": "s"},
        data="\n".join(Encoder(EVENTS).lines(rows)[0]),
        timeout=5,
    ).raise_for_status()


def test_health_rates_show_first_occurrences_restarts_and_drained_points(
    influxd: InfluxD, tmp_path: Path
) -> None:
    influxd.query('DROP DATABASE "health"')
    influxd.query('CREATE DATABASE "health"')
    config = tmp_path / "c.toml"
    config.write_text("")
    start = int(time.time()) - 3600
    first = Scheduler.from_settings(load(config), MemorySink(), once=True).counters
    _write_telemetry(influxd, first, start)  # nothing counted yet
    first.add("oslo", "fetch", "timeout")  # a kind never seen before
    _write_telemetry(influxd, first, start + 10)
    first.add("bikes", "write", "drained", 40)
    _write_telemetry(influxd, first, start + 20)
    # A restart: counts start again from zero, the first report comes 30 s later.
    second = Scheduler.from_settings(load(config), MemorySink(), once=True).counters
    second.add("oslo", "fetch", "timeout", 2)
    second.add("bikes", "write", "ok", 7)
    _write_telemetry(influxd, second, start + 60)
    name = "dashboards/livestack/collector-health.json"
    dashboard = json.loads(FILES[name])
    totals = {}
    for title in (
        "Errors by source, stage and kind",
        "Points written (drained from the spool included)",
    ):
        panel = _panel(dashboard, title)
        ctx = Context(start * 1000, (start + 120) * 1000, min_interval=panel.get("interval"))
        query = interpolate(panel["targets"][0]["query"], ctx)
        found = frames(execute(influxd.url, "health", query), "time_series")
        totals[title] = {
            tuple(sorted(f.labels.items())): sum(v for v in f.fields["Value"] if v) for f in found
        }
    assert totals["Errors by source, stage and kind"] == {
        (("result", "timeout"), ("source", "oslo"), ("stage", "fetch")): 3
    }
    assert totals["Points written (drained from the spool included)"] == {
        (("source", "bikes"),): 47
    }


def _great_circle_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    # The haversine formula on a sphere of the Earth's mean radius, computed here in Python.
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6_371_000 * math.asin(math.sqrt(a))


def test_nearby_stations_are_those_within_the_radius_nearest_first(filled: Filled) -> None:
    name = "dashboards/livestack/station-history.json"
    dashboard = json.loads(FILES[name])
    variables = _variables(filled, name)
    assert variables["radius_m"] == "500"
    info = json.loads((FIXTURES / SYSTEMS["velib"] / "station_information.json").read_text())
    places = {str(s["station_id"]): (s["lat"], s["lon"]) for s in info["data"]["stations"]}
    here = places[str(variables["station"])]
    expected = sorted(
        (round(_great_circle_m(*here, *there), 3), station)
        for station, there in places.items()
        if _great_circle_m(*here, *there) <= 500
    )
    assert len(expected) > 1, "a station with neighbours, or this proves little"
    for kind in ("table", "geomap"):
        panel = next(p for p in dashboard["panels"] if p["type"] == kind and "within" in p["title"])
        (frame,) = _run(filled, name, panel["targets"][0], panel)
        rows = sorted(
            (round(d, 3), s)
            for d, s in zip(frame.fields["distance_m"], frame.fields["station_id"], strict=True)
        )
        assert [s for _, s in rows] == [s for _, s in expected], kind
        assert [d for d, _ in rows] == pytest.approx([d for d, _ in expected], abs=0.01)
    # The table is sorted by Grafana (sortBy distance_m), InfluxQL returns series by tag.
    table_panel = next(
        p for p in dashboard["panels"] if p["type"] == "table" and "within" in p["title"]
    )
    assert table_panel["transformations"] == [
        {"id": "sortBy", "options": {"sort": [{"field": "distance_m", "desc": False}]}}
    ]


def test_nearby_panels_parse_and_show_nothing_for_a_station_without_position(
    filled: Filled,
) -> None:
    name = "dashboards/livestack/station-history.json"
    dashboard = json.loads(FILES[name])
    picked = _range(filled, name)
    values: dict[str, str | list[str]] = {"system": "velib", "station": str(UNKNOWN_STATION)}
    stations = filled.influxd.query(
        f"SELECT last(bikes_available), last(lat) FROM station_status "
        f"WHERE station_id = '{UNKNOWN_STATION}'",
        "bikes",
    )
    assert stations and stations[0]["last"] is not None, "the collector stored its status"
    assert stations[0]["last_1"] is None, "and no position"
    for variable in dashboard["templating"]["list"]:
        if variable["name"] in ("lat0", "lon0"):
            query = interpolate(variable["query"], Context(*picked, values))
            found = frames(execute(filled.influxd.url, "bikes", query), "time_series", query)
            assert found == []  # Grafana: no option, the variable is empty
            values[variable["name"]] = ""
        elif variable["name"] == "radius_m":
            values["radius_m"] = variable["query"]
        elif variable["name"] == "colour_by":
            values["colour_by"] = "bikes_available"
    for kind in ("table", "geomap"):
        panel = next(p for p in dashboard["panels"] if p["type"] == kind and "within" in p["title"])
        query = interpolate(panel["targets"][0]["query"], Context(*picked, values))
        result = execute(filled.influxd.url, "bikes", query)  # asserts it parses and runs
        assert frames(result, "table") == [], kind
    # A station with a position still finds itself (distance 0) through the same queries,
    # west of Greenwich too (a negative longitude inside "(0${lon0})").
    panel = next(p for p in dashboard["panels"] if p["type"] == "table" and "within" in p["title"])
    for system in ("velib", "citibike"):
        info = json.loads((FIXTURES / SYSTEMS[system] / "station_information.json").read_text())
        station = info["data"]["stations"][0]
        values.update(system=system, station=str(station["station_id"]))
        for coordinate in ("lat0", "lon0"):
            variable = next(v for v in dashboard["templating"]["list"] if v["name"] == coordinate)
            query = interpolate(variable["query"], Context(*picked, values))
            (frame,) = frames(execute(filled.influxd.url, "bikes", query), "time_series", query)
            values[coordinate] = str(frame.fields["Value"][0])
        query = interpolate(panel["targets"][0]["query"], Context(*picked, values))
        (frame,) = frames(execute(filled.influxd.url, "bikes", query), "table")
        nearest = min(zip(frame.fields["distance_m"], frame.fields["station_id"], strict=True))
        assert nearest == (pytest.approx(0, abs=0.01), str(station["station_id"])), system
