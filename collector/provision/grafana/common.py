"""Shared builders: the InfluxQL query model, datasource references, panels, variables.

Every query is InfluxQL, so that the same dashboards run on InfluxDB 1.x, 2.x (through the
DBRP mappings `collector setup` creates) and 3.x. Queries read time only through Grafana's
macros (``$timeFilter``, ``$__interval``, ``${__to:date:seconds}``), never ``now()``, so that
they follow the time picker and can be evaluated at any pinned time.
"""

from __future__ import annotations

from typing import Literal, Protocol, Self, TypeVar

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from collector.contract import BUCKETS

FOLDER = "Livestack"
FOLDER_UID = "livestack"

UID_BIKES = "livestack-bikes-live"
UID_HISTORY = "livestack-station-history"
UID_PRESSURE = "livestack-pressure-live"
UID_HEALTH = "livestack-collector-health"
UID_FLOWS = "livestack-trip-flows"

ResultFormat = Literal["time_series", "table"]

# The end of the picked range, in epoch seconds: "now" for a live view, any moment otherwise.
TO_SECS = "${__to:date:seconds}"
# The state "now" is each station's newest point of the hour up to the range's end.
# bikes_1h is filled by a downsampling job (a continuous query on 1.x, a task on 2.x) that
# first runs up to an hour after `collector setup`, for the hour just ended.
HOURLY_FIRST_RUN = (
    "Filled once an hour by the downsampling job, for the hour just ended: on a new install "
    "this panel stays empty until its first run, up to an hour after set-up."
)
LATEST_WINDOW = f"time > {TO_SECS}s - 1h AND time <= {TO_SECS}s"


def datasource_uid(bucket: str) -> str:
    """One datasource per bucket of the contract (a database for InfluxQL)."""
    if bucket not in BUCKETS:
        raise ValueError(f"not a bucket of the contract: {bucket}")
    return f"livestack-{bucket}"


def datasource(bucket: str) -> cm.DataSourceRef:
    return cm.DataSourceRef(type_val="influxdb", uid=datasource_uid(bucket))


def regex(variable: str) -> str:
    """A tag matched against a variable: Grafana writes a value (or several, as (a|b))
    regex-escaped inside /^...$/, so one form serves single and multi values."""
    return f"/^${{{variable}}}$/"


class InfluxQLQuery(cogvariants.Dataquery):
    """The InfluxDB datasource's query model in InfluxQL raw mode."""

    def __init__(
        self, ref_id: str, bucket: str, query: str, result_format: ResultFormat, alias: str
    ) -> None:
        self.ref_id = ref_id
        self.bucket = bucket
        self.query = query
        self.result_format = result_format
        self.alias = alias

    def to_json(self) -> dict[str, object]:
        model: dict[str, object] = {
            "datasource": datasource(self.bucket).to_json(),
            "query": self.query,
            "rawQuery": True,
            "refId": self.ref_id,
            "resultFormat": self.result_format,
        }
        if self.alias:
            model["alias"] = self.alias
        return model


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    def __init__(
        self,
        bucket: str,
        query: str,
        *,
        ref_id: str = "A",
        result_format: ResultFormat = "time_series",
        alias: str = "",
    ) -> None:
        text = " ".join(query.split())
        self._query = InfluxQLQuery(ref_id, bucket, text, result_format, alias)

    def build(self) -> InfluxQLQuery:
        return self._query


def grid(x: int, y: int, w: int, h: int) -> dm.GridPos:
    return dm.GridPos(h=h, w=w, x=x, y=y)


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


# red = no bike, orange = 1-3, green = more than 3: what riders expect.
AVAILABILITY = thresholds((None, "red"), (1, "orange"), (4, "green"))


def legend() -> cb.VizLegendOptions:
    return (
        cb.VizLegendOptions()
        .show_legend(True)
        .display_mode(cm.LegendDisplayMode.LIST)
        .placement(cm.LegendPlacement.BOTTOM)
    )


class PanelBuilder(Protocol):
    """What ``panel`` sets on every kind of panel builder (each SDK panel module's ``Panel``)."""

    def title(self, title: str) -> Self: ...

    def datasource(self, datasource: cm.DataSourceRef) -> Self: ...

    def grid_pos(self, grid_pos: dm.GridPos) -> Self: ...

    def with_target(self, target: cogbuilder.Builder[cogvariants.Dataquery]) -> Self: ...


P = TypeVar("P", bound=PanelBuilder)


def panel(kind: type[P], title: str, grid_pos: dm.GridPos, *targets: InfluxQL) -> P:
    """A panel of ``kind`` (timeseries.Panel, table.Panel, ...) reading one bucket."""
    built = kind().title(title).datasource(datasource(targets[0].build().bucket)).grid_pos(grid_pos)
    for target in targets:
        built = built.with_target(target)
    return built


def count_stat(
    title: str, grid_pos: dm.GridPos, target: InfluxQL, *, unit: str = "none"
) -> stat.Panel:
    """A single number: the last value of a query that always returns a row (0 included)."""
    return (
        panel(stat.Panel, title, grid_pos, target)
        .unit(unit)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(cm.BigValueGraphMode.NONE)
    )


def dashboard(uid: str, title: str, refresh: str, time_from: str, tags: list[str]) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .tags(["livestack", *tags])
        .refresh(refresh)
        .time(time_from, "now")
        .timezone("browser")
        .readonly()
    )


def tag_variable(
    name: str, label: str, bucket: str, measurement: str, tag: str, where: str = ""
) -> db.QueryVariable:
    """Values of ``tag`` in the picked range, refreshed when it changes: the picker drives the
    variables too (InfluxDB 1.x narrows SHOW TAG VALUES by time to whole shards, 2.x and 3.x
    to the range)."""
    condition = f"{where} AND $timeFilter" if where else "$timeFilter"
    query = f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "{tag}" WHERE {condition}'
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(datasource(bucket))
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
    )


def series(
    title: str, grid_pos: dm.GridPos, target: InfluxQL, *, interval: str
) -> timeseries.Panel:
    """A time series panel with its legend. ``interval`` is the data's cadence: Grafana never
    makes ``$__interval`` finer, where intervals would hold no point."""
    return panel(timeseries.Panel, title, grid_pos, target).interval(interval).legend(legend())
