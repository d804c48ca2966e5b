"""Citi Bike trip-history CSVs -> docks and undocks per station per minute.

Both schemas (before 2021: ``starttime``, ``start station id``...; from 2021: ``started_at``,
``start_station_id``...) are told apart by the header; files may be plain, ``.gz`` or ``.zip``.
Each trip is an undock at its start station and minute and a dock at its end station and
minute. Rows with no end station, an end before the start, or a time that does not parse are
skipped and counted (``BAD_ROW_KINDS``).

Files are not sorted by time (a 2021 file is half out of order), so counts are kept per
(station, minute) until the end. A month of New York has millions of such pairs, so the counts
live in a dict of packed integers up to ``max_keys_in_memory`` and are merged into a SQLite
file beyond that: memory stays bounded whatever the file size.
"""

from __future__ import annotations

import csv
import gzip
import io
import sqlite3
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeAlias
from zoneinfo import ZoneInfo

from collector.contract import STATION_FLOW
from collector.lineprotocol import FieldValue, Tags

assert STATION_FLOW.field_names == ("docks", "lat", "lon", "name", "net", "undocks")

if TYPE_CHECKING:  # typeshed's name for what readinto may fill
    from _typeshed import WriteableBuffer

BAD_ROW_KINDS = ("no_end_station", "no_start_station", "negative_duration", "bad_time", "short_row")
_DOCK = 1 << 32  # a count's value packs docks in the high half, undocks in the low half
TICK_ROWS = 4096  # progress is offered this often while reading
# A station_flow row: unlike a general Row, its time is always there (the minute).
FlowRow: TypeAlias = tuple[Tags, tuple[FieldValue | None, ...], int]


class TripFileError(Exception):
    """A file that is not a trip file we know (its header names no known schema)."""


@dataclass(frozen=True)
class Schema:
    name: str
    started: str
    ended: str
    start_id: str
    start_name: str
    start_lat: str
    start_lon: str
    end_id: str
    end_name: str
    end_lat: str
    end_lon: str


SCHEMAS = (
    Schema(
        "2013-2020",
        "starttime",
        "stoptime",
        "start station id",
        "start station name",
        "start station latitude",
        "start station longitude",
        "end station id",
        "end station name",
        "end station latitude",
        "end station longitude",
    ),
    Schema(
        "2021+",
        "started_at",
        "ended_at",
        "start_station_id",
        "start_station_name",
        "start_lat",
        "start_lng",
        "end_station_id",
        "end_station_name",
        "end_lat",
        "end_lng",
    ),
)


def detect_schema(header: list[str]) -> tuple[Schema, list[int]]:
    """The schema and the column indexes of its fields, from a header row."""
    names = [h.strip().strip('"').lower() for h in header]
    for schema in SCHEMAS:
        wanted = [
            schema.started,
            schema.ended,
            schema.start_id,
            schema.start_name,
            schema.start_lat,
            schema.start_lon,
            schema.end_id,
            schema.end_name,
            schema.end_lat,
            schema.end_lon,
        ]
        if all(w in names for w in wanted):
            return schema, [names.index(w) for w in wanted]
    raise TripFileError(f"unknown trip file header: {header[:6]}...")


class _Counting(io.RawIOBase):
    """Counts bytes read from a binary file into ``progress`` as they are read, so that the
    ETA moves while a file is being read, not once it is closed."""

    def __init__(self, raw: io.BufferedReader, progress: Progress) -> None:
        self._raw = raw
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        n = self._raw.readinto(buffer)
        self._progress.bytes_read += n or 0
        return n

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._raw.close()
        super().close()


@dataclass
class Progress:
    rows: int = 0
    bytes_read: int = 0
    bytes_total: int = 0


def open_texts(path: Path, progress: Progress) -> Iterator[IO[str]]:
    """The CSV texts in ``path``: itself, its gunzipped content, or each CSV in a zip."""
    progress.bytes_total += path.stat().st_size
    raw = _Counting(path.open("rb"), progress)
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(raw) as archive:
                members = [
                    m
                    for m in archive.namelist()
                    if m.lower().endswith(".csv") and not m.startswith("__MACOSX")
                ]
                if not members:
                    raise TripFileError("a zip with no .csv file in it")
                for member in members:
                    with archive.open(member) as binary:
                        yield io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
        elif path.suffix == ".gz":
            with gzip.GzipFile(fileobj=raw) as binary:
                yield io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
        else:
            yield io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8-sig", newline="")
    finally:
        raw.close()


def read_file(
    path: Path, flows: Flows, progress: Progress, tick: Callable[[], None] | None = None
) -> None:
    """Add every trip of ``path`` to ``flows``. Whatever is wrong with the file (not text, not
    the compression its name says, truncated, empty, a header and no rows) is one
    TripFileError naming it."""
    try:
        for text in open_texts(path, progress):
            flows.add_file(text, progress, tick)
    except TripFileError as exc:
        raise TripFileError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise TripFileError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} cannot be decoded); "
            "trip files are UTF-8 CSV"
        ) from None
    except gzip.BadGzipFile as exc:
        # The same exception says "not gzip" (a bad magic number) and "damaged" (a CRC or
        # length that does not match): only the first means the name is wrong.
        if "Not a gzipped file" in str(exc):
            raise TripFileError(f"{path}: named .gz but not gzip-compressed") from None
        raise TripFileError(f"{path}: damaged gzip data ({exc})") from None
    except zipfile.BadZipFile as exc:
        if _starts_like_zip(path):
            raise TripFileError(f"{path}: damaged or truncated zip archive ({exc})") from None
        raise TripFileError(f"{path}: named .zip but not a zip archive") from None
    except (EOFError, zlib.error) as exc:
        raise TripFileError(f"{path}: truncated or damaged compressed data ({exc})") from None
    except csv.Error as exc:
        raise TripFileError(f"{path}: not a CSV file ({exc})") from None
    except OSError as exc:
        raise TripFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _starts_like_zip(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(4) == b"PK\x03\x04"
    except OSError:
        return False


@dataclass
class Flows:
    """Counts per (station, minute), and each station's name and position."""

    timezone: str = "America/New_York"
    max_keys_in_memory: int = 300_000
    bad: Counter[str] = field(default_factory=Counter)
    trips: int = 0

    def __post_init__(self) -> None:
        self._zone = ZoneInfo(self.timezone)
        self._minutes: dict[str, int] = {}  # "YYYY-MM-DD HH:MM" -> epoch minute
        self._index: dict[str, int] = {}  # station id -> small int
        self.stations: list[tuple[str, str | None, float | None, float | None]] = []
        self._counts: dict[int, int] = {}
        self._spill: sqlite3.Connection | None = None
        self._spill_dir: tempfile.TemporaryDirectory[str] | None = None

    # -- input
    def _minute(self, text: str) -> int:
        key = text[:16]
        minute = self._minutes.get(key)
        if minute is None:
            moment = datetime.fromisoformat(key).replace(tzinfo=self._zone)
            minute = self._minutes[key] = int(moment.timestamp()) // 60
        return minute

    def _station(self, station_id: str, name: str, lat: str, lon: str) -> int:
        index = self._index.get(station_id)
        if index is None:
            index = self._index[station_id] = len(self.stations)
            self.stations.append((station_id, name or None, _float(lat), _float(lon)))
        return index

    def _negative(self, started: str, ended: str) -> bool:
        # Same format in one file, so the strings compare like the times, except across a
        # daylight-saving change: only then are the times themselves compared.
        if ended >= started:
            return False
        zone = self._zone
        start = datetime.fromisoformat(started).replace(tzinfo=zone)
        end = datetime.fromisoformat(ended).replace(tzinfo=zone)
        return end < start

    def add_file(
        self, text: IO[str], progress: Progress, tick: Callable[[], None] | None = None
    ) -> None:
        """Count the trips of one CSV text; ``tick`` is called every few thousand rows."""
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            raise TripFileError("empty: no header, no trips")
        _schema, columns = detect_schema(header)
        rows_before = progress.rows
        widest = max(columns)
        s, e, si, sn, sla, slo, ei, en, ela, elo = columns
        counts, bad = self._counts, self.bad
        minute_of, station_of = self._minute, self._station
        for row in reader:
            progress.rows += 1
            if tick is not None and not progress.rows % TICK_ROWS:
                tick()
            if len(row) <= widest:
                bad["short_row"] += 1
                continue
            start_id, end_id = row[si], row[ei]
            if not end_id:
                bad["no_end_station"] += 1
                continue
            if not start_id:
                bad["no_start_station"] += 1
                continue
            started, ended = row[s], row[e]
            try:
                start_minute, end_minute = minute_of(started), minute_of(ended)
                if self._negative(started, ended):
                    bad["negative_duration"] += 1
                    continue
            except ValueError:
                bad["bad_time"] += 1
                continue
            a = station_of(start_id, row[sn], row[sla], row[slo])
            b = station_of(end_id, row[en], row[ela], row[elo])
            key = (a << 32) | start_minute
            counts[key] = counts.get(key, 0) + 1
            key = (b << 32) | end_minute
            counts[key] = counts.get(key, 0) + _DOCK
            self.trips += 1
            if len(counts) > self.max_keys_in_memory:
                self._spill_counts()
        if progress.rows == rows_before:
            raise TripFileError("a header and no trips")

    # -- spilling
    def _spill_counts(self) -> None:
        if self._spill is None:
            self._spill_dir = tempfile.TemporaryDirectory(prefix="livestack-trips-")
            self._spill = sqlite3.connect(Path(self._spill_dir.name) / "flows.sqlite")
            self._spill.execute("PRAGMA journal_mode=OFF")
            self._spill.execute("PRAGMA synchronous=OFF")  # a scratch file: speed over safety
            self._spill.execute("CREATE TABLE flows (key INTEGER PRIMARY KEY, packed INTEGER)")
        self._spill.executemany(
            "INSERT INTO flows VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
            "SET packed = packed + excluded.packed",
            self._counts.items(),
        )
        self._spill.commit()
        self._counts.clear()

    @property
    def spilled(self) -> bool:
        return self._spill is not None

    def span(self) -> tuple[int, int] | None:
        """(first, last) epoch minute with a dock or undock; None when there is none."""
        minutes = [key & 0xFFFFFFFF for key in self._counts]
        bounds = [(min(minutes), max(minutes))] if minutes else []
        if self._spill is not None:
            low, high = self._spill.execute(
                "SELECT MIN(key & 4294967295), MAX(key & 4294967295) FROM flows"
            ).fetchone()
            if low is not None:
                bounds.append((low, high))
        if not bounds:
            return None
        return min(b[0] for b in bounds), max(b[1] for b in bounds)

    def size(self) -> int:
        """(station, minute) rows that ``rows`` yields."""
        if self._spill is None:
            return len(self._counts)
        self._spill_counts()
        (count,) = self._spill.execute("SELECT COUNT(*) FROM flows").fetchone()
        return int(count)

    # -- output
    def _packed(self, by_minute: bool) -> Iterator[tuple[int, int]]:
        if self._spill is None:
            items = self._counts.items()
            if by_minute:
                return iter(sorted(items, key=lambda kv: (kv[0] & 0xFFFFFFFF, kv[0])))
            return iter(items)
        self._spill_counts()
        order = "key & 4294967295, key" if by_minute else "key"
        return iter(self._spill.execute(f"SELECT key, packed FROM flows ORDER BY {order}"))

    def rows(
        self, system: str, *, by_minute: bool = False, rename: Callable[[str], str] = lambda s: s
    ) -> Iterator[tuple[int, FlowRow]]:
        """(epoch minute, station_flow row), every (station, minute) with a dock or undock."""
        tags_of: list[tuple[tuple[str, str], ...]] = [
            (("station_id", rename(station_id)), ("system", system))
            for station_id, _name, _lat, _lon in self.stations
        ]
        for key, packed in self._packed(by_minute):
            station, minute = key >> 32, key & 0xFFFFFFFF
            undocks, docks = packed & 0xFFFFFFFF, packed >> 32
            _id, name, lat, lon = self.stations[station]
            yield (
                minute,
                (tags_of[station], (docks, lat, lon, name, docks - undocks, undocks), minute * 60),
            )

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
        if self._spill_dir is not None:
            self._spill_dir.cleanup()


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) <= 180 else None
