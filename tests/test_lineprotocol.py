"""The encoder must be byte-identical to influxdb-client's Point on everything we can write."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from influxdb_client import Point

from collector.contract import MEASUREMENTS, Measurement
from collector.lineprotocol import Encoder, Row, format_float, series_key

# One field of every type; names chosen so that sorted order interleaves the types.
TEST = Measurement(
    bucket="b",
    name="m",
    tags=("k",),
    fields={
        "a_int": "integer",
        "b_float": "float",
        "c_bool": "boolean",
        "d_str": "string",
        "e_int": "integer",
        "f_float": "float",
    },
    precision="s",
    description="test",
)


def _point(measurement: Measurement, row: Row) -> str:
    tags, values, time = row
    point = Point(measurement.name)
    for key, value in tags:
        point.tag(key, value)
    for name, value in zip(measurement.field_names, values, strict=True):
        point.field(name, value)
    if time is not None:
        point.time(time, "s")
    return point.to_line_protocol()


NASTY = [
    "plain",
    "with space",
    "comma,here",
    "equals=sign",
    'double"quote',
    "back\\slash",
    "trailing\\",
    "new\nline",
    "tab\there",
    "carriage\rreturn",
    "ünïcödé ø 東京",
    "=,\\ \"'",
]

CASES: list[Row] = [
    ((("k", "v"),), (1, 1.5, True, "s", -2, 0.25), 1),
    ((), (None, 1.0, None, None, None, None), None),  # a whole float loses ".0"
    ((), (0, -0.5, False, "", 2**62, 1e21), 5),
    ((), (None, 1e-7, None, None, None, 2.0**60), 5),
    ((), (1, math.nan, None, None, None, math.inf), 5),  # NaN and inf are left out
    ((("b", "2"), ("a", "1")), (1, None, None, None, None, None), 7),  # tags sorted
    ((("empty", ""), ("k", "v")), (1, None, None, None, None, None), 7),  # empty tag dropped
    *[(((s, s),), (1, 2.5, True, s, None, None), 1) for s in NASTY],
]


@pytest.mark.parametrize("row", CASES, ids=range(len(CASES)))
def test_byte_identical_to_point(row: Row) -> None:
    assert Encoder(TEST).line(row) == _point(TEST, row)


@pytest.mark.parametrize("name", NASTY)
def test_nasty_measurement_names(name: str) -> None:
    measurement = Measurement("b", name, (), {"x": "integer"}, "s", "")
    row: Row = ((("t", name),), (1,), 3)
    assert Encoder(measurement).line(row) == _point(measurement, row)


def test_row_with_no_writable_field_is_counted_not_silently_lost() -> None:
    rows: list[Row] = [
        ((), (None, math.nan, None, None, None, None), 1),
        ((), (1, None, None, None, None, None), 1),
        ((), (None,) * 6, 1),
    ]
    assert _point(TEST, rows[0]) == ""  # what influxdb-client does: the point just vanishes
    lines, empty = Encoder(TEST).lines(rows)
    assert lines == ["m a_int=1i 1"]
    assert empty == 2


def test_caches_are_bounded_and_output_stays_correct() -> None:
    encoder = Encoder(TEST, max_cached=3)
    rows: list[Row] = [
        ((("k", str(i)),), (i, i / 7, None, f"s{i}", None, None), i) for i in range(50)
    ]
    assert encoder.lines(rows)[0] == [_point(TEST, r) for r in rows]
    assert len(encoder._keys) <= 3


def test_contract_field_names_are_identifiers_and_sorted() -> None:
    for measurement in MEASUREMENTS:
        assert list(measurement.fields) == sorted(measurement.fields), measurement.name
        assert all(name.isidentifier() for name in measurement.fields)
        Encoder(measurement)  # compiles


def test_non_identifier_field_names_are_refused() -> None:
    with pytest.raises(ValueError, match="identifier"):
        Encoder(Measurement("b", "m", (), {"bad name": "integer"}, "s", ""))


def test_helpers() -> None:
    assert series_key("m", [("b", "x y"), ("a", "1")]) == "m,a=1,b=x\\ y"
    assert format_float(3.0) == "3"
    assert format_float(math.nan) is None


text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@settings(max_examples=1500, deadline=None)
@given(
    name=text,
    tags=st.dictionaries(text, text, max_size=4),
    values=st.tuples(
        st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        st.one_of(st.none(), st.floats()),
        st.one_of(st.none(), st.booleans()),
        st.one_of(st.none(), text),
        st.one_of(st.none(), st.integers()),
        st.one_of(st.none(), st.floats(allow_nan=False)),
    ),
    time=st.one_of(st.none(), st.integers(min_value=0, max_value=2**62)),
)
def test_generated_rows_match_point(
    name: str, tags: dict[str, str], values: tuple, time: int | None
) -> None:
    if name.translate({ord(","): "", ord(" "): ""}).startswith("#"):
        return  # Point warns about a comment-like measurement; we never write one
    measurement = Measurement("b", name, (), TEST.fields, "s", "")
    row: Row = (tuple(tags.items()), values, time)
    encoder = Encoder(measurement)
    expected = _point(measurement, row)
    assert encoder.line(row) == (expected or None)
    assert encoder.line(row) == (expected or None)  # again, from the caches
