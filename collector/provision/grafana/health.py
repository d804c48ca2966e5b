"""Collector health: polls, errors, points written (drained spool included), data quality,
write latency, feed age per system against the stale-feed threshold, the spool."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import timeseries
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from collector.contract import EVENTS, FEED, SPOOL, WRITES
from collector.provision.grafana.common import (
    UID_HEALTH,
    InfluxQL,
    dashboard,
    grid,
    series,
    thresholds,
)
from collector.settings import GrafanaSettings

# Results that are not failures: ok, written later (spooled), written from the spool
# (drained), and rows with no data (a station that reported nothing).
SUCCESSES = ("ok", "spooled", "drained", "empty_row")
ERROR_STAGES = ("fetch", "parse", "write", "poll")


def _any(tag: str, values: tuple[str, ...]) -> str:
    return "(" + " OR ".join(f"\"{tag}\" = '{value}'" for value in values) + ")"


def _none(tag: str, values: tuple[str, ...]) -> str:
    return " AND ".join(f"\"{tag}\" != '{value}'" for value in values)


def increase(where: str, by: tuple[str, ...]) -> str:
    """How much the cumulative ``count`` grew per interval. The difference is taken point by
    point per series (the collector writes a 0 before a counter's first value and at each
    start), then summed per interval, so a first occurrence and the interval after a restart
    both show."""
    tags = ", ".join(f'"{tag}"' for tag in by)
    return (
        'SELECT sum("increase") FROM (SELECT non_negative_difference("count") AS "increase" '
        f'FROM "{EVENTS.name}" WHERE {where} AND $timeFilter '
        'GROUP BY "source", "stage", "result") '
        f"WHERE $timeFilter GROUP BY time($__interval), {tags} fill(0)"
    )


def _rate_panel(
    title: str, grid_pos: dm.GridPos, where: str, by: tuple[str, ...]
) -> timeseries.Panel:
    alias = " ".join(f"$tag_{tag}" for tag in by)
    return series(
        title,
        grid_pos,
        InfluxQL(EVENTS.bucket, increase(where, by), alias=alias),
        interval="10s",  # the telemetry cadence: no finer interval holds a point
    )


def successful_polls() -> timeseries.Panel:
    return _rate_panel(
        "Successful polls",
        grid(0, 0, 12, 8),
        "\"stage\" = 'fetch' AND \"result\" = 'ok'",
        ("source",),
    )


def errors() -> timeseries.Panel:
    where = f"{_any('stage', ERROR_STAGES)} AND {_none('result', SUCCESSES)}"
    return _rate_panel(
        "Errors by source, stage and kind", grid(12, 0, 12, 8), where, ("source", "stage", "result")
    )


def points_written() -> timeseries.Panel:
    where = f"\"stage\" = 'write' AND {_any('result', ('ok', 'drained'))}"
    return _rate_panel(
        "Points written (drained from the spool included)", grid(0, 8, 12, 8), where, ("source",)
    )


def quality_faults() -> timeseries.Panel:
    return _rate_panel(
        "Data-quality faults", grid(12, 8, 12, 8), "\"stage\" = 'quality'", ("source", "result")
    )


def write_latency() -> timeseries.Panel:
    query = (
        'SELECT max("latency_ms_max") AS "max", mean("latency_ms_mean") AS "mean" '
        f'FROM "{WRITES.name}" WHERE $timeFilter GROUP BY time($__interval), "bucket" fill(none)'
    )
    return series(
        "Write latency",
        grid(0, 16, 12, 8),
        InfluxQL(WRITES.bucket, query, alias="$tag_bucket $col"),
        interval="10s",
    ).unit("ms")


def feed_age(settings: GrafanaSettings) -> timeseries.Panel:
    query = (
        f'SELECT max("age_secs") FROM "{FEED.name}" WHERE $timeFilter '
        'GROUP BY time($__interval), "system" fill(none)'
    )
    return (
        series(
            "Feed age per system",
            grid(12, 16, 12, 8),
            InfluxQL(FEED.bucket, query, alias="$tag_system"),
            interval="10s",
        )
        .unit("s")
        .thresholds(thresholds((None, "green"), (settings.feed_stale_secs, "red")))
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.LINE))
    )


def spool() -> timeseries.Panel:
    query = (
        'SELECT last("lines") AS "lines waiting", last("oldest_age_secs") AS "oldest age (s)", '
        f'last("dropped_lines") AS "dropped" FROM "{SPOOL.name}" WHERE $timeFilter '
        "GROUP BY time($__interval) fill(none)"
    )
    return series("Spool", grid(0, 24, 24, 8), InfluxQL(SPOOL.bucket, query), interval="10s")


def build(settings: GrafanaSettings) -> db.Dashboard:
    return (
        dashboard(UID_HEALTH, "Collector health", "30s", "now-3h", ["collector"])
        .with_panel(successful_polls())
        .with_panel(errors())
        .with_panel(points_written())
        .with_panel(quality_faults())
        .with_panel(write_latency())
        .with_panel(feed_age(settings))
        .with_panel(spool())
    )
