"""Station history: one station's raw counts, its hourly aggregates kept for years, and its
week profile (mean bikes per hour of the week, in the dashboard's time zone)."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import barchart, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import dashboard as dm

from collector.contract import BIKES_1H_BUCKET, STATION_STATUS, STATION_STATUS_1H
from collector.provision.grafana.common import (
    UID_HISTORY,
    InfluxQL,
    dashboard,
    grid,
    panel,
    regex,
    series,
    tag_variable,
)
from collector.settings import GrafanaSettings

S = STATION_STATUS
STATION = f'"system" =~ {regex("system")} AND "station_id" =~ {regex("station")}'
# moment.js format: weekday number first (Sunday 0) so the profile sorts Sunday..Saturday.
HOUR_OF_WEEK_FORMAT = "d HH ddd"
PROFILE_WEEKS = 4


def raw_counts() -> timeseries.Panel:
    query = (
        'SELECT last("bikes_available") AS "bikes", last("ebikes_available") AS "e-bikes", '
        f'last("docks_available") AS "free docks" FROM "{S.name}" WHERE {STATION} '
        "AND $timeFilter GROUP BY time($__interval) fill(none)"
    )
    return series(
        "Bikes, e-bikes and free docks (raw, kept 30 days)",
        grid(0, 0, 24, 9),
        InfluxQL(S.bucket, query),
        interval="1m",
    )


def hourly() -> timeseries.Panel:
    query = (
        'SELECT mean("bikes_available_mean") AS "mean", min("bikes_available_min") AS "min", '
        f'max("bikes_available_max") AS "max" FROM "{STATION_STATUS_1H.name}" WHERE {STATION} '
        "AND $timeFilter GROUP BY time($__interval) fill(none)"
    )
    return series(
        "Hourly mean, min, max (kept 2 years)",
        grid(0, 9, 24, 9),
        InfluxQL(BIKES_1H_BUCKET, query),
        interval="1h",
    )


def week_profile_transformations(timezone: str) -> list[dm.DataTransformerConfig]:
    """InfluxQL cannot fold time; Grafana folds it: each hourly mean's time becomes its hour of
    the week in the systems' time zone, then the weeks are averaged per hour."""
    steps: list[tuple[str, dict[str, Any]]] = [
        (
            "formatTime",
            {"timeField": "Time", "outputFormat": HOUR_OF_WEEK_FORMAT, "timezone": timezone},
        ),
        (
            "groupBy",
            {
                "fields": {
                    "Time": {"aggregations": [], "operation": "groupby"},
                    "bikes": {"aggregations": ["mean"], "operation": "aggregate"},
                }
            },
        ),
        ("sortBy", {"sort": [{"field": "Time", "desc": False}]}),
    ]
    return [dm.DataTransformerConfig(id_val=name, options=options) for name, options in steps]


def week_profile(timezone: str) -> barchart.Panel:
    query = (
        f'SELECT mean("bikes_available_mean") AS "bikes" FROM "{STATION_STATUS_1H.name}" '
        f"WHERE {STATION} AND $timeFilter GROUP BY time(1h) fill(none)"
    )
    built = (
        panel(
            barchart.Panel,
            f"Mean bikes by hour of the week (last {PROFILE_WEEKS} weeks)",
            grid(0, 18, 24, 9),
            InfluxQL(BIKES_1H_BUCKET, query, result_format="table"),
        )
        .time_from(f"{PROFILE_WEEKS * 7}d")
        .x_field("Time")
        .x_tick_label_spacing(100)
    )
    for step in week_profile_transformations(timezone):
        built = built.with_transformation(step)
    return built


def build(settings: GrafanaSettings) -> db.Dashboard:
    return (
        dashboard(UID_HISTORY, "Station history", "1m", "now-7d", ["bikes"])
        .with_variable(tag_variable("system", "System", S.bucket, S.name, "system"))
        .with_variable(
            tag_variable(
                "station",
                "Station",
                S.bucket,
                S.name,
                "station_id",
                f'"system" =~ {regex("system")}',
            )
        )
        .with_panel(raw_counts())
        .with_panel(hourly())
        .with_panel(week_profile(settings.timezone))
    )
