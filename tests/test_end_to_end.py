"""Feeds served locally -> ``collector setup`` + ``collector run --once`` -> real InfluxDB 1.x.

Expected values are computed here straight from the JSON, independently of the collector's
parser, and compared with what the server returns for every station.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from collector.contract import STATION_STATUS
from tests.support import DATA, FeedServer, InfluxD, Reply, run_cli

pytestmark = pytest.mark.influxdb

BUCKET = STATION_STATUS.bucket


def _serve_json(feeds: FeedServer, path: str, body: bytes) -> str:
    feeds.routes[path] = Reply(200, body, {"Content-Type": "application/json"})
    return feeds.url + path


def _serve_folder(feeds: FeedServer, folder: Path, prefix: str, discovery: bool) -> None:
    """Serve a fixture folder; with ``discovery``, a gbfs.json whose feeds point here."""
    urls = {}
    for file in folder.glob("*.json"):
        if file.name != "gbfs.json":
            urls[file.stem] = _serve_json(feeds, f"{prefix}/{file.name}", file.read_bytes())
    if discovery:
        original = folder / "gbfs.json"
        doc = json.loads(original.read_text()) if original.exists() else None
        feed_list = [{"name": name, "url": url} for name, url in sorted(urls.items())]
        if doc is not None and "feeds" in doc["data"]:  # 3.0
            doc["data"]["feeds"] = feed_list
        elif doc is not None:
            language = next(iter(doc["data"]))
            doc["data"] = {language: {"feeds": feed_list}}
        else:
            doc = {
                "last_updated": 0,
                "ttl": 0,
                "version": "2.2",
                "data": {"nb": {"feeds": feed_list}},
            }
        _serve_json(feeds, f"{prefix}/gbfs.json", json.dumps(doc).encode())


def _config(tmp_path: Path, influxd: InfluxD, systems: str) -> Path:
    path = tmp_path / "collector.toml"
    path.write_text(
        f"""
[influxdb]
url = "{influxd.url}"
api = "v1"
max_retries = 0

# The fixtures are years old: keep them, or the 30-day default rejects them.
[buckets.bikes]
name = "bikes"
retention_hours = 0

{systems}
"""
    )
    return path


def _stored(influxd: InfluxD, system: str) -> dict[str, dict[str, Any]]:
    rows = influxd.query(f"SELECT * FROM station_status WHERE \"system\" = '{system}'", BUCKET)
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        assert row["station_id"] not in by_id, f"two points for station {row['station_id']}"
        by_id[row["station_id"]] = row
    return by_id


def _flag(value: object) -> bool | None:
    return None if value is None else bool(value)


def _expected_from_json(
    status: dict[str, Any], info: dict[str, Any], ebikes: Any
) -> dict[str, dict[str, Any]]:
    facts = {str(s["station_id"]): s for s in info["data"]["stations"]}
    expected = {}
    for raw in status["data"]["stations"]:
        station_id = str(raw["station_id"])
        fact = facts.get(station_id, {})
        reported = raw.get("last_reported")
        expected[station_id] = {
            "bikes_available": raw.get("num_bikes_available", raw.get("num_vehicles_available")),
            "docks_available": raw.get("num_docks_available"),
            "bikes_disabled": raw.get("num_bikes_disabled"),
            "docks_disabled": raw.get("num_docks_disabled"),
            "ebikes_available": ebikes(raw),
            "is_installed": _flag(raw.get("is_installed")),
            "is_renting": _flag(raw.get("is_renting")),
            "is_returning": _flag(raw.get("is_returning")),
            "last_reported": reported if isinstance(reported, int) and reported > 10**9 else None,
            "capacity": fact.get("capacity"),
            "lat": fact.get("lat"),
            "lon": fact.get("lon"),
            "name": fact.get("name"),
        }
    return expected


def _assert_same(stored: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    assert set(stored) == set(expected)
    for station_id, fields in expected.items():
        row = stored[station_id]
        got = {key: row.get(key) for key in fields}
        assert got == fields, station_id


def test_real_feeds_land_exactly(
    tmp_path: Path, influxd: InfluxD, feeds: FeedServer, shared_fixtures: Path
) -> None:
    gbfs_dir = shared_fixtures / "gbfs"
    _serve_folder(feeds, gbfs_dir / "oslo-2022-v2.2-intbool", "/oslo", discovery=True)
    _serve_folder(feeds, gbfs_dir / "spec-v3.0", "/paris3", discovery=True)
    _serve_folder(feeds, gbfs_dir / "citibike-2019-v1.0", "/citibike", discovery=False)
    _serve_folder(feeds, gbfs_dir / "velib-2024", "/velib", discovery=False)
    config = _config(
        tmp_path,
        influxd,
        f"""
[[gbfs.systems]]
name = "oslo"
url = "{feeds.url}/oslo/gbfs.json"
headers = {{ "Client-Identifier" = "test-livestack" }}

[[gbfs.systems]]
name = "paris3"
url = "{feeds.url}/paris3/gbfs.json"

[[gbfs.systems]]
name = "citibike"
station_information_url = "{feeds.url}/citibike/station_information.json"
station_status_url = "{feeds.url}/citibike/station_status.json"

[[gbfs.systems]]
name = "velib"
station_information_url = "{feeds.url}/velib/station_information.json"
station_status_url = "{feeds.url}/velib/station_status.json"
""",
    )
    setup = run_cli("setup", config=config)
    assert setup.returncode == 0, setup.stderr
    assert "database bikes:" in setup.stdout
    started = int(time.time())
    run = run_cli("run", "--once", config=config)
    finished = int(time.time())
    assert run.returncode == 0, run.stderr

    def load(folder: str, name: str) -> dict[str, Any]:
        return json.loads((gbfs_dir / folder / f"{name}.json").read_text())

    citibike = _stored(influxd, "citibike")
    _assert_same(
        citibike,
        _expected_from_json(
            load("citibike-2019-v1.0", "station_status"),
            load("citibike-2019-v1.0", "station_information"),
            lambda raw: raw.get("num_ebikes_available"),
        ),
    )
    assert {row["time"] for row in citibike.values()} == {1_562_342_057}

    def velib_ebikes(raw: dict[str, Any]) -> int:
        return next(t["ebike"] for t in raw["num_bikes_available_types"] if "ebike" in t)

    velib = _stored(influxd, "velib")
    _assert_same(
        velib,
        _expected_from_json(
            load("velib-2024", "station_status"),
            load("velib-2024", "station_information"),
            velib_ebikes,
        ),
    )
    # No last_updated in Vélib's feed: one fetch time for the whole poll.
    (velib_time,) = {row["time"] for row in velib.values()}
    assert started <= velib_time <= finished

    oslo = _stored(influxd, "oslo")
    _assert_same(
        oslo,
        _expected_from_json(
            load("oslo-2022-v2.2-intbool", "station_status"),
            load("oslo-2022-v2.2-intbool", "station_information"),
            lambda raw: None,
        ),
    )
    request = next(r for r in feeds.requests if r.path == "/oslo/station_status.json")
    assert request.headers["Client-Identifier"] == "test-livestack"

    paris3 = _stored(influxd, "paris3")
    assert set(paris3) == {"6efbec5a-6b8c-455b-bed2-8d66be6d6a4b"}
    row = paris3["6efbec5a-6b8c-455b-bed2-8d66be6d6a4b"]
    assert (row["bikes_available"], row["ebikes_available"], row["name"]) == (0, 0, "2 ROUES")
    assert row["time"] == 1_562_247_183

    # The run logs one poll line per system, with its data-quality counts.
    poll_lines = [line for line in run.stderr.splitlines() if "event=poll " in line]
    assert len(poll_lines) == 4
    assert any(
        "source=citibike" in line and "implausible_last_reported:15" in line for line in poll_lines
    )


def test_spec_fixture_escaping_round_trips(
    tmp_path: Path, influxd: InfluxD, feeds: FeedServer
) -> None:
    folder = DATA / "gbfs" / "v1.0"
    _serve_folder(feeds, folder, "/nyc", discovery=False)
    config = _config(
        tmp_path,
        influxd,
        f"""
[[gbfs.systems]]
name = "nyc-escaping"
station_information_url = "{feeds.url}/nyc/station_information.json"
station_status_url = "{feeds.url}/nyc/station_status.json"
""",
    )
    assert run_cli("setup", config=config).returncode == 0
    run = run_cli("run", "--once", config=config)
    assert run.returncode == 0, run.stderr
    stored = _stored(influxd, "nyc-escaping")
    assert set(stored) == {"72", "79", "82", "3255"}
    assert stored["79"]["name"] == 'Franklin St, "Quote" = \\ Corner'
    assert stored["82"]["name"] == "St James Pl\nPearl St"
    assert stored["82"]["last_reported"] is None  # the 18001 placeholder is left out
    assert stored["72"]["ebikes_available"] == 2
    assert stored["79"]["lon"] == -74.0
    # The server's own schema: every field has the type the contract names ("lon=-74" is a
    # float in line protocol; an int there would be a type conflict forever after).
    field_types = {
        row["fieldKey"]: row["fieldType"]
        for row in influxd.query("SHOW FIELD KEYS FROM station_status", BUCKET)
    }
    assert field_types == STATION_STATUS.fields


def test_setup_is_idempotent(tmp_path: Path, influxd: InfluxD) -> None:
    config = _config(tmp_path, influxd, "")
    first = run_cli("setup", config=config)
    second = run_cli("setup", config=config)
    assert first.returncode == second.returncode == 0
    assert "database bikes: unchanged" in second.stdout
    assert BUCKET in {row["name"] for row in influxd.query("SHOW DATABASES")}


def test_dry_run_prints_line_protocol_without_a_database(tmp_path: Path, feeds: FeedServer) -> None:
    folder = DATA / "gbfs" / "v2.3"
    feeds.serve_folder(folder, "/v2.3")
    config = tmp_path / "c.toml"
    config.write_text(
        f"""
[influxdb]
url = "http://127.0.0.1:9"

[[gbfs.systems]]
name = "oslo"
url = "{feeds.url}/v2.3/gbfs.json"
"""
    )
    run = run_cli("run", "--once", "--dry-run", config=config)
    assert run.returncode == 0, run.stderr
    assert run.stdout == (folder / "expected.lp").read_text()
