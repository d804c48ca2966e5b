"""``collector replay trips``: trip history into ``station_flow``, backfilled or replayed live.

Backfill writes every (station, minute) with its historical time, as fast as the database
takes it. Live replay emits the minutes in time order at ``speed`` times real time, each
timestamped with the moment it is emitted (milliseconds, so that fast replays never put two
minutes on one timestamp), so live dashboards move.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Protocol, TextIO

from collector.contract import STATION_FLOW, Precision
from collector.http import redact_url
from collector.lineprotocol import Encoder, Row
from collector.logs import event
from collector.provision.influxdb import duration_secs
from collector.settings import InfluxDBSettings
from collector.sinks.influxdb import InfluxV1Writer, InfluxV2Writer, WriteReport, make_writer
from collector.sources import gbfs
from collector.sources.trips import Flows, Progress, open_texts

log = logging.getLogger(__name__)
CHUNK = 5000


class Sink(Protocol):
    def write(self, bucket: str, lines: list[str], precision: Precision) -> WriteReport: ...


@dataclass
class Outcome:
    trips: int = 0
    rows_written: int = 0
    rows_failed: int = 0
    minutes: int = 0


class ProgressLine:
    """rows, rows/s and ETA on one terminal line; a log line every 10 s when not a terminal."""

    def __init__(
        self,
        progress: Progress,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.progress = progress
        self.stream = stream or sys.stderr
        self.clock = clock
        self.started = clock()
        self._last = 0.0
        self._tty = self.stream.isatty()

    def text(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        p = self.progress
        rate = p.rows / elapsed
        eta = "?"
        if p.bytes_read and p.bytes_total:
            remaining = elapsed * (p.bytes_total - p.bytes_read) / p.bytes_read
            eta = f"{int(remaining // 60)}:{int(remaining % 60):02d}"
        return f"rows {p.rows:,}  {rate:,.0f} rows/s  ETA {eta}"

    def tick(self, final: bool = False) -> None:
        now = self.clock()
        if not final and now - self._last < (0.5 if self._tty else 10.0):
            return
        self._last = now
        if self._tty:
            self.stream.write("\r" + self.text() + ("\n" if final else ""))
            self.stream.flush()
        else:
            event(log, logging.INFO, "replay_progress", progress=self.text())


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
    1.x database's retention policy (``retention_policy``, else the default one), or the 2.x
    bucket's expire rule.

    Raises Failure when the server cannot be reached or refuses us, PreflightError when the
    bucket does not exist (or the token cannot see it).
    """
    where = redact_url(influxdb.url)
    writer = make_writer(influxdb)
    try:
        if isinstance(writer, InfluxV1Writer):
            secs = _v1_retention_secs(writer, bucket, influxdb.retention_policy, where)
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
        raise PreflightError(
            f"database {database!r} does not exist at {where}: run collector setup"
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


# --------------------------------------------------------------------------- reading


def read_flows(
    paths: Iterable[Path], flows: Flows, progress: Progress, bar: ProgressLine | None
) -> None:
    for path in paths:
        for text in open_texts(path, progress):
            flows.add_file(text, progress)
            if bar is not None:
                bar.tick()
    if bar is not None:
        bar.tick(final=True)


def gbfs_ids(catalog: gbfs.Catalog) -> dict[str, str]:
    """Trip-file station id -> GBFS station_id. Trip files use the GBFS ``short_name`` (from
    2021) or, before, the numeric ``station_id`` itself; both are looked up."""
    mapping = {station_id: station_id for station_id in catalog.stations}
    for station_id, station in catalog.stations.items():
        if station.short_name:
            mapping[station.short_name] = station_id
    return mapping


def _chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def backfill(flows: Flows, sink: Sink, system: str, rename: Callable[[str], str]) -> Outcome:
    encoder = Encoder(STATION_FLOW)
    outcome = Outcome(trips=flows.trips)
    for chunk in _chunks((row for _m, row in flows.rows(system, rename=rename)), CHUNK):
        lines, _empty = encoder.lines(chunk)
        report = sink.write(STATION_FLOW.bucket, lines, "s")
        outcome.rows_written += report.written + report.spooled
        outcome.rows_failed += report.failed + report.rejected
    return outcome


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
) -> Outcome:
    """Emit minute after minute, ``speed`` times faster than they happened."""
    encoder = Encoder(STATION_FLOW)
    outcome = Outcome(trips=flows.trips)
    started = clock()
    first: int | None = None
    for minute, group in groupby(
        flows.rows(system, by_minute=True, rename=rename), key=lambda mr: mr[0]
    ):
        if first is None:
            first = minute
        due = started + (minute - first) * 60 / speed
        wait = due - clock()
        if wait > 0:
            sleep(wait)
        if stop():
            break
        stamp_ms = round(due * 1000)
        rows = [(tags, values, stamp_ms) for _m, (tags, values, _t) in group]
        lines, _empty = encoder.lines(rows)
        report = sink.write(STATION_FLOW.bucket, lines, "ms")
        outcome.rows_written += report.written + report.spooled
        outcome.rows_failed += report.failed + report.rejected
        outcome.minutes += 1
    return outcome
