"""Runs every source on its own schedule and hands what it collected to the sink.

Each bike-share system and each patient is one APScheduler job (``max_instances=1``,
``coalesce``) on a thread pool with a thread per job, so a slow or failing source never delays
another. GBFS polls write their own batch; pressure readings, hundreds a second, go through a
``BatchingSink``. Everything is counted; a GBFS poll logs one line, a patient's failure is
logged once per kind (then only counted). Only ``AuthError`` stops the collector, since no
retry can fix refused credentials.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor as _Pool
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from collector.archive import open_archive
from collector.contract import (
    ANOMALY,
    EVENTS,
    FEED,
    PATIENT,
    PRESSURE,
    SPOOL,
    STATION_STATUS,
    WRITES,
    Precision,
)
from collector.lineprotocol import Encoder
from collector.logs import event
from collector.retry import Failure
from collector.settings import Settings
from collector.sinks.batch import BatchingSink
from collector.sinks.influxdb import AuthError, WriteReport
from collector.sources import pressure
from collector.sources.gbfs import GbfsSystem
from collector.sources.pressure import PatientPoller, Person
from collector.telemetry import Counters

log = logging.getLogger(__name__)

# Docker sends SIGKILL 10 s after SIGTERM. Polls in flight get this long to finish their
# writes; then everything goes to the spool, and a write still in flight ends at its timeout.
SHUTDOWN_GRACE_SECS = 4.0


class Sink(Protocol):
    def write(self, bucket: str, lines: list[str], precision: Precision) -> WriteReport: ...
    def stop_retrying(self) -> None: ...
    def close(self) -> None: ...


class Cadence:
    """Whether each poll finished within one interval of the slot it was scheduled for."""

    def __init__(self, interval_secs: float, start: float) -> None:
        self.interval_secs = interval_secs
        self.start = start

    def on_time(self, started: float, finished: float) -> bool:
        slot = self.start + math.floor((started - self.start) / self.interval_secs + 1e-9) * (
            self.interval_secs
        )
        return finished - slot <= self.interval_secs

    def slots(self, now: float) -> int:
        """Polls scheduled from start until ``now``."""
        return max(0, math.floor((now - self.start) / self.interval_secs) + 1)


@dataclass
class PollSummary:
    source: str
    ok: bool
    outcome: str
    written: int = 0


class Collector:
    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        *,
        counters: Counters | None = None,
        systems: list[GbfsSystem] | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.counters = counters or Counters()
        # One archive, handed to every source as it is made: they record what they fetch.
        self.archive = open_archive(settings.archive, self.counters)
        self.systems = (
            systems
            if systems is not None
            else [GbfsSystem(system, archive=self.archive) for system in settings.gbfs.systems]
        )
        # One encoder per job: its caches are then touched by one thread at a time.
        self._encoders = {system.name: Encoder(STATION_STATUS) for system in self.systems}
        source = settings.pressure
        self.patients = (
            [PatientPoller(source, patient, archive=self.archive) for patient in source.patients]
            if source.url
            else []
        )
        self._patient_encoders = {
            p.patient_id: (Encoder(PRESSURE), Encoder(ANOMALY), Encoder(PATIENT))
            for p in self.patients
        }
        self._people: dict[int, Person] = {}
        self._logged_once: set[tuple[str, str]] = set()
        self.cadences: dict[str, Cadence] = {}
        self._in_flight = 0
        self._patients_logged: dict[str, int] = {}
        self._in_flight_lock = threading.Condition()
        self._feeds: dict[str, tuple[int, int]] = {}  # system -> (feed time, stations)
        self._telemetry = {m.name: Encoder(m) for m in (EVENTS, FEED, WRITES, SPOOL)}
        self._telemetry_lock = threading.Lock()
        self.fatal: BaseException | None = None
        self.stopped = threading.Event()

    @property
    def sources(self) -> int:
        return len(self.systems) + len(self.patients)

    # -- one poll
    def poll(self, system: GbfsSystem) -> PollSummary:
        name = system.name
        counters = self.counters
        try:
            poll = system.poll()
        except Failure as failure:
            self._failed(name, "poll_failed", failure)
            return PollSummary(name, False, "failed")
        for failure in poll.errors:
            self._failed(name, "feed_failed", failure)
        if poll.outcome == "backing_off":
            return PollSummary(name, True, poll.outcome)
        counters.add(name, "fetch", "ok")
        for kind, n in poll.quality.items():
            counters.add(name, "quality", kind, n)
        if not poll.rows:
            event(log, logging.DEBUG, "poll", source=name, outcome=poll.outcome)
            return PollSummary(name, True, poll.outcome)

        if poll.feed_time is not None:
            self._feeds[name] = (poll.feed_time, poll.stations)
        lines, empty = self._encoders[name].lines(poll.rows)
        counters.add(name, "parse", "ok")
        counters.add(name, "parse", "empty_row", empty)
        report = self.sink.write(STATION_STATUS.bucket, lines, STATION_STATUS.precision)
        counters.add(name, "write", "ok", report.written)
        counters.add(name, "write", "spooled", report.spooled)
        for failure in report.errors:
            counters.add(name, "write", failure.kind)
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

    # -- the collector's own metrics
    def telemetry_rows(self, now: float) -> dict[str, list]:
        """Rows of EVENTS, FEED and WRITES as of ``now`` (epoch seconds)."""
        stamp = int(now)
        counts, new = self.counters.report()
        events = [
            ((("result", result), ("source", source), ("stage", stage)), (0,), stamp - 1)
            for source, stage, result in new
        ] + [
            ((("result", result), ("source", source), ("stage", stage)), (count,), stamp)
            for (source, stage, result), count in sorted(counts.items())
        ]
        # A feed with no data since start is at least as old as this run: its age is written
        # (and grows) all the same, or alerting would resolve a dead feed as missing.
        unheard = (self.counters.started_secs, 0)
        feeds = [
            ((("system", system),), (round(now - feed_time, 3), stations), stamp)
            for system, (feed_time, stations) in sorted(
                ({s.name: unheard for s in self.systems} | self._feeds).items()
            )
        ]
        drain = getattr(self.sink, "drain_latencies", None)
        latencies = drain() if callable(drain) else {}
        writes = [
            (
                (("bucket", bucket),),
                (len(ms), round(max(ms), 3), round(sum(ms) / len(ms), 3)),
                stamp,
            )
            for bucket, ms in sorted(latencies.items())
            if ms
        ]
        rows = {EVENTS.name: events, FEED.name: feeds, WRITES.name: writes}
        spool_stats = getattr(self.sink, "spool_stats", None)
        if callable(spool_stats):
            stats = spool_stats()
            rows[SPOOL.name] = [
                (
                    (),
                    (
                        stats.batches,
                        stats.bytes,
                        stats.dropped_lines,
                        stats.lines,
                        round(stats.oldest_age_secs, 3),
                    ),
                    stamp,
                )
            ]
        return rows

    def _log_patients(self, counts: dict[tuple[str, str, str], int]) -> None:
        """One INFO line per report for all patients: polled several times a second, they
        log no line of their own, and a quiet log must still show they are being read."""
        names = {p.name for p in self.patients}
        totals = {"readings": 0, "failed": 0, "anomalies": 0}
        for (source, stage, result), n in counts.items():
            if source not in names:
                continue
            if (stage, result) == ("fetch", "ok"):
                totals["readings"] += n
            elif stage == "anomaly":
                totals["anomalies"] += n
            elif stage in ("fetch", "parse", "poll") and result != "cancelled":
                totals["failed"] += n
        since = {k: v - self._patients_logged.get(k, 0) for k, v in totals.items()}
        self._patients_logged = totals
        event(log, logging.INFO, "patients", patients=len(names), **since)

    def report(self) -> None:
        """Write the collector's own metrics. Runs in its own job: a slow database delays
        these reports, never the sources' polls."""
        with self._telemetry_lock:  # encoders are per thread; reports never overlap anyway
            if self.patients:
                self._log_patients(self.counters.snapshot())
            lines: list[str] = []
            for name, rows in self.telemetry_rows(time.time()).items():
                lines += self._telemetry[name].lines(rows)[0]
            if lines:
                report = self.sink.write(EVENTS.bucket, lines, EVENTS.precision)
                self._written(EVENTS.bucket, report)

    def _report_job(self) -> None:
        try:
            self.report()
        except AuthError as exc:
            self._fatal(exc)
        except Exception:
            log.exception("report_crashed")

    def _failed(self, source: str, what: str, failure: Failure, *, once: bool = False) -> None:
        self.counters.add(source, failure.stage, failure.kind)
        if once:
            if (source, failure.reason) in self._logged_once:
                return
            self._logged_once.add((source, failure.reason))
        event(
            log,
            # Cut by our own shutdown: worth a count, not a warning.
            logging.DEBUG if failure.kind == "cancelled" else logging.WARNING,
            what,
            source=source,
            stage=failure.stage,
            error=failure.kind,
            reason=failure.reason if failure.reason != failure.kind else None,
            detail=str(failure),
            note="logged once per source and reason" if once else None,
        )

    # -- pressure
    def _written(self, bucket: str, report: WriteReport) -> None:
        self.counters.add(bucket, "write", "ok", report.written)
        self.counters.add(bucket, "write", "spooled", report.spooled)
        for failure in report.errors:
            self.counters.add(bucket, "write", failure.kind)

    def _fatal(self, exc: BaseException) -> None:
        event(log, logging.CRITICAL, "auth_refused", detail=str(exc))
        self.fatal = exc
        self.stopped.set()

    def fail(self, exc: BaseException) -> None:
        """Stop the collector: something no retry can fix (refused credentials)."""
        self._fatal(exc)

    def drained(self, bucket: str, report: WriteReport) -> None:
        """Spooled lines the database finally took."""
        self.counters.add(bucket, "write", "drained", report.written)
        self.counters.add(bucket, "write", "rejected", report.rejected)

    def patient_lines(self, poller: PatientPoller) -> list[tuple[str, Precision, list[str]]]:
        """One reading of a patient as (bucket, precision, lines); [] when the poll failed."""
        name = poller.name
        try:
            reading = poller.poll()
        except Failure as failure:
            # Patients are polled several times a second: a log line per failure would bury
            # the log. The first of each reason is logged; the counters keep the rest.
            self._failed(name, "poll_failed", failure, once=True)
            return []
        pressure_encoder, anomaly_encoder, person_encoder = self._patient_encoders[
            poller.patient_id
        ]
        pressure_rows, anomaly_rows = pressure.rows(reading)
        batches = [(PRESSURE.bucket, PRESSURE.precision, pressure_encoder.lines(pressure_rows)[0])]
        if anomaly_rows:
            self.counters.add(name, "anomaly", "flagged", len(anomaly_rows))
            lines = anomaly_encoder.lines(anomaly_rows)[0]
            batches.append((ANOMALY.bucket, ANOMALY.precision, lines))
        if reading.person is not None and self._people.get(poller.patient_id) != reading.person:
            self._people[poller.patient_id] = reading.person
            row = pressure.person_row(reading)
            batches.append((PATIENT.bucket, PATIENT.precision, person_encoder.lines([row])[0]))
        self.counters.add(name, "fetch", "ok")
        return batches

    def poll_patient_now(self, poller: PatientPoller) -> PollSummary:
        """One reading, written before returning (``run --once``): the summary's count is
        what the database took, not what was queued."""
        batches = self.patient_lines(poller)
        if not batches:
            return PollSummary(poller.name, False, "failed")
        written, ok = 0, True
        for bucket, precision, lines in batches:
            report = self.sink.write(bucket, lines, precision)
            self._written(bucket, report)
            written += report.written
            ok = ok and not (report.rejected or report.failed)
        return PollSummary(poller.name, ok, "new", written)

    def _patient_job(self, poller: PatientPoller, batcher: BatchingSink) -> None:
        started = time.time()
        try:
            for bucket, precision, lines in self.patient_lines(poller):
                batcher.add(bucket, precision, lines)
        except Exception:
            self.counters.add(poller.name, "poll", "bug")
            log.exception("poll_crashed", extra={"source": poller.name})
        cadence = self.cadences.get(poller.name)
        if cadence is not None:
            on_time = cadence.on_time(started, time.time())
            self.counters.add(poller.name, "schedule", "on_time" if on_time else "late")

    def _job(self, system: GbfsSystem) -> None:
        try:
            self.poll(system)
        except AuthError as exc:
            event(log, logging.CRITICAL, "auth_refused", source=system.name, detail=str(exc))
            self.fatal = exc
            self.stopped.set()
        except Exception:  # a bug in one poll must not end the job's schedule
            self.counters.add(system.name, "poll", "bug")
            log.exception("poll_crashed", extra={"source": system.name})

    # -- run modes
    def run_once(self) -> list[PollSummary]:
        """Poll every source once, concurrently, and write everything before returning."""
        if not self.sources:
            return []
        with _Pool(max_workers=self.sources) as pool:
            systems = pool.map(self.poll, self.systems)
            patients = pool.map(self.poll_patient_now, self.patients)
            return list(systems) + list(patients)

    def run(self, stop: threading.Event) -> None:
        """Poll on schedule until ``stop`` is set (or credentials are refused)."""
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=self.sources + 1)},
            timezone=UTC,
        )
        batcher = (
            BatchingSink(
                self.sink,
                flush_interval_secs=self.settings.pressure.flush_interval_secs,
                on_report=self._written,
                on_fatal=self._fatal,
            )
            if self.patients
            else None
        )
        for system in self.systems:
            interval = system.settings.interval_secs
            scheduler.add_job(
                self._tracked(self._job),
                IntervalTrigger(seconds=interval, jitter=min(interval / 10, 5.0)),
                args=(system,),
                id=system.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                next_run_time=datetime.now(UTC),
            )
        interval = self.settings.pressure.interval_secs
        start = time.time() + 0.05
        for poller in self.patients:
            self.cadences[poller.name] = Cadence(interval, start)
            # No jitter: the cadence is the point. Every patient starts on the same slots.
            scheduler.add_job(
                self._tracked(self._patient_job),
                IntervalTrigger(seconds=interval, start_date=datetime.fromtimestamp(start, UTC)),
                args=(poller, batcher),
                id=poller.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                next_run_time=datetime.fromtimestamp(start, UTC),
            )
        every = self.settings.telemetry_interval_secs
        scheduler.add_job(
            self._report_job,
            IntervalTrigger(seconds=every),
            id="telemetry",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=datetime.fromtimestamp(time.time() + every, UTC),
        )
        scheduler.start()
        event(log, logging.INFO, "started", systems=len(self.systems), patients=len(self.patients))
        watcher = threading.Thread(target=lambda: (self.stopped.wait(), stop.set()), daemon=True)
        watcher.start()
        stop.wait()
        self.stopped.set()
        event(log, logging.INFO, "stopping")
        self._shutdown(scheduler, batcher)

    def _tracked(self, job: Callable[..., None]) -> Callable[..., None]:
        def tracked(*args: object) -> None:
            with self._in_flight_lock:
                self._in_flight += 1
            try:
                job(*args)
            finally:
                with self._in_flight_lock:
                    self._in_flight -= 1
                    self._in_flight_lock.notify_all()

        return tracked

    def _wait_for_jobs(self, deadline: float) -> bool:
        with self._in_flight_lock:
            return self._in_flight_lock.wait_for(
                lambda: self._in_flight == 0, max(0.0, deadline - time.monotonic())
            )

    def _shutdown(self, scheduler: BackgroundScheduler, batcher: BatchingSink | None) -> None:
        """Stop within Docker's grace whatever the sources do: fetches in flight are cut (they
        have collected nothing yet), writes in flight get ``SHUTDOWN_GRACE_SECS``, then go to
        the spool; what the patients collected and the last counts are written last."""
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECS
        scheduler.shutdown(wait=False)  # no new polls
        for source in (*self.systems, *self.patients):
            source.abort()
        if not self._wait_for_jobs(deadline):
            self.sink.stop_retrying()  # writes in flight spool what they hold and return
            self._wait_for_jobs(deadline + SHUTDOWN_GRACE_SECS / 2)
        try:
            if batcher is not None:
                batcher.close()  # what the patients collected, written
            self.report()  # and the last counts
        except AuthError as exc:
            self._fatal(exc)
        if time.monotonic() > deadline:
            self.sink.stop_retrying()

    def close(self) -> None:
        """Close the sources' HTTP sessions; for whoever made the collector, after run()."""
        for system in self.systems:
            system.close()
        for poller in self.patients:
            poller.close()
        if self.archive is not None:
            self.archive.close()  # ends each file's gzip stream
