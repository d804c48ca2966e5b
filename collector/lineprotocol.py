"""Rows of a contract measurement -> InfluxDB line protocol.

A row is ``(tags, values, time)``: ``tags`` a tuple of ``(key, value)`` pairs, ``values`` one
value (or None) per field in ``Measurement.field_names`` order, with the types the contract
declares; ``time`` in the measurement's precision. Rows are plain tuples because a poll makes
thousands of them and a NamedTuple costs several times more to build.

The output is byte-identical to ``influxdb_client.Point.to_line_protocol()`` (tags and fields
sorted by key, floats without a trailing ``.0``, None/NaN/inf fields left out), but several times
faster, for two reasons: each measurement's field layout is known from the contract, so its
encoder is generated once as straight-line Python with no per-field loop or type dispatch; and
a poll repeats the same series keys, names and coordinates, so their escaped text is cached.

Unlike ``Point``, a row with no writable field is not turned silently into nothing: the encoder
counts it, so the caller can report it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from types import CodeType
from typing import Any, TypeAlias, cast

from collector.contract import Measurement

FieldValue: TypeAlias = int | float | bool | str
Tags: TypeAlias = tuple[tuple[str, str], ...]
Row: TypeAlias = tuple[Tags, tuple[FieldValue | None, ...], int | None]

_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans(
    {",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"}
)
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})


def escape_key(key: str) -> str:
    return key.translate(_ESCAPE_KEY)


def escape_tag_value(value: str) -> str:
    escaped = value.translate(_ESCAPE_KEY)
    # A trailing backslash would escape the separator that follows it.
    return escaped + " " if escaped.endswith("\\") else escaped


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


def format_float(value: float) -> str | None:
    """Point's float text (``1.0`` -> ``1``); None for NaN and infinities, which are not written."""
    if not math.isfinite(value):
        return None
    text = str(value)
    return text[:-2] if text.endswith(".0") else text


def format_string(value: str) -> str:
    return f'"{value.translate(_ESCAPE_STRING)}"'


class _Cache(dict[object, str]):
    """Value -> encoded fragment, emptied when full so a feed inventing values cannot grow it."""

    def __init__(self, limit: int, make: Callable[[object], str | None]) -> None:
        super().__init__()
        self._limit = limit
        self._make = make

    def __missing__(self, value: object) -> str:
        text = self._make(value)
        if text is None:  # NaN or infinity: nothing to write, and NaN never equals a key
            return ""
        if len(self) >= self._limit:
            self.clear()
        self[value] = text
        return text


def _fragment(prefix: str, fmt: Callable[[Any], str | None]) -> Callable[[object], str | None]:
    """A cache's miss: ``,name=`` and the formatted value, None when it is not written."""

    def make(value: object) -> str | None:
        text = fmt(value)
        return None if text is None else prefix + text

    return make


@functools.cache
def _compiled(source: str) -> CodeType:
    # Compiling is most of an encoder's cost (~0.2 ms): once per measurement, not per encoder,
    # since every patient has three and they are made before the patients' first slot.
    return compile(source, "<generated encoder>", "exec")


def _generate(measurement: Measurement) -> str:
    """Source of ``encode(rows, out) -> empty`` for one measurement.

    Straight-line Python: the loop unpacks each row's values in its ``for`` target, and the
    fields are a single f-string with one conditional part per field ("" when the value is
    None): one string built per row, no call, no inner loop, no type dispatch. Float and string
    fields read whole fragments from caches (``c<i>``); series keys come from ``keys``.
    """
    parts: list[str] = []
    caches: list[str] = []
    for i, name in enumerate(measurement.field_names):
        if not name.isidentifier():  # keeps the generated source trivially safe
            raise ValueError(f"field name {name!r} must be an identifier")
        kind = measurement.fields[name]
        v = f"v{i}"
        if kind == "integer":
            fragment = f"f',{name}={{{v}}}i'"
        elif kind == "boolean":
            fragment = f"(',{name}=true' if {v} else ',{name}=false')"
        else:  # floats and strings repeat across polls: cached whole fragments
            caches.append(f"c{i}")
            fragment = f"c{i}[{v}]"
        parts.append(f"{{'' if {v} is None else {fragment}}}")
    unpack = "".join(f"v{i}, " for i in range(len(parts)))
    defaults = "".join(f", {c}={c}" for c in caches)
    return f"""
def encode(rows, out, keys, new_key{defaults}):
    append = out.append
    get = keys.get
    empty = 0
    for tags, ({unpack}), time in rows:
        fields = f"{"".join(parts)}"
        if not fields:
            empty += 1
        elif time is None:
            append(f"{{get(tags) or new_key(tags)}} {{fields[1:]}}")
        else:
            append(f"{{get(tags) or new_key(tags)}} {{fields[1:]}} {{time}}")
    return empty
"""


class Encoder:
    """Encodes rows of one measurement. One per thread: its caches are not locked."""

    def __init__(self, measurement: Measurement, max_cached: int = 100_000) -> None:
        self.measurement = measurement
        self._max_cached = max_cached
        self._keys: dict[Tags, str] = {}
        namespace: dict[str, object] = {}
        for i, name in enumerate(measurement.field_names):
            kind = measurement.fields[name]
            if kind == "float":
                namespace[f"c{i}"] = _Cache(max_cached, _fragment(f",{name}=", format_float))
            elif kind == "string":
                namespace[f"c{i}"] = _Cache(max_cached, _fragment(f",{name}=", format_string))
        exec(_compiled(_generate(measurement)), namespace)
        self._encode = cast(Callable[..., int], namespace["encode"])

    def _new_key(self, tags: Tags) -> str:
        if len(self._keys) >= self._max_cached:
            self._keys.clear()
        key = self._keys[tags] = series_key(self.measurement.name, tags)
        return key

    def line(self, row: Row) -> str | None:
        """One line without a newline, or None when the row has no field to write."""
        out: list[str] = []
        self._encode((row,), out, self._keys, self._new_key)
        return out[0] if out else None

    def lines(self, rows: Iterable[Row]) -> tuple[list[str], int]:
        """(lines, number of rows left out because none of their fields can be written)."""
        out: list[str] = []
        empty = self._encode(rows, out, self._keys, self._new_key)
        return out, empty
