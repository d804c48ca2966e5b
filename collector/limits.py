"""Server limits met at scale, found before they turn into rejected writes.

InfluxDB 1.x refuses, with a 400 "partial write: max-values-per-tag limit exceeded", every
point carrying a new value of a tag key past ``[data] max-values-per-tag`` (100,000 by
default), and every new series past ``max-series-per-database`` (1,000,000). The world's
public bike-share systems have ~225,000 station ids: one ``station_status`` series each, and
as many ``station_id`` values. The server does not publish its configuration over HTTP, so
the configured systems' stations (counted by ``collector check``'s poll, or estimated by
``collector setup``) are compared with the defaults, and the fix named in one line.

InfluxDB 2.x has no such hard limits by default, but each field is a series of its own
(13 for a station) and the in-memory index grows with them: SCALE.md says where a single
node stops and what takes over.
"""

from __future__ import annotations

__all__ = ["MEAN_STATIONS_PER_SYSTEM", "estimate_stations", "warnings"]

V1_MAX_VALUES_PER_TAG = 100_000
V1_MAX_SERIES_PER_DATABASE = 1_000_000
# The world catalogue: ~225,000 station ids over 1,520 systems (most small, a few 2,000+).
MEAN_STATIONS_PER_SYSTEM = 148
# station_status fields: each a series of its own in 2.x's storage.
FIELDS_PER_STATION = 13
# Where SCALE.md puts a 2.x single node's comfortable limit for series.
V2_COMFORTABLE_SERIES = 1_000_000
# Warn this far before a limit: a system's station count grows, and new systems are added.
HEADROOM = 0.8


def estimate_stations(systems: int, known: dict[str, int] | None = None) -> int:
    """Station ids ``systems`` will bring: those counted (``known``: system -> stations),
    the rest at the catalogue's mean."""
    known = known or {}
    return sum(known.values()) + max(0, systems - len(known)) * MEAN_STATIONS_PER_SYSTEM


def warnings(api: str, stations: int, bucket: str, *, estimated: bool) -> list[str]:
    """One line per limit that ``stations`` station ids in ``bucket`` come near; none when
    the configured systems fit with room to spare."""
    how = "estimated at the catalogue's mean" if estimated else "counted by this check"
    if api == "v1":
        out = []
        if stations > V1_MAX_VALUES_PER_TAG * HEADROOM:
            out.append(
                f"~{stations:,} station ids ({how}) against InfluxDB 1.x's max-values-per-tag "
                f"(default {V1_MAX_VALUES_PER_TAG:,}; new stations' points are refused past "
                f"it): set max-values-per-tag = 0 under [data] in influxdb.conf and restart "
                f"influxd, or give shards of the systems databases of their own "
                f"(buckets.bikes.name)"
            )
        if stations > V1_MAX_SERIES_PER_DATABASE * HEADROOM:
            out.append(
                f"~{stations:,} series in {bucket!r} against max-series-per-database "
                f"(default {V1_MAX_SERIES_PER_DATABASE:,}): set max-series-per-database = 0 "
                f"under [data], or split the systems over databases"
            )
        return out
    if api == "v2" and stations * FIELDS_PER_STATION > V2_COMFORTABLE_SERIES * HEADROOM:
        series = stations * FIELDS_PER_STATION
        return [
            f"~{series:,} series in {bucket!r} ({stations:,} stations x {FIELDS_PER_STATION} "
            f"fields, {how}): past ~{V2_COMFORTABLE_SERIES:,} a single InfluxDB 2.x node needs "
            f"the memory and care SCALE.md describes"
        ]
    return []
