"""Station history: one station's raw counts, its hourly aggregates kept for years, and its
week profile (mean bikes per hour of the week, in the dashboard's time zone)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, geomap, table, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import dashboard as dm

from collector.contract import BIKES_1H_BUCKET, STATION_STATUS, STATION_STATUS_1H
from collector.provision.grafana.common import (
    HOURLY_FIRST_RUN,
    LATEST_WINDOW,
    UID_HISTORY,
    InfluxQL,
    dashboard,
    datasource,
    grid,
    panel,
    regex,
    series,
    tag_variable,
)
from collector.provision.grafana.stations import (
    STATION_NOW,
    STATION_NOW_COLUMNS,
    colour_by,
    station_geomap,
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
    ).description(HOURLY_FIRST_RUN)


def week_profile_transformations(timezone: str) -> list[dm.DataTransformerConfig]:
    """InfluxQL cannot fold time; Grafana folds it: each hourly mean's time becomes its hour of
    the week in the systems' time zone, then the weeks are averaged per hour."""
    steps: list[tuple[str, dict[str, object]]] = [
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
        .description(f"From the hourly means (bikes_1h). {HOURLY_FIRST_RUN}")
        .x_field("Time")
        .x_tick_label_spacing(100)
    )
    for step in week_profile_transformations(timezone):
        built = built.with_transformation(step)
    return built


EARTH_DIAMETER_M = 12_742_000
RADIANS = 0.017453292519943295  # pi / 180


# The chosen station's coordinates as numbers that always parse. A station in
# station_status but not in station_information (the collector's ``unknown_station``) has no
# position: its variables are empty, and a bare ``${lat0}`` made ``(last("lat") - )``, an
# InfluxQL parse error in both nearby panels. "(0" + value + ")" is the value itself (a
# negative one too: "(0-33.9)"), and (0) when empty: every real station is then thousands of
# kilometres away and the panels show no row.
LAT0 = "(0${lat0})"
LON0 = "(0${lon0})"


def _distance_m(lat: str, lon: str) -> str:
    """Great-circle (haversine) distance in metres from the chosen station (``lat0``,
    ``lon0``, themselves variables read from its newest point) to ``lat``, ``lon``."""
    return (
        f"{EARTH_DIAMETER_M} * asin(sqrt(pow(sin(({lat} - {LAT0}) * {RADIANS} / 2), 2) + "
        f"cos({LAT0} * {RADIANS}) * cos({lat} * {RADIANS}) * "
        f"pow(sin(({lon} - {LON0}) * {RADIANS} / 2), 2)))"
    )


def nearby_query() -> InfluxQL:
    distance = _distance_m('last("lat")', 'last("lon")')
    stations = (
        f'SELECT {STATION_NOW}, {distance} AS "distance_m" FROM "{S.name}" '
        f'WHERE "system" =~ {regex("system")} AND {LATEST_WINDOW} GROUP BY "station_id"'
    )
    columns = ", ".join(f'"{c}"' for c in ("distance_m", *STATION_NOW_COLUMNS))
    query = (
        f'SELECT {columns} FROM ({stations}) WHERE "distance_m" <= ${{radius_m}} '
        'GROUP BY "station_id"'
    )
    return InfluxQL(S.bucket, query, result_format="table")


def nearby_map() -> geomap.Panel:
    return station_geomap("Stations within ${radius_m} m", grid(0, 27, 10, 10), nearby_query())


def nearby_table() -> table.Panel:
    # Nearest first: InfluxQL orders by time only, Grafana sorts.
    return (
        panel(
            table.Panel,
            "Stations within ${radius_m} m, nearest first",
            grid(10, 27, 14, 10),
            nearby_query(),
        )
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="sortBy", options={"sort": [{"field": "distance_m", "desc": False}]}
            )
        )
        .override_by_name("distance_m", [dm.DynamicConfigValue(id_val="unit", value="lengthm")])
        .override_by_name("report_age_s", [dm.DynamicConfigValue(id_val="unit", value="s")])
    )


def _station_coordinate(name: str, field: str) -> db.QueryVariable:
    query = f'SELECT last("{field}") FROM "{S.name}" WHERE {STATION} AND {LATEST_WINDOW}'
    return (
        db.QueryVariable(name)
        .datasource(datasource(S.bucket))
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .hide(dm.VariableHide.HIDE_VARIABLE)
    )


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
        .with_variable(_station_coordinate("lat0", "lat"))
        .with_variable(_station_coordinate("lon0", "lon"))
        .with_variable(db.TextBoxVariable("radius_m").label("Radius (m)").default_value("500"))
        .with_variable(colour_by())
        .with_panel(raw_counts())
        .with_panel(hourly())
        .with_panel(week_profile(settings.timezone))
        .with_panel(nearby_map())
        .with_panel(nearby_table())
    )
