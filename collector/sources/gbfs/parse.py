"""GBFS documents, versions 1.0 to 3.0, parsed: pure functions, bytes in, values out.

They carry the knowledge of the format and its real-world quirks (a new quirk is a change
here and a case folder under ``tests/data/gbfs/``); ``system.GbfsSystem`` does the I/O.

Data-quality faults never stop a poll; each is counted under one of
``contract.QUALITY_KINDS``:

- ``invalid_station``: no usable station_id or bikes count; the station is not stored.
- ``negative_count``: a negative count; the station is not stored (its numbers cannot be trusted).
- ``invalid_value``: a wrong-typed optional value (flag, count, position); that field is left out.
- ``duplicate_station``: a station_id seen twice in one document; the first one is kept.
- ``unknown_station``: in station_status but not in station_information; stored without position.
- ``over_capacity``: bikes + docks above capacity; stored as published.
- ``implausible_last_reported``: a placeholder ``last_reported`` (before 2000); that field is
  left out.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from collector.contract import STATION_STATUS
from collector.lineprotocol import Row, Tags
from collector.retry import Failure

MIN_PLAUSIBLE_EPOCH = 946_684_800  # 2000-01-01T00:00:00Z
# Feed clocks run a little ahead of ours; a last_updated further ahead than this is not trusted.
MAX_CLOCK_SKEW_SECS = 60
# Station information changes rarely and is the largest document: never fetch it more often.
MIN_INFO_REFRESH_SECS = 60.0
EBIKE_PROPULSION = frozenset({"electric_assist", "electric"})
EBIKE_FORM_FACTORS = frozenset({"bicycle", "cargo_bicycle"})

__all__ = [
    "Catalog",
    "Discovery",
    "Snapshot",
    "Station",
    "load_document",
    "parse_discovery",
    "parse_station_information",
    "parse_station_status",
    "parse_timestamp",
    "parse_vehicle_types",
    "plausible_time",
    "schema_failure",
]


def schema_failure(what: str, message: str) -> Failure:
    return Failure("schema", f"{what}: {message}", stage="parse")


def load_document(body: bytes, what: str) -> dict[str, Any]:
    """The top-level object of a GBFS document, with a dict under ``data``."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        start = body[:60].decode("utf-8", "replace").strip()
        raise Failure(
            "not_json", f"{what}: not JSON ({exc}); starts {start!r}", stage="parse"
        ) from None
    if type(doc) is not dict:
        raise schema_failure(what, f"top level is {type(doc).__name__}, not an object")
    if type(doc.get("data")) is not dict:
        raise schema_failure(what, "no 'data' object")
    return doc


def _ttl_secs(doc: dict[str, Any]) -> int | None:
    """The document's ``ttl`` in seconds, None when absent or not a count."""
    ttl = doc.get("ttl")
    return ttl if type(ttl) is int and ttl >= 0 else None


def parse_timestamp(value: object) -> int | None:
    """Epoch seconds from a POSIX number, a millisecond epoch or an RFC3339 string.

    Real feeds send all three, and RFC3339 with a space instead of ``T``. Returns None for
    anything else, including booleans.
    """
    if type(value) is int:
        seconds = value
    elif type(value) is float:
        if not math.isfinite(value):
            return None
        seconds = int(value)
    elif type(value) is str:
        text = value.strip()
        if text.isascii() and text.isdigit():  # "²".isdigit(), yet int("²") raises
            seconds = int(text)
        else:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return int(parsed.timestamp())
    else:
        return None
    if seconds > 100_000_000_000:  # milliseconds: 1e11 s is the year 5138
        seconds //= 1000
    return seconds


def _text(value: object, language: str | None) -> str | None:
    """A plain string, or the right entry of a 3.0 localized ``[{text, language}]`` list."""
    if type(value) is str:
        return value
    if type(value) is list and value:
        chosen = None
        for entry in value:
            if type(entry) is dict and type(entry.get("text")) is str:
                if chosen is None or entry.get("language") == language:
                    chosen = entry["text"]
                if entry.get("language") == language:
                    break
        return chosen
    return None


def _station_id(value: object) -> str | None:
    # Vélib' sends integer ids; the tag is always the decimal string.
    if type(value) is str:
        return value or None
    if type(value) is int:
        return str(value)
    return None


# ---------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Discovery:
    version: str | None
    language: str | None
    feeds: dict[str, str]
    ttl_secs: int | None


def parse_discovery(body: bytes, language: str | None = None) -> Discovery:
    """``gbfs.json``: feeds under ``data.{lang}.feeds`` (1.x/2.x) or ``data.feeds`` (3.0)."""
    doc = load_document(body, "gbfs.json")
    data = doc["data"]
    chosen: str | None = None
    if type(data.get("feeds")) is list:
        feeds = data["feeds"]
    else:
        languages = [
            key
            for key, value in data.items()
            if type(value) is dict and type(value.get("feeds")) is list
        ]
        if not languages:
            raise schema_failure("gbfs.json", "no feeds under data or data.<language>")
        chosen = language if language in languages else languages[0]
        feeds = data[chosen]["feeds"]
    urls = {
        feed["name"]: feed["url"]
        for feed in feeds
        if type(feed) is dict and type(feed.get("name")) is str and type(feed.get("url")) is str
    }
    version = doc.get("version")
    return Discovery(
        version=version if type(version) is str else None,
        language=chosen,
        feeds=urls,
        ttl_secs=_ttl_secs(doc),
    )


def parse_vehicle_types(body: bytes) -> frozenset[str]:
    """Ids of the vehicle types that count as e-bikes."""
    doc = load_document(body, "vehicle_types")
    types = doc["data"].get("vehicle_types")
    if type(types) is not list:
        raise schema_failure("vehicle_types", "no vehicle_types list")
    # Values are compared as strings only: a list there would not even be hashable.
    return frozenset(
        entry["vehicle_type_id"]
        for entry in types
        if type(entry) is dict
        and type(entry.get("vehicle_type_id")) is str
        and type(entry.get("propulsion_type")) is str
        and entry["propulsion_type"] in EBIKE_PROPULSION
        and type(entry.get("form_factor", "bicycle")) is str
        and entry.get("form_factor", "bicycle") in EBIKE_FORM_FACTORS
    )


# --------------------------------------------------------------------- station information


@dataclass(frozen=True, slots=True)
class Station:
    tags: Tags
    short_name: str | None
    # (capacity, lat, lon, name): the static fields of the station's rows, in field order,
    # built once per station_information refresh instead of once per poll.
    facts: tuple[int | None, float | None, float | None, str | None]

    @property
    def capacity(self) -> int | None:
        return self.facts[0]


@dataclass
class Catalog:
    """Static station facts from station_information, keyed by station_id."""

    stations: dict[str, Station]
    ttl_secs: int | None = None
    quality: Counter[str] = field(default_factory=Counter)


def _coordinate(value: object, limit: float) -> float | None:
    if type(value) is float or type(value) is int:
        number = float(value)
    elif type(value) is str:
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if -limit <= number <= limit else None


def parse_station_information(body: bytes, system: str, language: str | None = None) -> Catalog:
    doc = load_document(body, "station_information")
    raw_stations = doc["data"].get("stations")
    if type(raw_stations) is not list:
        raise schema_failure("station_information", "no stations list")
    quality: Counter[str] = Counter()
    stations: dict[str, Station] = {}
    # One pair for every station: a catalogue is held for as long as the system is polled
    # (~290,000 stations in bench/gbfs_scale.py), and a pair each would be 56 bytes apiece.
    system_tag = ("system", system)
    for raw in raw_stations:
        if type(raw) is not dict:
            quality["invalid_station"] += 1
            continue
        station_id = _station_id(raw.get("station_id"))
        if station_id is None:
            quality["invalid_station"] += 1
            continue
        if station_id in stations:
            quality["duplicate_station"] += 1
            continue
        lat = _coordinate(raw.get("lat"), 90.0)
        lon = _coordinate(raw.get("lon"), 180.0)
        if lat is None or lon is None:
            if "lat" in raw or "lon" in raw:
                quality["invalid_value"] += 1
            lat = lon = None
        capacity = raw.get("capacity")
        if capacity is not None and (type(capacity) is not int or capacity < 0):
            quality["invalid_value"] += 1
            capacity = None
        stations[station_id] = Station(
            tags=(("station_id", station_id), system_tag),
            short_name=_text(raw.get("short_name"), language),
            facts=(capacity, lat, lon, _text(raw.get("name"), language)),
        )
    return Catalog(stations, _ttl_secs(doc), quality)


# -------------------------------------------------------------------------- station status


@dataclass
class Snapshot:
    """One station_status document as station_status rows."""

    rows: list[Row]
    last_updated: int | None  # the feed's own time, when it gave a plausible one
    ttl_secs: int | None
    quality: Counter[str]


# Rows are built positionally for speed; fail at import if the contract's order ever changes.
assert STATION_STATUS.field_names == (
    "bikes_available",
    "bikes_disabled",
    "capacity",
    "docks_available",
    "docks_disabled",
    "ebikes_available",
    "is_installed",
    "is_renting",
    "is_returning",
    "last_reported",
    "lat",
    "lon",
    "name",
), "station_status fields changed: update parse_station_status"

_INVALID = object()


def _count(value: object) -> Any:
    """An int count, None when absent, or _INVALID."""
    if type(value) is int:
        return value
    if value is None:
        return None
    if type(value) is float and value.is_integer():
        return int(value)
    return _INVALID


# 1 == True and 0 == False, so 0/1 ints map too.
_FLAGS: dict[object, bool] = {True: True, False: False}
_NO_FACTS = (None, None, None, None)


def _ebikes(raw: dict[str, Any], ebike_types: frozenset[str] | None) -> Any:
    direct = raw.get("num_ebikes_available")
    if direct is not None:
        return _count(direct)
    by_type = raw.get("vehicle_types_available")
    if type(by_type) is list and ebike_types is not None:
        total = 0
        for entry in by_type:
            if type(entry) is not dict:
                return _INVALID
            type_id = entry.get("vehicle_type_id")
            if type(type_id) is str and type_id in ebike_types:
                count = _count(entry.get("count"))
                if type(count) is not int:
                    return _INVALID
                total += count
        return total
    # Vélib': [{"mechanical": 3}, {"ebike": 1}] (or the same as one dict).
    velib = raw.get("num_bikes_available_types")
    if type(velib) is list:
        for entry in velib:
            if type(entry) is dict and "ebike" in entry:
                return _count(entry["ebike"])
        return None
    if type(velib) is dict and "ebike" in velib:
        return _count(velib["ebike"])
    return None


def _flag(raw: dict[str, Any], key: str, quality: Counter[str]) -> bool | None:
    value = raw.get(key)
    flag = _FLAGS.get(value) if type(value) in (bool, int) else None
    if flag is None and value is not None:
        quality["invalid_value"] += 1
    return flag


def plausible_time(value: int | None, now: float) -> int | None:
    if value is None or value < MIN_PLAUSIBLE_EPOCH or value > now + MAX_CLOCK_SKEW_SECS:
        return None
    return value


def parse_station_status(
    body: bytes,
    system: str,
    catalog: Catalog | None,
    fetched_at: float,
    ebike_types: frozenset[str] | None = None,
) -> Snapshot:
    """station_status -> one row per station with valid counts.

    ``catalog`` None means station_information is not known (yet): stations are stored without
    position and not counted as unknown. ``ebike_types`` None means vehicle_types is not known.
    """
    doc = load_document(body, "station_status")
    raw_stations = doc["data"].get("stations")
    if type(raw_stations) is not list:
        raise schema_failure("station_status", "no stations list")
    last_updated = plausible_time(parse_timestamp(doc.get("last_updated")), fetched_at)
    timestamp = last_updated if last_updated is not None else int(fetched_at)

    known = catalog.stations if catalog is not None else {}
    quality: Counter[str] = Counter()
    rows: list[Row] = []
    append = rows.append
    seen: set[str] = set()
    for raw in raw_stations:
        if type(raw) is not dict:
            quality["invalid_station"] += 1
            continue
        get = raw.get
        station_id = get("station_id")
        if type(station_id) is not str or not station_id:
            station_id = _station_id(station_id)
            if station_id is None:
                quality["invalid_station"] += 1
                continue
        if station_id in seen:
            quality["duplicate_station"] += 1
            continue
        seen.add(station_id)

        bikes = get("num_bikes_available")
        if bikes is None:
            bikes = get("num_vehicles_available")  # 3.0
        disabled = get("num_bikes_disabled")
        if disabled is None:
            disabled = get("num_vehicles_disabled")  # 3.0
        docks = get("num_docks_available")
        docks_disabled = get("num_docks_disabled")
        ebikes = get("num_ebikes_available")
        # Fast path: every count an int (or absent). Anything else is checked one by one.
        if not (
            type(bikes) is int
            and (docks is None or type(docks) is int)
            and (disabled is None or type(disabled) is int)
            and (docks_disabled is None or type(docks_disabled) is int)
        ):
            bikes, docks = _count(bikes), _count(docks)
            disabled, docks_disabled = _count(disabled), _count(docks_disabled)
            if type(bikes) is not int or _INVALID in (docks, disabled, docks_disabled):
                quality["invalid_station"] += 1
                continue
        if type(ebikes) is not int:
            ebikes = _ebikes(raw, ebike_types)
            if ebikes is _INVALID:
                quality["invalid_value"] += 1
                ebikes = None
        if (
            bikes < 0
            or (docks is not None and docks < 0)
            or (disabled is not None and disabled < 0)
            or (docks_disabled is not None and docks_disabled < 0)
            or (ebikes is not None and ebikes < 0)
        ):
            quality["negative_count"] += 1
            continue

        installed = get("is_installed")
        renting = get("is_renting")
        returning = get("is_returning")
        if not (type(installed) is bool and type(renting) is bool and type(returning) is bool):
            installed = _flag(raw, "is_installed", quality)
            renting = _flag(raw, "is_renting", quality)
            returning = _flag(raw, "is_returning", quality)

        reported = get("last_reported")
        if reported is not None and not (type(reported) is int and reported >= MIN_PLAUSIBLE_EPOCH):
            reported = parse_timestamp(reported)
            if reported is None or reported < MIN_PLAUSIBLE_EPOCH:
                quality["implausible_last_reported"] += 1
                reported = None

        station = known.get(station_id)
        if station is None:
            if catalog is not None:
                quality["unknown_station"] += 1
            tags: Tags = (("station_id", station_id), ("system", system))
            capacity, lat, lon, name = _NO_FACTS
        else:
            tags = station.tags
            capacity, lat, lon, name = station.facts
            if capacity is not None and bikes + (docks or 0) > capacity:
                quality["over_capacity"] += 1

        append(
            (
                tags,
                (
                    bikes,
                    disabled,
                    capacity,
                    docks,
                    docks_disabled,
                    ebikes,
                    installed,
                    renting,
                    returning,
                    reported,
                    lat,
                    lon,
                    name,
                ),
                timestamp,
            )
        )
    return Snapshot(rows, last_updated, _ttl_secs(doc), quality)
