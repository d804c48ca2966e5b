"""Run InfluxData's Flux checker (tools/flux-check, @influxdata/flux-lsp-node) from the tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.support import ROOT

TOOL = ROOT / "tools" / "flux-check"

# What Grafana declares before running a dashboard query.
GRAFANA_V = "v = {timeRangeStart: -1h, timeRangeStop: now(), windowPeriod: 1m}\n"


def check(scripts: list[str]) -> list[dict[str, bool]]:
    """[{syntax, semantic}] per script. Skips locally when Node or the tool is missing; in CI
    (CI set) a missing checker fails, so no query goes unchecked there."""
    node = shutil.which("node")
    if node is None or not (TOOL / "node_modules" / "@influxdata" / "flux-lsp-node").is_dir():
        message = "Flux checker not installed: npm ci --prefix tools/flux-check"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [node, str(TOOL / "check.js")],
        input=json.dumps(scripts),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)


def assert_valid(named: dict[str, str]) -> None:
    results = check(list(named.values()))
    bad = {
        name: result
        for name, result in zip(named, results, strict=True)
        if not (result["syntax"] and result["semantic"])
    }
    assert not bad, f"Flux rejected by InfluxData's checker: {bad}\n" + "\n\n".join(
        f"--- {name}\n{named[name]}" for name in bad
    )
