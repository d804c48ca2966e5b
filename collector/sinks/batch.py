"""Lines from many jobs, written in batches by one thread.

Pressure readings arrive hundreds of times a second, six lines each; one HTTP write per reading
would cost more than the reading. Jobs ``write`` lines and return at once; a writer thread
sends them every ``flush_interval_secs``, or sooner when ``max_lines`` are waiting, through the
wrapped sink (which batches, retries and reports). ``close`` writes what is left.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from collector.contract import Precision
from collector.sinks.base import AuthError, Fatal, Sink, SinkMetrics, WriteReport
from collector.telemetry import Counters

__all__ = ["BatchingSink"]

log = logging.getLogger(__name__)


class BatchingSink:
    """A sink whose writes are queued: each returns an empty report, and what the wrapped
    sink reports when the batch goes out is counted per bucket."""

    def __init__(
        self,
        sink: Sink,
        *,
        counters: Counters,
        fatal: Fatal,
        flush_interval_secs: float = 1.0,
        max_lines: int = 5000,
    ) -> None:
        self._sink = sink
        self._counters = counters
        self._fatal = fatal
        self._interval = flush_interval_secs
        self._max_lines = max_lines
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, Precision], list[str]] = {}
        self._count = 0
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self._thread.start()

    def write(self, bucket: str, lines: Sequence[str], precision: Precision) -> WriteReport:
        if lines:
            with self._lock:
                self._pending.setdefault((bucket, precision), []).extend(lines)
                self._count += len(lines)
                full = self._count >= self._max_lines
            if full:
                self._wake.set()
        return WriteReport()

    def metrics(self) -> SinkMetrics:
        return self._sink.metrics()

    def stop_retrying(self) -> None:
        self._sink.stop_retrying()

    def flush(self) -> None:
        """Write everything queued so far (from the calling thread)."""
        with self._lock:
            batches, self._pending, self._count = self._pending, {}, 0
        for (bucket, precision), lines in batches.items():
            self._counters.wrote(bucket, self._sink.write(bucket, lines, precision))

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush()
            except AuthError as exc:
                self._fatal.stop(exc)
                return
            except Exception:  # a bug must not silently stop all writing
                log.exception("batch_write_crashed")

    def close(self) -> None:
        """Stop the writer thread and write what is left; the wrapped sink stays open (its
        owner closes it). Once: every job that shares this sink may call it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set()
        self._wake.set()
        self._thread.join()
        self.flush()
