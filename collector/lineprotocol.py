"""Records -> InfluxDB line protocol.

The output is byte-identical to ``influxdb_client.Point.to_line_protocol()`` (tags and fields
sorted by key, floats without a trailing ``.0``, None/NaN/inf fields left out), but several times
faster: a poll repeats the same series and field names thousands of times, so their escaped
forms are computed once and cached instead of once per point.

Unlike ``Point``, a record whose fields are all empty is not turned silently into nothing: the
encoder counts it, so the caller can report it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

FieldValue = int | float | bool | str

_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans(
    {",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"}
)
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})


class Record(NamedTuple):
    """One point. ``time`` is in the precision of the batch it is written with."""

    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: Mapping[str, FieldValue | None]
    time: int | None


def escape_key(key: str) -> str:
    return key.translate(_ESCAPE_KEY)


def escape_tag_value(value: str) -> str:
    escaped = value.translate(_ESCAPE_KEY)
    # A trailing backslash would escape the separator that follows it.
    return escaped + " " if escaped.endswith("\\") else escaped


def escape_string(value: str) -> str:
    return value.translate(_ESCAPE_STRING)


def series_key(measurement: str, tags: Iterable[tuple[str, str | None]]) -> str:
    """``measurement,tag=value,...`` with tags sorted by key; empty tags are left out."""
    parts = [measurement.translate(_ESCAPE_MEASUREMENT)]
    for key, value in sorted(tags, key=lambda kv: kv[0]):
        if value is None:
            continue
        k, v = escape_key(key), escape_tag_value(str(value))
        if k and v:
            parts.append(f"{k}={v}")
    return ",".join(parts)


def field_value(value: object) -> str | None:
    """The line-protocol text of one field value, or None when it is not written."""
    kind = type(value)
    if kind is int:
        return f"{value}i"
    if kind is float:
        return _float(value)  # type: ignore[arg-type]
    if kind is bool:
        return "true" if value else "false"
    if kind is str:
        return f'"{value.translate(_ESCAPE_STRING)}"'  # type: ignore[attr-defined]
    if value is None:
        return None
    # Subclasses (IntEnum, numpy scalars registered as numbers) take the slow path.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{int(value)}i"
    if isinstance(value, float):
        return _float(float(value))
    if isinstance(value, str):
        return f'"{str(value).translate(_ESCAPE_STRING)}"'
    raise TypeError(f"field value of type {kind.__name__} cannot be written: {value!r}")


def _float(value: float) -> str | None:
    if not math.isfinite(value):
        return None
    text = str(value)
    return text[:-2] if text.endswith(".0") else text


class Encoder:
    """Encodes records to lines, caching escaped series keys and sorted field-key layouts.

    The caches are bounded: station and patient sets are small, but a feed that invents a new
    station id on every poll must not grow memory without end.
    """

    def __init__(self, max_cached: int = 100_000) -> None:
        self._max_cached = max_cached
        self._series: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._layouts: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = {}
        self._strings: dict[str, str] = {}

    def line(self, record: Record) -> str | None:
        """One line without a newline, or None when the record has no field to write."""
        measurement, tags, fields, time = record
        cache_key = (measurement, tags)
        key = self._series.get(cache_key)
        if key is None:
            if len(self._series) >= self._max_cached:
                self._series.clear()
            key = self._series[cache_key] = series_key(measurement, tags)

        names = tuple(fields)
        layout = self._layouts.get(names)
        if layout is None:
            if len(self._layouts) >= self._max_cached:
                self._layouts.clear()
            # Point sorts fields by key; so do we, once per distinct set of field names.
            layout = self._layouts[names] = tuple(
                (name, escape_key(name) + "=") for name in sorted(names)
            )

        parts = []
        append = parts.append
        strings = self._strings
        for name, prefix in layout:
            value = fields[name]
            kind = type(value)
            if kind is int:
                append(f"{prefix}{value}i")
            elif kind is float:
                text = _float(value)  # type: ignore[arg-type]
                if text is not None:
                    append(prefix + text)
            elif kind is bool:
                append(prefix + ("true" if value else "false"))
            elif kind is str:
                quoted = strings.get(value)  # type: ignore[arg-type]
                if quoted is None:
                    if len(strings) >= self._max_cached:
                        strings.clear()
                    quoted = strings[value] = f'"{value.translate(_ESCAPE_STRING)}"'  # type: ignore[union-attr,index]
                append(prefix + quoted)
            elif value is not None:
                text = field_value(value)
                if text is not None:
                    append(prefix + text)
        if not parts:
            return None
        if time is None:
            return f"{key} {','.join(parts)}"
        return f"{key} {','.join(parts)} {time}"

    def lines(self, records: Iterable[Record]) -> tuple[list[str], int]:
        """(lines, number of records left out because none of their fields can be written)."""
        out: list[str] = []
        empty = 0
        line = self.line
        for record in records:
            text = line(record)
            if text is None:
                empty += 1
            else:
                out.append(text)
        return out, empty
