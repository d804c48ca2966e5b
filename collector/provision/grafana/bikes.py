"""Bike stations, live: a map of one system, counts of empty/full/silent stations, bikes over
time. "Now" is the end of the picked range, so the same dashboard shows any past moment."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import geomap, table, timeseries

from collector.contract import BIKES_1H_BUCKET, STATION_STATUS, STATION_STATUS_1H
from collector.provision.grafana.common import (
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
    # 1 when a non-negative count is 0, else 0: a sum of these is a count that is 0, not
    # "no data", when no station matches (a WHERE filter would return no row at all).
    return f'floor(1 / ("{column}" + 1))'


def bikes_available() -> InfluxQL:
    return InfluxQL(
        S.bucket, f'SELECT sum("bikes") AS "bikes" FROM ({latest(BIKES)}) WHERE {RENTING}'
    )


def empty_stations() -> InfluxQL:
    return InfluxQL(
        S.bucket,
        f'SELECT sum("empty") AS "empty" FROM (SELECT {_indicator_zero("bikes")} AS "empty" '
        f"FROM ({latest(BIKES)}) WHERE {RENTING})",
    )


def full_stations() -> InfluxQL:
    return InfluxQL(
        S.bucket,
        f'SELECT sum("full") AS "full" FROM (SELECT {_indicator_zero("docks")} AS "full" '
        f"FROM ({latest(DOCKS)}) WHERE {RETURNING})",
    )


def not_reporting() -> InfluxQL:
    # late = max(age - 1800, 0) without abs(): InfluxDB 1.6's abs() returns integers unchanged.
    late = f'({TO_SECS} - "reported" - {NOT_REPORTING_SECS})'
    positive = f"(({late} + sqrt(pow({late}, 2))) / 2)"
    stations = latest('last("last_reported") AS "reported"')
    return InfluxQL(
        S.bucket,
        f'SELECT sum("silent") AS "silent" FROM (SELECT 1 - floor(1 / ({positive} + 1)) '
        f'AS "silent" FROM ({stations}) WHERE "installed" = true)',
    )


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
    )


def build() -> db.Dashboard:
    return (
        dashboard(UID_BIKES, "Bike stations, live", "30s", "now-6h", ["bikes"])
        .with_variable(tag_variable("system", "System", S.bucket, S.name, "system"))
        .with_variable(colour_by())
        .with_panel(count_stat("Bikes available", grid(0, 0, 6, 4), bikes_available()))
        .with_panel(count_stat("Empty stations", grid(6, 0, 6, 4), empty_stations()))
        .with_panel(count_stat("Full stations", grid(12, 0, 6, 4), full_stations()))
        .with_panel(
            count_stat("Stations not reporting (30 min)", grid(18, 0, 6, 4), not_reporting())
        )
        .with_panel(station_map())
        .with_panel(empty_and_full_table())
        .with_panel(bikes_over_time())
        .with_panel(bikes_over_time_hourly())
    )
