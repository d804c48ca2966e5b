"""Runs uniform jobs (``collector.jobs.Job``) on their own schedules, and stops them in time.

Each job is one APScheduler job (``max_instances=1``, ``coalesce``) on a bounded thread pool
(``pool_size``): a thread for each job polled more often than every ``SHARED_ABOVE_SECS``, and
up to ``SHARED_WORKERS`` shared by the rest (a thousand bike-share systems polled every minute
need a few dozen threads, not a thousand). Patients, polled several times a second, run on one
event loop instead (``_PatientLoop``), each on its own cadence with the same rules: one poll
at a time, a slot missed while the last poll ran is skipped, not made up. The scheduler runs
every job once for ``run --once``, and shuts them down within Docker's grace. Only
``AuthError`` stops it, through the one ``Fatal`` holder, since no retry can fix refused
credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor as _Pool
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from collector.archive import Archive
from collector.jobs import Job, PatientJob, PollSummary, build_jobs
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
        patients: Sequence[PatientJob] = (),
        sink: Sink,
        counters: Counters,
        fatal: Fatal,
    ) -> None:
        self.jobs: list[Job] = [*jobs, *patients]  # every source
        self.report = report
        self._pooled = list(jobs)
        self._patients = list(patients)
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
        jobs = build_jobs(settings, sink, counters, fatal, archive=archive, once=once)
        return cls(
            jobs.sources,
            jobs.report,
            patients=jobs.patients,
            sink=sink,
            counters=counters,
            fatal=fatal,
        )

    def run_once(self) -> list[PollSummary]:
        """Run every job once, concurrently; everything is written before this returns."""
        summaries: list[PollSummary] = []
        with _Pool(max_workers=pool_size(self._pooled) + 1) as pool:
            patients = pool.submit(asyncio.run, _poll_once(self._patients))
            summaries += pool.map(lambda job: job.run(), self._pooled)
            summaries += patients.result()
        return summaries

    def run(self, stop: threading.Event) -> None:
        """Run the jobs on schedule until ``stop`` is set (or credentials are refused)."""
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=pool_size(self._pooled))},
            timezone=UTC,
        )
        patients = _PatientLoop(self._patients, self._tracked_patient)
        for job in (*self._pooled, self.report):
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
        patients.start()
        kinds = Counter(job.kind for job in self.jobs)
        event(log, logging.INFO, "started", **kinds)
        raised = self._fatal.raised
        while not (stop.wait(_STOP_CHECK_SECS) or raised.is_set()):
            pass
        event(log, logging.INFO, "stopping")
        self._shutdown(scheduler, patients)

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

    async def _tracked_patient(self, job: PatientJob) -> None:
        try:
            await job.poll()
        except AuthError as exc:
            self._fatal.stop(exc, source=job.name)
        except Exception:  # a bug in one poll must not end the patient's cadence
            self.counters.add(job.name, "poll", "bug")
            log.exception("poll_crashed", extra={"source": job.name})

    def _wait_for_jobs(self, deadline: float) -> bool:
        with self._in_flight_lock:
            return self._in_flight_lock.wait_for(
                lambda: self._in_flight == 0, max(0.0, deadline - time.monotonic())
            )

    def _shutdown(self, scheduler: BackgroundScheduler, patients: _PatientLoop) -> None:
        """Stop within Docker's grace whatever the sources do: runs in flight get
        ``FETCH_GRACE_SECS`` to finish (a reading being received is kept), then fetches still
        in flight are cut (they have collected nothing yet); writes in flight get
        ``SHUTDOWN_GRACE_SECS``, then go to the spool; what the jobs queued and the last counts
        are written last."""
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECS
        scheduler.shutdown(wait=False)  # no new runs
        patients.stop_new_polls()
        fetch_deadline = time.monotonic() + FETCH_GRACE_SECS
        pooled_idle = self._wait_for_jobs(fetch_deadline)
        if not (patients.wait_idle(fetch_deadline) and pooled_idle):
            for job in self._pooled:
                job.abort()
        patients.cancel_and_join()  # patients only queue their lines: nothing left to wait for
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


async def _poll_once(patients: Sequence[PatientJob]) -> list[PollSummary]:
    try:
        return list(await asyncio.gather(*(job.poll() for job in patients)))
    finally:
        for job in patients:
            job.poller.close()  # on the loop their connections belong to


class _PatientLoop:
    """Patients' polls on one event loop thread, each patient on its cadence."""

    def __init__(
        self,
        jobs: Sequence[PatientJob],
        tracked: Callable[[PatientJob], Coroutine[None, None, None]],
    ) -> None:
        self._jobs = list(jobs)
        self._tracked = tracked
        # A daemon: a loop blocked past the shutdown grace must not keep the process alive.
        self._thread = threading.Thread(target=self._run, name="patients", daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._polling: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._idle = threading.Event()  # set once stopping and no poll is in flight

    def start(self) -> None:
        if self._jobs:
            self._thread.start()
            self._ready.wait()

    def stop_new_polls(self) -> None:
        """No poll starts from now on; polls in flight go on (from any thread)."""
        try:
            if self._loop is None:
                raise RuntimeError("not started")
            self._loop.call_soon_threadsafe(self._stop_new_polls)
        except RuntimeError:  # never started, or every cadence has ended: nothing in flight
            self._idle.set()

    def wait_idle(self, deadline: float) -> bool:
        """Whether the polls in flight ended before ``deadline`` (after ``stop_new_polls``)."""
        return self._idle.wait(max(0.0, deadline - time.monotonic()))

    def cancel_and_join(self) -> None:
        """Cut the polls still in flight, close every connection, and end the loop."""
        if self._loop is None:
            return
        # The loop ends by itself once no poll is in flight after stop_new_polls.
        with contextlib.suppress(RuntimeError):  # "Event loop is closed": nothing to cut
            self._loop.call_soon_threadsafe(self._cancel_all)
        self._thread.join(SHUTDOWN_GRACE_SECS)
        if self._thread.is_alive():
            event(
                log,
                logging.WARNING,
                "patients_not_stopped",
                detail=f"the event loop was still busy {SHUTDOWN_GRACE_SECS:g}s after the stop",
            )

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._ready.set()  # start() never waits on a loop that failed to start

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._cadence(job)) for job in self._jobs]
        self._ready.set()
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for job in self._jobs:
                job.poller.close()

    async def _cadence(self, job: PatientJob) -> None:
        task = asyncio.current_task()
        assert task is not None
        slot = job.start_secs
        while True:
            delay = slot - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._stopping:
                return
            self._polling.add(task)
            try:
                await self._tracked(job)
            finally:
                self._polling.discard(task)
                if self._stopping and not self._polling:
                    self._idle.set()
            # The next slot after now: one missed while this poll ran is skipped (coalesced).
            slot = job.cadence.slot(time.time()) + job.interval_secs

    def _stop_new_polls(self) -> None:
        self._stopping = True
        for task in self._tasks:
            if task not in self._polling:
                task.cancel()  # asleep until its next slot
        if not self._polling:
            self._idle.set()

    def _cancel_all(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()


def pool_size(jobs: Sequence[Job]) -> int:
    """Workers for ``jobs`` and the report: a thread for each job polled more often than every
    ``SHARED_ABOVE_SECS``, at most ``SHARED_WORKERS`` for the rest."""
    frequent = sum(1 for job in jobs if job.interval_secs < SHARED_ABOVE_SECS)
    return frequent + min(len(jobs) - frequent, SHARED_WORKERS) + 1
