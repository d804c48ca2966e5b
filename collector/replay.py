"""``collector replay trips``: trip history into ``station_flow``, backfilled or replayed live.

Backfill writes every (station, minute) with its historical time, as fast as the database
takes it. Live replay emits the minutes in time order at ``speed`` times real time, each
timestamped with the moment it is emitted (milliseconds, so that fast replays never put two
minutes on one timestamp), so live dashboards move.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TextIO

from collector.contract import STATION_FLOW, TRIPS_BUCKET, Precision
from collector.http import redact_url
from collector.lineprotocol import Encoder
from collector.logs import event
from collector.provision.influxdb import duration_secs, v3_retention_secs
from collector.retry import Failure
from collector.settings import InfluxDBSettings, Settings
from collector.sinks.base import Sink, WriteReport
from collector.sinks.influxdb import InfluxV1Writer, InfluxV2Writer, InfluxV3Writer, make_writer
from collector.sources import gbfs
from collector.sources.trips import Flows, Progress, TripFileError, read_file

log = logging.getLogger(__name__)
CHUNK = 5000
# Writes in flight in a backfill into a database: InfluxDB 1.x took 1.31x the points/s from two
# requests as from one (#13).
WRITERS = 2
# A replay gives up once this many batches in a row failed for a transient reason (connection
# refused, timeout, 5xx) after every retry: the database is down, not refusing a batch. Each
# such batch was already retried max_retries times with backoff (~25 s by default), and with
# two writes in flight the first two failures can be one outage seen at once; the third
# batch was sent after the first gave up, so three in a row is a database gone for about a
# minute (a restart takes seconds). One failed batch between good ones does not stop a replay.
GIVE_UP_AFTER = 3
# What a re-run of a replay that ended early does (writes are idempotent: a point written again
# with the same series and time overwrites the first).
RERUN = {
    "backfill": "re-running the same files is safe: the same points are overwritten",
    "shifted": "a re-run with --shift-to-now moves every point to a new now, so the rows "
    "written here would stay beside the new ones",
    "live": "a re-run replays from the first minute, stamped with new times",
}


# A live replay stamps each minute with the moment it is written, a later millisecond than
# the minute before however high the speed; a backfill writes STATION_FLOW.precision.
LIVE_PRECISION: Precision = "ms"


@dataclass
class TripReplayResult:
    trips: int = 0
    rows_written: int = 0
    # Sent, and no answer that they were stored (transient failures after every retry): the
    # server may have applied a write it answered 500 to, or whose answer never came.
    rows_unconfirmed: int = 0
    rows_refused: int = 0  # refused by the server (4xx): not stored
    rows_unsent: int = 0  # never sent: the replay was stopped or gave up first
    minutes: int = 0
    stopped: bool = False  # by a signal, before the end
    gave_up: bool = False  # the database unreachable: GIVE_UP_AFTER batches failed in a row
    cause: Failure | None = None  # the last of them's failure

    @property
    def rows_failed(self) -> int:
        """Sent and not known to be stored."""
        return self.rows_unconfirmed + self.rows_refused


class Outage:
    """Batches in a row that failed for a transient reason after every retry; ``reached``
    once there were ``limit`` of them (then the replay gives up)."""

    def __init__(self, limit: int = GIVE_UP_AFTER) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.failure: Failure | None = None
        self.reached = threading.Event()  # read by the write threads

    def note(self, report: WriteReport) -> bool:
        """Count one batch's report; True once the limit is reached."""
        answered = report.written or report.spooled or report.rejected
        if report.failed and not answered:
            self.in_a_row += 1
            self.failure = next((e for e in report.errors if e.transient), self.failure)
        elif answered:
            self.in_a_row = 0  # an empty report (a batch not sent after a stop) proves nothing
        if self.in_a_row >= self.limit:
            self.reached.set()
        return self.reached.is_set()


class ProgressLine:
    """Progress of a stage (reading, writing, replaying): count, rate and ETA, redrawn on one
    terminal line twice a second, or a log line every 10 s when stderr is not a terminal."""

    def __init__(
        self,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_secs: float | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.clock = clock
        self._tty = self.stream.isatty()
        self.every_secs = every_secs if every_secs is not None else 0.5 if self._tty else 10.0
        self._stage = ""
        self._started = self._last = 0.0

    def text(self, stage: str, done: int, unit: str, fraction: float | None) -> str:
        elapsed = max(self.clock() - self._started, 1e-9)
        eta = "?"
        if fraction:
            remaining = max(0.0, elapsed * (1 - fraction) / fraction)
            eta = f"{int(remaining // 60)}:{int(remaining % 60):02d}"
        return f"{stage}: {unit} {done:,}  {done / elapsed:,.0f} {unit}/s  ETA {eta}"

    def update(
        self,
        stage: str,
        done: int,
        *,
        unit: str = "rows",
        fraction: float | None = None,
        final: bool = False,
    ) -> None:
        """Report ``done`` units of ``stage``, ``fraction`` of it (for the ETA) when known."""
        now = self.clock()
        if stage != self._stage:
            self._stage, self._started, self._last = stage, now, now
        if not final and now - self._last < self.every_secs:
            return
        self._last = now
        if self._tty:
            text = self.text(stage, done, unit, 1.0 if final else fraction)
            self.stream.write("\r" + text + ("\n" if final else ""))
            self.stream.flush()
            return
        elapsed = max(now - self._started, 1e-9)
        remaining = elapsed * (1 - fraction) / fraction if fraction and not final else None
        event(
            log,
            logging.INFO,
            "replay_progress",
            stage=stage,
            unit=unit,
            done=done,
            per_sec=round(done / elapsed),
            eta_secs=None if remaining is None else round(remaining),
            final=final or None,
        )


# ------------------------------------------------------------------ retention pre-flight


class PreflightError(Exception):
    """The target cannot keep this data as it is; nothing was written. Exit 2."""


@dataclass(frozen=True)
class Retention:
    bucket: str  # the configured name (v2 bucket, v1 database)
    secs: int  # 0 = forever
    where: str  # the server's URL, without credentials

    def describe(self) -> str:
        return "forever" if self.secs == 0 else f"{self.secs / 3600:g}h"

    def cutoff(self, now: float) -> float | None:
        """Points stamped before this are dropped by the server on write."""
        return None if self.secs == 0 else now - self.secs


def read_retention(influxdb: InfluxDBSettings, bucket: str) -> Retention:
    """The retention the server applies to writes into ``bucket`` (its configured name): the
    1.x database's retention policy (``retention_policy``, else the default one), the 2.x
    bucket's expire rule, or the 3.x database's retention period.

    Raises Failure when the server cannot be reached or refuses us, PreflightError when the
    bucket does not exist (or the token cannot see it).
    """
    where = redact_url(influxdb.url)
    writer = make_writer(influxdb)
    try:
        if isinstance(writer, InfluxV1Writer):
            secs = _v1_retention_secs(writer, bucket, influxdb.retention_policy, where)
        elif isinstance(writer, InfluxV3Writer):
            secs = _v3_retention_secs(writer, bucket, where)
        else:
            assert isinstance(writer, InfluxV2Writer)
            secs = _v2_retention_secs(writer, bucket, influxdb.org, where)
    finally:
        writer.close()
    return Retention(bucket, secs, where)


def _v1_retention_secs(
    writer: InfluxV1Writer, database: str, policy: str | None, where: str
) -> int:
    names = {
        row[0]
        for result in writer.query("SHOW DATABASES")
        for series in result.get("series", [])
        for row in series.get("values", [])
    }
    if database not in names:
        # 1.x lists only the databases this user may read: a missing one and one without
        # READ privilege look the same here.
        user = writer.settings.username
        who = f"the user {user!r}" if user else "these credentials"
        raise PreflightError(
            f"database {database!r} not found at {where}, or {who} may not read it: "
            "run collector setup, or GRANT READ (or ALL) on it"
        )
    for result in writer.query(f'SHOW RETENTION POLICIES ON "{database}"'):
        for series in result.get("series", []):
            columns = series["columns"]
            for values in series.get("values", []):
                rp = dict(zip(columns, values, strict=True))
                if rp["name"] == policy or (policy is None and rp["default"]):
                    return duration_secs(rp["duration"])
    raise PreflightError(
        f"database {database!r} at {where} has no retention policy {policy or '(default)'!r}"
    )


def _v3_retention_secs(writer: InfluxV3Writer, database: str, where: str) -> int:
    # GET /api/v3/configure/database?format=json lists each database's retention_period.
    try:
        databases = writer.databases()
    except Failure as failure:
        if failure.kind != "auth":
            raise
        raise PreflightError(
            f"cannot list the databases at {where} to read {database!r}'s retention period: "
            "the token may not (listing needs an admin token); use one that can, or write "
            "without the pre-flight"
        ) from None
    if database not in databases:
        raise PreflightError(
            f"database {database!r} not found at {where}: run collector setup (a write would "
            "create it with no retention period)"
        )
    return v3_retention_secs(databases[database])


def _v2_retention_secs(writer: InfluxV2Writer, bucket: str, org: str, where: str) -> int:
    # GET /api/v2/buckets?name=&org= (InfluxDB 2 API reference, "List buckets"); a token that
    # may not read the bucket gets an empty list, as for a bucket that does not exist.
    found = writer.call(
        "find bucket", lambda: writer.client.buckets_api().find_buckets(name=bucket, org=org)
    )
    buckets = [b for b in (found.buckets or []) if b.name == bucket]
    if not buckets:
        raise PreflightError(
            f"bucket {bucket!r} not found in org {org!r} at {where}, or the token may not read "
            "it: run collector setup, or use a token that can read the bucket"
        )
    rules = [r for r in buckets[0].retention_rules or [] if r.type == "expire"]
    return int(rules[0].every_seconds or 0) if rules else 0


def _utc(secs: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(secs))


def check_retention(
    retention: Retention,
    oldest_secs: float,
    newest_secs: float,
    *,
    source: str,
    now: float,
    shift_option: str | None = "--shift-to-now",
    config_key: str | None = None,
) -> None:
    """Raise PreflightError when the server would drop part of [oldest, newest] as older than
    the bucket's retention; the message names the data's span, the bucket, its retention and
    the ways out."""
    cutoff = retention.cutoff(now)
    if cutoff is None or oldest_secs >= cutoff:
        return
    key = f"[buckets.{config_key}] " if config_key else ""
    ways = (
        f"a bucket with longer retention ({key}retention_hours, 0 = forever, then collector setup)"
    )
    if shift_option:
        ways += f", or {shift_option} to move the data so that its last minute is now"
    part = "all of it" if newest_secs < cutoff else f"everything before {_utc(cutoff)}"
    raise PreflightError(
        f"{source}: data from {_utc(oldest_secs)} to {_utc(newest_secs)}, but bucket "
        f"{retention.bucket!r} at {retention.where} keeps {retention.describe()}, so the server "
        f"would drop {part}; nothing written. Ways out: {ways}"
    )


def retention_preflight(
    influxdb: InfluxDBSettings,
    bucket: str,
    oldest_secs: float,
    newest_secs: float,
    *,
    source: str,
    now: float | None = None,
    shift_option: str | None = None,
    config_key: str | None = None,
) -> Retention:
    """Before a historical write: read ``bucket``'s retention from the server and refuse
    (PreflightError) data it would drop. Failure when the server cannot be reached."""
    retention = read_retention(influxdb, bucket)
    check_retention(
        retention,
        oldest_secs,
        newest_secs,
        source=source,
        now=time.time() if now is None else now,
        shift_option=shift_option,
        config_key=config_key,
    )
    return retention


def warn_spooled_beyond_retention(
    influxdb: InfluxDBSettings,
    bucket_names: Mapping[str, str],
    oldest_by_bucket: Mapping[str, float],
    *,
    now: float | None = None,
) -> list[str]:
    """At start-up: log a warning for each bucket whose spool holds points older than its
    retention's cut-off: the server will drop them as they drain. Returns those buckets
    (configured names). A server that cannot be asked now is
    left to the writer to report."""
    now = time.time() if now is None else now
    warned = []
    for logical, spooled in sorted(oldest_by_bucket.items()):
        name = bucket_names.get(logical, logical)
        try:
            retention = read_retention(influxdb, name)
        except Failure:
            break  # down or refusing: one timeout at most, and the writer reports it
        except PreflightError:
            continue
        cutoff = retention.cutoff(now)
        if cutoff is not None and spooled < cutoff:
            warned.append(name)
            event(
                log,
                logging.WARNING,
                "spool_beyond_retention",
                bucket=name,
                oldest_point=_utc(spooled),
                retention=retention.describe(),
                detail="the server drops these points as the spool drains (counted as "
                "beyond_retention): raise the bucket's retention_hours and run collector setup "
                "first to keep them",
            )
    return warned


# --------------------------------------------------------------------------- reading


class Stopped(Exception):
    """SIGTERM or Ctrl-C while reading: nothing was written."""


def read_flows(
    paths: Iterable[Path],
    flows: Flows,
    progress: Progress,
    bar: ProgressLine | None,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Read every file into ``flows``; TripFileError names a file that cannot be used."""

    def tick() -> None:
        if stop():
            raise Stopped
        if bar is not None:
            fraction = progress.bytes_read / progress.bytes_total if progress.bytes_total else None
            bar.update("reading", progress.rows, fraction=fraction)

    if bar is not None:
        bar.update("reading", progress.rows)  # the stage's rate and ETA count from here
    for path in paths:
        read_file(path, flows, progress, tick)
    if bar is not None:
        bar.update("reading", progress.rows, final=True)


def gbfs_ids(catalog: gbfs.Catalog) -> dict[str, str]:
    """Trip-file station id -> GBFS station_id. Trip files use the GBFS ``short_name`` (from
    2021) or, before, the numeric ``station_id`` itself; both are looked up."""
    mapping = {station_id: station_id for station_id in catalog.stations}
    for station_id, station in catalog.stations.items():
        if station.short_name:
            mapping[station.short_name] = station_id
    return mapping


def station_matcher(config: Settings, system: str) -> Callable[[str], str]:
    """Trip-file ids -> the station_id of the same system's GBFS feed, when it is configured,
    so that flows and availability share station_id tags."""
    live_system = next((s for s in config.gbfs.systems if s.name == system), None)
    if live_system is None:
        return lambda station_id: station_id
    gbfs_system = gbfs.GbfsSystem(live_system)
    try:
        mapping = gbfs_ids(gbfs_system.fetch_catalog())
    except Failure as failure:
        event(log, logging.WARNING, "station_match_unavailable", source=system, detail=str(failure))
        return lambda station_id: station_id
    finally:
        gbfs_system.close()
    event(log, logging.INFO, "station_match", source=system, gbfs_stations=len(mapping))
    return lambda station_id: mapping.get(station_id, station_id)


def backfill(
    flows: Flows,
    sink: Sink,
    system: str,
    rename: Callable[[str], str],
    *,
    shift_secs: int = 0,
    bar: ProgressLine | None = None,
    stop: Callable[[], bool] = lambda: False,
    writers: int = 0,
) -> TripReplayResult:
    """Every (station, minute) at its minute (+ ``shift_secs``), in batches of CHUNK rows;
    stops between batches when ``stop()`` says so (a signal also makes the writer give up
    its retries, so the batches in flight end at once), and gives up (``gave_up``) after
    GIVE_UP_AFTER batches in a row failed for a transient reason: the writes in flight end
    without more retries, and no other batch is sent. ``rows_unsent`` counts what was not.

    With ``writers`` threads, batches are written while the next ones are merged and encoded
    (the database's time is no longer the replay's): at most 2 x ``writers`` batches wait or
    are in flight, and each is counted, in order, when its write ends. 0: each batch is written
    before the next is made (a dry run, whose lines go to stdout in order).
    """
    outcome = TripReplayResult(trips=flows.trips)
    total, counted = flows.events, 0  # the rows are not known before the merge: events are
    pool = ThreadPoolExecutor(writers, thread_name_prefix="backfill-write") if writers else None
    waiting: deque[tuple[Future[WriteReport], int]] = deque()
    outage = Outage()
    skipped: list[int] = []  # rows of batches made but not sent (appended from write threads)

    def send(lines: list[str]) -> WriteReport:
        # A batch whose turn comes after a stop stays unsent, like one never made: a stop
        # ends the writes in flight, it does not start the queued ones. Same after giving up.
        if stop() or outage.reached.is_set():
            skipped.append(len(lines))
            return WriteReport()
        return sink.write(STATION_FLOW.bucket, lines, STATION_FLOW.precision)

    def write(lines: list[str]) -> Future[WriteReport]:
        if pool is not None:
            return pool.submit(send, lines)
        written: Future[WriteReport] = Future()
        written.set_result(send(lines))
        return written

    def collect() -> None:
        nonlocal counted
        future, events = waiting.popleft()
        report = future.result()  # a write's exception (refused credentials) is raised
        _count(outcome, report)
        # After a stop, the writes in flight fail because they were cut short, not because the
        # database is gone.
        if not stop() and outage.note(report) and not outcome.gave_up:
            outcome.gave_up, outcome.cause = True, outage.failure
            sink.stop_retrying()  # the writes in flight end now, unconfirmed
        counted += events
        if bar is not None:
            done = outcome.rows_written + outcome.rows_failed
            bar.update("writing", done, fraction=counted / total if total else None)

    if bar is not None:
        bar.update("writing", 0)
    every_batch_made = False
    try:
        for lines, events in flows.lines(system, CHUNK, shift_secs=shift_secs, rename=rename):
            if stop():
                outcome.stopped = True
                break
            waiting.append((write(lines), events))
            if len(waiting) >= 2 * writers:
                collect()
            if outcome.gave_up:
                break
        else:
            every_batch_made = True
        while waiting:
            collect()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if every_batch_made:
        outcome.rows_unsent = sum(skipped)
    else:
        outcome.rows_unsent = _unsent(flows, outcome)
    if bar is not None:
        bar.update("writing", outcome.rows_written + outcome.rows_failed, final=True)
    return outcome


def _count(outcome: TripReplayResult, report: WriteReport) -> None:
    outcome.rows_written += report.written + report.spooled
    outcome.rows_unconfirmed += report.failed
    outcome.rows_refused += report.rejected


def _unsent(flows: Flows, outcome: TripReplayResult) -> int:
    """The rows of a replay that ended early that were never sent (a merge of their own)."""
    return flows.count_rows() - outcome.rows_written - outcome.rows_failed


def live(
    flows: Flows,
    sink: Sink,
    system: str,
    speed: float,
    rename: Callable[[str], str],
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], object] = time.sleep,
    stop: Callable[[], bool] = lambda: False,
    bar: ProgressLine | None = None,
) -> TripReplayResult:
    """Emit minute after minute, ``speed`` times faster than they happened. Each minute gets
    a later millisecond than the one before, however high the speed: two minutes on one
    timestamp would overwrite each other. Gives up as a backfill does (``gave_up``) after
    GIVE_UP_AFTER minutes in a row failed for a transient reason."""
    encoder = Encoder(STATION_FLOW)
    outcome = TripReplayResult(trips=flows.trips)
    outage = Outage()
    span = flows.span()
    if bar is not None:
        bar.update("replaying", 0, unit="minutes")
    started = clock()
    first: int | None = None
    last_ms = 0
    for minute, group in groupby(flows.rows(system, rename=rename), key=lambda mr: mr[0]):
        if first is None:
            first = minute
        due = started + (minute - first) * 60 / speed
        wait = due - clock()
        if wait > 0:
            sleep(wait)
        if stop():
            outcome.stopped = True
            break
        stamp_ms = last_ms = max(round(due * 1000), last_ms + 1)
        rows = [(tags, values, stamp_ms) for _m, (tags, values, _t) in group]
        lines, _empty = encoder.lines(rows)
        report = sink.write(STATION_FLOW.bucket, lines, LIVE_PRECISION)
        _count(outcome, report)
        outcome.minutes += 1
        if not stop() and outage.note(report):  # a write cut short by a stop is no outage
            outcome.gave_up, outcome.cause = True, outage.failure
            break
        if bar is not None and span is not None:
            length = span[1] - span[0]
            bar.update(
                "replaying",
                outcome.minutes,
                unit="minutes",
                fraction=(minute - span[0]) / length if length else 1.0,
            )
    if outcome.stopped or outcome.gave_up:
        outcome.rows_unsent = _unsent(flows, outcome)
    if bar is not None:
        bar.update("replaying", outcome.minutes, unit="minutes", final=True)
    return outcome


def replay_trips(
    paths: Sequence[Path],
    flows: Flows,
    progress: Progress,
    bar: ProgressLine,
    sink: Sink,
    *,
    system: str,
    speed: float | None,
    shift_to_now: bool,
    retention: Retention | None,
    rename: Callable[[str], str],
    stop: threading.Event,
    writers: int = 0,
) -> TripReplayResult:
    """``collector replay trips``: read every file, check the span against ``retention``
    (None: not asked, a dry run), then write as a backfill (on ``writers`` threads, see
    ``backfill``) or live at ``speed``. Raises
    ``TripFileError`` when no trip is usable, ``PreflightError`` when the bucket's retention
    would drop some, ``Stopped`` when a signal came while reading."""
    read_flows(paths, flows, progress, bar, stop=stop.is_set)
    event(
        log,
        logging.INFO,
        "trips_read",
        trips=flows.trips,
        rows=progress.rows,
        stations=len(flows.stations),
        bad=",".join(f"{k}:{n}" for k, n in sorted(flows.bad.items())) or None,
    )
    source = ", ".join(str(p) for p in paths)
    span = flows.span()
    if span is None:
        raise TripFileError(f"{source}: no usable trip in {progress.rows} rows")
    shift_secs = 0
    if shift_to_now:
        shift_secs = (int(time.time()) // 60 - span[1]) * 60
        event(log, logging.INFO, "replay_shift", offset_secs=shift_secs, detail="last minute = now")
    if retention is not None and speed is None:  # a live replay stamps minutes with now
        check_retention(
            retention,
            span[0] * 60 + shift_secs,
            span[1] * 60 + shift_secs,
            source=source,
            now=time.time(),
            shift_option=None if shift_to_now else "--shift-to-now",
            config_key=TRIPS_BUCKET,
        )
    if speed is not None:
        outcome = live(
            flows, sink, system, speed, rename, sleep=stop.wait, stop=stop.is_set, bar=bar
        )
    else:
        outcome = backfill(
            flows,
            sink,
            system,
            rename,
            shift_secs=shift_secs,
            bar=bar,
            stop=stop.is_set,
            writers=writers,
        )
    outcome.stopped = outcome.stopped or stop.is_set()
    log_outcome(
        outcome, RERUN["live" if speed is not None else "shifted" if shift_secs else "backfill"]
    )
    return outcome


def log_outcome(outcome: TripReplayResult, rerun: str) -> None:
    """The replay's last line: replay_done, replay_stopped (a signal) or replay_gave_up (the
    database unreachable), with what was written, not confirmed, refused and not sent, and
    (``rerun``) what running it again does."""
    counts: dict[str, object] = {
        "trips": outcome.trips,
        "written": outcome.rows_written,
        "not_confirmed": outcome.rows_unconfirmed,
        "refused": outcome.rows_refused or None,
        "minutes": outcome.minutes or None,
    }
    written = f"{outcome.rows_written:,} rows written"
    if outcome.rows_unconfirmed:
        written += f", {outcome.rows_unconfirmed:,} not confirmed (the server may have stored some)"
    if outcome.rows_refused:
        written += f", {outcome.rows_refused:,} refused"
    if not (outcome.gave_up or outcome.stopped):
        event(log, logging.INFO, "replay_done", **counts)
        return
    detail = f"{written}, {outcome.rows_unsent:,} not sent; {rerun}"
    cause = outcome.cause if outcome.gave_up else None
    if outcome.gave_up:
        detail = (
            f"the database is unreachable: {GIVE_UP_AFTER} batches in a row failed after every "
            f"retry{f' (last: {cause})' if cause else ''}; {detail}"
        )
    event(
        log,
        logging.ERROR if outcome.gave_up else logging.WARNING,
        "replay_gave_up" if outcome.gave_up else "replay_stopped",
        **counts,
        unsent=outcome.rows_unsent,
        error=cause.kind if cause else None,
        detail=detail,
    )
