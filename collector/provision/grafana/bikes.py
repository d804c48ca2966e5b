"""Bike stations, live: a map of one system, counts of empty/full/silent stations, bikes over
time. "Now" is the end of the picked range, so the same dashboard shows any past moment."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import geomap, table, timeseries

from collector.contract import BIKES_1H_BUCKET, STATION_STATUS, STATION_STATUS_1H
from collector.provision.grafana.common import (
    HOURLY_FIRST_RUN,
    LATEST_WINDOW,
    TO_SECS,
    UID_BIKES,
    InfluxQL,
    count_stat,
    dashboard,
    grid,
    panel,
    regex,
    series,
    tag_variable,
)
from collector.provision.grafana.stations import STATION_NOW, colour_by, station_geomap

S = STATION_STATUS
SYSTEM = f'"system" =~ {regex("system")}'
NOT_REPORTING_SECS = 1800


def latest(*fields: str) -> str:
    """Each station's newest value of ``fields`` (as ``field AS alias`` pairs), one series per
    station, plus whether it is installed, renting and returning."""
    selects = [
        *fields,
        'last("is_installed") AS "installed"',
        'last("is_renting") AS "renting"',
        'last("is_returning") AS "returning"',
    ]
    return (
        f'SELECT {", ".join(selects)} FROM "{S.name}" '
        f'WHERE {SYSTEM} AND {LATEST_WINDOW} GROUP BY "station_id"'
    )


BIKES = 'last("bikes_available") AS "bikes"'
DOCKS = 'last("docks_available") AS "docks"'
# Stations a rider can use: installed and renting (for bikes) or returning (for docks). A
# station that is not renting still counts its bikes (GBFS), but nobody can take them.
RENTING = '"installed" = true AND "renting" = true'
RETURNING = '"installed" = true AND "returning" = true'


def _indicator_zero(column: str) -> str:
    # 1 when a non-negative count is 0, else 0: a sum of these counts the zeros.
    return f'floor(1 / ("{column}" + 1))'


def _total(alias: str, value: str, stations: str, where: str, column: str) -> str:
    """The sum of ``value`` over the stations of ``stations`` matching ``where``, and 0, not
    "no data", when stations reported ``column`` but none matches. A WHERE filter leaves no
    row at all when nothing matches, and InfluxQL cannot add booleans, so a second source
    gives a 0 per station that reported ``column``. No row means ``column`` is unknown: no
    station reported it in the last hour (a dead feed; for docks, a feed without them)."""
    matching = f'SELECT {value} AS "{alias}" FROM ({stations}) WHERE {where}'
    zeros = f'SELECT "{column}" * 0 AS "{alias}" FROM ({stations})'
    return f'SELECT sum("{alias}") AS "{alias}" FROM ({matching}), ({zeros})'


def bikes_available() -> InfluxQL:
    return InfluxQL(S.bucket, _total("bikes", '"bikes"', latest(BIKES), RENTING, "bikes"))


def empty_stations() -> InfluxQL:
    return InfluxQL(
        S.bucket, _total("empty", _indicator_zero("bikes"), latest(BIKES), RENTING, "bikes")
    )


def full_stations() -> InfluxQL:
    return InfluxQL(
        S.bucket, _total("full", _indicator_zero("docks"), latest(DOCKS), RETURNING, "docks")
    )


def not_reporting() -> InfluxQL:
    # late = max(age - 1800, 0) without abs(): InfluxDB 1.6's abs() returns integers unchanged.
    late = f'({TO_SECS} - "reported" - {NOT_REPORTING_SECS})'
    positive = f"(({late} + sqrt(pow({late}, 2))) / 2)"
    stations = latest('last("last_reported") AS "reported"')
    silent = f"1 - floor(1 / ({positive} + 1))"
    return InfluxQL(S.bucket, _total("silent", silent, stations, '"installed" = true', "reported"))


# What a count stat shows when its query has no row (see _total): the figure is unknown, and
# says so; 0 is shown by the queries themselves whenever it is the answer.
UNKNOWN = "unknown"
NO_REPORT = "Unknown when no station of the system reported in the hour before the range's end."


def station_map() -> geomap.Panel:
    query = (
        f'SELECT {STATION_NOW} FROM "{S.name}" WHERE {SYSTEM} AND {LATEST_WINDOW} '
        'GROUP BY "station_id"'
    )
    return station_geomap(
        "Stations now: ${system}",
        grid(0, 4, 16, 18),
        InfluxQL(S.bucket, query, result_format="table"),
    )


def empty_and_full_table() -> table.Panel:
    inner = latest('last("name") AS "name"', BIKES, DOCKS)
    query = (
        f'SELECT "name", "bikes", "docks" FROM ({inner}) WHERE "installed" = true '
        'AND ("bikes" = 0 OR "docks" = 0) GROUP BY "station_id"'
    )
    return panel(
        table.Panel,
        "Empty and full stations",
        grid(16, 4, 8, 18),
        InfluxQL(S.bucket, query, result_format="table"),
    )


def _sum_per_interval(measurement: str, per_station: str, where: str) -> str:
    # Per station first, then summed: a station polled twice in an interval counts once.
    return (
        f'SELECT sum("bikes") AS "bikes" FROM (SELECT {per_station} AS "bikes" '
        f'FROM "{measurement}" WHERE {where} AND $timeFilter '
        'GROUP BY time($__interval), "station_id" fill(none)) '
        "WHERE $timeFilter GROUP BY time($__interval) fill(none)"
    )


def bikes_over_time() -> timeseries.Panel:
    query = _sum_per_interval(S.name, 'last("bikes_available")', SYSTEM)
    return series(
        "Bikes available in ${system} (raw, kept 30 days)",
        grid(0, 22, 12, 8),
        InfluxQL(S.bucket, query),
        interval="1m",  # never finer than the polls: stations would drop out
    )


def bikes_over_time_hourly() -> timeseries.Panel:
    query = _sum_per_interval(STATION_STATUS_1H.name, 'mean("bikes_available_mean")', SYSTEM)
    return series(
        "Bikes available in ${system}, hourly (kept 2 years)",
        grid(12, 22, 12, 8),
        InfluxQL(BIKES_1H_BUCKET, query),
        interval="1h",
    ).description(HOURLY_FIRST_RUN)


def build() -> db.Dashboard:
    return (
        dashboard(UID_BIKES, "Bike stations, live", "30s", "now-6h", ["bikes"])
        .with_variable(tag_variable("system", "System", S.bucket, S.name, "system"))
        .with_variable(colour_by())
        .with_panel(
            count_stat("Bikes available", grid(0, 0, 6, 4), bikes_available())
            .no_value(UNKNOWN)
            .description(f"At stations installed and renting. {NO_REPORT}")
        )
        .with_panel(
            count_stat("Empty stations", grid(6, 0, 6, 4), empty_stations())
            .no_value(UNKNOWN)
            .description(f"Installed and renting, no bike. {NO_REPORT}")
        )
        .with_panel(
            count_stat("Full stations", grid(12, 0, 6, 4), full_stations())
            .no_value(UNKNOWN)
            .description(
                "Installed and returning, no free dock. Unknown when no station reported its "
                "free docks in the hour before the range's end (a feed without docks, or a "
                "dead one)."
            )
        )
        .with_panel(
            count_stat("Stations not reporting (30 min)", grid(18, 0, 6, 4), not_reporting())
            .no_value(UNKNOWN)
            .description(f"Installed, last report older than 30 minutes. {NO_REPORT}")
        )
        .with_panel(station_map())
        .with_panel(empty_and_full_table())
        .with_panel(bikes_over_time())
        .with_panel(bikes_over_time_hourly())
    )
