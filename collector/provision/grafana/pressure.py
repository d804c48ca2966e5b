"""Foot pressure, live: the six sensors laid out as two feet, both feet over time, anomaly
runs as annotations, in a table and counted today, and the per-minute history."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import stat, table, timeseries
from grafana_foundation_sdk.models import common as cm

from collector.contract import ANOMALY, PRESSURE, PRESSURE_1M, PRESSURE_1M_BUCKET, SENSORS
from collector.provision.grafana.common import (
    UID_PRESSURE,
    InfluxQL,
    count_stat,
    dashboard,
    datasource,
    grid,
    legend,
    panel,
    regex,
    series,
    tag_variable,
    thresholds,
)

P, A = PRESSURE, ANOMALY
PATIENT = f'"patient_id" =~ {regex("patient")}'
FOOT_PARTS = {"0": "front", "1": "middle", "2": "heel"}
PRESSURE_SCALE = thresholds(
    (None, "blue"), (200, "green"), (500, "yellow"), (800, "orange"), (1000, "red")
)
# Anomaly runs last 12-99 s with readings several times a second: a run is a sequence of
# 10-second steps that each hold a flagged reading; a step without one ends it.
RUN_STEP = "10s"


def run_starts() -> str:
    """One row per RUN_STEP of the range: ``start`` is 1 where an anomaly run begins."""
    flagged = (
        f'SELECT count("value") AS "flagged" FROM "{A.name}" WHERE {PATIENT} AND $timeFilter '
        f"GROUP BY time({RUN_STEP}) fill(0)"
    )
    on = f'SELECT 1 - floor(1 / ("flagged" + 1)) AS "on" FROM ({flagged})'
    change = f'SELECT difference("on") AS "change" FROM ({on})'
    return f'SELECT floor(("change" + 1) / 2) AS "start" FROM ({change})'


def sensor_stat(index: int, sensor: str) -> stat.Panel:
    foot = "Left" if sensor.startswith("L") else "Right"
    query = (
        f'SELECT last("value") FROM "{P.name}" WHERE {PATIENT} AND "sensor" = \'{sensor}\' '
        "AND $timeFilter"
    )
    return (
        count_stat(
            f"{foot} {FOOT_PARTS[sensor[1]]} ({sensor})",
            grid(4 * (index // 3), 3 * (index % 3), 4, 3),
            InfluxQL(P.bucket, query),
        )
        .thresholds(PRESSURE_SCALE)
        .color_mode(cm.BigValueColorMode.BACKGROUND)
    )


def foot_series(column: int, foot: str) -> timeseries.Panel:
    # The peak per interval: a zoomed-out view keeps the loading peaks instead of averaging
    # them away, and never exceeds Grafana's point limit.
    query = (
        f'SELECT max("value") FROM "{P.name}" WHERE {PATIENT} AND "foot" = \'{foot}\' '
        'AND $timeFilter GROUP BY time($__interval), "sensor" fill(none)'
    )
    return (
        panel(
            timeseries.Panel,
            f"{foot.capitalize()} foot",
            grid(column, 0, 8, 9),
            InfluxQL(P.bucket, query, alias="$tag_sensor"),
        )
        .min(0)
        .max(1023)
        .legend(legend())
    )


def anomaly_annotation() -> db.AnnotationQuery:
    query = f'SELECT "start" AS "anomaly run" FROM ({run_starts()}) WHERE "start" = 1'
    return (
        db.AnnotationQuery()
        .name("Anomaly runs")
        .datasource(datasource(A.bucket))
        .enable(True)
        .icon_color("red")
        .target(InfluxQL(A.bucket, query, ref_id="Anomalies", result_format="table"))
    )


def anomalies_table() -> table.Panel:
    query = (
        'SELECT count("value") AS "flagged readings", max("value") AS "max value" '
        f'FROM "{A.name}" WHERE {PATIENT} AND $timeFilter '
        'GROUP BY time(1m), "sensor" fill(none)'
    )
    return panel(
        table.Panel,
        "Anomalies per minute and sensor",
        grid(0, 9, 12, 8),
        InfluxQL(A.bucket, query, result_format="table"),
    )


def anomalies_today() -> stat.Panel:
    query = f'SELECT sum("start") AS "runs" FROM ({run_starts()})'
    # The anomalies bucket holds flagged readings only: no row there means no anomaly.
    return (
        count_stat("Anomaly runs today", grid(12, 9, 4, 8), InfluxQL(A.bucket, query))
        .no_value("0")
        .time_from("now/d")
    )


def per_minute_history() -> timeseries.Panel:
    query = (
        f'SELECT mean("value_mean") FROM "{PRESSURE_1M.name}" WHERE {PATIENT} AND $timeFilter '
        'GROUP BY time($__interval), "sensor" fill(none)'
    )
    return series(
        "Per-minute mean, last 7 days (kept 90 days)",
        grid(16, 9, 8, 8),
        InfluxQL(PRESSURE_1M_BUCKET, query, alias="$tag_sensor"),
        interval="1m",
    ).time_from("7d")


def build() -> db.Dashboard:
    dash = (
        dashboard(UID_PRESSURE, "Foot pressure, live", "5s", "now-5m", ["pressure"])
        .with_variable(tag_variable("patient", "Patient", P.bucket, P.name, "patient_id"))
        .annotation(anomaly_annotation())
    )
    for index, sensor in enumerate(SENSORS):
        dash = dash.with_panel(sensor_stat(index, sensor))
    return (
        dash.with_panel(foot_series(8, "left"))
        .with_panel(foot_series(16, "right"))
        .with_panel(anomalies_table())
        .with_panel(anomalies_today())
        .with_panel(per_minute_history())
    )
