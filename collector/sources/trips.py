"""Citi Bike trip-history CSVs -> docks and undocks per station per minute.

Both schemas (before 2021: ``starttime``, ``start station id``...; from 2021: ``started_at``,
``start_station_id``...) are told apart by the header; files may be plain, ``.gz`` or ``.zip``.
Each trip is an undock at its start station and minute and a dock at its end station and
minute. Rows with no end station, an end before the start, or a time that does not parse are
skipped and counted (``BAD_ROW_KINDS``).

Files are not sorted by time (a 2021 file is half out of order), so nothing is counted until
every file is read: each dock and undock is appended to an array as one packed int64, sorted in
runs of ``max_events_in_memory`` (past the first, in a scratch file), and the runs are merged at
the end, where the events of one (station, minute) come together and are counted. Memory stays
bounded whatever the file size; appending is cheaper than counting in a dict per event, and a
sort of int64s and a merge of sorted runs cost less than any keyed store on disk.
"""

from __future__ import annotations

import csv
import gzip
import io
import operator
import tempfile
import zipfile
import zlib
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, groupby, repeat
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeAlias
from zoneinfo import ZoneInfo

from collector.contract import STATION_FLOW
from collector.lineprotocol import FieldValue, Tags, format_float, format_string, series_key

assert STATION_FLOW.field_names == ("docks", "lat", "lon", "name", "net", "undocks")

if TYPE_CHECKING:  # typeshed's name for what readinto may fill
    from _typeshed import WriteableBuffer

BAD_ROW_KINDS = ("no_end_station", "no_start_station", "negative_duration", "bad_time", "short_row")
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


def _required(schema: Schema) -> list[str]:
    return [
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


HEADER_SHOWN = 16  # header names quoted in an unknown-header message (Citi Bike has 13-15)


def detect_schema(header: list[str]) -> tuple[Schema, list[int]]:
    """The schema and the column indexes of its fields, from a header row.

    TripFileError otherwise, naming the required columns missing from the schema the header
    is closest to (a renamed column is then named, wherever it is in the header)."""
    names = [h.strip().strip('"').lower() for h in header]
    missing: dict[Schema, list[str]] = {}
    for schema in SCHEMAS:
        wanted = _required(schema)
        missing[schema] = [w for w in wanted if w not in names]
        if not missing[schema]:
            return schema, [names.index(w) for w in wanted]
    closest = min(SCHEMAS, key=lambda schema: len(missing[schema]))
    shown = ", ".join(h.strip() for h in header[:HEADER_SHOWN])
    if len(shown) > 400 or len(header) > HEADER_SHOWN:  # abbreviated, whatever the first line
        shown = shown[:400] + " ..."
    if len(missing[closest]) < len(_required(closest)):
        what = f"missing {', '.join(missing[closest])} (required by the {closest.name} schema)"
    else:
        schemas = "; ".join(f"{s.name}: {', '.join(_required(s))}" for s in SCHEMAS)
        what = f"none of the required columns ({schemas})"
    raise TripFileError(f"unknown trip file header: {what}; the header is: {shown}")


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


# An event (an undock or a dock) is one int64: minute << 30 | station << 1 | dock. Sorted, the
# events of one (station, minute) are neighbours, and minutes come in time order, so one merge of
# sorted runs gives both the backfill's rows and the live replay's minutes. 30 bits below the
# minute leave room for 2**29 stations; any minute of years 1-9999 fits the 34 bits above.
_MINUTE_SHIFT = 30
_STATION_BITS = _MINUTE_SHIFT - 1  # after the dock bit is shifted out
_STATION_MASK = (1 << _STATION_BITS) - 1
MAX_STATIONS = 1 << _STATION_BITS
# Cached minute texts ("YYYY-MM-DD HH:MM"): a month has 44,640; emptied past this so that a
# file of many years cannot grow the cache without bound.
MAX_CACHED_MINUTES = 200_000
# Events in one window of a merge, all runs together (~48 bytes each while sorted: 24 MB).
WINDOW_EVENTS = 500_000
MIN_BLOCK_EVENTS = 4096  # read from one run at a time, however many runs are merged
MAX_MERGE_RUNS = 64  # runs merged at once: past this, runs are first merged into longer ones


class _SortedEvents:
    """Events appended to ``pending``, sorted in runs of at most ``max_events``; full runs go to
    one scratch file, and ``merged`` yields every event in order.

    Memory is the pending array (8 bytes an event), the sort of one run (~48 bytes an event
    while it lasts: a list of Python ints) and, when merging, one window of WINDOW_EVENTS with at
    most MAX_MERGE_RUNS runs merged at once: bounded whatever the number of events.
    """

    def __init__(self, max_events: int) -> None:
        self.pending = array("q")
        self.max_events = max_events
        self.count = 0
        self._memory: array[int] | None = None  # the only run, when nothing was spilled
        self._runs: list[tuple[int, int]] = []  # (first event, events) in the scratch file
        self._file: IO[bytes] | None = None
        self._end = 0  # events in the scratch file
        self._first: int | None = None  # the smallest and largest event sorted so far
        self._last: int | None = None

    @property
    def spilled(self) -> bool:
        return bool(self._runs)

    def _sort_pending(self) -> array[int] | None:
        if not self.pending:
            return None
        run = array("q", sorted(self.pending))
        del self.pending[:]  # in place: add_file holds its append method
        self.count += len(run)
        self._first = run[0] if self._first is None else min(self._first, run[0])
        self._last = run[-1] if self._last is None else max(self._last, run[-1])
        return run

    def spill(self) -> None:
        """Sort the pending events into a run in the scratch file."""
        run = self._sort_pending()
        if run is not None:
            if self._memory is not None:  # events added after a merge: both runs go to disk
                self._write(self._memory)
                self._memory = None
            self._write(run)

    def seal(self) -> None:
        """Sort what is pending: on disk when other runs are, else kept in memory."""
        if self._runs or self._memory is not None:
            self.spill()
        else:
            self._memory = self._sort_pending()

    def bounds(self) -> tuple[int, int] | None:
        """(smallest, largest) event; None when there is none."""
        self.seal()
        if self._first is None or self._last is None:
            return None
        return self._first, self._last

    def merged(self) -> Iterator[Sequence[int]]:
        """Every event in order, in blocks."""
        self.seal()
        if self._memory is not None:
            return iter((self._memory,))
        while len(self._runs) > MAX_MERGE_RUNS:
            # Merged into one longer run first, so that no window holds more than
            # MAX_MERGE_RUNS blocks.
            first, self._runs = self._runs[:MAX_MERGE_RUNS], self._runs[MAX_MERGE_RUNS:]
            start = self._end
            for window in self._merge(first):
                self._append(array("q", window))
            self._runs.append((start, self._end - start))
        return self._merge(self._runs)

    def _merge(self, runs: list[tuple[int, int]]) -> Iterator[list[int]]:
        """The events of sorted ``runs`` in order, in windows: each takes from every run what
        is not above the smallest last event of their current blocks, and sorts it in C (the
        sort finds the runs in it and merges them), instead of a heap step in Python per event.
        """
        block_events = max(MIN_BLOCK_EVENTS, WINDOW_EVENTS // len(runs))
        readers = [_RunReader(self._blocks(start, count, block_events)) for start, count in runs]
        while readers:
            bound = min(reader.block[-1] for reader in readers)
            parts = [reader.take(bound) for reader in readers]
            readers = [reader for reader in readers if reader.block]
            yield sorted(chain.from_iterable(parts))

    def _write(self, run: array[int]) -> None:
        start = self._end
        self._append(run)
        self._runs.append((start, len(run)))

    def _append(self, events: array[int]) -> None:
        if self._file is None:
            # Closed by close(), which the CLI calls in a finally.
            self._file = tempfile.TemporaryFile(prefix="livestack-trips-")  # noqa: SIM115
        self._file.seek(self._end * 8)
        events.tofile(self._file)
        self._end += len(events)

    def _blocks(self, start: int, count: int, block_events: int) -> Iterator[array[int]]:
        file = self._file
        assert file is not None
        while count:
            n = min(count, block_events)
            block = array("q")
            file.seek(start * 8)  # the runs are read in turns from one file
            block.fromfile(file, n)
            yield block
            start, count = start + n, count - n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _RunReader:
    """A sorted run being merged: its current block and how far into it the merge has got."""

    def __init__(self, blocks: Iterator[array[int]]) -> None:
        self._blocks = blocks
        self.block = next(blocks)  # empty once the run is used up
        self._position = 0

    def take(self, bound: int) -> array[int]:
        """The next events not above ``bound`` (at most the rest of the current block)."""
        start = self._position
        end = self._position = bisect_right(self.block, bound, start)
        taken = self.block[start:end]
        if end == len(self.block):
            self.block, self._position = next(self._blocks, array("q")), 0
        return taken


@dataclass
class Flows:
    """Docks and undocks per (station, minute), and each station's name and position.

    Every dock and undock is kept as an event until the end (files are not in time order);
    past ``max_events_in_memory`` pending events, they are sorted and spilled to a scratch file,
    so memory stays bounded whatever the file size (see _SortedEvents).
    """

    timezone: str = "America/New_York"
    max_events_in_memory: int = 1_000_000  # ~56 MB while a run is being sorted
    bad: Counter[str] = field(default_factory=Counter)
    trips: int = 0

    def __post_init__(self) -> None:
        self._zone = ZoneInfo(self.timezone)
        self._minutes: dict[str, int] = {}  # "YYYY-MM-DD HH:MM" -> epoch minute << 30
        self._index: dict[str, int] = {}  # station id -> its number << 1
        self.stations: list[tuple[str, str | None, float | None, float | None]] = []
        self._events = _SortedEvents(self.max_events_in_memory)

    # -- input
    def _minute(self, text: str) -> int:
        """The minute of a time as the high bits of an event; ValueError when it does not
        parse (or is out of range)."""
        key = text[:16]
        minute = self._minutes.get(key)
        if minute is None:
            try:
                moment = datetime.fromisoformat(key).replace(tzinfo=self._zone)
                epoch_minute = int(moment.timestamp()) // 60
            except OverflowError as exc:
                raise ValueError(str(exc)) from None
            if len(self._minutes) >= MAX_CACHED_MINUTES:
                self._minutes.clear()
            minute = self._minutes[key] = epoch_minute << _MINUTE_SHIFT
        return minute

    def _keys(self, row: list[str], columns: list[int]) -> tuple[int, int, int, int] | None:
        """(start minute, end minute, start station, end station) of a row whose minutes or
        stations are new, or whose end comes before its start; None when it is a bad row
        (counted)."""
        s, e, si, sn, sla, slo, ei, en, ela, elo = columns
        started, ended = row[s], row[e]
        try:
            start, end = self._minute(started), self._minute(ended)
            if self._negative(started, ended):
                self.bad["negative_duration"] += 1
                return None
        except ValueError:
            self.bad["bad_time"] += 1
            return None
        a = self._station(row[si], row[sn], row[sla], row[slo])
        return start, end, a, self._station(row[ei], row[en], row[ela], row[elo])

    def _station(self, station_id: str, name: str, lat: str, lon: str) -> int:
        """The station's number << 1, a new one the first time it is seen."""
        index = self._index.get(station_id)
        if index is not None:
            return index
        if len(self.stations) >= MAX_STATIONS:
            raise TripFileError(f"more than {MAX_STATIONS:,} stations")
        index = self._index[station_id] = len(self.stations) << 1
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
        """Count the trips of one CSV text; ``tick`` is called every few thousand rows.

        The loop runs once per trip, so it is written for speed: caches read inline, the rare
        cases (a new minute or station, an end before the start) in ``_keys``.
        """
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            raise TripFileError("empty: no header, no trips")
        _schema, columns = detect_schema(header)
        s, e, si, _sn, _sla, _slo, ei, *_end = columns
        # The widest column too, so that a row too short to have them all raises IndexError.
        needed = operator.itemgetter(s, e, si, ei, max(columns))
        minutes, index = self._minutes, self._index
        events = self._events
        pending, limit = events.pending, events.max_events
        append = pending.append
        bad = self.bad
        rows = rows_before = progress.rows
        trips = 0
        try:
            for row in reader:
                rows += 1
                if not rows % TICK_ROWS and tick is not None:
                    progress.rows = rows
                    tick()
                try:
                    started, ended, start_id, end_id, _ = needed(row)
                except IndexError:
                    bad["short_row"] += 1
                    continue
                if not end_id:
                    bad["no_end_station"] += 1
                    continue
                if not start_id:
                    bad["no_start_station"] += 1
                    continue
                try:
                    start, end = minutes[started[:16]], minutes[ended[:16]]
                    a, b = index[start_id], index[end_id]
                    settled = ended >= started
                except KeyError:
                    settled = False
                if not settled:
                    # A minute or a station not seen yet, or an end before the start: rare.
                    keys = self._keys(row, columns)
                    if keys is None:
                        continue
                    start, end, a, b = keys
                append(start | a)  # an undock
                append(end | b | 1)  # a dock
                trips += 1
                if len(pending) >= limit:
                    events.spill()
        finally:
            progress.rows = rows
            self.trips += trips
        if rows == rows_before:
            raise TripFileError("a header and no trips")

    @property
    def spilled(self) -> bool:
        return self._events.spilled

    @property
    def events(self) -> int:
        """Docks and undocks counted (twice the trips)."""
        return self._events.count + len(self._events.pending)

    def span(self) -> tuple[int, int] | None:
        """(first, last) epoch minute with a dock or undock; None when there is none."""
        bounds = self._events.bounds()
        if bounds is None:
            return None
        return bounds[0] >> _MINUTE_SHIFT, bounds[1] >> _MINUTE_SHIFT

    # -- output
    def count_rows(self) -> int:
        """The (station, minute) rows the events make, as ``lines`` and ``rows`` would yield
        them, counted by a merge of their own (~0.5 s for 1.5 million trips), no line made:
        what a stopped replay left unsent is this less what it sent."""
        keys = map(operator.rshift, chain.from_iterable(self._events.merged()), repeat(1))
        return sum(1 for _key in groupby(keys))

    def _counted(self, size: int) -> Iterator[tuple[list[tuple[int, int, int]], int]]:
        """(station-minute key, docks, undocks) for every (station, minute) with an event, in
        time order (then by station), in lists of at most ``size``, each with the number of
        events it counts. The key is ``minute << 29 | station``."""
        batch: list[tuple[int, int, int]] = []
        append = batch.append
        counted = 0
        events = chain.from_iterable(self._events.merged())
        first = next(events, None)
        if first is None:
            return
        current, docks = first >> 1, first & 1
        undocks = 1 - docks
        for event in events:
            key = event >> 1
            if key == current:  # the same station and minute: sorted events are neighbours
                if event & 1:
                    docks += 1
                else:
                    undocks += 1
                continue
            append((current, docks, undocks))
            counted += docks + undocks
            if len(batch) == size:
                yield batch, counted
                batch, counted = [], 0
                append = batch.append
            current, docks = key, event & 1
            undocks = 1 - docks
        append((current, docks, undocks))
        yield batch, counted + docks + undocks

    def lines(
        self,
        system: str,
        size: int,
        *,
        shift_secs: int = 0,
        rename: Callable[[str], str] = lambda s: s,
    ) -> Iterator[tuple[list[str], int]]:
        """station_flow line protocol for every (station, minute) with a dock or undock, stamped
        with its minute (+ ``shift_secs``) in seconds, in time order, in lists of at most
        ``size`` lines, each with the number of events it counts (for progress).

        The lines are those of ``Encoder(STATION_FLOW)`` for ``rows``, made here from each
        station's constant text (series key, position, name) and three integers: the generic
        encoder would cost as much again as everything else a backfill does.
        """
        heads, middles = [], []
        for station_id, name, lat, lon in self.stations:
            tags = (("station_id", rename(station_id)), ("system", system))
            heads.append(series_key(STATION_FLOW.name, tags) + " docks=")
            fields = [
                f",{key}={text}"
                for key, text in (
                    ("lat", None if lat is None else format_float(lat)),
                    ("lon", None if lon is None else format_float(lon)),
                    ("name", None if name is None else format_string(name)),
                )
                if text is not None
            ]
            middles.append("i" + "".join(fields) + ",net=")
        mask, bits = _STATION_MASK, _STATION_BITS
        for batch, events in self._counted(size):
            lines = [
                f"{heads[key & mask]}{docks}{middles[key & mask]}{docks - undocks}i,"
                f"undocks={undocks}i {(key >> bits) * 60 + shift_secs}"
                for key, docks, undocks in batch
            ]
            yield lines, events

    def rows(
        self, system: str, *, rename: Callable[[str], str] = lambda s: s
    ) -> Iterator[tuple[int, FlowRow]]:
        """(epoch minute, station_flow row) for every (station, minute) with a dock or undock,
        in time order, then by station."""
        stations = [
            ((("station_id", rename(station_id)), ("system", system)), lat, lon, name)
            for station_id, name, lat, lon in self.stations
        ]
        for batch, _events in self._counted(5000):
            for key, docks, undocks in batch:
                tags, lat, lon, name = stations[key & _STATION_MASK]
                minute = key >> _STATION_BITS
                yield minute, (tags, (docks, lat, lon, name, docks - undocks, undocks), minute * 60)

    def close(self) -> None:
        self._events.close()


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) <= 180 else None
