"""The raw archive: every response the collector fetched, kept to be parsed again later.

A parser fix (a new GBFS quirk, a corrected field) cannot repair points already written; with
the responses kept, ``collector replay archive`` runs them through today's parsers and writes
the points again with their original timestamps, so they overwrite rather than duplicate.

Layout: ``DIR/gbfs/<system>/`` and ``DIR/pressure/patient-<id>/``, one gzip file per source
per hour, ``2026-12-01T13Z.raw.gz`` (``...T13Z-1.raw.gz`` when a restart reopens an hour: a
file is never appended to after it was closed). Each record is a JSON header line
``{"fetched_at": <epoch s>, "feed": ..., "url": ..., "bytes": N}``, then the N bytes of the
body and a newline, so ``zcat`` shows it. The compressor is flushed after every record: a
killed collector leaves a file whose complete records are all readable.

What is never kept: request headers (tokens), query strings and credentials of URLs, both in
the header and inside bodies (a ``gbfs.json`` lists its feeds with the API key the system
wants), and, unless ``pressure.store_personal_data``, the personal fields of pressure responses
(the sources hand over bodies already stripped).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

import orjson

from collector.contract import ANOMALY, PATIENT, PRESSURE, STATION_STATUS, Precision
from collector.http import redact_url
from collector.lineprotocol import Encoder
from collector.logs import event
from collector.replay import PreflightError
from collector.replay import retention_preflight as bucket_preflight
from collector.retry import Failure
from collector.settings import ArchiveSettings, ConfigError, Settings
from collector.sinks.base import Sink
from collector.sources import gbfs, pressure
from collector.telemetry import Counters

log = logging.getLogger(__name__)

Kind = Literal["gbfs", "pressure"]
_KINDS: tuple[Kind, ...] = ("gbfs", "pressure")
_SUFFIX = ".raw.gz"
_NAME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d)Z(?:-(\d+))?\.raw\.gz$")
# A URL (JSON may escape its slashes) carrying credentials or a query string or fragment.
_SECRET_URL = re.compile(
    rb"(?P<scheme>https?:(?:\\?/){2})(?P<userinfo>[^\"\s/\\@?#]*@)?"
    rb"(?P<rest>[^\"\s?#]*)(?P<query>[?#][^\"\s]*)?"
)
_CHUNK = 64 * 1024
# A full archive is pruned to this fraction of max_bytes below it: see Archive._prune.
_SLACK = 16


def _scrub(match: re.Match[bytes]) -> bytes:
    if match["userinfo"] is None and match["query"] is None:
        return match[0]
    return match["scheme"] + match["rest"]


def _scrub_urls(body: bytes) -> bytes:
    """``body`` with every URL's query string, fragment and credentials removed."""
    return _SECRET_URL.sub(_scrub, body)


def _hour_name(hour: int, part: int) -> str:
    stamp = datetime.fromtimestamp(hour, UTC).strftime("%Y-%m-%dT%H")
    return f"{stamp}Z{'' if part == 0 else f'-{part}'}{_SUFFIX}"


# ------------------------------------------------------------------------------- writing


@dataclass
class _Open:
    hour: int
    path: Path
    raw: BinaryIO
    gz: gzip.GzipFile
    size: int = 0


class Archive:
    """Keeps responses as they are fetched. Shared by every source; each source's records go
    to its own file, written by that source's job (one at a time), so only the index of files
    and the pruning are under a common lock."""

    def __init__(
        self,
        directory: Path,
        *,
        retention_days: float,
        max_bytes: int,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self._retention_secs = retention_days * 86_400
        self._max_bytes = max_bytes
        self.counters = counters or Counters()
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[tuple[Kind, str], _Open] = {}
        self._source_locks: dict[tuple[Kind, str], threading.Lock] = {}
        self._files: dict[Path, int] = {}  # every archive file -> its size in bytes
        self._total = 0
        self._pruned_for_hour = 0  # the newest hour whose first file has set off a prune
        self._logged: set[tuple[str, str]] = set()
        try:
            for kind in _KINDS:
                (directory / kind).mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = directory / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"archive.dir: cannot write to {directory}: {exc.strerror}") from None
        for found in list_files(directory):
            size = found.path.stat().st_size
            self._files[found.path] = size
            self._total += size
        self._prune(self._clock())

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def record(
        self,
        kind: Kind,
        source: str,
        feed: str,
        url: str,
        fetched_at: float,
        body: bytes | None,
    ) -> None:
        """Keep one response. ``body`` None: a response that could not be made safe to keep
        (counted as withheld). Never raises: the archive must not stop a poll."""
        key = (kind, source)
        if body is None:
            self.counters.add(source, "archive", "withheld")
            self._log_once(
                source,
                "withheld",
                "not a JSON object, so personal data could not be removed: not archived",
            )
            return
        body = _scrub_urls(body)
        header = orjson.dumps(
            {"fetched_at": fetched_at, "feed": feed, "url": redact_url(url), "bytes": len(body)}
        )
        with self._lock:
            lock = self._source_locks.setdefault(key, threading.Lock())
        with lock:
            try:
                current = self._file_for(key, fetched_at)
                current.gz.write(header + b"\n" + body + b"\n")
                # A sync flush per record: a killed collector loses no complete record.
                current.gz.flush()
                grown = current.raw.tell() - current.size
                current.size += grown
            except OSError as exc:
                self.counters.add(source, "archive", "error")
                self._log_once(source, f"error:{exc.errno}", f"{exc.strerror or exc}")
                self._close(key)
                return
            with self._lock:
                self._files[current.path] = current.size
                self._total += grown
                over = self._total > self._max_bytes
        self.counters.add(source, "archive", "ok")
        if over:
            self._prune(self._clock())

    def close(self) -> None:
        with self._lock:
            keys = list(self._open)
        for key in keys:
            with self._lock:
                lock = self._source_locks[key]
            with lock:
                self._close(key)

    # -- inside
    def _file_for(self, key: tuple[Kind, str], fetched_at: float) -> _Open:
        hour = int(fetched_at // 3600 * 3600)
        current = self._open.get(key)
        if current is not None and current.hour == hour:
            return current
        self._close(key)
        folder = self.directory / key[0] / key[1]
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        part = 0
        while True:
            path = folder / _hour_name(hour, part)
            try:
                # Owner only: responses may hold what the operator chose to keep (names, with
                # store_personal_data) and what a feed says only to its paying clients.
                raw = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
                break
            except FileExistsError:  # a restart within the hour: never append to a closed file
                part += 1
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0)
        current = _Open(hour, path, raw, gz)
        with self._lock:
            self._open[key] = current
            self._files[path] = 0
        with self._lock:
            # A new hour: older ones may have expired. Once per hour, not once per source:
            # a prune reads every file's name (1.1 s for two weeks of 300 patients' hourly
            # files), and 300 patients roll over to the new hour together.
            first = hour > self._pruned_for_hour
            self._pruned_for_hour = max(self._pruned_for_hour, hour)
        if first:
            self._prune(self._clock())
        return current

    def _close(self, key: tuple[Kind, str]) -> None:
        with self._lock:
            current = self._open.pop(key, None)
        if current is None:
            return
        try:
            current.gz.close()
            size = current.raw.tell()
            current.raw.close()
        except OSError as exc:
            self._log_once(key[1], f"close:{exc.errno}", f"{exc.strerror or exc}")
            return
        with self._lock:
            if current.path in self._files:
                self._total += size - self._files[current.path]
                self._files[current.path] = size

    def _prune(self, now: float) -> None:
        """Remove files past retention, then the oldest until under max_bytes by a slack of
        a sixteenth (so that a full archive prunes once per sixteenth of max_bytes written,
        not on every record); files being written are never removed."""
        with self._lock:
            writing = {f.path for f in self._open.values()}
            candidates = sorted(
                (entry for entry in map(_parse_path, self._files) if entry is not None),
                key=lambda entry: (entry.hour, entry.part, str(entry.path)),
            )
            doomed: list[tuple[ArchiveFile, str]] = []
            total = self._total
            for entry in candidates:
                if entry.path in writing:
                    continue
                if entry.hour + 3600 <= now - self._retention_secs:
                    reason = "retention"
                elif total > self._max_bytes - self._max_bytes // _SLACK:
                    reason = "max_bytes"
                else:
                    continue
                total -= self._files[entry.path]
                doomed.append((entry, reason))
            for entry, _reason in doomed:
                self._total -= self._files.pop(entry.path)
        for entry, reason in doomed:
            try:
                size = entry.path.stat().st_size
                entry.path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._log_once(entry.source, f"remove:{exc.errno}", f"{exc.strerror or exc}")
                continue
            self.counters.add(entry.source, "archive", f"removed_{reason}")
            event(
                log,
                logging.INFO,
                "archive_removed",
                source=entry.source,
                file=str(entry.path),
                reason=reason,
                bytes=size,
            )

    def _log_once(self, source: str, what: str, detail: str) -> None:
        with self._lock:
            if (source, what) in self._logged:
                return
            self._logged.add((source, what))
        event(
            log,
            logging.WARNING,
            "archive_failed",
            source=source,
            stage="archive",
            error=what,
            detail=detail,
            note="logged once per source and error",
        )


def open_archive(settings: ArchiveSettings, counters: Counters | None = None) -> Archive | None:
    """The archive the settings ask for, or None when off. Raises ConfigError when its
    directory cannot be written (at start-up, before any poll)."""
    if settings.dir is None:
        return None
    return Archive(
        settings.dir,
        retention_days=settings.retention_days,
        max_bytes=settings.max_bytes,
        counters=counters,
    )


# ------------------------------------------------------------------------------- reading


class ArchiveFileError(Exception):
    """An archive file that cannot be read: not gzip, a bad checksum, broken records."""


@dataclass(frozen=True)
class ArchiveFile:
    path: Path
    kind: Kind
    source: str
    hour: int  # epoch seconds of the hour its records were fetched in
    part: int


@dataclass(frozen=True)
class Record:
    fetched_at: float
    feed: str
    url: str
    body: bytes


def _parse_path(path: Path) -> ArchiveFile | None:
    match = _NAME.match(path.name)
    kind = path.parent.parent.name
    if match is None or kind not in _KINDS:
        return None
    hour = int(datetime.strptime(match[1], "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp())
    return ArchiveFile(path, kind, path.parent.name, hour, int(match[2] or 0))


def list_files(directory: Path) -> list[ArchiveFile]:
    """Every archive file under ``directory``, oldest first (other files are ignored)."""
    found = [
        entry
        for kind in _KINDS
        for path in (directory / kind).glob(f"*/*{_SUFFIX}")
        if (entry := _parse_path(path)) is not None
    ]
    return sorted(found, key=lambda e: (e.kind, e.source, e.hour, e.part))


@dataclass
class Reader:
    """The records of one file. A file whose end is missing (still being written, or its
    collector was killed) yields its complete records and sets ``truncated``; anything else
    wrong raises ArchiveFileError."""

    path: Path
    truncated: bool = False
    records: int = field(default=0, init=False)

    def __iter__(self) -> Iterator[Record]:
        buffer = bytearray()
        decompressor = zlib.decompressobj(wbits=31)
        started = False  # a member has begun and not ended
        try:
            with self.path.open("rb") as raw:
                while chunk := raw.read(_CHUNK):
                    while chunk:
                        started = True
                        buffer += decompressor.decompress(chunk)
                        yield from self._records(buffer)
                        chunk = b""
                        if decompressor.eof:  # gzip files may hold several members
                            chunk = decompressor.unused_data
                            decompressor = zlib.decompressobj(wbits=31)
                            started = False
        except zlib.error as exc:
            raise ArchiveFileError(f"{self.path}: not a readable gzip stream ({exc})") from None
        except OSError as exc:
            raise ArchiveFileError(f"{self.path}: {exc.strerror or exc}") from None
        if started or buffer:
            self.truncated = True

    def _records(self, buffer: bytearray) -> Iterator[Record]:
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                return
            try:
                header = orjson.loads(buffer[:end])
                fetched_at, feed, url, size = (
                    header["fetched_at"],
                    header["feed"],
                    header["url"],
                    header["bytes"],
                )
                if not (
                    type(fetched_at) in (int, float)
                    and type(feed) is str
                    and type(url) is str
                    and type(size) is int
                    and size >= 0
                ):
                    raise TypeError
            except (orjson.JSONDecodeError, TypeError, KeyError):
                start = bytes(buffer[:40]).decode("utf-8", "replace")
                raise ArchiveFileError(
                    f"{self.path}: record {self.records + 1} has no valid header (starts {start!r})"
                ) from None
            if len(buffer) < end + 1 + size + 1:
                return
            if buffer[end + 1 + size] != 0x0A:
                raise ArchiveFileError(
                    f"{self.path}: record {self.records + 1} is not {size} bytes long"
                )
            body = bytes(buffer[end + 1 : end + 1 + size])
            del buffer[: end + 1 + size + 1]
            self.records += 1
            yield Record(float(fetched_at), feed, url, body)


# ------------------------------------------------------------------------------- replay

# station_information is fetched at least daily (info_refresh_secs <= 86,400): a replay that
# starts at --from reads the day before it for the station facts, without writing it.
_CATALOG_LOOKBACK_SECS = 25 * 3600
_BATCH_LINES = 5000


@dataclass
class ReplayOutcome:
    files: int = 0
    records: int = 0
    written: int = 0
    spooled: int = 0
    rejected: int = 0
    failed: int = 0
    unparsable: Counter[str] = field(default_factory=Counter)  # "source:kind" -> responses
    corrupt: list[str] = field(default_factory=list)  # one message per file skipped
    truncated: list[Path] = field(default_factory=list)

    @property
    def failed_any(self) -> bool:
        """Whether the replay left something out that a person must look at."""
        return bool(self.corrupt or self.rejected or self.failed)

    def log(self) -> None:
        event(
            log,
            logging.INFO,
            "replay_done",
            files=self.files,
            records=self.records,
            written=self.written,
            spooled=self.spooled or None,
            rejected=self.rejected,
            failed=self.failed,
            unparsable=",".join(f"{k}:{n}" for k, n in sorted(self.unparsable.items())) or None,
            corrupt_files=len(self.corrupt) or None,
            truncated_files=len(self.truncated) or None,
        )


def retention_preflight(
    settings: Settings, spans: dict[str, tuple[float, float]], directory: Path
) -> None:
    """Raise ``PreflightError`` when a bucket's retention would drop some of ``spans``
    (bucket -> oldest, newest record); ``Failure`` when the database cannot be asked."""
    for bucket, (oldest, newest) in sorted(spans.items()):
        try:
            bucket_preflight(
                settings.influxdb,
                settings.buckets.of(bucket).name,
                oldest,
                newest,
                source=f"archive {directory}",
                config_key=bucket,
            )
        except PreflightError as exc:
            raise PreflightError(f"{exc}; or replay a later range with --from") from None


@dataclass(frozen=True)
class Selection:
    """What to replay: the files, and the time range whose records are written."""

    files: list[ArchiveFile]
    start: float
    end: float

    def writes(self, fetched_at: float) -> bool:
        return self.start <= fetched_at < self.end


def select(
    directory: Path, *, system: str | None, start: float | None, end: float | None
) -> Selection:
    """Files of ``system`` (a bike-share system; None: every source) whose hours overlap
    [start, end), plus the day before ``start`` for bike-share station facts."""
    low = float("-inf") if start is None else start
    high = float("inf") if end is None else end
    chosen = []
    for entry in list_files(directory):
        if system is not None and (entry.kind != "gbfs" or entry.source != system):
            continue
        first = low - _CATALOG_LOOKBACK_SECS if entry.kind == "gbfs" else low
        if entry.hour + 3600 > first and entry.hour < high:
            chosen.append(entry)
    return Selection(chosen, low, high)


def _buckets_of(kind: Kind, keep_person: bool) -> tuple[str, ...]:
    if kind == "gbfs":
        return (STATION_STATUS.bucket,)
    return (PRESSURE.bucket, ANOMALY.bucket) + ((PATIENT.bucket,) if keep_person else ())


def verify(
    selection: Selection, outcome: ReplayOutcome, *, keep_person: bool
) -> tuple[list[ArchiveFile], dict[str, tuple[float, float]]]:
    """Read every file once before anything is written: the readable files, and per bucket
    the span of fetch times to be written (for the retention pre-flight). Corrupt files are
    reported, with their path, and left out."""
    good: list[ArchiveFile] = []
    spans: dict[str, tuple[float, float]] = {}
    for entry in selection.files:
        reader = Reader(entry.path)
        first, last = float("inf"), float("-inf")
        try:
            for rec in reader:
                if selection.writes(rec.fetched_at) and (
                    entry.kind == "pressure" or rec.feed == "station_status"
                ):
                    first, last = min(first, rec.fetched_at), max(last, rec.fetched_at)
        except ArchiveFileError as exc:
            outcome.corrupt.append(str(exc))
            event(log, logging.ERROR, "archive_file_corrupt", file=str(entry.path), error=exc)
            continue
        if reader.truncated:
            outcome.truncated.append(entry.path)
            event(
                log,
                logging.WARNING,
                "archive_file_truncated",
                file=str(entry.path),
                records=reader.records,
                note="still being written, or its collector was killed: complete records kept",
            )
        good.append(entry)
        for bucket in _buckets_of(entry.kind, keep_person) if first <= last else ():
            low, high = spans.get(bucket, (first, last))
            spans[bucket] = (min(low, first), max(high, last))
    return good, spans


class _Batches:
    """Lines per bucket, written _BATCH_LINES at a time."""

    def __init__(self, sink: Sink, outcome: ReplayOutcome) -> None:
        self._sink = sink
        self._outcome = outcome
        self._pending: dict[str, tuple[Precision, list[str]]] = {}

    def add(self, bucket: str, precision: Precision, lines: list[str]) -> None:
        pending = self._pending.setdefault(bucket, (precision, []))[1]
        pending += lines
        if len(pending) >= _BATCH_LINES:
            self._write(bucket)

    def flush(self) -> None:
        for bucket in list(self._pending):
            self._write(bucket)

    def _write(self, bucket: str) -> None:
        precision, lines = self._pending.pop(bucket)
        report = self._sink.write(bucket, lines, precision)
        self._outcome.written += report.written
        self._outcome.spooled += report.spooled
        self._outcome.rejected += report.rejected
        self._outcome.failed += report.failed


class _Unparsable:
    def __init__(self, outcome: ReplayOutcome) -> None:
        self._outcome = outcome

    def __call__(self, source: str, failure: Failure) -> None:
        key = f"{source}:{failure.kind}"
        self._outcome.unparsable[key] += 1
        if self._outcome.unparsable[key] == 1:
            event(
                log,
                logging.WARNING,
                "replay_unparsable",
                source=source,
                stage=failure.stage,
                error=failure.kind,
                detail=str(failure),
                note="logged once per source and kind, counted in replay_done",
            )


def _replay_gbfs(
    entries: list[ArchiveFile],
    selection: Selection,
    language: str | None,
    batches: _Batches,
    unparsable: _Unparsable,
    outcome: ReplayOutcome,
) -> None:
    """One system's responses in the order they were fetched, through the parsers the live
    poller uses, with the same state between them: station facts, e-bike types, and the
    last ``last_updated`` (an unchanged feed was not written live, nor is it here)."""
    system = entries[0].source
    encoder = Encoder(STATION_STATUS)
    catalog: gbfs.Catalog | None = None
    ebike_types: frozenset[str] | None = None
    last_updated: int | None = None
    for entry in entries:
        for rec in Reader(entry.path):
            writes = selection.writes(rec.fetched_at)
            if rec.feed == "station_status" and not writes:
                continue
            outcome.records += writes
            try:
                if rec.feed == "station_information":
                    catalog = gbfs.parse_station_information(rec.body, system, language)
                elif rec.feed == "vehicle_types":
                    ebike_types = gbfs.parse_vehicle_types(rec.body)
                elif rec.feed == "station_status":
                    snapshot = gbfs.parse_station_status(
                        rec.body, system, catalog, rec.fetched_at, ebike_types
                    )
                    if snapshot.last_updated is None or snapshot.last_updated != last_updated:
                        last_updated = snapshot.last_updated
                        lines = encoder.lines(snapshot.rows)[0]
                        batches.add(STATION_STATUS.bucket, STATION_STATUS.precision, lines)
            except Failure as failure:
                unparsable(system, failure)


def _replay_pressure(
    entries: list[ArchiveFile],
    selection: Selection,
    keep_person: bool,
    batches: _Batches,
    unparsable: _Unparsable,
    outcome: ReplayOutcome,
) -> None:
    source = entries[0].source
    patient_id = int(source.removeprefix("patient-"))
    encoders = Encoder(PRESSURE), Encoder(ANOMALY), Encoder(PATIENT)
    person: pressure.Person | None = None
    for entry in entries:
        for rec in Reader(entry.path):
            if not selection.writes(rec.fetched_at):
                continue
            outcome.records += 1
            try:
                reading = pressure.parse_reading(
                    rec.body, patient_id, round(rec.fetched_at * 1000), keep_person=keep_person
                )
            except Failure as failure:
                unparsable(source, failure)
                continue
            pressure_rows, anomaly_rows = pressure.rows(reading)
            batches.add(PRESSURE.bucket, PRESSURE.precision, encoders[0].lines(pressure_rows)[0])
            if anomaly_rows:
                batches.add(ANOMALY.bucket, ANOMALY.precision, encoders[1].lines(anomaly_rows)[0])
            if reading.person is not None and reading.person != person:
                person = reading.person
                row = pressure.person_row(reading, person)
                batches.add(PATIENT.bucket, PATIENT.precision, encoders[2].lines([row])[0])


def replay(
    files: list[ArchiveFile],
    selection: Selection,
    sink: Sink,
    settings: Settings,
    outcome: ReplayOutcome,
) -> None:
    """Write what the (verified) ``files`` hold, source by source."""
    batches = _Batches(sink, outcome)
    unparsable = _Unparsable(outcome)
    languages = {s.name: s.language for s in settings.gbfs.systems}
    keep_person = settings.pressure.store_personal_data
    by_source: dict[tuple[Kind, str], list[ArchiveFile]] = {}
    for entry in files:
        by_source.setdefault((entry.kind, entry.source), []).append(entry)
    for (kind, source), entries in sorted(by_source.items()):
        outcome.files += len(entries)
        if kind == "gbfs":
            _replay_gbfs(entries, selection, languages.get(source), batches, unparsable, outcome)
        elif source.removeprefix("patient-").isdigit():
            _replay_pressure(entries, selection, keep_person, batches, unparsable, outcome)
        batches.flush()
