"""Trip flows (from `collector replay trips`, bucket trips): everything follows the time
picker, variables included, so a backfilled month from years ago is one range change away."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import table, timeseries

from collector.contract import STATION_FLOW
from collector.provision.grafana.common import (
    UID_FLOWS,
    InfluxQL,
    dashboard,
    grid,
    panel,
    regex,
    series,
    tag_variable,
)

F = STATION_FLOW
SYSTEM = f'"system" =~ {regex("system")}'
BUSIEST = 15


def over_time() -> timeseries.Panel:
    query = (
        f'SELECT sum("undocks") AS "undocks", sum("docks") AS "docks" FROM "{F.name}" '
        f"WHERE {SYSTEM} AND $timeFilter GROUP BY time($__interval) fill(0)"
    )
    return series(
        "Bikes taken (undocks) and returned (docks), all stations",
        grid(0, 0, 24, 9),
        InfluxQL(F.bucket, query),
        interval="1m",  # the replay's resolution
    )


def busiest() -> table.Panel:
    per_station = (
        'SELECT sum("undocks") + sum("docks") AS "trips", sum("undocks") AS "undocks", '
        'sum("docks") AS "docks", last("name") AS "name" '
        f'FROM "{F.name}" WHERE {SYSTEM} AND $timeFilter GROUP BY "station_id"'
    )
    query = (
        f'SELECT top("trips", "station_id", {BUSIEST}), "name", "undocks", "docks" '
        f"FROM ({per_station})"
    )
    return panel(
        table.Panel,
        "Busiest stations",
        grid(0, 9, 10, 12),
        InfluxQL(F.bucket, query, result_format="table"),
    )


def net_flow() -> timeseries.Panel:
    query = (
        f'SELECT sum("net") AS "net" FROM "{F.name}" WHERE {SYSTEM} '
        f'AND "station_id" =~ {regex("station")} AND $timeFilter '
        "GROUP BY time($__interval) fill(0)"
    )
    return series(
        "Net flow at ${station} (docks - undocks)",
        grid(10, 9, 14, 12),
        InfluxQL(F.bucket, query),
        interval="1m",
    )


def build() -> db.Dashboard:
    return (
        dashboard(UID_FLOWS, "Trip flows", "30s", "now-7d", ["bikes", "trips"])
        .with_variable(tag_variable("system", "System", F.bucket, F.name, "system"))
        .with_variable(tag_variable("station", "Station", F.bucket, F.name, "station_id", SYSTEM))
        .with_panel(over_time())
        .with_panel(busiest())
        .with_panel(net_flow())
    )
