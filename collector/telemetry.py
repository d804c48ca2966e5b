"""In-process counters of what the collector did, grouped by a small fixed set of labels."""

from __future__ import annotations

import threading
import time
from collections import Counter


class Counters:
    """Thread-safe counts keyed by (source, stage, result).

    ``stage`` is fetch, parse, write or quality; ``result`` is ``ok``, an error kind from
    ``collector.retry.ErrorKind`` or a data-quality kind, so the key space stays small.
    """

    def __init__(self, started_secs: float | None = None) -> None:
        # When counting began (epoch seconds): the collector's start, for whatever has not
        # happened since (a feed that never answered is at least this old).
        self.started_secs = time.time() if started_secs is None else started_secs
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._reported: set[tuple[str, str, str]] = set()

    def add(self, source: str, stage: str, result: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._counts[(source, stage, result)] += n

    def get(self, source: str, stage: str, result: str) -> int:
        with self._lock:
            return self._counts[(source, stage, result)]

    def snapshot(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._counts)

    def report(self) -> tuple[dict[tuple[str, str, str], int], list[tuple[str, str, str]]]:
        """The counts, and the keys reported for the first time since start.

        A cumulative counter's increase is a difference between two points: a key's first
        point has none before it, and neither has the first point after a restart (counts
        start again from 0). Writing a 0 just before each new key's first value gives both.
        """
        with self._lock:
            counts = dict(self._counts)
            new = sorted(set(counts) - self._reported)
            self._reported.update(new)
        return counts, new
