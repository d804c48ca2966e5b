"""Runs every source on its own schedule and hands what it collected to the sink.

Each system is one APScheduler job (``max_instances=1``, ``coalesce``, jitter) on a thread pool
with a thread per job, so a slow or failing system never delays another. Everything a job
does is counted and logged in one line per poll; only ``AuthError`` stops the collector,
since no retry can fix refused credentials.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor as _Pool
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from collector.contract import STATION_STATUS, Precision
from collector.lineprotocol import Encoder
from collector.logs import event
from collector.retry import Failure
from collector.settings import Settings
from collector.sinks.influxdb import AuthError, WriteReport
from collector.sources.gbfs import GbfsSystem
from collector.telemetry import Counters

log = logging.getLogger(__name__)

# Docker sends SIGKILL 10 s after SIGTERM; leave room to exit after in-flight writes.
SHUTDOWN_GRACE_SECS = 8.0


class Sink(Protocol):
    def write(self, bucket: str, lines: list[str], precision: Precision) -> WriteReport: ...
    def stop_retrying(self) -> None: ...
    def close(self) -> None: ...


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
        self.systems = (
            systems
            if systems is not None
            else [GbfsSystem(system) for system in settings.gbfs.systems]
        )
        # One encoder per system: its caches are then touched by one thread at a time.
        self._encoders = {system.name: Encoder(STATION_STATUS) for system in self.systems}
        self.fatal: BaseException | None = None
        self.stopped = threading.Event()

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

        lines, empty = self._encoders[name].lines(poll.rows)
        counters.add(name, "parse", "ok")
        counters.add(name, "parse", "empty_row", empty)
        report = self.sink.write(STATION_STATUS.bucket, lines, STATION_STATUS.precision)
        counters.add(name, "write", "ok", report.written)
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
            feed_time=poll.feed_time,
            quality=",".join(f"{k}:{n}" for k, n in sorted(poll.quality.items())) or None,
        )
        ok = not (report.rejected or report.failed)
        return PollSummary(name, ok, poll.outcome, report.written)

    def _failed(self, source: str, what: str, failure: Failure) -> None:
        self.counters.add(source, failure.stage, failure.kind)
        event(
            log,
            logging.WARNING,
            what,
            source=source,
            stage=failure.stage,
            error=failure.kind,
            detail=str(failure),
        )

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
        """Poll every system once, concurrently, and wait for all writes."""
        if not self.systems:
            return []
        with _Pool(max_workers=len(self.systems)) as pool:
            return list(pool.map(self.poll, self.systems))

    def run(self, stop: threading.Event) -> None:
        """Poll on schedule until ``stop`` is set (or credentials are refused)."""
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=max(1, len(self.systems)))},
            timezone=UTC,
        )
        for system in self.systems:
            interval = system.settings.interval_secs
            scheduler.add_job(
                self._job,
                IntervalTrigger(seconds=interval, jitter=min(interval / 10, 5.0)),
                args=(system,),
                id=system.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                next_run_time=datetime.now(UTC),
            )
        scheduler.start()
        event(log, logging.INFO, "started", systems=len(self.systems))
        watcher = threading.Thread(target=lambda: (self.stopped.wait(), stop.set()), daemon=True)
        watcher.start()
        stop.wait()
        self.stopped.set()
        event(log, logging.INFO, "stopping")
        # Let polls in flight finish their writes; past the grace period, end their retries.
        closer = threading.Thread(target=scheduler.shutdown, kwargs={"wait": True})
        closer.start()
        closer.join(SHUTDOWN_GRACE_SECS)
        if closer.is_alive():
            self.sink.stop_retrying()
            closer.join()
        for system in self.systems:
            system.close()
        event(log, logging.INFO, "stopped")
