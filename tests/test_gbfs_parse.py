"""GBFS parsing: recorded payload in, exact line protocol out; no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector.contract import STATION_STATUS
from collector.lineprotocol import Encoder, Row
from collector.retry import Failure
from collector.sources import gbfs
from tests.support import DATA

SPEC = DATA / "gbfs"


def fields(row: Row) -> dict[str, object]:
    return dict(zip(STATION_STATUS.field_names, row[1], strict=True))


def station_id(row: Row) -> str:
    return dict(row[0])["station_id"]


def _lines(
    folder: Path, system: str, fetched_at: float, language: str | None = None
) -> tuple[str, gbfs.Snapshot, gbfs.Catalog]:
    catalog = gbfs.parse_station_information(
        (folder / "station_information.json").read_bytes(), system, language
    )
    types_file = folder / "vehicle_types.json"
    ebike_types = gbfs.parse_vehicle_types(types_file.read_bytes()) if types_file.exists() else None
    snapshot = gbfs.parse_station_status(
        (folder / "station_status.json").read_bytes(), system, catalog, fetched_at, ebike_types
    )
    lines, empty = Encoder(STATION_STATUS).lines(snapshot.rows)
    assert empty == 0
    return "\n".join(lines) + "\n", snapshot, catalog


# A case is a folder: the documents a system serves, ``expected.lp`` (written by hand from the
# specification) and ``case.json`` (what it shows, the parse's parameters and its expected
# data-quality counts). A new real-world quirk is one more folder.
CASES = sorted(folder.name for folder in SPEC.iterdir() if (folder / "case.json").is_file())


def test_every_fixture_folder_describes_itself() -> None:
    assert sorted(folder.name for folder in SPEC.iterdir() if folder.is_dir()) == CASES


@pytest.mark.parametrize("case", CASES)
def test_spec_fixture_gives_exact_line_protocol(case: str) -> None:
    folder = SPEC / case
    params = json.loads((folder / "case.json").read_text())
    assert params["description"]
    text, snapshot, catalog = _lines(
        folder, params["system"], params["fetched_at"], params["language"]
    )
    assert text == (folder / "expected.lp").read_text()
    assert dict(snapshot.quality) == params["quality"]
    assert dict(catalog.quality) == params["info_quality"]


def test_discovery_v1_v2_language_key_and_v3_flat() -> None:
    v11 = (SPEC / "v1.1" / "gbfs.json").read_bytes()
    first = gbfs.parse_discovery(v11)
    assert first.language == "fr"  # no preference: the first language listed
    assert first.feeds["station_status"] == "{BASE}/v1.1/fr/station_status.json"
    english = gbfs.parse_discovery(v11, language="en")
    assert english.version == "1.1"
    assert english.feeds["station_status"] == "{BASE}/v1.1/station_status.json"
    assert gbfs.parse_discovery(v11, language="de").language == "fr"

    v23 = gbfs.parse_discovery((SPEC / "v2.3" / "gbfs.json").read_bytes())
    assert (v23.language, v23.version, v23.ttl_secs) == ("nb", "2.3", 0)
    v30 = gbfs.parse_discovery((SPEC / "v3.0" / "gbfs.json").read_bytes())
    assert (v30.language, v30.version) == (None, "3.0")
    assert set(v30.feeds) == {
        "system_information",
        "vehicle_types",
        "station_information",
        "station_status",
    }


def test_vehicle_types_count_only_electric_bicycles() -> None:
    assert gbfs.parse_vehicle_types((SPEC / "v2.3" / "vehicle_types.json").read_bytes()) == {
        "ebike"
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1_700_000_000, 1_700_000_000),
        (1_700_000_000_123, 1_700_000_000),  # millisecond epoch
        (1_700_000_000.9, 1_700_000_000),
        ("1700000000", 1_700_000_000),
        ("2023-11-14T22:13:20Z", 1_700_000_000),
        ("2023-11-14T22:13:20.969Z", 1_700_000_000),
        ("2023-11-14 22:13:20.124370+00:00", 1_700_000_000),  # space, microseconds
        ("2023-11-14T23:13:20+01:00", 1_700_000_000),
        ("2023-11-14T22:13:20", 1_700_000_000),  # no offset: UTC
        ("yesterday", None),
        (True, None),
        (None, None),
        (float("nan"), None),
        ([1], None),
    ],
)
def test_parse_timestamp(value: object, expected: int | None) -> None:
    assert gbfs.parse_timestamp(value) == expected


def _status(stations: list[object], **top: object) -> bytes:
    return json.dumps(
        {"last_updated": 1_700_000_000, "ttl": 0, **top, "data": {"stations": stations}}
    ).encode()


@pytest.mark.parametrize(
    ("last_updated", "expected_time"),
    [
        (1_700_000_000, 1_700_000_000),
        (18001, 1_700_000_500),  # placeholder from 1970: fetch time instead
        (1_700_000_500 + 61, 1_700_000_500),  # beyond clock skew in the future
        (1_700_000_500 + 59, 1_700_000_559),  # within the skew allowance
        ("garbage", 1_700_000_500),
    ],
)
def test_point_time_is_feed_time_only_when_plausible(
    last_updated: object, expected_time: int
) -> None:
    body = _status([{"station_id": "a", "num_bikes_available": 1}], last_updated=last_updated)
    snapshot = gbfs.parse_station_status(body, "x", None, 1_700_000_500.7)
    assert [r[2] for r in snapshot.rows] == [expected_time]


def test_no_last_updated_uses_fetch_time_and_reports_none() -> None:
    body = json.dumps(
        {
            "lastUpdatedOther": 1,
            "ttl": 3600,
            "data": {"stations": [{"station_id": 5, "num_bikes_available": 2}]},
        }
    ).encode()
    snapshot = gbfs.parse_station_status(body, "x", None, 1_700_000_500.2)
    assert snapshot.last_updated is None
    assert snapshot.ttl_secs == 3600
    assert snapshot.rows[0][2] == 1_700_000_500
    assert snapshot.rows[0][0] == (("station_id", "5"), ("system", "x"))


def test_unknown_catalog_does_not_count_unknown_stations() -> None:
    body = _status([{"station_id": "a", "num_bikes_available": 1}])
    assert not gbfs.parse_station_status(body, "x", None, 1_700_000_000).quality
    empty = gbfs.Catalog({})
    assert gbfs.parse_station_status(body, "x", empty, 1_700_000_000).quality == {
        "unknown_station": 1
    }


def test_integral_float_counts_are_accepted_and_fractional_rejected() -> None:
    body = _status(
        [
            {"station_id": "a", "num_bikes_available": 3.0, "num_docks_available": 2},
            {"station_id": "b", "num_bikes_available": 3.5, "num_docks_available": 2},
            {"station_id": "c", "num_bikes_available": 1, "num_docks_available": "2"},
        ]
    )
    snapshot = gbfs.parse_station_status(body, "x", None, 1_700_000_000)
    assert [(station_id(r), fields(r)["bikes_available"]) for r in snapshot.rows] == [("a", 3)]
    assert type(fields(snapshot.rows[0])["bikes_available"]) is int
    assert snapshot.quality == {"invalid_station": 2}


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"<html><body>Bad gateway</body></html>", "not_json"),
        (b'{"last_updated": 1, "data": {"stations": [', "not_json"),
        (b"", "not_json"),
        (b"[]", "schema"),
        (b'{"last_updated": 1}', "schema"),
        (b'{"data": []}', "schema"),
        (b'{"data": {"stations": {"a": 1}}}', "schema"),
        (b'{"data": {"bikes": []}}', "schema"),
    ],
)
def test_malformed_documents_raise_parse_failures(body: bytes, kind: str) -> None:
    with pytest.raises(Failure) as raised:
        gbfs.parse_station_status(body, "x", None, 1_700_000_000)
    assert raised.value.kind == kind
    assert raised.value.stage == "parse"
    assert "station_status" in str(raised.value)
    assert not raised.value.transient


def test_discovery_without_feeds_is_a_schema_failure() -> None:
    with pytest.raises(Failure) as raised:
        gbfs.parse_discovery(b'{"data": {"en": {"nothing": []}}}')
    assert raised.value.kind == "schema"


# ------------------------------------------------------------------------ real public feeds


def _real(
    shared: Path, folder: str, system: str, fetched_at: float
) -> tuple[gbfs.Snapshot, gbfs.Catalog, dict]:
    base = shared / "gbfs" / folder
    catalog = gbfs.parse_station_information(
        (base / "station_information.json").read_bytes(), system
    )
    types = base / "vehicle_types.json"
    snapshot = gbfs.parse_station_status(
        (base / "station_status.json").read_bytes(),
        system,
        catalog,
        fetched_at,
        gbfs.parse_vehicle_types(types.read_bytes()) if types.exists() else None,
    )
    by_id = {station_id(r): r for r in snapshot.rows}
    return snapshot, catalog, by_id


def test_real_citibike_2019_v1_0(shared_fixtures: Path) -> None:
    snapshot, catalog, by_id = _real(
        shared_fixtures, "citibike-2019-v1.0", "citibike", 1_562_342_100
    )
    assert len(catalog.stations) == 845
    assert len(snapshot.rows) == 845
    assert snapshot.last_updated == 1_562_342_057
    # Decommissioned stations report last_reported = 18001 (1970): left out, counted.
    assert dict(snapshot.quality) == {"implausible_last_reported": 15}
    assert fields(by_id["168"]) == {
        "bikes_available": 11,
        "bikes_disabled": 0,
        "capacity": 47,
        "docks_available": 36,
        "docks_disabled": 0,
        "ebikes_available": 0,
        "is_installed": True,
        "is_renting": True,
        "is_returning": False,
        "last_reported": 1_562_341_725,
        "lat": 40.73971301,
        "lon": -73.99456405,
        "name": "W 18 St & 6 Ave",
    }
    assert by_id["168"][2] == 1_562_342_057
    placeholders = [r for r in snapshot.rows if fields(r)["last_reported"] is None]
    assert len(placeholders) == 15


def test_real_velib_2024(shared_fixtures: Path) -> None:
    snapshot, catalog, by_id = _real(shared_fixtures, "velib-2024", "velib", 1_732_004_600)
    assert len(catalog.stations) == 1485
    assert len(snapshot.rows) == 1485
    assert snapshot.last_updated is None  # only lastUpdatedOther
    assert all(r[2] == 1_732_004_600 for r in snapshot.rows)
    assert dict(snapshot.quality) == {"over_capacity": 13}
    first = fields(by_id["213688169"])  # integer id in the feed
    assert (first["bikes_available"], first["ebikes_available"], first["docks_available"]) == (
        1,
        0,
        34,
    )
    assert first["name"] == "Benjamin Godard - Victor Hugo"
    second = fields(by_id["17278902806"])
    assert (second["bikes_available"], second["ebikes_available"], second["docks_available"]) == (
        5,
        4,
        15,
    )


def test_real_oslo_2022_int_booleans(shared_fixtures: Path) -> None:
    snapshot, catalog, by_id = _real(
        shared_fixtures, "oslo-2022-v2.2-intbool", "oslo", 1_666_551_810
    )
    assert len(snapshot.rows) == len(catalog.stations) == 260
    assert not snapshot.quality
    station = fields(by_id["2351"])
    assert station["bikes_available"] == 10 and station["docks_available"] == 8
    assert station["is_installed"] is True and station["capacity"] == 18
    assert station["name"] == "Sogn Studentby"


def test_real_spec_v3_0(shared_fixtures: Path) -> None:
    snapshot, catalog, by_id = _real(shared_fixtures, "spec-v3.0", "paris", 1_562_247_200)
    assert snapshot.last_updated == 1_562_247_183  # 2019-07-04T13:33:03.969Z
    assert len(catalog.stations) == 23
    record = fields(by_id["6efbec5a-6b8c-455b-bed2-8d66be6d6a4b"])
    assert record["name"] == "2 ROUES"  # localized [{language, text}]
    assert record["bikes_available"] == 0  # num_vehicles_available
    assert record["ebikes_available"] == 0  # ebicycle_paris is electric_assist
    assert record["last_reported"] == 1_562_247_183


def test_real_entur_ids_mismatch_is_counted_not_fatal(shared_fixtures: Path) -> None:
    snapshot, _catalog, by_id = _real(shared_fixtures, "entur-v2", "entur", 1_434_054_700)
    # Entur's test status uses ids that station_information does not list.
    assert snapshot.quality == {"unknown_station": 2}
    assert set(by_id) == {"TST:Station:1", "2"}
    assert fields(by_id["TST:Station:1"])["lat"] is None
