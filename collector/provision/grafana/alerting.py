"""Alert rules, contact point and notification policy, in Grafana's file-provisioning shape
(the SDK's alert builders emit the HTTP API's shape).

Every rule's query is InfluxQL in ``time_series`` format: one frame per tag set, a time field
and one numeric field labelled with the tags, which alert evaluation takes as a wide series
(``pkg/expr/converter.go``), reduces to one number per label set and compares with the
threshold. Queries read time only through ``$timeFilter`` (the rule's relative time range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from collector.contract import ANOMALY, EVENTS, FEED, STATION_STATUS
from collector.provision.grafana.common import FOLDER, datasource_uid
from collector.settings import GrafanaSettings

GROUP = "livestack"
INTERVAL_SECS = 60
NoData = Literal["OK", "Alerting", "NoData", "KeepLast"]


@dataclass(frozen=True)
class Rule:
    uid: str
    title: str
    bucket: str
    query: str
    range_secs: int  # the query's time range: now - range_secs .. now
    reducer: str
    threshold: tuple[str, float]  # ("gt" | "lt", value)
    for_: str
    no_data: NoData
    summary: str
    labels: dict[str, str]


def pressure_anomaly() -> Rule:
    # Flagged readings per (patient, sensor) in 10 s steps, summed over the last three steps:
    # above 0 while a run goes on, back to 0 (the series is still there, so the instance
    # resolves at once) 30 s after it ends. Readings arrive several times a second.
    query = (
        f'SELECT moving_average(count("value"), 3) AS "flagged" FROM "{ANOMALY.name}" '
        'WHERE $timeFilter GROUP BY time(10s), "patient_id", "sensor" fill(0)'
    )
    return Rule(
        uid="livestack-pressure-anomaly",
        title="Pressure anomaly",
        bucket=ANOMALY.bucket,
        query=query,
        range_secs=180,
        reducer="last",
        threshold=("gt", 0),
        for_="0s",
        no_data="OK",  # the anomalies bucket holds flagged readings only: none is good news
        summary="Patient {{ $labels.patient_id }}: anomaly on sensor {{ $labels.sensor }}",
        labels={"severity": "critical", "team": "clinic"},
    )


def feed_stale(settings: GrafanaSettings) -> Rule:
    # The collector's own feed age keeps growing while a feed is dead (it is written every
    # telemetry interval, dead feed or not), so the series never vanishes. The smallest age
    # over the window: a healthy feed whose ttl equals the threshold dips to a few seconds at
    # each refresh and never fires; a dead one fires once its data is 2 x threshold old.
    stale = int(settings.feed_stale_secs)
    query = (
        f'SELECT min("age_secs") AS "age" FROM "{FEED.name}" WHERE $timeFilter '
        'GROUP BY time(1m), "system" fill(none)'
    )
    return Rule(
        uid="livestack-feed-stale",
        title="Bike feed stale",
        bucket=FEED.bucket,
        query=query,
        range_secs=stale,
        reducer="min",
        threshold=("gt", settings.feed_stale_secs),
        for_="0s",
        # No feed metrics at all means the collector is down ("Collector silent" says so):
        # keep each system's state rather than resolve a feed that may still be dead.
        no_data="KeepLast",
        summary="System {{ $labels.system }}: no data newer than "
        "{{ humanizeDuration $values.B.Value }} for " + f"{stale} s",
        labels={"severity": "warning", "team": "mobility"},
    )


def empty_stations(settings: GrafanaSettings) -> Rule:
    per_station = (
        'SELECT last("bikes_available") AS "bikes", last("is_installed") AS "installed", '
        f'last("is_renting") AS "renting" FROM "{STATION_STATUS.name}" WHERE $timeFilter '
        'GROUP BY time(5m), "station_id", "system" fill(none)'
    )
    empty = (
        f'SELECT floor(1 / ("bikes" + 1)) AS "empty" FROM ({per_station}) '
        'WHERE "installed" = true AND "renting" = true'
    )
    query = (
        f'SELECT mean("empty") AS "empty share" FROM ({empty}) WHERE $timeFilter '
        'GROUP BY time(5m), "system" fill(none)'
    )
    return Rule(
        uid="livestack-empty-stations",
        title="Many empty stations",
        bucket=STATION_STATUS.bucket,
        query=query,
        range_secs=900,
        reducer="last",
        threshold=("gt", settings.empty_station_share),
        for_=f"{settings.empty_station_for_mins}m",
        no_data="OK",  # no bike data at all is "Bike feed stale"'s business
        summary="System {{ $labels.system }}: "
        "{{ humanizePercentage $values.B.Value }} of stations in service are empty",
        labels={"severity": "warning", "team": "mobility"},
    )


def collector_silent(settings: GrafanaSettings) -> Rule:
    query = (
        f'SELECT count("count") AS "reports" FROM "{EVENTS.name}" WHERE $timeFilter '
        "GROUP BY time(1m)"
    )
    return Rule(
        uid="livestack-collector-silent",
        title="Collector silent",
        bucket=EVENTS.bucket,
        query=query,
        range_secs=settings.collector_silent_secs,
        reducer="sum",
        threshold=("lt", 1),
        for_="0s",
        no_data="Alerting",  # silence is exactly "no data"
        summary=f"No metrics from the collector for {settings.collector_silent_secs} s",
        labels={"severity": "critical", "team": "ops"},
    )


def alert_rules(settings: GrafanaSettings) -> list[Rule]:
    return [
        pressure_anomaly(),
        feed_stale(settings),
        empty_stations(settings),
        collector_silent(settings),
    ]


def _rule(rule: Rule) -> dict[str, Any]:
    evaluator, value = rule.threshold
    return {
        "uid": rule.uid,
        "title": rule.title,
        "condition": "C",
        "data": [
            {
                "refId": "A",
                "relativeTimeRange": {"from": rule.range_secs, "to": 0},
                "datasourceUid": datasource_uid(rule.bucket),
                "model": {
                    "refId": "A",
                    "query": rule.query,
                    "rawQuery": True,
                    "resultFormat": "time_series",
                    "intervalMs": 10000,
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


def alerting_files(settings: GrafanaSettings) -> dict[str, dict[str, Any]]:
    rules = {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": GROUP,
                "folder": FOLDER,
                "interval": f"{INTERVAL_SECS // 60}m",
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
