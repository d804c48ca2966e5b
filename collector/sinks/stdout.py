"""Line protocol to standard output, for ``collector run --dry-run``."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from collector.contract import Precision
from collector.sinks.base import SinkMetrics, WriteReport


class StdoutSink:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()

    def write(self, bucket: str, lines: Sequence[str], precision: Precision) -> WriteReport:
        if lines:
            with self._lock:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
        return WriteReport(written=len(lines))

    def metrics(self) -> SinkMetrics:
        return SinkMetrics()

    def stop_retrying(self) -> None:
        pass

    def close(self) -> None:
        pass
