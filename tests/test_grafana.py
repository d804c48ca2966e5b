"""Grafana provisioning: committed = generated, `dashboards --check` names missing and
differing files, every query is InfluxQL on a datasource of the contract's buckets and uses
only what the collector writes. Execution against a real server: test_grafana_queries.py."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.contract import BUCKETS, DOWNSAMPLES, MEASUREMENTS
from collector.provision import grafana
from collector.settings import GrafanaSettings, Settings
from tests.flux import assert_valid
from tests.grafana_model import (
    NO_DATA,
    Context,
    Frame,
    LongFrameError,
    RuleModel,
    alert_series,
    format_interval,
    frames,
    interpolate,
    reduce,
    write,
)
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
    # The collector's own (writing) account is not Grafana's: still no authentication.
    config.write_text('[influxdb]\napi = "v1"\nusername = "collector"\n')
    assert run_cli("dashboards", "--out", str(out), config=config).returncode == 0
    sources = yaml.safe_load((out / "datasources" / "influxdb.yaml").read_text())["datasources"]
    assert all("user" not in s and "secureJsonData" not in s for s in sources)
    # 1.x with authentication: the reader's user, its password read by Grafana from its file.
    config.write_text(
        '[influxdb]\napi = "v1"\nusername = "collector"\n\n'
        '[grafana]\nreader_username = "grafana"\n'
        'reader_password_file = "/run/secrets/grafana-influx"\n'
    )
    assert run_cli("dashboards", "--out", str(out), config=config).returncode == 0
    sources = yaml.safe_load((out / "datasources" / "influxdb.yaml").read_text())["datasources"]
    assert all(s["user"] == "grafana" for s in sources)
    assert all(
        s["secureJsonData"] == {"password": "$__file{/run/secrets/grafana-influx}"} for s in sources
    )
    # Unset, the password file has a default of its own, not the 2.x token's path.
    config.write_text('[influxdb]\napi = "v1"\n\n[grafana]\nreader_username = "grafana"\n')
    assert run_cli("dashboards", "--out", str(out), config=config).returncode == 0
    sources = yaml.safe_load((out / "datasources" / "influxdb.yaml").read_text())["datasources"]
    password = f"$__file{{{GrafanaSettings().reader_password_file}}}"
    assert password != f"$__file{{{GrafanaSettings().reader_token_file}}}"
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


def test_grafana_model_frame_kind_counts_string_and_bool_fields_as_factors() -> None:
    # grafana-plugin-sdk-go data/time_series.go TimeSeriesSchema: string and bool fields are
    # factors; without a value field the frame is "not" a time series.
    time_col = [1000, 2000]
    assert Frame("m", {"Time": time_col, "Value": ["a", "b"]}).kind == "not"
    assert Frame("m", {"Time": time_col, "Value": [True, False]}).kind == "not"
    assert Frame("m", {"Time": time_col, "v": [1, 2], "k": ["a", "b"]}).kind == "long"
    assert Frame("m", {"Time": time_col, "v": [1, 2], "ok": [True, False]}).kind == "long"
    assert Frame("m", {"Time": time_col, "Value": [1.5, None]}).kind == "wide"
    assert Frame("m", {"Value": [1.5]}).kind == "not"


def test_grafana_model_skips_influxdb_frames_without_numeric_fields() -> None:
    # converter.go Convert: "Ignoring InfluxDB data frame due to missing numeric fields";
    # NoData when none remains.
    text = Frame("m.state", {"Time": [0], "Value": ["up"]}, {"system": "a"})
    number = Frame("m.v", {"Time": [0], "Value": [3]}, {"system": "b"})
    assert alert_series([text, number]) == {(("system", "b"),): [3]}
    assert alert_series([text, Frame("m.ok", {"Time": [0], "Value": [True]})]) == NO_DATA
    # A single frame without time and one numeric field is a number set.
    assert alert_series([Frame("m", {"Value": [7]})]) == {(): [7]}


def test_grafana_model_reduces_as_mathexp_does() -> None:
    # mathexp/reduce.go: Sum of nothing is 0; dropNN drops null, NaN and +-Inf.
    assert reduce([], "sum") == 0
    assert reduce([None, math.nan], "sum") == 0
    assert reduce([1.0, math.inf, -math.inf, None], "max") == 1.0
    assert reduce([2.0, math.inf], "last") == 2.0
    assert reduce([None, math.nan, math.inf], "last") is None


def test_grafana_model_formats_intervals_as_gtime_does() -> None:
    # gtime.FormatInterval: the largest unit reached, truncated; a year from 365 days.
    assert format_interval(90_000) == "1m"
    assert format_interval(1500) == "1s"
    assert format_interval(36 * 3_600_000) == "1d"
    assert format_interval(400 * 86_400_000) == "1y"
    assert format_interval(300_000) == "5m"


def _line(measurement: str, tags: dict[str, str], field: str, value: float, at_s: int) -> str:
    tag_text = "".join(f",{k}={v}" for k, v in tags.items())
    return f"{measurement}{tag_text} {field}={value} {at_s}"


@pytest.fixture
def model_db(influxd: InfluxD) -> Iterator[tuple[InfluxD, str]]:
    db = "grafana_model_rules"
    influxd.query(f'DROP DATABASE "{db}"')
    influxd.query(f'CREATE DATABASE "{db}"')
    yield influxd, db
    influxd.query(f'DROP DATABASE "{db}"')


def _model(uid: str, influxd: InfluxD, db: str) -> RuleModel:
    return RuleModel(next(r for r in RULES if r["uid"] == uid), influxd.url, db)


@pytest.mark.influxdb
def test_no_data_keeps_every_feed_stale_instance_as_it_was(model_db: tuple[InfluxD, str]) -> None:
    # manager.go setNextStateForRule: no data with KeepLast goes to every existing instance
    # (setNextStateForAll); nothing goes stale, no label-less instance appears.
    influxd, db = model_db
    at = int(time.time()) - 3600
    write(
        influxd.url,
        db,
        [_line("feed", {"system": s}, "age_secs", a, at) for s, a in (("a", 900), ("b", 5))],
    )
    model = _model("livestack-feed-stale", influxd, db)
    assert model.evaluate((at + 30) * 1000) == {
        (("system", "a"),): "Alerting",
        (("system", "b"),): "Normal",
    }
    for minutes in (10, 11, 12, 30):  # the collector is down: no feed age at all
        states = model.evaluate((at + minutes * 60) * 1000)
        assert model.no_data
        assert states == {(("system", "a"),): "Alerting", (("system", "b"),): "Normal"}


@pytest.mark.influxdb
def test_no_data_fires_the_collector_silent_instance_itself(model_db: tuple[InfluxD, str]) -> None:
    influxd, db = model_db
    at = int(time.time()) - 3600
    write(
        influxd.url,
        db,
        [_line("events", {"result": "ok", "source": "bikes", "stage": "poll"}, "count", 1, at)],
    )
    model = _model("livestack-collector-silent", influxd, db)
    assert model.evaluate((at + 30) * 1000) == {(): "Normal"}
    # The same (label-less) instance fires: Alerting applied to every existing instance.
    assert model.evaluate((at + 600) * 1000) == {(): "Alerting"}
    assert model.no_data
    # Grafana started while the collector is down: the NoData result makes the instance.
    fresh = _model("livestack-collector-silent", influxd, db)
    assert fresh.evaluate((at + 600) * 1000) == {(): "Alerting"}


@pytest.mark.influxdb
def test_no_data_resolves_every_anomaly_instance_at_once(model_db: tuple[InfluxD, str]) -> None:
    influxd, db = model_db
    at = int(time.time()) - 3600
    lines = [
        _line("anomaly", {"patient_id": "1", "sensor": s}, "value", 900, at) for s in ("L0", "R1")
    ]
    write(influxd.url, db, lines)
    model = _model("livestack-pressure-anomaly", influxd, db)
    firing = {(("patient_id", "1"), ("sensor", s)) for s in ("L0", "R1")}
    model.evaluate((at + 5) * 1000)
    assert model.firing() == firing
    # No anomaly in the rule's 180 s: OK goes to both instances in this one evaluation.
    states = model.evaluate((at + 600) * 1000)
    assert model.no_data and states == {key: "Normal" for key in firing}
    assert all(model.instances[key].resolved for key in firing)


def test_a_nil_value_gives_its_instance_the_no_data_state() -> None:
    # eval.go buildResult: a nil reduce result is NoData for that instance, which state.go
    # resultNoData maps by noDataState; the other instance is evaluated as usual.
    rule = next(r for r in RULES if r["uid"] == "livestack-feed-stale")
    result = {
        "series": [
            {"name": "feed", "tags": {"system": s}, "columns": ["time", "age"], "values": v}
            for s, v in (("a", [[0, None]]), ("b", [[0, 10]]))
        ]
    }
    for mode, state in (("Alerting", "Alerting"), ("OK", "Normal"), ("KeepLast", "Normal")):
        model = RuleModel({**rule, "noDataState": mode}, "http://unused", "unused")
        states = model.apply(frames(result, "time_series"), 60_000)
        assert states == {(("system", "a"),): state, (("system", "b"),): "Normal"}, mode
        assert not model.no_data


def test_panels_reading_hourly_data_say_they_start_empty() -> None:
    # bikes_1h holds nothing until the downsampling job's first run, up to an hour after
    # set-up: an empty hourly panel on a new install must say why.
    hourly = [
        (name, panel)
        for name, dash in DASHBOARDS.items()
        for panel in dash["panels"]
        if any(t["datasource"]["uid"] == "livestack-bikes_1h" for t in panel.get("targets", []))
    ]
    assert len(hourly) >= 3
    for name, panel in hourly:
        assert "until its first run" in panel.get("description", ""), (name, panel["title"])
