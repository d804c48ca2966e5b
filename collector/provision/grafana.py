"""Grafana provisioning, generated: datasource, dashboards, alert rules, contact point, policy.

Dashboards are built with grafana-foundation-sdk (pinned; it has no InfluxDB query builder, so
``FluxQuery`` below is the small dataquery class it needs). Alerting is written in Grafana's
file-provisioning shape directly: the SDK's alert builders emit the HTTP API's shape. Every
bucket, measurement, tag and field comes from ``collector.contract``.

Grafana expands ``$VAR``, ``${VAR}`` and ``$__file{...}`` in every string of provisioning YAML
files, except rule queries and annotations; labels that mean ``$labels`` are written ``$$``.
Dashboard JSON is not expanded (``${system}`` there is a dashboard variable).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import geomap, heatmap, stat, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import geomap as geomap_model

from collector.contract import (
    ANOMALY,
    EVENTS,
    FEED,
    PRESSURE,
    PRESSURE_1M,
    SENSORS,
    SPOOL,
    STATION_FLOW,
    STATION_STATUS,
    STATION_STATUS_1H,
    WRITES,
)
from collector.settings import GrafanaSettings

DATASOURCE_UID = "livestack-influxdb"
DATASOURCE = cm.DataSourceRef(type_val="influxdb", uid=DATASOURCE_UID)
FOLDER = "Livestack"
DASHBOARDS_PATH = "/etc/grafana/provisioning/dashboards/livestack"

UID_BIKES = "livestack-bikes-live"
UID_HISTORY = "livestack-station-history"
UID_PRESSURE = "livestack-pressure-live"
UID_HEALTH = "livestack-collector-health"
UID_FLOWS = "livestack-trip-flows"

S, P, A = STATION_STATUS, PRESSURE, ANOMALY


# ------------------------------------------------------------------------------ Flux queries


class FluxQuery(cogvariants.Dataquery):
    """The InfluxDB datasource's query model in Flux mode: the Flux text is under ``query``."""

    def __init__(self, ref_id: str, query: str) -> None:
        self.ref_id = ref_id
        self.query = query

    def to_json(self) -> dict[str, object]:
        return {"datasource": DATASOURCE.to_json(), "query": self.query, "refId": self.ref_id}


class Flux(cogbuilder.Builder[FluxQuery]):
    def __init__(self, query: str, ref_id: str = "A") -> None:
        self._query = FluxQuery(ref_id, query.strip() + "\n")

    def build(self) -> FluxQuery:
        return self._query


def _from(
    measurement: Any, *filters: str, start: str = "v.timeRangeStart", stop: str = "v.timeRangeStop"
) -> str:
    lines = [
        f'from(bucket: "{measurement.bucket}")',
        f"  |> range(start: {start}, stop: {stop})",
        f'  |> filter(fn: (r) => r._measurement == "{measurement.name}")',
    ]
    lines += [f"  |> filter(fn: (r) => {f})" for f in filters]
    return "\n".join(lines)


def _fields(*names: str) -> str:
    return " or ".join(f'r._field == "{name}"' for name in names)


SYSTEM = 'r.system == "${system}"'
PATIENT = 'r.patient_id == "${patient}"'

# The latest point of every station of the chosen system, one row per station.
LATEST_STATIONS = "\n".join(
    [
        _from(S, SYSTEM, start="-1h", stop="now()"),
        "  |> last()",
        '  |> pivot(rowKey: ["station_id"], columnKey: ["_field"], valueColumn: "_value")',
        "  |> group()",
    ]
)


# -------------------------------------------------------------------------------- builders


def _grid(x: int, y: int, w: int, h: int) -> dm.GridPos:
    return dm.GridPos(h=h, w=w, x=x, y=y)


def _thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


# red = no bike, orange = 1-3, green = more than 3: what riders expect.
AVAILABILITY = _thresholds((None, "red"), (1, "orange"), (4, "green"))
PRESSURE_SCALE = _thresholds(
    (None, "blue"), (200, "green"), (500, "yellow"), (800, "orange"), (1000, "red")
)


def _panel(kind: Any, title: str, query: str, grid: dm.GridPos) -> Any:
    """A panel of ``kind`` (timeseries.Panel, table.Panel, ...) with one Flux query."""
    return kind().title(title).datasource(DATASOURCE).with_target(Flux(query)).grid_pos(grid)


def _stat(
    title: str,
    query: str,
    grid: dm.GridPos,
    *,
    unit: str = "none",
    thresholds: db.ThresholdsConfig | None = None,
) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .with_target(Flux(query))
        .grid_pos(grid)
        .unit(unit)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(cm.BigValueGraphMode.NONE)
    )
    if thresholds is not None:
        panel = panel.thresholds(thresholds).color_mode(cm.BigValueColorMode.BACKGROUND)
    return panel


def _dashboard(uid: str, title: str, refresh: str, time_from: str, tags: list[str]) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .tags(["livestack", *tags])
        .refresh(refresh)
        .time(time_from, "now")
        .timezone("browser")
        .readonly()
    )


def _query_variable(name: str, label: str, query: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(dm.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
    )


def _tag_values(measurement: Any, tag: str, *filters: str) -> str:
    predicate = " and ".join([f'r._measurement == "{measurement.name}"', *filters])
    return (
        'import "influxdata/influxdb/schema"\n'
        f'schema.tagValues(bucket: "{measurement.bucket}", tag: "{tag}", '
        f"predicate: (r) => {predicate}, start: -7d)"
    )


# ---------------------------------------------------------------------------- dashboards


def bikes_dashboard() -> db.Dashboard:
    map_query = "\n".join(
        [
            _from(S, SYSTEM, start="-1h", stop="now()"),
            "  |> last()",
            '  |> pivot(rowKey: ["station_id"], columnKey: ["_field"], valueColumn: "_value")',
            "  |> map(fn: (r) => ({r with",
            '      colour: if "${colour_by}" == "docks_available"',
            "          then r.docks_available else r.bikes_available,",
            "      report_age_s: int(v: now()) / 1000000000 - r.last_reported}))",
            '  |> keep(columns: ["station_id", "name", "lat", "lon", "colour", "bikes_available", '
            '"ebikes_available", "docks_available", "report_age_s"])',
            "  |> group()",
        ]
    )
    markers = (
        cb.MapLayerOptions()
        .type("markers")
        .name("Stations")
        .location(
            cb.FrameGeometrySource()
            .mode(cm.FrameGeometrySourceMode.COORDS)
            .latitude("lat")
            .longitude("lon")
        )
        .config(
            {
                "showLegend": True,
                "style": {
                    "color": {"field": "colour", "fixed": "dark-green"},
                    "opacity": 0.85,
                    "size": {"fixed": 7},
                    "symbol": {"fixed": "img/icons/marker/circle.svg", "mode": "fixed"},
                },
            }
        )
        .tooltip(True)
    )
    station_link = db.DashboardLink("Station history").url(
        f"/d/{UID_HISTORY}?var-system=${{system}}&var-station=${{__data.fields.station_id}}"
    )
    geomap_panel = (
        geomap.Panel()
        .title("Stations now: ${system}")
        .description("Colour: red none, orange 1-3, green more than 3 (bikes, or free docks).")
        .datasource(DATASOURCE)
        .with_target(Flux(map_query))
        .grid_pos(_grid(0, 4, 16, 18))
        .thresholds(AVAILABILITY)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .view(geomap.MapViewConfig().id("fit").zoom(12))
        .basemap(cb.MapLayerOptions().type("osm-standard").name("Basemap"))
        .layers([markers])
        .tooltip(geomap.TooltipOptions().mode(geomap_model.TooltipMode.DETAILS))
        .data_links([station_link])
        .override_by_name("report_age_s", [dm.DynamicConfigValue(id_val="unit", value="s")])
    )

    def count_stations(condition: str) -> str:
        return "\n".join(
            [
                LATEST_STATIONS,
                f"  |> filter(fn: (r) => {condition})",
                '  |> count(column: "station_id")',
            ]
        )

    availability = "\n".join(
        [
            _from(S, SYSTEM, f'r._field == "{"bikes_available"}"'),
            "  |> aggregateWindow(every: v.windowPeriod, fn: last, createEmpty: false)",
            '  |> group(columns: ["_time"])',
            "  |> sum()",
            "  |> group()",
            '  |> rename(columns: {_value: "bikes available"})',
        ]
    )
    empty_full = "\n".join(
        [
            LATEST_STATIONS,
            "  |> filter(fn: (r) => r.bikes_available == 0 or r.docks_available == 0)",
            "  |> map(fn: (r) => ({station: r.name, station_id: r.station_id,",
            '      state: if r.bikes_available == 0 then "empty" else "full",',
            "      bikes: r.bikes_available, docks: r.docks_available}))",
            '  |> sort(columns: ["state", "station"])',
        ]
    )
    return (
        _dashboard(UID_BIKES, "Bike stations, live", "30s", "now-6h", ["bikes"])
        .with_variable(_query_variable("system", "System", _tag_values(S, "system")))
        .with_variable(
            db.CustomVariable("colour_by")
            .label("Colour by")
            .values("Bikes : bikes_available, Free docks : docks_available")
        )
        .with_panel(
            _stat(
                "Bikes available",
                "\n".join([LATEST_STATIONS, '  |> sum(column: "bikes_available")']),
                _grid(0, 0, 6, 4),
            )
        )
        .with_panel(
            _stat("Empty stations", count_stations("r.bikes_available == 0"), _grid(6, 0, 6, 4))
        )
        .with_panel(
            _stat("Full stations", count_stations("r.docks_available == 0"), _grid(12, 0, 6, 4))
        )
        .with_panel(
            _stat(
                "Stations not reporting (30 min)",
                count_stations("int(v: now()) / 1000000000 - r.last_reported > 1800"),
                _grid(18, 0, 6, 4),
            )
        )
        .with_panel(geomap_panel)
        .with_panel(_panel(table.Panel, "Empty and full stations", empty_full, _grid(16, 4, 8, 18)))
        .with_panel(
            _panel(
                timeseries.Panel, "Bikes available in ${system}", availability, _grid(0, 22, 24, 8)
            )
        )
    )


def history_dashboard() -> db.Dashboard:
    station = 'r.station_id == "${station}"'
    raw = "\n".join(
        [
            _from(
                S,
                SYSTEM,
                station,
                _fields("bikes_available", "ebikes_available", "docks_available"),
            ),
            "  |> aggregateWindow(every: v.windowPeriod, fn: last, createEmpty: false)",
        ]
    )
    hourly = "\n".join(
        [
            _from(
                STATION_STATUS_1H,
                SYSTEM,
                station,
                _fields("bikes_available_mean", "bikes_available_min", "bikes_available_max"),
            ),
        ]
    )
    hour_of_week = "\n".join(
        [
            'import "date"',
            "",
            'days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]',
            "",
            _from(
                STATION_STATUS_1H,
                SYSTEM,
                station,
                'r._field == "bikes_available_mean"',
                start="-28d",
                stop="now()",
            ),
            # Each hour of the week becomes one cell: x = hour of day, y = weekday.
            "  |> map(fn: (r) => ({_time: time(v: date.hour(t: r._time) * 3600000000000), "
            "weekday: days[date.weekDay(t: r._time)], _value: r._value}))",
            '  |> group(columns: ["weekday", "_time"])',
            "  |> mean()",
            "  |> group()",
            '  |> pivot(rowKey: ["_time"], columnKey: ["weekday"], valueColumn: "_value")',
            '  |> sort(columns: ["_time"])',
        ]
    )
    return (
        _dashboard(UID_HISTORY, "Station history", "1m", "now-7d", ["bikes"])
        .with_variable(_query_variable("system", "System", _tag_values(S, "system")))
        .with_variable(
            _query_variable(
                "station", "Station", _tag_values(S, "station_id", 'r.system == "${system}"')
            )
        )
        .with_panel(
            _panel(timeseries.Panel, "Bikes, e-bikes and free docks (raw)", raw, _grid(0, 0, 24, 9))
        )
        .with_panel(
            _panel(
                timeseries.Panel, "Hourly mean, min, max (kept 2 years)", hourly, _grid(0, 9, 24, 9)
            )
        )
        .with_panel(
            _panel(
                heatmap.Panel,
                "Mean bikes by hour of the week (last 4 weeks)",
                hour_of_week,
                _grid(0, 18, 24, 9),
            ).calculate(False)
        )
    )


FOOT_LABELS = {"0": "front", "1": "middle", "2": "heel"}


def pressure_dashboard() -> db.Dashboard:
    dash = (
        _dashboard(UID_PRESSURE, "Foot pressure, live", "5s", "now-5m", ["pressure"])
        .with_variable(_query_variable("patient", "Patient", _tag_values(P, "patient_id")))
        .annotation(
            db.AnnotationQuery()
            .name("Anomalies")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("red")
            .target(
                Flux(
                    "\n".join(
                        [
                            _from(A, PATIENT, 'r._field == "value"'),
                            "  |> map(fn: (r) => ({_time: r._time, sensor: r.sensor,",
                            '      text: "anomaly " + r.sensor + " = " + string(v: r._value)}))',
                            "  |> group()",
                        ]
                    ),
                    ref_id="Anomalies",
                )
            )
        )
    )
    # Two feet, front at the top, heel at the bottom: one coloured value per sensor.
    for index, sensor in enumerate(SENSORS):
        foot = "Left" if sensor.startswith("L") else "Right"
        part = FOOT_LABELS[sensor[1]]
        query = "\n".join(
            [
                _from(
                    P,
                    PATIENT,
                    f'r.sensor == "{sensor}"',
                    'r._field == "value"',
                    start="-1m",
                    stop="now()",
                ),
                "  |> last()",
            ]
        )
        dash = dash.with_panel(
            _stat(
                f"{foot} {part} ({sensor})",
                query,
                _grid(0 + 4 * (index // 3), 3 * (index % 3), 4, 3),
                thresholds=PRESSURE_SCALE,
            )
        )
    for column, foot in ((8, "left"), (16, "right")):
        query = "\n".join(
            [
                _from(P, PATIENT, f'r.foot == "{foot}"', 'r._field == "value"'),
                '  |> keep(columns: ["_time", "_value", "sensor"])',
            ]
        )
        dash = dash.with_panel(
            _panel(
                timeseries.Panel,
                f"{foot.capitalize()} foot, last 5 minutes",
                query,
                _grid(column, 0, 8, 9),
            )
            .min(0)
            .max(1023)
        )
    anomalies_table = "\n".join(
        [
            _from(A, PATIENT, 'r._field == "value"'),
            "  |> group()",
            '  |> keep(columns: ["_time", "sensor", "_value"])',
            '  |> rename(columns: {_value: "value"})',
            '  |> sort(columns: ["_time"], desc: true)',
        ]
    )
    today = "\n".join(
        [
            'import "date"',
            "",
            _from(
                A,
                PATIENT,
                'r._field == "value"',
                start="date.truncate(t: now(), unit: 1d)",
                stop="now()",
            ),
            "  |> group()",
            "  |> count()",
        ]
    )
    history = "\n".join(
        [
            _from(PRESSURE_1M, PATIENT, 'r._field == "value_mean"', start="-7d", stop="now()"),
            '  |> keep(columns: ["_time", "_value", "sensor"])',
        ]
    )
    return (
        dash.with_panel(_panel(table.Panel, "Anomalies", anomalies_table, _grid(0, 9, 12, 8)))
        .with_panel(_stat("Anomalies today", today, _grid(12, 9, 4, 8)))
        .with_panel(
            _panel(
                timeseries.Panel,
                "Per-minute mean, last 7 days (kept 90 days)",
                history,
                _grid(16, 9, 8, 8),
            )
        )
    )


def health_dashboard() -> db.Dashboard:
    def rate(stage_filter: str, title: str, grid: dm.GridPos) -> timeseries.Panel:
        query = "\n".join(
            [
                _from(EVENTS, stage_filter, 'r._field == "count"'),
                "  |> difference(nonNegative: true)",
                "  |> aggregateWindow(every: v.windowPeriod, fn: sum, createEmpty: false)",
                '  |> keep(columns: ["_time", "_value", "source", "stage", "result"])',
            ]
        )
        return _panel(timeseries.Panel, title, query, grid)

    feed_age = "\n".join(
        [
            _from(FEED, 'r._field == "age_secs"'),
            "  |> aggregateWindow(every: v.windowPeriod, fn: last, createEmpty: false)",
            '  |> keep(columns: ["_time", "_value", "system"])',
        ]
    )
    latency = "\n".join(
        [
            _from(WRITES, _fields("latency_ms_mean", "latency_ms_max")),
            '  |> keep(columns: ["_time", "_value", "_field", "bucket"])',
        ]
    )
    spool = "\n".join(
        [
            _from(SPOOL, _fields("lines", "oldest_age_secs", "dropped_lines")),
            "  |> aggregateWindow(every: v.windowPeriod, fn: last, createEmpty: false)",
            '  |> keep(columns: ["_time", "_value", "_field"])',
        ]
    )
    return (
        _dashboard(UID_HEALTH, "Collector health", "30s", "now-3h", ["collector"])
        .with_panel(
            rate(
                'r.result == "ok" and (r.stage == "fetch" or r.stage == "parse")',
                "Successful polls",
                _grid(0, 0, 12, 8),
            )
        )
        .with_panel(
            rate(
                'r.result != "ok" and r.stage != "quality" and r.stage != "schedule"'
                ' and r.stage != "anomaly"',
                "Errors by source, stage and kind",
                _grid(12, 0, 12, 8),
            )
        )
        .with_panel(
            rate('r.stage == "write" and r.result == "ok"', "Points written", _grid(0, 8, 12, 8))
        )
        .with_panel(rate('r.stage == "quality"', "Data-quality faults", _grid(12, 8, 12, 8)))
        .with_panel(
            _panel(timeseries.Panel, "Write latency", latency, _grid(0, 16, 12, 8)).unit("ms")
        )
        .with_panel(
            _panel(timeseries.Panel, "Feed age per system", feed_age, _grid(12, 16, 12, 8))
            .unit("s")
            .thresholds(_thresholds((None, "green"), (300, "red")))
        )
        .with_panel(
            _panel(
                timeseries.Panel,
                "Spool: lines waiting, oldest age (s), dropped",
                spool,
                _grid(0, 24, 24, 8),
            )
        )
    )


def flows_dashboard() -> db.Dashboard:
    over_time = "\n".join(
        [
            _from(STATION_FLOW, SYSTEM, _fields("undocks", "docks")),
            '  |> group(columns: ["_field"])',
            "  |> aggregateWindow(every: v.windowPeriod, fn: sum, createEmpty: false)",
        ]
    )
    busiest = "\n".join(
        [
            _from(STATION_FLOW, SYSTEM, _fields("undocks", "docks")),
            '  |> group(columns: ["station_id", "_field"])',
            "  |> sum()",
            '  |> pivot(rowKey: ["station_id"], columnKey: ["_field"], valueColumn: "_value")',
            "  |> group()",
            "  |> map(fn: (r) => ({station_id: r.station_id, undocks: r.undocks, docks: r.docks,",
            "      trips: r.undocks + r.docks}))",
            '  |> sort(columns: ["trips"], desc: true)',
            "  |> limit(n: 15)",
        ]
    )
    net = "\n".join(
        [
            _from(STATION_FLOW, SYSTEM, 'r.station_id == "${station}"', 'r._field == "net"'),
            "  |> aggregateWindow(every: v.windowPeriod, fn: sum, createEmpty: false)",
        ]
    )
    return (
        _dashboard(UID_FLOWS, "Trip flows", "30s", "now-7d", ["bikes", "trips"])
        .with_variable(_query_variable("system", "System", _tag_values(STATION_FLOW, "system")))
        .with_variable(
            _query_variable(
                "station",
                "Station",
                _tag_values(STATION_FLOW, "station_id", 'r.system == "${system}"'),
            )
        )
        .with_panel(
            _panel(
                timeseries.Panel,
                "Bikes taken (undocks) and returned (docks), all stations",
                over_time,
                _grid(0, 0, 24, 9),
            )
        )
        .with_panel(_panel(table.Panel, "Busiest stations", busiest, _grid(0, 9, 10, 12)))
        .with_panel(
            _panel(
                timeseries.Panel,
                "Net flow at ${station} (docks - undocks)",
                net,
                _grid(10, 9, 14, 12),
            )
        )
    )


DASHBOARDS = {
    "bikes-live.json": bikes_dashboard,
    "station-history.json": history_dashboard,
    "pressure-live.json": pressure_dashboard,
    "collector-health.json": health_dashboard,
    "trip-flows.json": flows_dashboard,
}


# ------------------------------------------------------------------------------ alerting


@dataclass(frozen=True)
class Rule:
    uid: str
    title: str
    query: str
    reducer: str
    threshold: tuple[str, float]  # ("gt" | "lt", value)
    for_: str
    no_data: str
    summary: str
    labels: dict[str, str]


def _rule(rule: Rule) -> dict[str, Any]:
    evaluator, value = rule.threshold
    return {
        "uid": rule.uid,
        "title": rule.title,
        "condition": "C",
        "data": [
            {
                "refId": "A",
                "relativeTimeRange": {"from": 3600, "to": 0},
                "datasourceUid": DATASOURCE_UID,
                "model": {
                    "refId": "A",
                    "query": rule.query,
                    "intervalMs": 60000,
                    "maxDataPoints": 43200,
                },
            },
            {
                "refId": "B",
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "B",
                    "type": "reduce",
                    "expression": "A",
                    "reducer": rule.reducer,
                    "settings": {"mode": "dropNN"},
                },
            },
            {
                "refId": "C",
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "C",
                    "type": "threshold",
                    "expression": "B",
                    "conditions": [{"evaluator": {"type": evaluator, "params": [value]}}],
                },
            },
        ],
        "noDataState": rule.no_data,
        "execErrState": "Error",
        "for": rule.for_,
        "labels": rule.labels,
        "annotations": {"summary": rule.summary},
    }


def alert_rules(settings: GrafanaSettings) -> list[Rule]:
    share = settings.empty_station_share
    return [
        Rule(
            uid="livestack-pressure-anomaly",
            title="Pressure anomaly",
            query="\n".join(
                [
                    _from(A, 'r._field == "value"', start="-1m", stop="now()"),
                    '  |> group(columns: ["patient_id", "sensor"])',
                    "  |> last()",
                ]
            ),
            reducer="last",
            threshold=("gt", -1),
            for_="0s",
            no_data="OK",
            summary="Patient {{ $labels.patient_id }}: anomaly on sensor {{ $labels.sensor }}, "
            "value {{ $values.B }}",
            labels={"severity": "critical", "team": "clinic"},
        ),
        Rule(
            uid="livestack-feed-stale",
            title="Bike feed stale",
            query="\n".join(
                [
                    _from(S, 'r._field == "bikes_available"', start="-6h", stop="now()"),
                    '  |> group(columns: ["system"])',
                    "  |> last()",
                    "  |> map(fn: (r) => ({system: r.system, _time: r._time, "
                    "_value: float(v: int(v: now()) - int(v: r._time)) / 1000000000.0}))",
                ]
            ),
            reducer="last",
            threshold=("gt", settings.feed_stale_secs),
            for_="0s",
            no_data="Alerting",
            summary="System {{ $labels.system }}: newest data is "
            "{{ humanizeDuration $values.B.Value }} old",
            labels={"severity": "warning", "team": "mobility"},
        ),
        Rule(
            uid="livestack-empty-stations",
            title="Many empty stations",
            query="\n".join(
                [
                    _from(S, 'r._field == "bikes_available"', start="-1h", stop="now()"),
                    "  |> last()",
                    '  |> group(columns: ["system"])',
                    "  |> map(fn: (r) => ({system: r.system,",
                    "      empty: if r._value == 0 then 1.0 else 0.0}))",
                    '  |> mean(column: "empty")',
                    '  |> rename(columns: {empty: "_value"})',
                ]
            ),
            reducer="last",
            threshold=("gt", share),
            for_=f"{settings.empty_station_for_mins}m",
            no_data="OK",
            summary="System {{ $labels.system }}: "
            "{{ humanizePercentage $values.B.Value }} of stations empty",
            labels={"severity": "warning", "team": "mobility"},
        ),
        Rule(
            uid="livestack-collector-silent",
            title="Collector silent",
            query="\n".join(
                [
                    _from(
                        EVENTS,
                        'r._field == "count"',
                        start=f"-{settings.collector_silent_secs}s",
                        stop="now()",
                    ),
                    "  |> group()",
                    "  |> count()",
                    "  |> map(fn: (r) => ({_time: now(), _value: float(v: r._value)}))",
                ]
            ),
            reducer="last",
            threshold=("lt", 1),
            for_="0s",
            no_data="Alerting",
            summary="No metrics from the collector for {{ $labels.silent_for }}",
            labels={
                "severity": "critical",
                "team": "ops",
                "silent_for": f"{settings.collector_silent_secs}s",
            },
        ),
    ]


def alerting_files(settings: GrafanaSettings) -> dict[str, dict[str, Any]]:
    rules = {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": "livestack",
                "folder": FOLDER,
                "interval": "1m",
                "rules": [_rule(rule) for rule in alert_rules(settings)],
            }
        ],
    }
    contact_points = {
        "apiVersion": 1,
        "contactPoints": [
            {
                "orgId": 1,
                "name": "livestack-webhook",
                "receivers": [
                    {
                        "uid": "livestack-webhook",
                        "type": "webhook",
                        # Expanded by Grafana from its environment at start-up.
                        "settings": {"url": f"${settings.webhook_url_env}", "httpMethod": "POST"},
                        "disableResolveMessage": False,
                    }
                ],
            }
        ],
    }
    policies = {
        "apiVersion": 1,
        "policies": [
            {
                "orgId": 1,
                "receiver": "livestack-webhook",
                "group_by": ["alertname", "patient_id", "system"],
                "group_wait": "30s",
                "group_interval": "5m",
                "repeat_interval": "4h",
            }
        ],
    }
    return {"rules.yaml": rules, "contact-points.yaml": contact_points, "policies.yaml": policies}


# ------------------------------------------------------------------------------ the tree


def datasource_file(settings: GrafanaSettings) -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "InfluxDB",
                "uid": DATASOURCE_UID,
                "type": "influxdb",
                "access": "proxy",
                "url": f"${settings.influxdb_url_env}",
                "isDefault": True,
                "editable": False,
                "jsonData": {
                    "version": "Flux",
                    "organization": settings.org,
                    "defaultBucket": S.bucket,
                    "httpMode": "POST",
                },
                # The read-only token that `collector setup` wrote; never in this file.
                "secureJsonData": {"token": f"$__file{{{settings.reader_token_file}}}"},
            }
        ],
    }


def provider_file() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "livestack",
                "type": "file",
                "folder": FOLDER,
                "folderUid": "livestack",
                "allowUiUpdates": False,
                "disableDeletion": True,
                "options": {"path": DASHBOARDS_PATH, "foldersFromFilesStructure": False},
            }
        ],
    }


HEADER = "# Generated by `collector dashboards`: edit collector/provision/grafana.py instead.\n"


def _yaml(doc: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)


def render(settings: GrafanaSettings) -> dict[str, str]:
    """Relative path -> file content, for the whole provisioning tree."""
    files = {
        "datasources/influxdb.yaml": _yaml(datasource_file(settings)),
        "dashboards/livestack.yaml": _yaml(provider_file()),
    }
    for name, build in DASHBOARDS.items():
        model = build().build()
        files[f"dashboards/livestack/{name}"] = (
            json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        )
    for name, doc in alerting_files(settings).items():
        files[f"alerting/{name}"] = _yaml(doc)
    return files


def write(out: Path, settings: GrafanaSettings) -> list[Path]:
    """Write the tree under ``out``; files of ours that the generator no longer makes go."""
    files = render(settings)
    written = []
    for relative, content in files.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != content:
            path.write_text(content)
        written.append(path)
    for stale in (out / "dashboards" / "livestack").glob("*.json"):
        if stale.relative_to(out).as_posix() not in files:
            stale.unlink()
    return written


def differences(out: Path, settings: GrafanaSettings) -> list[str]:
    """Files under ``out`` that differ from what the generator makes."""
    return [
        relative
        for relative, content in render(settings).items()
        if not (out / relative).is_file() or (out / relative).read_text() != content
    ]
