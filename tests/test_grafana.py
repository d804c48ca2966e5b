"""Grafana provisioning: committed = generated, every Flux query valid, structure sound, and
every field and tag a query uses is one the collector writes (read from the contract)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.contract import (
    DOWNSAMPLES,
    MEASUREMENTS,
    SENSORS,
    STATION_STATUS,
    Measurement,
)
from collector.provision import grafana
from collector.settings import GrafanaSettings
from tests.flux import GRAFANA_V, assert_valid
from tests.support import ROOT, run_cli

TREE = ROOT / "grafana" / "provisioning"
SETTINGS = GrafanaSettings()
FILES = grafana.render(SETTINGS)
DASHBOARDS = {
    name: json.loads(content) for name, content in FILES.items() if name.endswith(".json")
}
RULES = yaml.safe_load(FILES["alerting/rules.yaml"])["groups"][0]["rules"]
# Values for the dashboards' template variables, as Grafana substitutes them.
VARIABLES = {"system": "oslo", "station": "2351", "patient": "1", "colour_by": "bikes_available"}
ALL_MEASUREMENTS: tuple[Measurement, ...] = (*MEASUREMENTS, *(d.target for d in DOWNSAMPLES))


def test_committed_tree_is_what_the_generator_makes() -> None:
    assert grafana.differences(TREE, SETTINGS) == [], "run: collector dashboards"
    committed = {p.relative_to(TREE).as_posix() for p in TREE.rglob("*") if p.is_file()}
    assert committed == set(FILES), "files that the generator does not make"


def test_generation_is_deterministic_and_check_mode_works(tmp_path: Path) -> None:
    assert grafana.render(SETTINGS) == FILES
    config = tmp_path / "c.toml"
    config.write_text("")
    assert run_cli("dashboards", "--out", str(tmp_path / "p"), config=config).returncode == 0
    assert (
        run_cli("dashboards", "--out", str(tmp_path / "p"), "--check", config=config).returncode
        == 0
    )
    (tmp_path / "p" / "alerting" / "rules.yaml").write_text("changed")
    checked = run_cli("dashboards", "--out", str(tmp_path / "p"), "--check", config=config)
    assert checked.returncode == 1 and "rules.yaml" in checked.stdout


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries() -> dict[str, str]:
    """Every Flux query in the tree, named by where it is."""
    found = {}
    for name, dashboard in DASHBOARDS.items():
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                found[f"{name} / {panel['title']} / {target['refId']}"] = target["query"]
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable["type"] == "query":
                found[f"{name} / variable {variable['name']}"] = variable["query"]
        for annotation in dashboard.get("annotations", {}).get("list", []):
            if "target" in annotation and "query" in annotation["target"]:
                found[f"{name} / annotation {annotation['name']}"] = annotation["target"]["query"]
    for rule in RULES:
        for query in rule["data"]:
            if query["datasourceUid"] != "__expr__":
                found[f"rule {rule['uid']} / {query['refId']}"] = query["model"]["query"]
    return found


QUERIES = _queries()


def _substituted(query: str) -> str:
    for name, value in VARIABLES.items():
        query = query.replace("${" + name + "}", value)
    assert "${" not in query, f"unknown variable in {query}"
    return query


def test_every_flux_query_passes_influxdatas_checker() -> None:
    assert len(QUERIES) >= 30
    named = {}
    for name, query in QUERIES.items():
        imports = [line for line in query.splitlines() if line.startswith("import ")]
        body = "\n".join(line for line in query.splitlines() if not line.startswith("import "))
        # Grafana's v record is declared after the imports, as Grafana itself does.
        named[name] = "\n".join(imports) + "\n" + GRAFANA_V + _substituted(body)
    assert_valid(named)


def _measurement(query: str) -> Measurement | None:
    bucket = re.search(r'from\(bucket: "([^"]+)"\)', query)
    name = re.search(r'r\._measurement == "([^"]+)"', query)
    if bucket is None or name is None:
        return None
    matches = [
        m for m in ALL_MEASUREMENTS if (m.bucket, m.name) == (bucket.group(1), name.group(1))
    ]
    assert len(matches) == 1, f"no contract measurement {name.group(1)} in bucket {bucket.group(1)}"
    return matches[0]


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_queries_use_only_what_the_collector_writes(name: str) -> None:
    query = QUERIES[name]
    measurement = _measurement(query)
    if measurement is None:  # variable queries: tag values of a contract measurement
        bucket = re.search(r'bucket: "([^"]+)"', query).group(1)  # type: ignore[union-attr]
        tag = re.search(r'tag: "([^"]+)"', query).group(1)  # type: ignore[union-attr]
        assert any(m.bucket == bucket and tag in m.tags for m in ALL_MEASUREMENTS), name
        return
    fields = set(re.findall(r'r\._field == "([^"]+)"', query))
    assert fields <= set(measurement.fields), (name, fields - set(measurement.fields))
    # Columns a query reads: tags, fields (after pivot), Flux's own, or ones it made itself.
    made = {
        key
        for body in re.findall(r"map\(fn: \(r\) => \(\{(.*?)\}\)\)", query, re.S)
        for key in re.findall(r"(?:^|[,{]|with)\s*(\w+):", body)
    }
    made |= {
        new
        for body in re.findall(r"rename\(columns: \{([^}]*)\}\)", query)
        for new in re.findall(r'"(\w+)"', body)
    }
    known = (
        set(measurement.tags)
        | set(measurement.fields)
        | made
        | {
            "_field",
            "_measurement",
            "_value",
            "_time",
            "_start",
            "_stop",
        }
    )
    used = set(re.findall(r"\br\.(\w+)", query))
    assert used <= known, (name, used - known)
    for column in re.findall(r"group\(columns: \[([^\]]*)\]", query):
        grouped = set(re.findall(r'"(\w+)"', column))
        assert grouped <= known, (name, grouped - known)


def test_everything_points_at_the_provisioned_datasource() -> None:
    (datasource,) = yaml.safe_load(FILES["datasources/influxdb.yaml"])["datasources"]
    assert datasource["uid"] == grafana.DATASOURCE_UID
    assert datasource["jsonData"]["version"] == "Flux"
    assert datasource["secureJsonData"]["token"] == f"$__file{{{SETTINGS.reader_token_file}}}"
    for name, dashboard in DASHBOARDS.items():
        for panel in _panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == grafana.DATASOURCE_UID, (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == grafana.DATASOURCE_UID
        for variable in dashboard["templating"].get("list", []):
            if variable["type"] == "query":
                assert variable["datasource"]["uid"] == grafana.DATASOURCE_UID
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids) == 5


def test_alert_rules_reference_existing_refids() -> None:
    assert {r["uid"] for r in RULES} == {
        "livestack-pressure-anomaly",
        "livestack-feed-stale",
        "livestack-empty-stations",
        "livestack-collector-silent",
    }
    for rule in RULES:
        refs = [q["refId"] for q in rule["data"]]
        assert len(set(refs)) == len(refs)
        assert rule["condition"] in refs
        for query in rule["data"]:
            model = query["model"]
            assert model["refId"] == query["refId"]
            if query["datasourceUid"] == "__expr__":
                assert model["type"] in ("reduce", "threshold", "math")
                assert model["expression"] in refs and model["expression"] != query["refId"]
            else:
                assert query["datasourceUid"] == grafana.DATASOURCE_UID


def test_alert_rules_as_specified() -> None:
    rules = {r["uid"]: r for r in RULES}
    anomaly = rules["livestack-pressure-anomaly"]
    assert 'group(columns: ["patient_id", "sensor"])' in anomaly["data"][0]["model"]["query"]
    assert anomaly["for"] == "0s" and anomaly["noDataState"] == "OK"
    assert "$labels.patient_id" in anomaly["annotations"]["summary"]
    assert "$values.B" in anomaly["annotations"]["summary"]
    stale = rules["livestack-feed-stale"]
    assert stale["data"][2]["model"]["conditions"][0]["evaluator"] == {
        "type": "gt",
        "params": [300.0],
    }
    empty = rules["livestack-empty-stations"]
    assert empty["for"] == "30m"
    assert empty["data"][2]["model"]["conditions"][0]["evaluator"]["params"] == [
        SETTINGS.empty_station_share
    ]
    silent = rules["livestack-collector-silent"]
    assert silent["noDataState"] == "Alerting" and "-120s" in silent["data"][0]["model"]["query"]
    group = yaml.safe_load(FILES["alerting/rules.yaml"])["groups"][0]
    assert group["interval"] == "1m"  # the anomaly alert fires within a minute
    (policy,) = yaml.safe_load(FILES["alerting/policies.yaml"])["policies"]
    assert {"patient_id", "system"} <= set(policy["group_by"])
    (point,) = yaml.safe_load(FILES["alerting/contact-points.yaml"])["contactPoints"]
    assert point["receivers"][0]["settings"]["url"] == "$ALERT_WEBHOOK_URL"


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}/{index}")
    elif isinstance(node, str):
        yield path, node


INTENDED = re.compile(r"\$(INFLUXDB_URL|ALERT_WEBHOOK_URL|__file\{[^}]+\})")


def test_no_dollar_that_grafana_would_expand_by_mistake() -> None:
    for name, content in FILES.items():
        if not name.endswith(".yaml"):
            continue  # dashboard JSON is not expanded: ${system} there is a variable
        for path, text in _strings(yaml.safe_load(content)):
            if "/model/" in path or "/annotations/" in path:
                continue  # Grafana leaves rule queries and annotations alone
            stray = INTENDED.sub("", text).replace("$$", "")
            assert "$" not in stray, (name, path, text)


def test_geomap_query_shape_and_thresholds() -> None:
    dashboard = DASHBOARDS["dashboards/livestack/bikes-live.json"]
    (panel,) = [p for p in dashboard["panels"] if p["type"] == "geomap"]
    query = panel["targets"][0]["query"]
    assert "pivot(" in query and query.rstrip().endswith("|> group()")  # one frame
    layer = panel["options"]["layers"][0]
    lat, lon = layer["location"]["latitude"], layer["location"]["longitude"]
    assert (STATION_STATUS.fields[lat], STATION_STATUS.fields[lon]) == ("float", "float")
    assert layer["config"]["style"]["color"]["field"] == "colour" and "colour:" in query
    steps = [
        (s["value"], s["color"]) for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    ]
    assert steps == [(None, "red"), (1, "orange"), (4, "green")]
    link = panel["fieldConfig"]["defaults"]["links"][0]["url"]
    assert f"/d/{grafana.UID_HISTORY}" in link and "${__data.fields.station_id}" in link
    assert dashboard["refresh"] == "30s"
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"system", "colour_by"}


def test_pressure_view_lays_sensors_out_as_two_feet() -> None:
    dashboard = DASHBOARDS["dashboards/livestack/pressure-live.json"]
    assert dashboard["refresh"] == "5s" and dashboard["time"]["from"] == "now-5m"
    stats = {p["title"]: p["gridPos"] for p in dashboard["panels"] if p["type"] == "stat"}
    grid = {sensor: next(g for t, g in stats.items() if f"({sensor})" in t) for sensor in SENSORS}
    for side in "LR":
        front, middle, heel = (grid[f"{side}{i}"] for i in range(3))
        assert front["y"] < middle["y"] < heel["y"] and front["x"] == middle["x"] == heel["x"]
    assert grid["L0"]["x"] < grid["R0"]["x"]
    (annotation,) = [a for a in dashboard["annotations"]["list"] if a["name"] == "Anomalies"]
    assert 'from(bucket: "anomalies")' in annotation["target"]["query"]
    titles = {p["title"] for p in dashboard["panels"]}
    assert {
        "Anomalies",
        "Anomalies today",
        "Left foot, last 5 minutes",
        "Right foot, last 5 minutes",
    } <= titles
