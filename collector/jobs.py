"""What the scheduler runs: one job per source, and the collector's own report.

Every job has the same shape (``Job``): a name, an interval, a jitter, a first start, and
``run() -> PollSummary``; the scheduler knows nothing else of it. ``build_jobs`` is the one
place that names the kinds of source: a new kind is its module under ``sources/``, its job
here, and one line in ``build_jobs``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

from collector.archive import Archive
from collector.contract import (
    ANOMALY,
    EVENTS,
    FEED,
    PATIENT,
    PRESSURE,
    SPOOL,
    STATION_STATUS,
    WRITES,
)
from collector.lineprotocol import Encoder
from collector.logs import event
from collector.retry import Failure
from collector.settings import Settings
from collector.sinks.base import Fatal, Sink
from collector.sinks.batch import BatchingSink
from collector.sources import pressure
from collector.sources.gbfs import GbfsSystem
from collector.sources.pressure import PatientPoller, Person
from collector.telemetry import Counters

__all__ = [
    "Cadence",
    "GbfsJob",
    "Job",
    "Jobs",
    "PatientJob",
    "PollSummary",
    "TelemetryJob",
    "build_jobs",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Bike-share systems polled at least this far apart keep nothing between polls that the next
# poll can rebuild cheaply. Their connections: servers close idle keep-alive connections
# sooner than that (commonly 5-60 s), and a socket kept per system is a file descriptor per
# system (1,520 for the world catalogue). And their encoder's caches: ~450 bytes a station
# (~130 MB for the world's 290,000 in bench/gbfs_scale.py), to save ~15 ms on a 2,000-station
# poll once a minute.
LONG_INTERVAL_SECS = 30.0
# A bike-share poll is on time when it starts within this share of its interval after its
# slot: then the gap between two polls stays within 10% of the interval.
ON_TIME_SHARE = 0.1
# The first patient's first slot: this far after their jobs are made, time enough to add them
# to the scheduler before it comes.
PATIENT_START_DELAY_SECS = 0.05


@dataclass
class PollSummary:
    source: str
    ok: bool
    outcome: str
    written: int = 0


class Job(Protocol):
    name: str
    kind: str  # the kind of source ("gbfs"): the start-up log counts jobs by it
    buckets: tuple[str, ...]  # what it writes to (contract names): `collector check` probes them
    interval_secs: float
    jitter_secs: float
    start_secs: float  # epoch seconds of the first run

    def run(self) -> PollSummary:
        """One poll, written (or queued for writing) before it returns. Raises ``AuthError``
        when the database refuses the credentials; anything else it raises is a bug."""
        ...

    def check(self) -> str:
        """One poll that writes nothing, for ``collector check``: what the source said (lines
        after the first are warnings). Raises ``Failure`` when it cannot be polled."""
        ...

    def abort(self) -> None:
        """Cut a fetch in flight (shutdown); from any thread."""
        ...

    def close(self) -> None:
        """After the last run: write what is queued, close sessions."""
        ...


class Cadence:
    """Whether each poll finished within one interval of the slot it was scheduled for."""

    def __init__(self, interval_secs: float, start_secs: float) -> None:
        self.interval_secs = interval_secs
        self.start_secs = start_secs

    def slot(self, started: float) -> float:
        """The latest slot at or before ``started``."""
        return self.start_secs + math.floor(
            (started - self.start_secs) / self.interval_secs + 1e-9
        ) * (self.interval_secs)

    def on_time(self, started: float, finished: float) -> bool:
        return finished - self.slot(started) <= self.interval_secs

    def slots(self, now: float) -> int:
        """Polls scheduled from start until ``now``."""
        return max(0, math.floor((now - self.start_secs) / self.interval_secs) + 1)


def spread_offset_secs(name: str, interval_secs: float) -> float:
    """Where in its first interval a system's first poll falls: a stable hash of its name
    spread uniformly over the interval, so that a thousand systems do not all start at once
    (and a restart keeps each system's place in the minute)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64 * interval_secs


class GbfsJob:
    """One bike-share system: a poll writes its own batch and logs one line.

    Its slots are ``start_secs + k * interval_secs`` with no jitter: the start itself is spread
    over the first interval (``spread_offset_secs``), and a jittered slot would drift (the
    scheduler adds the next interval to the jittered time) and defeat the ttl rule."""

    def __init__(
        self,
        system: GbfsSystem,
        sink: Sink,
        counters: Counters,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.system = system
        self.name = system.name
        self.kind = "gbfs"
        self.buckets: tuple[str, ...] = (STATION_STATUS.bucket,)
        self.interval_secs = system.settings.interval_secs
        self.jitter_secs = 0.0
        self._clock = clock
        self.start_secs = clock() + spread_offset_secs(self.name, self.interval_secs)
        self.cadence = Cadence(self.interval_secs, self.start_secs)
        self._sink = sink
        self._counters = counters
        # One encoder per job: its caches are then touched by one thread at a time.
        self._encoder: Encoder | None = Encoder(STATION_STATUS)
        self._long_interval = self.interval_secs >= LONG_INTERVAL_SECS
        counters.expect_feed(self.name)

    def run(self) -> PollSummary:
        try:
            return self._run()
        finally:
            if self._long_interval:
                self.system.release()
                self._encoder = None

    def _run(self) -> PollSummary:
        name = self.name
        counters = self._counters
        started = self._clock()
        # A run --once starts before the first slot: its slot is then now.
        slot = started if started < self.start_secs else self.cadence.slot(started)
        on_time = started - slot <= self.interval_secs * ON_TIME_SHARE
        counters.add(name, "schedule", "on_time" if on_time else "late")
        try:
            poll = self.system.poll(slot)
        except Failure as failure:
            counters.failed(name, "poll_failed", failure)
            return PollSummary(name, False, "failed")
        for error in poll.errors:
            counters.failed(name, "feed_failed", error)
        if poll.outcome in ("backing_off", "fresh"):
            # Counted so that the summary shows skips; a skip is normal when the feed's ttl is
            # longer than the interval, and a sign of trouble when it is not.
            counters.add(name, "poll", poll.outcome)
            return PollSummary(name, True, poll.outcome)
        counters.add(name, "fetch", "ok")
        for kind, n in poll.quality.items():
            counters.add(name, "quality", kind, n)
        if not poll.rows:
            event(log, logging.DEBUG, "poll", source=name, outcome=poll.outcome)
            return PollSummary(name, True, poll.outcome)

        if poll.feed_time is not None:
            counters.feed(name, poll.feed_time, poll.stations)
        if self._encoder is None:
            self._encoder = Encoder(STATION_STATUS)
        lines, empty = self._encoder.lines(poll.rows)
        counters.add(name, "parse", "ok")
        counters.add(name, "parse", "empty_row", empty)
        report = self._sink.write(STATION_STATUS.bucket, lines, STATION_STATUS.precision)
        counters.wrote(name, report)
        event(
            log,
            logging.INFO,
            "poll",
            source=name,
            outcome=poll.outcome,
            stations=poll.stations,
            written=report.written,
            rejected=report.rejected,
            failed=report.failed,
            spooled=report.spooled or None,
            feed_time=poll.feed_time,
            quality=",".join(f"{k}:{n}" for k, n in sorted(poll.quality.items())) or None,
        )
        ok = not (report.rejected or report.failed)
        return PollSummary(name, ok, poll.outcome, report.written)

    def check(self) -> str:
        system = self.system
        poll = system.poll()
        # Counted so that `collector check` can hold the stations against server limits.
        self._counters.feed(self.name, poll.feed_time or 0, poll.stations)
        age = f", data {time.time() - poll.feed_time:.0f}s old" if poll.feed_time else ""
        quality = ", ".join(f"{k} {n}" for k, n in sorted(poll.quality.items()))
        if system.settings.url is None:
            version = "(direct feed URLs, no gbfs.json)"
        else:
            version = system.version or "1.0 (gbfs.json has no version)"
        said = f"ok, GBFS {version}, {poll.stations} stations{age}"
        if quality:
            said += f"; data-quality faults: {quality}"
        return "\n".join([said, *(f"  warning: {error}" for error in poll.errors)])

    def abort(self) -> None:
        self.system.abort()

    def close(self) -> None:
        self.system.close()


class PatientJob:
    """One patient: a reading as pressure, anomaly and (when allowed) patient lines.

    ``poll`` is the hot path, a coroutine: the scheduler runs every patient's on one event
    loop (``collector.scheduler``), as a thread per patient cost three times the CPU. ``run``
    and ``check`` poll once on a loop of their own (``run --once``, ``collector check``).

    On schedule, readings (hundreds a second) go to ``queue``, a ``BatchingSink`` shared by
    every patient, which ``close`` flushes; without one (``run --once``) they are written to
    ``sink`` before the summary, whose count is then what the database took.
    """

    def __init__(
        self,
        poller: PatientPoller,
        sink: Sink,
        counters: Counters,
        *,
        queue: BatchingSink | None,
        interval_secs: float,
        start_secs: float,
    ) -> None:
        self.poller = poller
        self.name = poller.name
        self.kind = "pressure"
        # PATIENT rows go to PRESSURE's bucket.
        self.buckets: tuple[str, ...] = (PRESSURE.bucket, ANOMALY.bucket)
        self.interval_secs = interval_secs
        self.jitter_secs = 0.0  # the cadence is the point: slots exactly interval_secs apart
        self.start_secs = start_secs
        self.cadence = Cadence(interval_secs, start_secs)
        self._out: Sink = sink if queue is None else queue
        self._queue = queue
        self._counters = counters
        self._encoders = (Encoder(PRESSURE), Encoder(ANOMALY), Encoder(PATIENT))
        self._person: Person | None = None

    async def poll(self) -> PollSummary:
        """One poll, queued for writing (or written, without a queue) before it returns.
        Cancelled (shutdown), it is counted as cut, and the cancellation goes on."""
        started = time.time()
        try:
            summary = await self._poll()
        except asyncio.CancelledError:
            # Cut, not late: the slot's lateness was never decided.
            failure = Failure("cancelled", f"{self.name}: cut, the collector is stopping")
            self._counters.failed(self.name, "poll_failed", failure, once=True)
            raise
        on_time = self.cadence.on_time(started, time.time())
        self._counters.add(self.name, "schedule", "on_time" if on_time else "late")
        return summary

    def run(self) -> PollSummary:
        return asyncio.run(self._closing(self.poll()))

    def check(self) -> str:
        reading = asyncio.run(self._closing(self.poller.poll()))
        flagged = sum(reading.anomalies)
        return f"ok, {len(reading.values)} sensors" + (f", {flagged} flagged" if flagged else "")

    def abort(self) -> None:
        """Nothing to cut here: the scheduler cancels polls on its loop, and a one-off
        ``run`` or ``check`` ends within the source's ``timeout_secs``."""

    def close(self) -> None:
        self.poller.close()
        if self._queue is not None:
            self._queue.close()  # what every patient queued, written (once, by the first)

    async def _closing(self, poll: Coroutine[None, None, _T]) -> _T:
        # A loop of run()'s own ends with it: its connection must not outlive it.
        try:
            return await poll
        finally:
            self.poller.close()

    async def _poll(self) -> PollSummary:
        name, counters = self.name, self._counters
        try:
            reading = await self.poller.poll()
        except Failure as failure:
            # Patients are polled several times a second: a log line per failure would bury
            # the log. The first of each reason is logged; the counters keep the rest.
            counters.failed(name, "poll_failed", failure, once=True)
            return PollSummary(name, False, "failed")
        pressure_encoder, anomaly_encoder, person_encoder = self._encoders
        pressure_rows, anomaly_rows = pressure.rows(reading)
        batches = [(PRESSURE.bucket, PRESSURE.precision, pressure_encoder.lines(pressure_rows)[0])]
        if anomaly_rows:
            counters.add(name, "anomaly", "flagged", len(anomaly_rows))
            lines = anomaly_encoder.lines(anomaly_rows)[0]
            batches.append((ANOMALY.bucket, ANOMALY.precision, lines))
        person = reading.person
        if person is not None and self._person != person:
            self._person = person
            row = pressure.person_row(reading, person)
            batches.append((PATIENT.bucket, PATIENT.precision, person_encoder.lines([row])[0]))
        counters.add(name, "fetch", "ok")
        written, ok = 0, True
        for bucket, precision, lines in batches:
            report = self._out.write(bucket, lines, precision)
            counters.wrote(bucket, report)
            written += report.written
            ok = ok and not (report.rejected or report.failed)
        return PollSummary(name, ok, "new", written)


class TelemetryJob:
    """The collector's own metrics, written every ``telemetry_interval_secs`` and once more at
    the end. A job of its own: a slow database delays these reports, never the sources."""

    name = kind = "telemetry"
    buckets: tuple[str, ...] = (EVENTS.bucket,)
    jitter_secs = 0.0

    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        counters: Counters,
        patients: list[str],
        systems: list[str] | None = None,
    ) -> None:
        self.interval_secs = float(settings.telemetry_interval_secs)
        self.start_secs = time.time() + self.interval_secs
        self._sink = sink
        self._counters = counters
        self._patients = frozenset(patients)
        self._patients_logged: dict[str, int] = {}
        self._systems = frozenset(systems or ())
        self._systems_logged: dict[str, int] = {}
        self._encoders = {m.name: Encoder(m) for m in (EVENTS, FEED, WRITES, SPOOL)}
        self._lock = threading.Lock()  # the last report (at shutdown) may overlap a late one

    def run(self) -> PollSummary:
        with self._lock:
            if self._patients or self._systems:
                counts = self._counters.snapshot()
                if self._patients:
                    self._log_patients(counts)
                if self._systems:
                    self._log_systems(counts)
            lines: list[str] = []
            for name, rows in self._counters.rows(time.time(), self._sink.metrics()).items():
                lines += self._encoders[name].lines(rows)[0]
            if not lines:
                return PollSummary(self.name, True, "empty")
            report = self._sink.write(EVENTS.bucket, lines, EVENTS.precision)
            self._counters.wrote(EVENTS.bucket, report)
            return PollSummary(self.name, not (report.rejected or report.failed), "new")

    def _log_patients(self, counts: dict[tuple[str, str, str], int]) -> None:
        """One INFO line per report for all patients: polled several times a second, they
        log no line of their own, and a quiet log must still show they are being read."""
        totals = {"readings": 0, "late": 0, "failed": 0, "anomalies": 0}
        for (source, stage, result), n in counts.items():
            if source not in self._patients:
                continue
            if (stage, result) == ("fetch", "ok"):
                totals["readings"] += n
            elif (stage, result) == ("schedule", "late"):
                totals["late"] += n  # finished more than an interval after their slot
            elif stage == "anomaly":
                totals["anomalies"] += n
            elif stage in ("fetch", "parse", "poll") and result != "cancelled":
                totals["failed"] += n
        since = {k: v - self._patients_logged.get(k, 0) for k, v in totals.items()}
        self._patients_logged = totals
        event(log, logging.INFO, "patients", patients=len(self._patients), **since)

    def _log_systems(self, counts: dict[tuple[str, str, str], int]) -> None:
        """One INFO line per report for all bike-share systems: how many polls started, how
        many late, and how many were skipped (fresh by the feed's ttl, or backing off), which
        the per-poll lines (one per write) do not show."""
        totals = dict.fromkeys(("polls", "late", "fresh", "backing_off", "failed"), 0)
        for (source, stage, result), n in counts.items():
            if source not in self._systems:
                continue
            if stage == "schedule":
                totals["polls"] += n
                if result == "late":
                    totals["late"] += n
            elif stage == "poll" and result in ("fresh", "backing_off"):
                totals[result] += n
            elif stage in ("fetch", "parse", "poll") and result not in ("ok", "cancelled"):
                totals["failed"] += n
        since = {k: v - self._systems_logged.get(k, 0) for k, v in totals.items()}
        self._systems_logged = totals
        event(log, logging.INFO, "systems", systems=len(self._systems), **since)

    def check(self) -> str:
        return "ok"  # its own counts: nothing outside to ask

    def abort(self) -> None:
        pass

    def close(self) -> None:
        self.run()  # the last counts


class Jobs(NamedTuple):
    sources: list[Job]  # run on the scheduler's thread pool
    patients: list[PatientJob]  # polled several times a second: on its event loop
    report: TelemetryJob


def build_jobs(
    settings: Settings,
    sink: Sink,
    counters: Counters,
    fatal: Fatal,
    *,
    archive: Archive | None = None,
    once: bool = False,
) -> Jobs:
    """A job per configured source (patients apart: they run on an event loop), and the
    report of them all: the one place that names the kinds of source.

    ``once``: for ``run --once``, patients write straight to ``sink`` instead of through a
    batch writer, so that each job's summary says what the database took.
    """
    jobs: list[Job] = [
        GbfsJob(GbfsSystem(system, archive=archive), sink, counters)
        for system in settings.gbfs.assigned()
    ]
    patient_jobs: list[PatientJob] = []
    source = settings.pressure
    if source.url:
        queue = None
        if not once:
            queue = BatchingSink(
                sink,
                counters=counters,
                fatal=fatal,
                flush_interval_secs=source.flush_interval_secs,
            )
        pollers = [PatientPoller(source, patient, archive=archive) for patient in source.patients]
        # Once every poller is made, so that the first slot is not spent making them.
        start_secs = time.time() + PATIENT_START_DELAY_SECS
        # Patients' slots spread evenly over the interval: the API sees a steady rate, not
        # every patient at once (at 400 patients that burst made 6% of polls late, the
        # server answering the last of them after the next slot; BENCHMARKS.md).
        step_secs = source.interval_secs / max(1, len(pollers))
        patient_jobs = [
            PatientJob(
                poller,
                sink,
                counters,
                queue=queue,
                interval_secs=source.interval_secs,
                start_secs=start_secs + i * step_secs,
            )
            for i, poller in enumerate(pollers)
        ]
    patients = [job.name for job in patient_jobs]
    systems = [system.name for system in settings.gbfs.assigned()]
    return Jobs(jobs, patient_jobs, TelemetryJob(settings, sink, counters, patients, systems))
