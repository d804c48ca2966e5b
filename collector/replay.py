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
from collector.lineprotocol import Encoder, Row
from collector.logs import event
from collector.sinks.influxdb import WriteReport
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
