"""Runs uniform jobs (``collector.jobs.Job``) on their own schedules, and stops them in time.

Each job is one APScheduler job (``max_instances=1``, ``coalesce``) on a bounded thread pool
(``pool_size``): a thread for each job polled more often than every ``SHARED_ABOVE_SECS`` (a
patient's cadence is the point), and up to ``SHARED_WORKERS`` shared by the rest (a thousand
bike-share systems polled every minute need a few dozen threads, not a thousand). The
scheduler knows no kind of source: it adds every job the same way, runs them once for
``run --once``, and shuts them down within Docker's grace. Only ``AuthError`` stops it,
through the one ``Fatal`` holder, since no retry can fix refused credentials.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor as _Pool
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from collector.archive import Archive
from collector.jobs import Job, PollSummary, build_jobs
from collector.logs import event
from collector.settings import Settings
from collector.sinks.base import AuthError, Fatal, Sink
from collector.telemetry import Counters

__all__ = ["SHUTDOWN_GRACE_SECS", "Scheduler"]

log = logging.getLogger(__name__)

# Docker sends SIGKILL 10 s after SIGTERM. Polls in flight get this long to finish their
# writes; then everything goes to the spool, and a write still in flight ends at its timeout.
SHUTDOWN_GRACE_SECS = 4.0
# A healthy fetch takes milliseconds: cutting it at once would lose a reading the server has
# already sent. One that is still running after this is hanging, and is cut.
FETCH_GRACE_SECS = 1.0
# Jobs polled at least this far apart share the pool's workers.
SHARED_ABOVE_SECS = 5.0
# Workers shared by them: the world catalogue at 60 s is ~25 polls a second of 10-200 ms each,
# and this many also absorb a few dozen feeds hanging until their 10 s timeout.
SHARED_WORKERS = 48
# How soon refused credentials, met in any thread, end run(): the time it may take to notice.
_STOP_CHECK_SECS = 0.1


class Scheduler:
    """``jobs`` poll the sources; ``report`` writes the collector's own metrics on its own
    schedule and once more at the end (it is not run by ``run_once``)."""

    def __init__(
        self,
        jobs: Sequence[Job],
        report: Job,
        *,
        sink: Sink,
        counters: Counters,
        fatal: Fatal,
    ) -> None:
        self.jobs = list(jobs)
        self.report = report
        self._sink = sink
        self.counters = counters
        self._fatal = fatal
        self._in_flight = 0
        self._in_flight_lock = threading.Condition()
        self._closed = False

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        sink: Sink,
        *,
        counters: Counters | None = None,
        fatal: Fatal | None = None,
        archive: Archive | None = None,
        once: bool = False,
    ) -> Scheduler:
        """The jobs ``build_jobs`` makes from ``settings``, scheduled (``once``: see there)."""
        counters = counters or Counters()
        fatal = fatal or Fatal()
        sources, report = build_jobs(settings, sink, counters, fatal, archive=archive, once=once)
        return cls(sources, report, sink=sink, counters=counters, fatal=fatal)

    def run_once(self) -> list[PollSummary]:
        """Run every job once, concurrently; everything is written before this returns."""
        if not self.jobs:
            return []
        with _Pool(max_workers=pool_size(self.jobs)) as pool:
            return list(pool.map(lambda job: job.run(), self.jobs))

    def run(self, stop: threading.Event) -> None:
        """Run the jobs on schedule until ``stop`` is set (or credentials are refused)."""
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=pool_size(self.jobs))},
            timezone=UTC,
        )
        for job in (*self.jobs, self.report):
            start = datetime.fromtimestamp(job.start_secs, UTC)
            scheduler.add_job(
                self._tracked,
                IntervalTrigger(
                    seconds=job.interval_secs, jitter=job.jitter_secs or None, start_date=start
                ),
                args=(job,),
                id=job.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                next_run_time=start,
            )
        scheduler.start()
        kinds = Counter(job.kind for job in self.jobs)
        event(log, logging.INFO, "started", **kinds)
        raised = self._fatal.raised
        while not (stop.wait(_STOP_CHECK_SECS) or raised.is_set()):
            pass
        event(log, logging.INFO, "stopping")
        self._shutdown(scheduler)

    def close(self) -> None:
        """Write what the jobs queued and close their sessions (``run`` does it on its way
        out; after ``run_once``, the caller does). Once only."""
        if self._closed:
            return
        self._closed = True
        for job in self.jobs:
            job.close()

    def _tracked(self, job: Job) -> None:
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            job.run()
        except AuthError as exc:
            self._fatal.stop(exc, source=job.name)
        except Exception:  # a bug in one run must not end the job's schedule
            self.counters.add(job.name, "poll", "bug")
            log.exception("poll_crashed", extra={"source": job.name})
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
                self._in_flight_lock.notify_all()

    def _wait_for_jobs(self, deadline: float) -> bool:
        with self._in_flight_lock:
            return self._in_flight_lock.wait_for(
                lambda: self._in_flight == 0, max(0.0, deadline - time.monotonic())
            )

    def _shutdown(self, scheduler: BackgroundScheduler) -> None:
        """Stop within Docker's grace whatever the sources do: runs in flight get
        ``FETCH_GRACE_SECS`` to finish (a reading being received is kept), then fetches still
        in flight are cut (they have collected nothing yet); writes in flight get
        ``SHUTDOWN_GRACE_SECS``, then go to the spool; what the jobs queued and the last counts
        are written last."""
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECS
        scheduler.shutdown(wait=False)  # no new runs
        if not self._wait_for_jobs(time.monotonic() + FETCH_GRACE_SECS):
            for job in self.jobs:
                job.abort()
        if not self._wait_for_jobs(deadline):
            self._sink.stop_retrying()  # writes in flight spool what they hold and return
            self._wait_for_jobs(deadline + SHUTDOWN_GRACE_SECS / 2)
        try:
            self.close()  # what the jobs queued, written
            self.report.close()  # and the last counts
        except AuthError as exc:
            self._fatal.stop(exc)
        if time.monotonic() > deadline:
            self._sink.stop_retrying()


def pool_size(jobs: Sequence[Job]) -> int:
    """Workers for ``jobs`` and the report: a thread for each job polled more often than every
    ``SHARED_ABOVE_SECS``, at most ``SHARED_WORKERS`` for the rest."""
    frequent = sum(1 for job in jobs if job.interval_secs < SHARED_ABOVE_SECS)
    return frequent + min(len(jobs) - frequent, SHARED_WORKERS) + 1
