"""InfluxDB 1.x's tag and series limits, met by the world catalogue, are said by `collector
check` (stations counted by its poll) and `collector setup` (stations estimated) before any
write is refused, with the fix in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector import limits
from collector.settings import Settings
from collector.simulators.gbfs import GbfsSimulator
from collector.simulators.serve import Background
from tests.support import InfluxD, run_cli

LIMIT_LINE = "max-values-per-tag"


def _buckets(prefix: str) -> str:
    """Databases of this test's own, so that setup leaves the other tests' alone."""
    return "".join(
        f'[buckets.{logical}]\nname = "{prefix}_{logical}"\n'
        for logical in Settings().buckets.names()
    )


@pytest.mark.influxdb
def test_check_counts_the_stations_and_names_the_limit(tmp_path: Path, influxd: InfluxD) -> None:
    big = Background(GbfsSimulator(1, stations=85_000))
    small = Background(GbfsSimulator(2, stations=50))
    try:
        for stations, server, warned in ((85_000, big, True), (50, small, False)):
            url = server.start()
            config = tmp_path / f"{stations}.toml"
            config.write_text(
                f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\n'
                f'[[gbfs.systems]]\nname = "city"\nurl = "{url}/gbfs.json"\n'
            )
            proc = run_cli("check", config=config)
            assert f"gbfs city: ok, GBFS 2.3, {stations} stations" in proc.stdout
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("limits:")]
            if warned:
                assert len(lines) == 1, proc.stdout
                assert "~85,000 station ids (counted by this check)" in lines[0]
                assert "set max-values-per-tag = 0 under [data] in influxdb.conf" in lines[0]
            else:
                assert lines == []
    finally:
        big.stop()
        small.stop()


@pytest.mark.influxdb
def test_setup_estimates_the_stations_of_the_configured_systems(
    tmp_path: Path, influxd: InfluxD
) -> None:
    for systems, warned in ((600, True), (100, False)):
        config = tmp_path / f"{systems}.toml"
        config.write_text(
            f'[influxdb]\nurl = "{influxd.url}"\napi = "v1"\n'
            + _buckets("limits")
            + "".join(
                f'[[gbfs.systems]]\nname = "s{i}"\nurl = "http://127.0.0.1:9/{i}/gbfs.json"\n'
                for i in range(systems)
            )
        )
        proc = run_cli("setup", config=config)
        assert proc.returncode == 0, proc.stderr
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("limits:")]
        assert bool(lines) == warned, proc.stdout
        if warned:
            expected = 600 * limits.MEAN_STATIONS_PER_SYSTEM
            assert f"~{expected:,} station ids (estimated" in lines[0] and LIMIT_LINE in lines[0]
    for logical in Settings().buckets.names():
        influxd.drop(f"limits_{logical}")


def test_series_limits_and_2x_cardinality() -> None:
    series = limits.warnings("v1", 900_000, "bikes", estimated=True)
    assert len(series) == 2 and "max-series-per-database" in series[1]
    assert limits.warnings("v1", 79_000, "bikes", estimated=True) == []
    (v2,) = limits.warnings("v2", 225_000, "bikes", estimated=True)
    assert "2,925,000 series" in v2 and "SCALE.md" in v2
    assert limits.warnings("v2", 50_000, "bikes", estimated=True) == []
    assert limits.estimate_stations(3, {"a": 10}) == 10 + 2 * limits.MEAN_STATIONS_PER_SYSTEM
