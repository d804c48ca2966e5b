"""Property-based: every parser, fed thousands of generated payloads (valid-but-odd JSON in
the right shape, wrong shapes, random bytes), returns or raises its own Failure, nothing else;
and what it returns keeps its promises."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.contract import SENSORS, STATION_STATUS
from collector.retry import Failure
from collector.sources import gbfs, pressure

FAST = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(
        [
            "2023-11-14T22:13:20Z",
            "2023-11-14 22:13:20.5+00:00",
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+23:00",
            "1700000000",
            "",
            "nan",
            "1e400",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
counts = st.one_of(st.integers(min_value=-5, max_value=60), values)


def _maybe(keys: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=keys)


station_status = _maybe(
    {
        "station_id": st.one_of(st.text(max_size=6), st.integers(), values),
        "num_bikes_available": counts,
        "num_vehicles_available": counts,
        "num_bikes_disabled": counts,
        "num_docks_available": counts,
        "num_docks_disabled": counts,
        "num_ebikes_available": counts,
        "vehicle_types_available": st.one_of(
            st.lists(_maybe({"vehicle_type_id": values, "count": counts}), max_size=3), values
        ),
        "num_bikes_available_types": st.one_of(
            st.lists(st.dictionaries(st.sampled_from(["ebike", "mechanical"]), counts), max_size=2),
            values,
        ),
        "is_installed": values,
        "is_renting": values,
        "is_returning": values,
        "last_reported": values,
    }
)
station_information = _maybe(
    {
        "station_id": st.one_of(st.text(max_size=6), st.integers(), values),
        "name": st.one_of(
            st.text(max_size=10), st.lists(_maybe({"text": values, "language": values})), values
        ),
        "short_name": values,
        "lat": values,
        "lon": values,
        "capacity": counts,
    }
)


def _document(stations: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "data": st.one_of(
                st.fixed_dictionaries({"stations": st.lists(stations, max_size=6)}), values
            )
        },
        optional={"last_updated": values, "ttl": values, "version": values},
    )


def _dump(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _parses_or_fails(func: Any, *args: Any) -> Any:
    try:
        return func(*args)
    except Failure as failure:
        assert failure.stage == "parse" and failure.kind in ("not_json", "schema")
        return None


@FAST
@given(
    doc=_document(station_status),
    info=_document(station_information),
    ebike_types=st.one_of(st.none(), st.frozensets(st.text(max_size=4), max_size=3)),
    fetched_at=st.floats(min_value=0, max_value=4e9),
)
def test_station_status_never_raises_anything_else(
    doc: dict[str, Any], info: dict[str, Any], ebike_types: frozenset[str] | None, fetched_at: float
) -> None:
    catalog = _parses_or_fails(gbfs.parse_station_information, _dump(info), "x")
    snapshot = _parses_or_fails(
        gbfs.parse_station_status, _dump(doc), "x", catalog, fetched_at, ebike_types
    )
    if snapshot is None:
        return
    names = STATION_STATUS.field_names
    for tags, row_values, time in snapshot.rows:
        fields = dict(zip(names, row_values, strict=True))
        assert dict(tags)["station_id"] and dict(tags)["system"] == "x"
        assert type(fields["bikes_available"]) is int and fields["bikes_available"] >= 0
        for name in (
            "bikes_disabled",
            "docks_available",
            "docks_disabled",
            "ebikes_available",
            "capacity",
            "last_reported",
        ):
            assert fields[name] is None or (type(fields[name]) is int and fields[name] >= 0)
        for name in ("is_installed", "is_renting", "is_returning"):
            assert fields[name] is None or type(fields[name]) is bool
        for name in ("lat", "lon"):
            assert fields[name] is None or (
                type(fields[name]) is float and math.isfinite(fields[name])
            )
        assert type(time) is int
    assert len({dict(tags)["station_id"] for tags, _, _ in snapshot.rows}) == len(snapshot.rows)


@FAST
@given(
    doc=st.one_of(
        st.fixed_dictionaries(
            {
                "data": st.one_of(
                    st.fixed_dictionaries(
                        {"feeds": st.lists(_maybe({"name": values, "url": values}))}
                    ),
                    st.dictionaries(
                        st.text(max_size=3),
                        st.one_of(
                            st.fixed_dictionaries(
                                {"feeds": st.lists(_maybe({"name": values, "url": values}))}
                            ),
                            values,
                        ),
                    ),
                    values,
                )
            },
            optional={"version": values, "ttl": values},
        ),
        values,
    ),
    language=st.one_of(st.none(), st.text(max_size=3)),
)
def test_discovery_never_raises_anything_else(doc: Any, language: str | None) -> None:
    discovery = _parses_or_fails(gbfs.parse_discovery, _dump(doc), language)
    if discovery is not None:
        assert all(type(k) is str and type(v) is str for k, v in discovery.feeds.items())


@FAST
@given(
    doc=st.fixed_dictionaries(
        {
            "data": st.one_of(
                st.fixed_dictionaries(
                    {
                        "vehicle_types": st.lists(
                            _maybe(
                                {
                                    "vehicle_type_id": values,
                                    "propulsion_type": values,
                                    "form_factor": values,
                                }
                            )
                        )
                    }
                ),
                values,
            )
        }
    )
)
def test_vehicle_types_never_raise_anything_else(doc: Any) -> None:
    types = _parses_or_fails(gbfs.parse_vehicle_types, _dump(doc))
    if types is not None:
        assert all(type(t) is str for t in types)


sensor = _maybe(
    {
        "id": st.one_of(st.integers(min_value=-1, max_value=7), values),
        "value": st.one_of(st.integers(min_value=-2, max_value=1100), values),
        "anomaly": st.one_of(st.booleans(), values),
        "name": values,
    }
)


@FAST
@given(
    doc=st.one_of(
        st.fixed_dictionaries(
            {
                "trace": st.one_of(
                    _maybe(
                        {
                            "sensors": st.one_of(st.lists(sensor, max_size=8), values),
                            "id": values,
                            "name": values,
                        }
                    ),
                    values,
                )
            },
            optional={
                "firstname": values,
                "lastname": values,
                "birthdate": values,
                "disabled": values,
                "id": values,
            },
        ),
        values,
    ),
    keep_person=st.booleans(),
)
def test_pressure_reading_never_raises_anything_else(doc: Any, keep_person: bool) -> None:
    reading = _parses_or_fails(
        pressure.parse_reading,
        _dump(doc),
        3,
        1_700_000_000_000,
    )
    if reading is None:
        return
    assert len(reading.values) == len(reading.anomalies) == len(SENSORS)
    assert all(type(v) is int and 0 <= v <= 1023 for v in reading.values)
    assert all(type(a) is bool for a in reading.anomalies)
    assert reading.person is None  # not asked for
    rows, anomalies = pressure.rows(reading)
    assert len(rows) == 6 and len(anomalies) == sum(reading.anomalies)
    if keep_person:
        with_person = pressure.parse_reading(_dump(doc), 3, 1, keep_person=True)
        assert with_person.person is not None


@FAST
@given(body=st.binary(max_size=300))
def test_random_bytes_are_failures_not_crashes(body: bytes) -> None:
    for parse in (
        lambda b: gbfs.parse_station_status(b, "x", None, 0.0),
        lambda b: gbfs.parse_station_information(b, "x"),
        lambda b: gbfs.parse_discovery(b),
        gbfs.parse_vehicle_types,
        lambda b: pressure.parse_reading(b, 1, 0),
    ):
        _parses_or_fails(parse, body)


@FAST
@given(value=values)
def test_timestamps_never_raise(value: Any) -> None:
    result = gbfs.parse_timestamp(value)
    assert result is None or type(result) is int


def test_deeply_nested_json_is_a_failure_not_a_crash() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    assert _parses_or_fails(gbfs.parse_station_status, deep, "x", None, 0.0) is None
    assert _parses_or_fails(pressure.parse_reading, b'{"trace": ' + deep + b"}", 1, 0) is None
