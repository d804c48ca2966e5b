"""Which failures are worth retrying, and how long to wait: decided here and nowhere else.

Feeds and the database use the same rules: 408, 429 and 5xx, timeouts and refused connections
are transient (retry with exponential backoff and jitter, never sooner than ``Retry-After``);
everything else is permanent (log, count, move on).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # telemetry imports this module's ErrorKind
    from collector.telemetry import Stage

# A small fixed set, so that metrics and logs can be grouped by it without unbounded labels.
ErrorKind = Literal[
    "timeout",
    "connection",
    "http_4xx",
    "http_5xx",
    "too_large",
    "not_json",
    "schema",
    "auth",
    "rejected",
    "cancelled",  # cut by shutdown: neither the source's fault nor worth a retry
]


class Failure(Exception):
    """A failed fetch, parse or write, classified once where it happens."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        stage: Stage = "fetch",
        status: int | None = None,
        retry_after_secs: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.stage: Stage = stage
        # A finer, still bounded, label than kind (e.g. "sensor_count"), for logging once per kind.
        self.reason = reason or kind
        self.status = status
        self.retry_after_secs = retry_after_secs

    @property
    def transient(self) -> bool:
        return self.kind in ("timeout", "connection", "http_5xx") or self.status in (408, 429)


def kind_of_status(status: int) -> ErrorKind:
    if status in (401, 403):
        return "auth"
    if status == 413:
        return "too_large"
    return "http_5xx" if status >= 500 else "http_4xx"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@dataclass(frozen=True)
class Backoff:
    base_secs: float = 1.0
    max_secs: float = 60.0

    def delay(
        self,
        attempt: int,
        retry_after_secs: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """Wait before retry number ``attempt`` (0-based): "equal jitter" exponential backoff.

        Half the exponential step is fixed and half random, so that many clients retrying the
        same server spread out, yet none retries almost at once. The server's Retry-After is a
        floor: retrying sooner only earns another 429.
        """
        step = min(self.max_secs, self.base_secs * (1 << min(attempt, 32)))
        jitter = (rng or random).random()
        wait = step / 2 + jitter * step / 2
        if retry_after_secs is not None:
            wait = max(wait, retry_after_secs)
        return wait
