"""Batches the database could not take yet, on disk until it does; and a dead-letter file.

SQLite from the standard library holds the queue: each put and each removal is one atomic,
fsync'ed transaction, so a SIGKILL or a power cut leaves every batch either fully queued or not
at all; the rowid gives the order; one file, no extra dependency, and no recovery code of our
own. Writes reach it only while the database is failing, a few batches a second at most, so
paying an fsync per transaction is cheap (``BENCHMARKS.md``).

A batch leaves the spool only after the server accepted it, or refused it for good (then it
goes to the dead-letter file, with the server's message, for a person to look at).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from collector.contract import Precision
from collector.logs import event
from collector.retry import Backoff, Failure
from collector.sinks.base import AuthError, Fatal, SinkMetrics, SpoolStats, WriteReport
from collector.sinks.influxdb import InfluxWriter
from collector.telemetry import Counters

log = logging.getLogger(__name__)


_DATABASE = "spool.sqlite"
DEAD_LETTERS = "dead-letter.lp"  # beside the spool


class SpoolBusy(Exception):
    """Another collector holds this spool: two drainers would write everything twice."""


@dataclass(frozen=True)
class SpooledBatch:
    id: int
    bucket: str
    precision: Precision
    lines: list[str]
    created: float


def describe(directory: Path) -> str:
    """What waits in the spool under ``directory`` and in its dead letters, for ``collector
    check``; read-only, since a running collector may hold the spool."""
    path = directory / _DATABASE
    if not path.exists():
        return f"{directory}: empty"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            batches, lines, oldest = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(lines), 0), MIN(created) FROM batches"
            ).fetchone()
    except sqlite3.OperationalError as exc:  # being created this very moment, or damaged
        return f"{directory}: cannot be read now ({exc})"
    age = f", oldest {time.time() - oldest:.0f}s old" if oldest else ""
    dead = directory / DEAD_LETTERS
    dead_note = f"; dead letters: {dead} ({dead.stat().st_size} bytes)" if dead.exists() else ""
    return f"{directory}: {batches} batches, {lines} lines waiting{age}{dead_note}"


_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _oldest_point(lines: Sequence[str], precision: str, default: float) -> float:
    oldest = default
    divisor = _PER_SECOND.get(precision, 1_000_000_000)
    for line in lines:
        stamp = line.rsplit(" ", 2)
        # "measurement,tags fields timestamp": three parts when the line has a timestamp.
        if len(stamp) == 3 and stamp[2].lstrip("-").isdigit():
            oldest = min(oldest, int(stamp[2]) / divisor)
    return oldest


class Spool:
    def __init__(
        self, directory: Path, max_bytes: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = (directory / "spool.lock").open("a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolBusy(f"spool {directory} is in use by another collector") from None
        self.path = directory / _DATABASE
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # durable once put() returns
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batches (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "bucket TEXT NOT NULL, precision TEXT NOT NULL, lines INTEGER NOT NULL, "
            "size INTEGER NOT NULL, created REAL NOT NULL, payload BLOB NOT NULL, "
            "oldest_point REAL)"
        )
        # A spool left by a version without the column keeps working: its rows read NULL,
        # and oldest_by_bucket() reads their lines instead.
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(batches)")}
        if "oldest_point" not in columns:
            self._db.execute("ALTER TABLE batches ADD COLUMN oldest_point REAL")
        self.dropped_lines = 0

    @property
    def dead_letter_path(self) -> Path:
        return self.path.parent / DEAD_LETTERS

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lock_file.close()

    @staticmethod
    def _pack(lines: Sequence[str]) -> bytes:
        # A JSON list, not newline-joined: string fields may hold newlines.
        return zlib.compress(orjson.dumps(list(lines)), 1)

    def _insert(self, bucket: str, precision: str, lines: Sequence[str], created: float) -> None:
        # The oldest point is read once here, while the lines are at hand, so that start-up
        # can ask the retention question with one query instead of unpacking the spool.
        payload = self._pack(lines)
        self._db.execute(
            "INSERT INTO batches (bucket, precision, lines, size, created, payload, "
            "oldest_point) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                bucket,
                precision,
                len(lines),
                len(payload),
                created,
                payload,
                _oldest_point(lines, precision, created),
            ),
        )

    def put(self, bucket: str, precision: Precision, batches: Sequence[Sequence[str]]) -> int:
        """Queue ``batches``; returns the number of lines evicted (oldest first) to make room."""
        batches = [b for b in batches if b]
        if not batches:
            return 0
        evicted = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for lines in batches:
                    self._insert(bucket, precision, lines, self._clock())
                (total,) = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()
                while total > self._max_bytes:
                    oldest = self._db.execute(
                        "SELECT id, lines, size FROM batches ORDER BY id LIMIT 1"
                    ).fetchone()
                    if oldest is None:
                        break
                    self._db.execute("DELETE FROM batches WHERE id = ?", (oldest[0],))
                    evicted += oldest[1]
                    total -= oldest[2]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if evicted:
            self.dropped_lines += evicted
            event(
                log,
                logging.ERROR,
                "spool_full_dropped_oldest",
                lines=evicted,
                max_bytes=self._max_bytes,
                detail="raise spool.max_mb or fix the database",
            )
        return evicted

    def oldest(self) -> SpooledBatch | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, bucket, precision, created, payload FROM batches ORDER BY id LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return SpooledBatch(row[0], row[1], row[2], orjson.loads(zlib.decompress(row[4])), row[3])

    def settle(self, batch_id: int, remaining: Sequence[Sequence[str]] = ()) -> None:
        """Remove a batch the server took; what it did not take (``remaining``) is queued
        again in the same transaction, at the back of the queue (with its spool time): a
        batch that keeps failing does not hold up the ones behind it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT bucket, precision, created FROM batches WHERE id = ?", (batch_id,)
                ).fetchone()
                self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
                if row is not None:
                    for lines in remaining:
                        self._insert(row[0], row[1], lines, row[2])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def oldest_by_bucket(self) -> dict[str, float]:
        """The oldest point of each bucket (epoch seconds), read from the lines' timestamps.

        Not when a batch was spooled: a feed whose data is weeks old is spooled today with
        points the server will drop as beyond retention. Kept per batch when it is spooled;
        a line without a timestamp counts as spooled-time."""
        with self._lock:
            oldest: dict[str, float] = dict(
                self._db.execute(
                    "SELECT bucket, MIN(oldest_point) FROM batches "
                    "WHERE oldest_point IS NOT NULL GROUP BY bucket"
                ).fetchall()
            )
            legacy = self._db.execute(
                "SELECT bucket, precision, created, payload FROM batches WHERE oldest_point IS NULL"
            )
            for bucket, precision, created, payload in legacy:
                first = _oldest_point(orjson.loads(zlib.decompress(payload)), precision, created)
                oldest[bucket] = min(first, oldest.get(bucket, first))
        return oldest

    def stats(self) -> SpoolStats:
        with self._lock:
            batches, lines, size, oldest = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(lines), 0), COALESCE(SUM(size), 0), MIN(created) "
                "FROM batches"
            ).fetchone()
        age = 0.0 if oldest is None else max(0.0, self._clock() - oldest)
        return SpoolStats(batches, lines, size, age, self.dropped_lines)


class DeadLetters:
    """Batches the server refused for good, kept as line protocol with the reason in a
    comment line before each, for inspection. Rotated at ``max_bytes`` (one old file kept).

    The header names the bucket as configured (``bucket_names``: contract name -> configured
    one), the one a person replaying the file must write to."""

    def __init__(
        self, path: Path, max_bytes: int, bucket_names: Mapping[str, str] | None = None
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._max_bytes = max_bytes
        self._names = dict(bucket_names or {})
        self._lock = threading.Lock()

    def add(self, bucket: str, precision: str, lines: Sequence[str], failure: Failure) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        reason = str(failure).replace("\n", " ")
        bucket = self._names.get(bucket, bucket)
        header = (
            f"# {stamp} bucket={bucket} precision={precision} lines={len(lines)} "
            f"status={failure.status} reason={failure.reason}: {reason}\n"
        )
        with self._lock:
            if self.path.exists() and self.path.stat().st_size > self._max_bytes:
                os.replace(self.path, self.path.with_suffix(self.path.suffix + ".1"))
            with self.path.open("a", encoding="utf-8") as f:
                f.write(header + "\n".join(lines) + "\n")


class SpoolingSink:
    """The writer, with the spool behind it.

    A write is tried once; what fails for a transient reason is spooled, and while anything is
    spooled new batches are spooled too (so that polls never wait on a database that is down).
    A drainer thread sends spooled batches, oldest first, with backoff and jitter, never sooner
    than the server's Retry-After. Refused batches go to the dead letters; refused credentials
    stop the collector and leave the spool as it is.
    """

    def __init__(
        self,
        writer: InfluxWriter,
        spool: Spool,
        dead_letters: DeadLetters,
        *,
        fatal: Fatal,
        counters: Counters,
        backoff: Backoff | None = None,
    ) -> None:
        self.writer = writer
        self.spool = spool
        self.dead_letters = dead_letters
        self._backoff = backoff or Backoff(
            writer.settings.retry_base_secs, writer.settings.retry_max_secs
        )
        self._fatal = fatal
        self._counters = counters
        self._outage = threading.Event()
        self._outage_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self.waits: list[float] = []  # backoff waits taken, for telemetry and tests
        if spool.oldest() is not None:
            self._outage.set()  # a spool left by the last run drains first
        self._drainer = threading.Thread(target=self._drain, name="spool-drainer", daemon=True)
        self._drainer.start()

    # -- what the collector calls
    def write(self, bucket: str, lines: Sequence[str], precision: Precision) -> WriteReport:
        if not lines:
            return WriteReport()
        if self._outage.is_set() or self._stopping.is_set():
            return self._to_spool(bucket, precision, [list(lines)], WriteReport())
        report = self.writer.write(bucket, lines, precision, retry=False)
        self._dead_letter(bucket, precision, report)
        if report.unsent:
            if not self._outage.is_set():
                failure = report.errors[-1] if report.errors else None
                event(
                    log,
                    logging.WARNING,
                    "spooling",
                    bucket=bucket,
                    error=failure.kind if failure else None,
                    detail=str(failure) if failure else None,
                    note="writes wait on disk until the database takes them",
                )
            unsent = report.unsent
            report.unsent, report.failed = [], 0
            # Spooled and marked as one step: the drainer must not find the spool empty and
            # end the outage between the two, or the next write would try the server again.
            with self._outage_lock:
                report = self._to_spool(bucket, precision, unsent, report)
                self._outage.set()
        return report

    def stop_retrying(self) -> None:
        """Shutdown: no more network waits; everything from now on is spooled."""
        self._stopping.set()
        self._wake.set()
        self.writer.stop_retrying()

    def close(self) -> None:
        self.stop_retrying()
        self._drainer.join(timeout=15)
        self.writer.close()
        self.spool.close()

    def metrics(self) -> SinkMetrics:
        return SinkMetrics(self.writer.metrics().latencies_ms, self.spool.stats())

    # -- inside
    def _to_spool(
        self, bucket: str, precision: Precision, batches: list[list[str]], report: WriteReport
    ) -> WriteReport:
        evicted = self.spool.put(bucket, precision, batches)
        report.spooled += sum(len(b) for b in batches)
        report.failed += evicted  # lost: the spool was full
        self._wake.set()
        return report

    def _dead_letter(self, bucket: str, precision: Precision, report: WriteReport) -> None:
        for lines, failure in report.refused:
            self.dead_letters.add(bucket, precision, lines, failure)
        report.refused = []

    def _drain(self) -> None:
        failures = 0
        drained_lines = drained_batches = 0
        while not self._stopping.is_set():
            with self._outage_lock:
                batch = self.spool.oldest()
                if batch is None:
                    self._outage.clear()
            if batch is None:
                if drained_batches:
                    event(
                        log,
                        logging.INFO,
                        "spool_drained",
                        batches=drained_batches,
                        lines=drained_lines,
                    )
                    drained_lines = drained_batches = 0
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                report = self.writer.write(batch.bucket, batch.lines, batch.precision, retry=False)
            except AuthError as exc:
                self._fatal.stop(exc)
                return
            self._dead_letter(batch.bucket, batch.precision, report)
            self.spool.settle(batch.id, report.unsent)
            if report.written or report.rejected:
                self._counters.drained(batch.bucket, report)
                drained_batches += 1
                drained_lines += report.written
            if report.unsent:
                retry_after = max(
                    (f.retry_after_secs or 0.0 for f in report.errors if f.transient), default=None
                )
                wait = self._backoff.delay(failures, retry_after or None)
                failures += 1
                self.waits.append(wait)
                event(
                    log,
                    logging.WARNING,
                    "spool_retry",
                    bucket=batch.bucket,
                    lines=len(batch.lines),
                    wait_secs=round(wait, 2),
                    attempt=failures,
                    error=report.errors[-1].kind if report.errors else None,
                )
                self._stopping.wait(wait)
            else:
                if failures:
                    event(log, logging.INFO, "spool_draining", after_attempts=failures)
                failures = 0
