"""One bike-share system polled: discovery, station facts and validators kept between polls."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from collector.http import Fetcher, Response, Validators
from collector.lineprotocol import Row
from collector.retry import Backoff, Failure
from collector.settings import GbfsSystemSettings
from collector.sources.gbfs.parse import (
    MIN_INFO_REFRESH_SECS,
    Catalog,
    parse_discovery,
    parse_station_information,
    parse_station_status,
    parse_vehicle_types,
    schema_failure,
)

if TYPE_CHECKING:  # the archive's replay imports the parsers
    from collector.archive import Archive

__all__ = ["GbfsSystem", "Poll", "PollOutcome"]

PollOutcome = Literal["new", "not_modified", "unchanged", "fresh", "backing_off"]


@dataclass
class Poll:
    outcome: PollOutcome
    rows: list[Row] = field(default_factory=list)
    quality: Counter[str] = field(default_factory=Counter)
    stations: int = 0
    feed_time: int | None = None
    errors: list[Failure] = field(default_factory=list)  # failures that did not stop the poll


class GbfsSystem:
    """Polls one bike-share system. Keeps discovery, station facts and validators between polls.

    Not thread-safe: the scheduler runs at most one poll of a system at a time.
    """

    def __init__(
        self,
        settings: GbfsSystemSettings,
        *,
        fetcher: Fetcher | None = None,
        clock: Callable[[], float] = time.time,
        backoff: Backoff | None = None,
        archive: Archive | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._archive = archive
        self._fetcher = fetcher or Fetcher(
            headers=settings.headers,
            timeout_secs=settings.timeout_secs,
            max_body_bytes=settings.max_body_bytes,
            verify_tls=settings.verify_tls,
        )
        self._clock = clock
        self._backoff = backoff or Backoff(base_secs=settings.interval_secs, max_secs=300.0)
        self._feeds: dict[str, str] | None = None
        self.version: str | None = None
        self._catalog: Catalog | None = None
        self._catalog_at = float("-inf")
        self._ebike_types: frozenset[str] | None = None
        self._validators: dict[str, Validators] = {}
        # The slot (scheduled time) of the poll that last fetched station_status: freshness is
        # judged slot to slot, so that a late start does not make the next slot look fresh.
        self._status_slot = float("-inf")
        self._status_ttl_secs = 0.0
        self._last_updated: int | None = None
        self._failures = 0
        self._not_before = float("-inf")

    def close(self) -> None:
        self._fetcher.close()

    def abort(self) -> None:
        """Cut the fetch in flight (shutdown); from any thread."""
        self._fetcher.abort()

    def release(self) -> None:
        """Close idle connections between polls: a system polled every minute would otherwise
        hold a socket (a file descriptor) that the server closes before the next poll anyway."""
        self._fetcher.close()

    def poll(self, slot_secs: float | None = None) -> Poll:
        """One poll. Raises Failure when no status could be had; the next poll retries.

        ``slot_secs``: when the scheduler meant this poll to start (default: now). The feed's
        ttl is counted from the slot of the poll that fetched to this one's slot, not from that
        poll's actual start: a poll started late would otherwise make the next slot, one
        interval later, look younger than a ttl equal to the interval, and be skipped."""
        now = self._clock()
        if now < self._not_before:
            return Poll("backing_off")
        try:
            poll = self._poll(now, now if slot_secs is None else min(slot_secs, now))
        except Failure as failure:
            if failure.transient:
                self._failures += 1
                self._not_before = now + self._backoff.delay(
                    self._failures - 1, failure.retry_after_secs
                )
            elif failure.status == 404 and self.settings.url is not None:
                self._feeds = None  # feed URLs move: look them up again next time
            raise
        self._failures = 0
        return poll

    def _poll(self, now: float, slot: float) -> Poll:
        errors: list[Failure] = []
        feeds = self._discover()
        if now - self._catalog_at >= self._info_refresh_secs():
            errors.extend(self._refresh_catalog(feeds, now))
        if slot - self._status_slot < self._status_ttl_secs:
            return Poll("fresh", errors=errors)

        url = feeds["station_status"]
        response = self._get("station_status", url, now)
        self._status_slot = slot
        if response.body is None:
            return Poll("not_modified", errors=errors)
        snapshot = parse_station_status(
            response.body, self.name, self._catalog, now, self._ebike_types
        )
        self._validators[url] = response.validators
        self._status_ttl_secs = min(float(snapshot.ttl_secs or 0), self.settings.max_ttl_secs)
        if snapshot.quality["unknown_station"] and now - self._catalog_at >= MIN_INFO_REFRESH_SECS:
            self._catalog_at = float("-inf")  # new stations appeared: fetch their facts next poll
        quality = snapshot.quality
        if self._catalog is not None and self._catalog.quality:
            quality = quality + self._catalog.quality
        if snapshot.last_updated is not None and snapshot.last_updated == self._last_updated:
            return Poll(
                "unchanged", quality=quality, feed_time=snapshot.last_updated, errors=errors
            )
        self._last_updated = snapshot.last_updated
        return Poll(
            "new",
            rows=snapshot.rows,
            quality=quality,
            stations=len(snapshot.rows),
            feed_time=snapshot.last_updated,
            errors=errors,
        )

    def fetch_catalog(self) -> Catalog:
        """The system's station_information now (discovering feeds first if needed)."""
        url = self._discover().get("station_information")
        if url is None:
            raise schema_failure("gbfs.json", "lists no station_information feed")
        response = self._fetcher.get(url)
        return parse_station_information(response.body or b"", self.name, self.settings.language)

    def _get(self, feed: str, url: str, now: float) -> Response:
        """Fetch (conditionally when the feed gave validators), and archive what came."""
        response = self._fetcher.get(url, self._validators.get(url))
        if self._archive is not None and response.body is not None:
            self._archive.record("gbfs", self.name, feed, url, now, response.body)
        return response

    def _info_refresh_secs(self) -> float:
        ttl = self._catalog.ttl_secs if self._catalog is not None and self._catalog.ttl_secs else 0
        return min(self.settings.info_refresh_secs, max(float(ttl), MIN_INFO_REFRESH_SECS))

    def _discover(self) -> dict[str, str]:
        if self._feeds is not None:
            return self._feeds
        settings = self.settings
        if settings.url is None:
            given = {
                "station_status": settings.station_status_url,
                "station_information": settings.station_information_url,
                "vehicle_types": settings.vehicle_types_url,
            }
            feeds = {name: url for name, url in given.items() if url}
        else:
            response = self._get("discovery", settings.url, self._clock())
            assert response.body is not None  # no validators sent, so never a 304
            discovery = parse_discovery(response.body, settings.language)
            self.version = discovery.version
            feeds = discovery.feeds
            if "station_status" not in feeds:
                raise schema_failure(
                    "gbfs.json", "lists no station_status feed (not a docked system?)"
                )
        self._feeds = {name: url for name, url in feeds.items() if url}
        return self._feeds

    def _refresh_catalog(self, feeds: dict[str, str], now: float) -> list[Failure]:
        """Fetch station_information (and vehicle_types); a failure keeps the old facts."""
        errors: list[Failure] = []
        for feed in ("station_information", "vehicle_types"):
            url = feeds.get(feed)
            if url is None:
                continue
            try:
                response = self._get(feed, url, now)
                if response.body is not None:
                    if feed == "station_information":
                        self._catalog = parse_station_information(
                            response.body, self.name, self.settings.language
                        )
                    else:
                        self._ebike_types = parse_vehicle_types(response.body)
                    self._validators[url] = response.validators
            except Failure as failure:
                errors.append(failure)
        self._catalog_at = now
        return errors
