"""What every sink shares: the protocol the collector writes through, what a write reports,
the one exception that stops the collector, and the holder of that fatal state.

Kept apart from any one sink (as Vector keeps its shared sink machinery in one neutral place),
so that a new sink imports this module and nothing of the InfluxDB writer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from collector.contract import Precision
from collector.logs import event
from collector.retry import Failure

__all__ = ["AuthError", "Fatal", "Sink", "SinkMetrics", "SpoolStats", "WriteReport"]

log = logging.getLogger(__name__)


class AuthError(Exception):
    """The database refused our credentials: retrying cannot help, the operator must act."""


@dataclass
class WriteReport:
    written: int = 0
    rejected: int = 0  # refused by the server as bad data (4xx): retrying cannot help
    failed: int = 0  # still failing after every retry (outage)
    spooled: int = 0  # kept on disk, to be written when the server answers again
    errors: list[Failure] = field(default_factory=list)
    # What was not written, as batches: transient failures (to spool) and refusals (dead letter).
    unsent: list[list[str]] = field(default_factory=list)
    refused: list[tuple[list[str], Failure]] = field(default_factory=list)

    def add(self, other: WriteReport) -> None:
        self.written += other.written
        self.rejected += other.rejected
        self.failed += other.failed
        self.spooled += other.spooled
        self.errors.extend(other.errors)
        self.unsent.extend(other.unsent)
        self.refused.extend(other.refused)


@dataclass(frozen=True)
class SpoolStats:
    batches: int
    lines: int
    bytes: int
    oldest_age_secs: float
    dropped_lines: int  # evicted because the spool was full, since start


@dataclass(frozen=True)
class SinkMetrics:
    """What a sink tells the collector's own metrics; empty for sinks that measure nothing."""

    # Latencies of the write requests accepted since the last call, per bucket.
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    spool: SpoolStats | None = None  # None: no spool behind this sink


class Sink(Protocol):
    def write(self, bucket: str, lines: Sequence[str], precision: Precision) -> WriteReport: ...

    def metrics(self) -> SinkMetrics:
        """Measured since the last call: each call takes the latencies it returns."""
        ...

    def stop_retrying(self) -> None: ...

    def close(self) -> None: ...


class Fatal:
    """The collector's one fatal state: refused credentials, which no retry can fix.

    Made once and handed at construction to every part that may meet it (the spool's drainer,
    the batch writer, the scheduler), so that none of them needs a callback set afterwards.
    """

    def __init__(self) -> None:
        self.error: AuthError | None = None
        self.raised = threading.Event()

    def stop(self, exc: AuthError, *, source: str | None = None) -> None:
        event(log, logging.CRITICAL, "auth_refused", source=source, detail=str(exc))
        self.error = exc
        self.raised.set()
