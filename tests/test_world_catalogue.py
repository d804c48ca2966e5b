"""The GBFS world catalogue (MobilityData's systems.csv, 1,520 rows) imported as settings, and
the systems split between collector replicas (``--shard K/N``)."""

from __future__ import annotations

import csv
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from collector import catalogue, cli, settings
from collector.jobs import build_jobs
from collector.shard import Shard, owner
from collector.sinks.base import Fatal
from collector.sinks.stdout import StdoutSink
from collector.telemetry import Counters

CATALOGUE = (
    Path(__file__).resolve().parents[2]
    / "shared/fixtures/gbfs/systems-catalogue-2026-07/systems.csv"
)
needs_catalogue = pytest.mark.skipif(
    not CATALOGUE.is_file(), reason=f"the real catalogue is not here: {CATALOGUE}"
)


def _import(tmp_path: Path, capsys: pytest.CaptureFixture[str], *options: str) -> str:
    out = tmp_path / "systems.toml"
    assert cli.main(["systems", "import", str(CATALOGUE), "--out", str(out), *options]) == 0
    capsys.readouterr()
    return out.read_text(encoding="utf-8")


def _names(toml_text: str) -> list[str]:
    return [s["name"] for s in tomllib.loads(toml_text)["gbfs"]["systems"]]


def _commented_names(toml_text: str) -> list[str]:
    return re.findall(r'^# name = "([^"]+)"$', toml_text, re.MULTILINE)


@needs_catalogue
def test_the_whole_catalogue_loads_as_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _import(tmp_path, capsys)
    config = tmp_path / "collector.toml"
    config.write_text(text, encoding="utf-8")
    loaded = settings.load(config)  # the names and URLs pass the settings' own rules
    rows = list(csv.DictReader(CATALOGUE.open(newline="", encoding="utf-8")))
    needing = [r for r in rows if r["Authentication Type"].strip()]
    assert len(rows) == 1520 and len(needing) == 5
    assert len(loaded.gbfs.systems) == 1520 - 5
    names = [s.name for s in loaded.gbfs.systems] + _commented_names(text)
    assert len(names) == len(set(names)) == 1520  # unique, the duplicated System ID too
    by_url = {s.url for s in loaded.gbfs.systems}
    assert by_url == {r["Auto-Discovery URL"] for r in rows if not r["Authentication Type"]}
    # The ones needing authentication are apart, commented out, with what they need.
    assert sorted(_commented_names(text)) == sorted(catalogue.slug(r["System ID"]) for r in needing)
    assert "stadtrad_hamburg" in text.split("Need authentication")[1]
    assert "needs HTTP headers (DB-Client-Id, DB-Api-Key)" in text


@needs_catalogue
def test_names_are_stable_whatever_the_filters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    everything = catalogue.entries(catalogue.read(CATALOGUE))
    full = {e.system_id + "|" + e.url: e.name for e in everything}
    norway = catalogue.entries(catalogue.read(CATALOGUE), countries=["no"])
    assert norway and {e.country for e in norway} == {"NO"}
    assert all(full[e.system_id + "|" + e.url] == e.name for e in norway)
    # The catalogue lists citiz_la_rochelle twice: both kept, told apart by their URL's hash.
    twice = [e.name for e in everything if e.system_id == "citiz_la_rochelle"]
    assert len(twice) == 2 and len(set(twice)) == 2
    assert all(re.fullmatch(r"citiz_la_rochelle-[0-9a-f]{6}", n) for n in twice)
    assert catalogue.slug("voi_V'Lônes") == "voi_v-lones"


@needs_catalogue
def test_country_and_version_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = list(csv.DictReader(CATALOGUE.open(newline="", encoding="utf-8")))

    def versions(row: dict[str, str]) -> list[tuple[int, ...]]:
        given = re.split(r"\s*;\s*", row["Supported Versions"].strip())
        return [tuple(map(int, v.split("."))) for v in given if v]

    want = [
        r
        for r in rows
        if r["Country Code"] in ("NO", "FR")
        and any(v >= (3, 0) for v in versions(r))
        and not r["Authentication Type"]
    ]
    text = _import(tmp_path, capsys, "--country", "NO,FR", "--version", ">=3.0")
    assert len(_names(text)) == len(want) > 0
    text = _import(tmp_path, capsys, "--version", "<2", "--interval-secs", "60")
    systems = tomllib.loads(text)["gbfs"]["systems"]
    assert len(systems) == sum(
        1 for r in rows if any(v < (2,) for v in versions(r)) and not r["Authentication Type"]
    )
    assert {s["interval_secs"] for s in systems} == {60}


def test_bad_filters_and_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_catalogue = tmp_path / "x.csv"
    not_a_catalogue.write_text("a,b\n1,2\n")
    assert cli.main(["systems", "import", str(not_a_catalogue)]) == 2
    assert "not a GBFS systems.csv" in capsys.readouterr().err
    assert cli.main(["systems", "import", str(CATALOGUE), "--version", "new"]) == 2


def _names_of_world() -> list[str]:
    if CATALOGUE.is_file():
        return [e.name for e in catalogue.entries(catalogue.read(CATALOGUE))]
    return [f"system-{i}" for i in range(1520)]  # the property holds for any names


def test_shards_neither_overlap_nor_leave_gaps() -> None:
    names = _names_of_world()
    for n in range(1, 9):
        owners = Counter(k for name in names for k in range(1, n + 1) if Shard(k, n).owns(name))
        assert sum(owners.values()) == len(names)  # each name owned exactly once...
        per_name = Counter(
            name for name in names for k in range(1, n + 1) if Shard(k, n).owns(name)
        )
        assert set(per_name.values()) == {1}
        # ...and spread: no replica with under half or over 1.5 times its fair share.
        assert all(len(names) / n / 2 < c < len(names) / n * 1.5 for c in owners.values())


def test_adding_a_replica_moves_only_what_it_takes() -> None:
    names = _names_of_world()
    for n in range(1, 8):
        moved = [name for name in names if owner(name, n) != owner(name, n + 1)]
        # Every system that moves goes to the new replica; none moves between the others.
        assert all(owner(name, n + 1) == n + 1 for name in moved)
        assert len(moved) < 1.5 * len(names) / (n + 1)


def test_shard_setting_and_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "collector.toml"
    systems = "".join(
        f'[[gbfs.systems]]\nname = "s{i}"\nurl = "http://127.0.0.1:9/s{i}/gbfs.json"\n'
        for i in range(40)
    )
    config.write_text(f'[gbfs]\nshard = "2/3"\n{systems}')
    loaded = settings.load(config)
    jobs = build_jobs(loaded, StdoutSink(), Counters(), Fatal(), once=True).sources
    assert [j.name for j in jobs] == [f"s{i}" for i in range(40) if owner(f"s{i}", 3) == 2]
    config.write_text(f'[gbfs]\nshard = "4/3"\n{systems}')
    with pytest.raises(settings.ConfigError, match=r"gbfs\.shard"):
        settings.load(config)
    config.write_text(systems)
    assert cli.main(["run", "--config", str(config), "--shard", "0/2", "--once"]) == 2
    assert "--shard" in capsys.readouterr().err
