"""The collector's own metrics: counts by (source, stage, result), and their rows.

Every part counts here, under a declared, fixed set of stages and results, so that the
``events`` measurement has bounded labels and the README's table of them can be checked
against this module (``tests/test_telemetry.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Literal, get_args

from collector.contract import EVENTS, FEED, QUALITY_KINDS, SPOOL, WRITES
from collector.lineprotocol import Row
from collector.logs import event
from collector.retry import ErrorKind, Failure
from collector.sinks.base import SinkMetrics, WriteReport

__all__ = ["ONCE_SOURCES", "RESULTS", "STAGES", "Counters", "Stage"]

# Rows are built in the contract's field order; fail at import if it ever changes.
assert FEED.field_names == ("age_secs", "stations")
assert WRITES.field_names == ("batches", "latency_ms_max", "latency_ms_mean")
assert SPOOL.field_names == ("batches", "bytes", "dropped_lines", "lines", "oldest_age_secs")

log = logging.getLogger(__name__)

Stage = Literal["fetch", "parse", "write", "quality", "schedule", "anomaly", "archive", "poll"]
STAGES: tuple[str, ...] = get_args(Stage)

RESULTS: frozenset[str] = frozenset(
    (
        "ok",
        *get_args(ErrorKind),
        *QUALITY_KINDS,
        "empty_row",  # parse: a row with no field to write
        "spooled",  # write: kept on disk for later
        "drained",  # write: spooled lines the database finally took
        "on_time",  # schedule: a patient's poll finished within its interval, a system's
        # started within 10% of it
        "late",
        "flagged",  # anomaly: sensor readings the device flagged
        "withheld",  # archive: personal data kept out of the archive
        "error",  # archive: a record that could not be written
        "removed_retention",  # archive: files removed for their age
        "removed_max_bytes",  # archive: files removed to stay under max_bytes
        "bug",  # poll: an exception no source should raise
        "fresh",  # poll: skipped, the feed's ttl has not passed since the slot that fetched
        "backing_off",  # poll: skipped, waiting after transient failures
    )
)

_Key = tuple[str, str, str]
# Sources whose failures of one reason are each logged once (``Counters.failed``).
ONCE_SOURCES = 10


class Counters:
    """Thread-safe counts keyed by (source, stage, result), and the feed ages.

    A stage or result outside ``STAGES`` and ``RESULTS`` raises ``ValueError``: a new label is
    declared here first, then shows on the dashboards.
    """

    def __init__(self, started_secs: float | None = None) -> None:
        # When counting began (epoch seconds): the collector's start, for whatever has not
        # happened since (a feed that never answered is at least this old).
        self.started_secs = time.time() if started_secs is None else started_secs
        self._lock = threading.Lock()
        self._counts: Counter[_Key] = Counter()
        self._reported: set[_Key] = set()
        self._logged_once: set[tuple[str, str]] = set()
        self._logged_per_reason: Counter[str] = Counter()  # sources logged once, per reason
        self._feeds: dict[str, tuple[float, int]] = {}  # system -> (feed time, stations)

    def add(self, source: str, stage: Stage, result: str, n: int = 1) -> None:
        if stage not in STAGES or result not in RESULTS:
            raise ValueError(f"undeclared telemetry label: stage={stage} result={result}")
        if n:
            with self._lock:
                self._counts[(source, stage, result)] += n

    def failed(self, source: str, what: str, failure: Failure, *, once: bool = False) -> None:
        """Count a failure under its stage and kind, and log it (``once``: the first time per
        source and reason only, for sources polled several times a second)."""
        self.add(source, failure.stage, failure.kind)
        note = "logged once per source and reason" if once else None
        # Cut by our own shutdown: worth a count, not a warning.
        level = logging.DEBUG if failure.kind == "cancelled" else logging.WARNING
        if once:
            with self._lock:
                if (source, failure.reason) in self._logged_once:
                    return
                # 2,000 patients behind one dead server would log 2,000 lines: past the first
                # ONCE_SOURCES sources of a reason, one more line says the rest are counted.
                logged = self._logged_per_reason[failure.reason]
                self._logged_per_reason[failure.reason] = logged + 1
                if logged > ONCE_SOURCES:
                    return
                self._logged_once.add((source, failure.reason))
            if logged == ONCE_SOURCES:
                event(
                    log,
                    level,
                    what,
                    error=failure.kind,
                    reason=failure.reason if failure.reason != failure.kind else None,
                    detail=f"more sources fail this way: counted, not logged (the first "
                    f"{ONCE_SOURCES} were); see the periodic summary and the events measurement",
                )
                return
        event(
            log,
            level,
            what,
            source=source,
            stage=failure.stage,
            error=failure.kind,
            reason=failure.reason if failure.reason != failure.kind else None,
            detail=str(failure),
            note=note,
        )

    def wrote(self, source: str, report: WriteReport) -> None:
        """Count what one write did: lines written and spooled, and each failure's kind."""
        self.add(source, "write", "ok", report.written)
        self.add(source, "write", "spooled", report.spooled)
        for failure in report.errors:
            self.add(source, "write", failure.kind)

    def drained(self, bucket: str, report: WriteReport) -> None:
        """Count spooled lines the database finally took (or refused for good)."""
        self.add(bucket, "write", "drained", report.written)
        self.add(bucket, "write", "rejected", report.rejected)

    def expect_feed(self, system: str) -> None:
        """A system whose feed age is reported from now on, heard from or not."""
        with self._lock:
            self._feeds.setdefault(system, (self.started_secs, 0))

    def feed(self, system: str, feed_time: int, stations: int) -> None:
        with self._lock:
            self._feeds[system] = (feed_time, stations)

    def stations(self) -> dict[str, int]:
        """Stations per system, as last heard (systems not heard from yet are left out)."""
        with self._lock:
            return {system: n for system, (_, n) in self._feeds.items() if n}

    def get(self, source: str, stage: Stage, result: str) -> int:
        with self._lock:
            return self._counts[(source, stage, result)]

    def snapshot(self) -> dict[_Key, int]:
        with self._lock:
            return dict(self._counts)

    def report(self) -> tuple[dict[_Key, int], list[_Key]]:
        """The counts, and the keys reported for the first time since start.

        A cumulative counter's increase is a difference between two points: a key's first
        point has none before it, and neither has the first point after a restart (counts
        start again from 0). Writing a 0 just before each new key's first value gives both.
        """
        with self._lock:
            counts = dict(self._counts)
            new = sorted(set(counts) - self._reported)
            self._reported.update(new)
        return counts, new

    def rows(self, now: float, sink: SinkMetrics) -> dict[str, list[Row]]:
        """Rows of EVENTS, FEED, WRITES (and SPOOL, when the sink has one) as of ``now``."""
        stamp = int(now)
        counts, new = self.report()
        events: list[Row] = [
            ((("result", result), ("source", source), ("stage", stage)), (0,), stamp - 1)
            for source, stage, result in new
        ]
        events += [
            ((("result", result), ("source", source), ("stage", stage)), (count,), stamp)
            for (source, stage, result), count in sorted(counts.items())
        ]
        with self._lock:
            feeds_now = sorted(self._feeds.items())
        # A feed with no data since start is as old as this run: its age is written (and
        # grows) all the same, or alerting would resolve a dead feed as missing.
        feeds: list[Row] = [
            ((("system", system),), (round(now - feed_time, 3), stations), stamp)
            for system, (feed_time, stations) in feeds_now
        ]
        writes: list[Row] = [
            (
                (("bucket", bucket),),
                (len(ms), round(max(ms), 3), round(sum(ms) / len(ms), 3)),
                stamp,
            )
            for bucket, ms in sorted(sink.latencies_ms.items())
            if ms
        ]
        rows = {EVENTS.name: events, FEED.name: feeds, WRITES.name: writes}
        spool = sink.spool
        if spool is not None:
            fields = (
                spool.batches,
                spool.bytes,
                spool.dropped_lines,
                spool.lines,
                round(spool.oldest_age_secs, 3),
            )
            rows[SPOOL.name] = [((), fields, stamp)]
        return rows
