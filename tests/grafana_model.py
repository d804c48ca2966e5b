"""A small model of what Grafana 12 does with our InfluxQL queries, written from its source:

- Macros: ``pkg/tsdb/influxdb/models/query.go`` ``(*Query).Build``: ``$timeFilter`` ->
  ``time >= {from}ms and time <= {to}ms`` (``renderTimeFilter``), ``$interval`` and
  ``$__interval`` -> ``gtime.FormatInterval(query.Interval)``, ``$__interval_ms``.
- Template variables (frontend ``public/app/plugins/datasource/influxdb/datasource.ts``
  ``interpolateQueryExpr``, behaviour pinned by its ``datasource.test.ts`` "interpolateQueryExpr"
  cases): a single value is inserted as it is, regex-escaped only inside ``/.../``; several
  values are always escaped and joined as ``(a|b)``; ``${__to:date:seconds}`` is the range's
  end in epoch seconds.
- Frames: ``pkg/tsdb/influxdb/influxql/buffered/response_parser.go``:
  ``transformRowsForTimeSeries`` makes one frame per series and value column (``Time`` plus
  ``Value`` labelled with the series' tags); ``transformRowsForTable`` one frame for all
  series (``Time``, one string field per tag, then the value columns).
- Frame kind: grafana-plugin-sdk-go ``data/frame.go`` ``(*Frame).TimeSeriesSchema``: no time
  field -> not a time series; a string field -> long; otherwise wide.
- Alert evaluation: ``pkg/expr/converter.go`` ``convertDataFramesToResults``: no frames ->
  NoData; wide frames -> one series per numeric field with its labels; a long frame -> error
  "input data must be a wide series but got type long". ``pkg/expr/nodes.go`` /
  ``mathexp/reduce.go``: reduce each series to a number (``dropNN`` drops null/NaN);
  ``threshold`` makes 1 or 0.
- States: ``pkg/services/ngalert/state/manager.go`` / ``state.go``: an instance per label
  set; Pending until ``for`` has passed, then Alerting; back to Normal (resolved) when the
  condition is 0; an instance missing from two consecutive evaluations is stale and resolved
  ("MissingSeries"); no data at all follows ``noDataState`` (OK -> Normal, Alerting,
  KeepLast keeps each instance's state).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import requests

# grafana-plugin-sdk-go backend/gtime FormatInterval: the largest whole unit.
_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))
# grafana-data rangeutil.ts roundInterval: the interval rounded to a "nice" value.
_NICE_MS = (
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (350, 200),
    (750, 500),
    (1500, 1000),
    (3500, 2000),
    (7500, 5000),
    (12500, 10000),
    (17500, 15000),
    (25000, 20000),
    (45000, 30000),
    (90000, 60000),
    (210000, 120000),
    (450000, 300000),
    (750000, 600000),
    (1050000, 900000),
    (1500000, 1200000),
    (2700000, 1800000),
    (5400000, 3600000),
    (9000000, 7200000),
    (16200000, 10800000),
    (32400000, 21600000),
    (86400000, 43200000),
    (604800000, 86400000),
    (1814400000, 604800000),
    (3628800000, 2592000000),
)


def format_interval(ms: int) -> str:
    for unit, size in _UNITS:
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def parse_duration_ms(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text).groups()  # type: ignore[union-attr]  # every interval the dashboards use matches
    return int(number) * dict(_UNITS)[unit]


def interval_ms(range_ms: int, max_data_points: int, min_interval: str | None) -> int:
    """rangeutil.calculateInterval: range / max data points, rounded, not below the
    panel's min interval."""
    raw = range_ms / max_data_points
    nice = next((value for limit, value in _NICE_MS if raw < limit), 31_536_000_000)
    floor = parse_duration_ms(min_interval) if min_interval else 1
    return max(nice, floor)


def escape_regex(value: str) -> str:
    # datasource.ts escapes /[\\^$*+?.()|[\]{}\/]/ with a backslash.
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\1", value)


@dataclass(frozen=True)
class Context:
    from_ms: int
    to_ms: int
    variables: dict[str, str | list[str]] = field(default_factory=dict)
    max_data_points: int = 1000  # about the panel's width in pixels
    min_interval: str | None = None

    @property
    def interval(self) -> str:
        ms = interval_ms(self.to_ms - self.from_ms, self.max_data_points, self.min_interval)
        return format_interval(ms)


def interpolate(query: str, ctx: Context) -> str:
    query = query.replace("${__to:date:seconds}", str(ctx.to_ms // 1000))
    # Longest names first: $lat0 must not be taken for $lat followed by "0".
    for name, value in sorted(ctx.variables.items(), key=lambda item: -len(item[0])):
        if isinstance(value, list) and len(value) > 1:
            text = "(" + "|".join(escape_regex(v) for v in value) + ")"
            in_regex = text
        else:
            text = value[0] if isinstance(value, list) else value
            in_regex = escape_regex(text)
        for form in (f"${{{name}}}", f"${name}"):
            query = query.replace(f"/^{form}$/", f"/^{in_regex}$/").replace(form, text)
    query = query.replace("$timeFilter", f"time >= {ctx.from_ms}ms and time <= {ctx.to_ms}ms")
    query = query.replace("$interval", ctx.interval).replace("$__interval", ctx.interval)
    assert "$" not in query.replace("$/", ""), f"macro left in: {query}"
    return query


def execute(url: str, db: str, query: str) -> dict[str, Any]:
    """What the datasource sends: POST /query with db and epoch=ms; the first result."""
    resp = requests.post(f"{url}/query", data={"q": query, "db": db, "epoch": "ms"}, timeout=30)
    body = resp.json()
    assert resp.status_code == 200 and "error" not in body, (query, body)
    result = body["results"][0]
    assert "error" not in result, (query, result["error"])
    return result


@dataclass
class Frame:
    name: str
    fields: dict[str, list[Any]]  # "Time" first when there is one
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """Frame.TimeSeriesSchema: "not", "long" or "wide"."""
        if "Time" not in self.fields:
            return "not"
        values = [v for name, col in self.fields.items() if name != "Time" for v in col]
        if any(isinstance(v, str) for v in values):
            return "long"
        return "wide"


def frames(result: dict[str, Any], result_format: str, query: str = "") -> list[Frame]:
    """``query``: the raw query, which newFrameWithoutTimeField reads to pick the column."""
    series = result.get("series", [])
    if not series:
        return []
    if result_format == "table":
        columns = series[0]["columns"]
        out: dict[str, list[Any]] = {}
        if columns[0] == "time":
            out["Time"] = [v[0] for s in series for v in s["values"]]
        for tag in series[0].get("tags") or {}:
            out[tag] = [s["tags"][tag] for s in series for _ in s["values"]]
        for index, column in enumerate(columns[1:] if columns[0] == "time" else columns):
            at = index + 1 if columns[0] == "time" else index
            out[column] = [v[at] for s in series for v in s["values"]]
        return [Frame(series[0]["name"], out)]
    made = []
    for s in series:
        if "time" not in s["columns"]:
            column = 1 if "show tag values" in query.lower() else 0  # (key, value) rows
            made.append(Frame(s["name"], {"Value": [v[column] for v in s["values"]]}))
            continue
        for index, column in enumerate(s["columns"]):
            if column == "time":
                continue
            made.append(
                Frame(
                    f"{s['name']}.{column}",
                    {"Time": [v[0] for v in s["values"]], "Value": [v[index] for v in s["values"]]},
                    dict(s.get("tags") or {}),
                )
            )
    return made


class LongFrameError(Exception):
    pass


NO_DATA = "NoData"


def alert_series(found: list[Frame]) -> dict[tuple[tuple[str, str], ...], list[float | None]] | str:
    """converter.go: label set -> values, NO_DATA, or LongFrameError."""
    if not found:
        return NO_DATA
    series: dict[tuple[tuple[str, str], ...], list[float | None]] = {}
    for frame in found:
        if frame.kind == "long":
            raise LongFrameError("input data must be a wide series but got type long")
        if frame.kind == "not":
            raise LongFrameError("not a time series")
        series[tuple(sorted(frame.labels.items()))] = frame.fields["Value"]
    return series


def reduce(values: list[float | None], reducer: str) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]  # mode dropNN
    if not kept:
        return None
    match reducer:
        case "last":
            return kept[-1]
        case "min":
            return min(kept)
        case "max":
            return max(kept)
        case "sum":
            return sum(kept)
        case "mean":
            return sum(kept) / len(kept)
    raise ValueError(reducer)


def threshold(value: float | None, evaluator: str, limit: float) -> bool:
    if value is None:
        return False
    return value > limit if evaluator == "gt" else value < limit


@dataclass
class Instance:
    state: str = "Normal"  # Normal, Pending, Alerting
    since_ms: int = 0
    missing: int = 0
    resolved: bool = False


class RuleModel:
    """A provisioned rule (its YAML dict) evaluated against a real server at pinned times."""

    def __init__(self, rule: dict[str, Any], url: str, db: str) -> None:
        self.rule = rule
        self.url = url
        self.db = db
        query, reduce_node, threshold_node = (d for d in rule["data"])
        self.query = query["model"]["query"]
        self.range_ms = query["relativeTimeRange"]["from"] * 1000
        assert query["model"]["resultFormat"] == "time_series"
        self.reducer = reduce_node["model"]["reducer"]
        condition = threshold_node["model"]["conditions"][0]["evaluator"]
        self.evaluator, self.limit = condition["type"], condition["params"][0]
        self.for_ms = parse_duration_ms(rule["for"]) if rule["for"] != "0s" else 0
        self.instances: dict[tuple[tuple[str, str], ...], Instance] = {}
        self.no_data = False

    def evaluate(self, at_ms: int) -> dict[tuple[tuple[str, str], ...], str]:
        ctx = Context(at_ms - self.range_ms, at_ms)
        result = execute(self.url, self.db, interpolate(self.query, ctx))
        series = alert_series(frames(result, "time_series"))
        self.no_data = series == NO_DATA
        if series == NO_DATA:
            mode = self.rule["noDataState"]
            if mode == "KeepLast":
                return self.states()
            firing = mode == "Alerting"
            series = {(("alertname", self.rule["title"]),): [1.0 if firing else 0.0]}
            conditions = {key: firing for key in series}
        else:
            assert isinstance(series, dict)
            conditions = {
                key: threshold(reduce(values, self.reducer), self.evaluator, self.limit)
                for key, values in series.items()
            }
        for key, instance in self.instances.items():
            if key not in conditions:
                instance.missing += 1
                if instance.missing >= 2:  # stale: resolved as MissingSeries
                    instance.state, instance.resolved = "Normal", True
        for key, firing in conditions.items():
            instance = self.instances.setdefault(key, Instance())
            instance.missing = 0
            if not firing:
                instance.resolved = instance.state == "Alerting"
                instance.state = "Normal"
            elif instance.state == "Normal":
                instance.state = "Pending" if self.for_ms else "Alerting"
                instance.since_ms = at_ms
            elif instance.state == "Pending" and at_ms - instance.since_ms >= self.for_ms:
                instance.state = "Alerting"
        return self.states()

    def states(self) -> dict[tuple[tuple[str, str], ...], str]:
        return {key: inst.state for key, inst in self.instances.items()}

    def firing(self) -> set[tuple[tuple[str, str], ...]]:
        return {key for key, state in self.states().items() if state == "Alerting"}
