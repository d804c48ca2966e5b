"""Lines from many jobs, written in batches by one thread.

Pressure readings arrive hundreds of times a second, six lines each; one HTTP write per reading
would cost more than the reading. Jobs ``add`` lines and return at once; a writer thread sends
them every ``flush_interval_secs``, or sooner when ``max_lines`` are waiting, through the
wrapped sink (which batches, retries and reports). ``close`` writes what is left.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from collector.contract import Precision
from collector.sinks.influxdb import AuthError, WriteReport

log = logging.getLogger(__name__)


class _Sink(Protocol):
    def write(self, bucket: str, lines: list[str], precision: Precision) -> WriteReport: ...


class BatchingSink:
    def __init__(
        self,
        sink: _Sink,
        *,
        flush_interval_secs: float = 1.0,
        max_lines: int = 5000,
        on_report: Callable[[str, WriteReport], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._sink = sink
        self._interval = flush_interval_secs
        self._max_lines = max_lines
        self._on_report = on_report or (lambda bucket, report: None)
        self._on_fatal = on_fatal or (lambda exc: None)
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, Precision], list[str]] = {}
        self._count = 0
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self._thread.start()

    def add(self, bucket: str, precision: Precision, lines: list[str]) -> None:
        if not lines:
            return
        with self._lock:
            self._pending.setdefault((bucket, precision), []).extend(lines)
            self._count += len(lines)
            full = self._count >= self._max_lines
        if full:
            self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return self._count

    def flush(self) -> None:
        """Write everything added so far (from the calling thread)."""
        with self._lock:
            batches, self._pending, self._count = self._pending, {}, 0
        for (bucket, precision), lines in batches.items():
            self._on_report(bucket, self._sink.write(bucket, lines, precision))

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush()
            except AuthError as exc:
                self._on_fatal(exc)
                return
            except Exception:  # a bug must not silently stop all writing
                log.exception("batch_write_crashed")

    def close(self) -> None:
        """Stop the writer thread and write what is left."""
        self._closing.set()
        self._wake.set()
        self._thread.join()
        self.flush()
