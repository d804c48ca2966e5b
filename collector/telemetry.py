"""In-process counters of what the collector did, grouped by a small fixed set of labels."""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    """Thread-safe counts keyed by (source, stage, result).

    ``stage`` is fetch, parse, write or quality; ``result`` is ``ok``, an error kind from
    ``collector.retry.ErrorKind`` or a data-quality kind, so the key space stays small.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str, str]] = Counter()

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
