"""Grafana provisioning: committed = generated, `dashboards --check` names missing and
differing files, every query is InfluxQL on a datasource of the contract's buckets and uses
only what the collector writes. Execution against a real server: test_grafana_queries.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.contract import BUCKETS, DOWNSAMPLES, MEASUREMENTS
from collector.provision import grafana
from collector.settings import Settings
from tests.flux import assert_valid
from tests.grafana_model import NO_DATA, Context, LongFrameError, alert_series, frames, interpolate
from tests.support import ROOT, InfluxD, run_cli

TREE = ROOT / "grafana" / "provisioning"
SETTINGS = Settings()
FILES = grafana.render(SETTINGS)
DASHBOARDS = {n: json.loads(c) for n, c in FILES.items() if n.endswith(".json")}
RULES = yaml.safe_load(FILES["alerting/rules.yaml"])["groups"][0]["rules"]
WRITTEN = {(m.bucket, m.name): m for m in (*MEASUREMENTS, *(d.target for d in DOWNSAMPLES))}


def test_committed_tree_is_what_the_generator_makes() -> None:
    assert grafana.compare(TREE, SETTINGS) == ([], []), "run: collector dashboards"
    committed = {p.relative_to(TREE).as_posix() for p in TREE.rglob("*") if p.is_file()}
    assert committed == set(FILES), "files that the generator does not make"


def test_check_mode_says_missing_for_missing_and_differs_for_changed(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("")
    out = tmp_path / "p"
    checked = run_cli("dashboards", "--out", str(out), "--check", config=config)
    assert checked.returncode == 1 and "differs" not in checked.stdout
    assert f"missing: {out / 'alerting' / 'rules.yaml'}" in checked.stdout
    assert run_cli("dashboards", "--out", str(out), config=config).returncode == 0
    assert run_cli("dashboards", "--out", str(out), "--check", config=config).returncode == 0
    (out / "alerting" / "rules.yaml").write_text("changed")
    checked = run_cli("dashboards", "--out", str(out), "--check", config=config)
    assert checked.returncode == 1
    assert (
        checked.stdout.strip() == f"differs from the generator: {out / 'alerting' / 'rules.yaml'}"
    )


def _targets() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, dash in DASHBOARDS.items():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                yield f"{name} / {panel['title']}", target
        for variable in dash["templating"].get("list", []):
            if variable["type"] == "query":
                yield (
                    f"{name} / {variable['name']}",
                    {
                        "query": variable["query"],
                        "datasource": variable["datasource"],
                    },
                )
        for annotation in dash["annotations"].get("list", []):
            if "target" in annotation:
                yield f"{name} / {annotation['name']}", annotation["target"]
    for rule in RULES:
        model = rule["data"][0]["model"]
        yield rule["uid"], {**model, "datasource": {"uid": rule["data"][0]["datasourceUid"]}}


def test_one_influxql_datasource_per_bucket_with_the_token_header_on_v2() -> None:
    sources = yaml.safe_load(FILES["datasources/influxdb.yaml"])["datasources"]
    assert [s["jsonData"]["dbName"] for s in sources] == list(BUCKETS)
    for source in sources:
        assert source["jsonData"]["version"] == "InfluxQL"
        assert source["jsonData"]["httpHeaderName1"] == "Authorization"
        token = f"Token $__file{{{SETTINGS.grafana.reader_token_file}}}"
        assert source["secureJsonData"] == {"httpHeaderValue1": token}


def test_v1_datasources_carry_no_token_and_follow_renamed_databases(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[influxdb]\napi = "v1"\n\n[buckets.bikes]\nname = "velos"\n')
    out = tmp_path / "p"
    assert run_cli("dashboards", "--out", str(out), config=config).returncode == 0
    sources = yaml.safe_load((out / "datasources" / "influxdb.yaml").read_text())["datasources"]
    assert {s["uid"]: s["jsonData"]["dbName"] for s in sources}["livestack-bikes"] == "velos"
    assert all(
        "secureJsonData" not in s and "httpHeaderName1" not in s["jsonData"] for s in sources
    )
    # 1.x with authentication: that user, the password read by Grafana from a file.
    config.write_text('[influxdb]\napi = "v1"\nusername = "grafana"\n')
    assert run_cli("dashboards", "--out", str(out), config=config).returncode == 0
    sources = yaml.safe_load((out / "datasources" / "influxdb.yaml").read_text())["datasources"]
    password = f"$__file{{{SETTINGS.grafana.reader_token_file}}}"
    assert all(s["user"] == "grafana" for s in sources)
    assert all(s["secureJsonData"] == {"password": password} for s in sources)


def test_every_query_is_influxql_on_a_bucket_holding_what_it_reads() -> None:
    found = list(_targets())
    assert len(found) >= 30
    for where, target in found:
        query = target["query"]
        assert "from(bucket" not in query and "|>" not in query, where
        assert "now()" not in query, f"{where}: time only through Grafana's macros"
        bucket = target["datasource"]["uid"].removeprefix("livestack-")
        assert bucket in BUCKETS, where
        for name in re.findall(r'FROM "(\w+)"', query):
            measurement = WRITTEN.get((bucket, name))
            assert measurement is not None, (where, bucket, name)
            used = set(re.findall(r'"(\w+)"', query)) - {name}
            known = set(measurement.tags) | set(measurement.fields)
            # Aliases a query gives its own columns are declared with AS.
            made = set(re.findall(r'AS "([\w ()-]+)"', query))
            assert used <= known | made, (where, used - known - made)


def test_provider_and_rules_share_the_folder_by_title_only() -> None:
    (provider,) = yaml.safe_load(FILES["dashboards/livestack.yaml"])["providers"]
    assert provider["folder"] == "Livestack" and "folderUid" not in provider
    group = yaml.safe_load(FILES["alerting/rules.yaml"])["groups"][0]
    assert group["folder"] == "Livestack"


def test_multi_series_panels_show_their_legend_and_feed_age_its_threshold() -> None:
    for name, dash in DASHBOARDS.items():
        for panel in dash["panels"]:
            if panel["type"] == "timeseries":
                assert panel["options"]["legend"]["showLegend"], (name, panel["title"])
    health = DASHBOARDS["dashboards/livestack/collector-health.json"]
    age = next(p for p in health["panels"] if p["title"] == "Feed age per system")
    custom = age["fieldConfig"]["defaults"]["custom"]
    assert custom["thresholdsStyle"]["mode"] == "line"
    steps = age["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == SETTINGS.grafana.feed_stale_secs


def _readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_readme_flux_examples_pass_influxdatas_checker() -> None:
    blocks = _readme_blocks("flux")
    assert blocks
    assert_valid({f"README flux example {i}": block for i, block in enumerate(blocks)})


def test_readme_influxql_examples_run(influxd: InfluxD) -> None:
    blocks = _readme_blocks("sql")
    assert blocks
    for bucket in BUCKETS:
        influxd.query(f'CREATE DATABASE "{bucket}"')
    for block in blocks:
        influxd.query(" ".join(block.split()), "bikes")  # raises on an InfluxQL error


def test_grafana_model_interpolates_as_grafanas_own_tests_say() -> None:
    # Cases of public/app/plugins/datasource/influxdb/datasource.test.ts "interpolateQueryExpr".
    ctx = Context(0, 60_000, {"path": "/special/path", "n": "12.2", "multi": ["a.b", "c"]})
    assert interpolate("WHERE p =~ /^${path}$/", ctx) == r"WHERE p =~ /^\/special\/path$/"
    assert interpolate("WHERE p = '${path}'", ctx) == "WHERE p = '/special/path'"
    assert interpolate("SELECT v / $n", ctx) == "SELECT v / 12.2"
    assert interpolate("WHERE m =~ /^${multi}$/", ctx) == r"WHERE m =~ /^(a\.b|c)$/"
    # query.go Build: $timeFilter in milliseconds, $__interval from the range and width.
    assert interpolate("$timeFilter GROUP BY time($__interval)", ctx) == (
        "time >= 0ms and time <= 60000ms GROUP BY time(50ms)"
    )


def test_grafana_model_rejects_what_alerting_rejects() -> None:
    # The old "Pressure anomaly" shape: string columns beside the value make a long frame.
    result = {
        "series": [
            {
                "name": "anomaly",
                "columns": ["time", "value", "sensor"],
                "values": [[1000, 700, "L0"], [2000, 800, "L1"]],
            }
        ]
    }
    (frame,) = frames(result, "table")
    assert frame.kind == "long"
    with pytest.raises(LongFrameError, match="wide series but got type long"):
        alert_series([frame])
    # time_series: one wide frame per series and column, the tags as labels.
    tagged = {
        "series": [
            {"name": "m", "tags": {"system": s}, "columns": ["time", "v"], "values": [[0, n]]}
            for s, n in (("a", 1), ("b", 2))
        ]
    }
    assert alert_series(frames(tagged, "time_series")) == {
        (("system", "a"),): [1],
        (("system", "b"),): [2],
    }
    assert alert_series(frames({}, "time_series")) == NO_DATA
