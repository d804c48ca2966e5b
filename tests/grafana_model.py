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
- Frame kind: grafana-plugin-sdk-go ``data/time_series.go`` ``(*Frame).TimeSeriesSchema``:
  string AND bool fields are factors, every other non-time field a value; no time field or no
  value field -> "not"; factors and values -> "long"; values only -> "wide".
- Alert evaluation: ``pkg/expr/converter.go`` ``(*ResultConverter).Convert``: no frames ->
  NoData; a single "not" frame with exactly one numeric field and otherwise strings -> a
  number set (labels from the string fields, ``isNumberTable`` / ``extractNumberSet``);
  otherwise "not" frames of an InfluxDB datasource are skipped ("Ignoring InfluxDB data frame
  due to missing numeric fields") and NoData if none remains; wide frames -> one series per
  value field with its labels; a long frame -> error "input data must be a wide series but got
  type long". ``pkg/expr/mathexp/reduce.go``: ``Sum`` of no value is 0, ``Last``/``Min``/
  ``Max``/``Avg`` of none nil; mode ``dropNN`` drops null, NaN and +-Inf first; ``threshold``
  makes 1, 0, or nil from nil.
- Results: ``pkg/services/ngalert/eval/eval.go`` ``buildResult``: a nil condition value is a
  NoData result for that instance, 0 Normal, anything else Alerting.
- States: ``pkg/services/ngalert/state/manager.go`` ``setNextStateForRule``: when every result
  is NoData and ``noDataState`` is Alerting, OK or KeepLast, ``setNextStateForAll`` applies
  that NoData result to every existing instance (no new one); only when there is none does
  the NoData result (labels: none but the rule's) make an instance. Otherwise one instance
  per result; ``state.go`` ``resultNoData`` maps a NoData result by ``noDataState`` (Alerting
  -> ``resultAlerting``, OK -> ``resultNormal``, KeepLast -> ``resultKeepLast``: Alerting
  stays, Pending fires once ``for`` has passed, Normal stays). Pending until ``for`` has
  passed, then Alerting; Normal (resolved) when the condition is 0.
  ``processMissingSeriesStates``: an instance absent from two evaluations is stale and
  resolved ("MissingSeries").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import requests

_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))
_YEAR_MS = 365 * 86_400_000
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
    """grafana-plugin-sdk-go ``backend/gtime/gtime.go`` ``FormatInterval``: the count of the
    largest unit the interval reaches, truncated (90 s -> "1m"); 365 days and more in years."""
    for unit, size in (("y", _YEAR_MS), *_UNITS):
        if ms >= size:
            return f"{ms // size}{unit}"
    return "1ms"


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


def write(url: str, db: str, lines: list[str]) -> None:
    """Line protocol (precision s) into ``db``: what the scenarios give the server."""
    requests.post(
        f"{url}/write", params={"db": db, "precision": "s"}, data="\n".join(lines), timeout=5
    ).raise_for_status()


@dataclass
class Frame:
    name: str
    fields: dict[str, list[Any]]  # "Time" first when there is one
    labels: dict[str, str] = field(default_factory=dict)

    def field_type(self, name: str) -> str:
        """ "time", "string", "bool" or "number": what the response parser's field holds."""
        if name == "Time":
            return "time"
        column = self.fields[name]
        # bool before number: Python's bool is an int.
        if any(isinstance(v, str) for v in column):
            return "string"
        if any(isinstance(v, bool) for v in column):
            return "bool"
        return "number"

    @property
    def kind(self) -> str:
        """data/time_series.go TimeSeriesSchema: "not", "long" or "wide". String and bool
        fields are factors (FactorIndices); a value field is any other non-time field."""
        types = [self.field_type(name) for name in self.fields]
        if "time" not in types or not any(t == "number" for t in types):
            return "not"
        if any(t in ("string", "bool") for t in types):
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


Labels = tuple[tuple[str, str], ...]


def _number_set(frame: Frame) -> dict[Labels, list[float | None]] | None:
    """converter.go isNumberTable / extractNumberSet: one numeric field, the rest strings ->
    one number per row, labelled by the string fields; None when the frame is not one."""
    types = {name: frame.field_type(name) for name in frame.fields}
    numeric = [name for name, t in types.items() if t == "number"]
    if len(numeric) != 1 or any(t not in ("number", "string") for t in types.values()):
        return None
    strings = [name for name, t in types.items() if t == "string"]
    return {
        tuple(sorted((name, frame.fields[name][row]) for name in strings)): [value]
        for row, value in enumerate(frame.fields[numeric[0]])
    }


def alert_series(found: list[Frame]) -> dict[Labels, list[float | None]] | str:
    """converter.go (*ResultConverter).Convert for an InfluxDB datasource: label set ->
    values, NO_DATA, or LongFrameError."""
    if not found:
        return NO_DATA
    if len(found) == 1 and found[0].kind == "not":
        numbers = _number_set(found[0])
        if numbers is not None:
            return numbers
    series: dict[Labels, list[float | None]] = {}
    for frame in found:
        if frame.kind == "not":
            continue  # "Ignoring InfluxDB data frame due to missing numeric fields"
        if frame.kind == "long":
            raise LongFrameError("input data must be a wide series but got type long")
        for name in frame.fields:
            if frame.field_type(name) == "number":  # WideToMany: a series per value field
                series[tuple(sorted(frame.labels.items()))] = frame.fields[name]
    return series or NO_DATA


def reduce(values: list[float | None], reducer: str) -> float | None:
    # mode dropNN (mathexp/reduce.go DropNonNumber): null, NaN and +-Inf go first.
    kept = [v for v in values if v is not None and math.isfinite(v)]
    if reducer == "sum":
        return float(sum(kept))  # reduce.go Sum: 0 for no value
    if not kept:
        return None
    match reducer:
        case "last":
            return kept[-1]
        case "min":
            return min(kept)
        case "max":
            return max(kept)
        case "mean":
            return sum(kept) / len(kept)
    raise ValueError(reducer)


def threshold(value: float | None, evaluator: str, limit: float) -> bool | None:
    """1/0 as True/False; nil stays nil (eval.go buildResult then makes it NoData)."""
    if value is None:
        return None
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
        self.instances: dict[Labels, Instance] = {}
        self.stale: dict[Labels, Instance] = {}  # resolved as MissingSeries, then deleted
        self.no_data = False

    def evaluate(self, at_ms: int) -> dict[Labels, str]:
        ctx = Context(at_ms - self.range_ms, at_ms)
        result = execute(self.url, self.db, interpolate(self.query, ctx))
        return self.apply(frames(result, "time_series"), at_ms)

    def apply(self, found: list[Frame], at_ms: int) -> dict[Labels, str]:
        """One evaluation of the query's frames at ``at_ms``."""
        series = alert_series(found)
        # eval.go buildResult: one result per instance, NoData (None) for a nil value.
        outcomes: dict[Labels, bool | None]
        if series == NO_DATA:
            outcomes = {(): None}  # the NoData result carries no label but the rule's
        else:
            assert isinstance(series, dict)
            outcomes = {
                key: threshold(reduce(values, self.reducer), self.evaluator, self.limit)
                for key, values in series.items()
            }
        self.no_data = all(outcome is None for outcome in outcomes.values())
        mode = self.rule["noDataState"]
        if self.no_data and mode in ("Alerting", "OK", "KeepLast") and self.instances:
            # manager.go setNextStateForRule -> setNextStateForAll: the NoData result is
            # applied to every existing instance; none is created, none goes stale.
            for instance in self.instances.values():
                self._transition(instance, None, at_ms)
            return self.states()
        # processMissingSeriesStates: absent from two evaluations -> stale: resolved
        # ("MissingSeries") and deleted from the cache (kept here in ``stale``).
        for key, instance in list(self.instances.items()):
            if key not in outcomes:
                instance.missing += 1
                if instance.missing >= 2:
                    instance.resolved = instance.state == "Alerting"
                    instance.state = "Normal"
                    self.stale[key] = self.instances.pop(key)
        for key, outcome in outcomes.items():
            instance = self.instances.setdefault(key, Instance())
            instance.missing = 0
            self._transition(instance, outcome, at_ms)
        return self.states()

    def _transition(self, instance: Instance, outcome: bool | None, at_ms: int) -> None:
        """state.go: Alerting/Normal results, and a NoData one by ``noDataState``
        (resultNoData): Alerting -> resultAlerting, OK -> resultNormal, KeepLast ->
        resultKeepLast (an Alerting or Pending instance goes on as if firing, Normal stays)."""
        if outcome is None:
            mode = self.rule["noDataState"]
            if mode == "KeepLast":
                outcome = instance.state in ("Pending", "Alerting")
            elif mode in ("Alerting", "OK"):
                outcome = mode == "Alerting"
            else:
                raise NotImplementedError(f"noDataState {mode}: not modelled")
        instance.resolved = False
        if not outcome:
            instance.resolved = instance.state == "Alerting"
            instance.state = "Normal"
        elif instance.state == "Normal":
            instance.state = "Pending" if self.for_ms else "Alerting"
            instance.since_ms = at_ms
        elif instance.state == "Pending" and at_ms - instance.since_ms >= self.for_ms:
            instance.state = "Alerting"

    def states(self) -> dict[Labels, str]:
        return {key: inst.state for key, inst in self.instances.items()}

    def firing(self) -> set[Labels]:
        return {key for key, state in self.states().items() if state == "Alerting"}
