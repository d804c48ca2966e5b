"""Settings load from TOML and env, and fail at start-up naming the bad key; `collector check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector import cli
from collector.settings import ConfigError, load
from tests.support import DATA, ROOT, FeedServer, InfluxD, free_port, run_cli


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_example_config_loads_with_presets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-a-file\n")
    monkeypatch.setenv("COLLECTOR_INFLUXDB__TOKEN_FILE", str(token))
    settings = load(ROOT / "examples" / "collector.toml")
    assert [s.name for s in settings.gbfs.systems] == ["oslo", "citibike", "velib"]
    assert settings.gbfs.systems[0].headers == {"Client-Identifier": "example-livestack"}
    assert settings.influxdb.resolved_token() == "from-a-file"


def test_env_overrides_single_keys_and_lists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _write(tmp_path, '[influxdb]\napi = "v1"\norg = "keep"\n')
    monkeypatch.setenv("COLLECTOR_CONFIG", str(path))
    monkeypatch.setenv("COLLECTOR_INFLUXDB__URL", "http://db.internal:8086/")
    monkeypatch.setenv(
        "COLLECTOR_GBFS__SYSTEMS", json.dumps([{"name": "x", "url": "https://e.org/gbfs.json"}])
    )
    settings = load()
    assert settings.influxdb.url == "http://db.internal:8086"  # trailing slash dropped
    assert (settings.influxdb.api, settings.influxdb.org) == ("v1", "keep")
    assert settings.gbfs.systems[0].name == "x"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[influxdb]\ntokn = "x"\n', "influxdb.tokn: unknown key"),
        ('[influxdb]\napi = "v4"\n', "influxdb.api:"),
        (
            '[influxdb]\nurl = "localhost:8086"\n',
            "influxdb.url: must be an http:// or https:// URL",
        ),
        ("[influxdb]\nbatch_lines = 10000\n", "influxdb.batch_lines:"),
        ('[influxdb]\ntoken = "a"\ntoken_file = "/etc/hostname"\n', "give token or token_file"),
        ('[influxdb]\ntoken_file = "/nonexistent/token"\n', "influxdb.token_file: file not found"),
        ('[[gbfs.systems]]\nname = "a"\n', "gbfs.systems.0: give url"),
        ('[[gbfs.systems]]\nname = "a b"\nurl = "http://x/"\n', "gbfs.systems.0.name:"),
        (
            '[[gbfs.systems]]\nname = "a"\nurl = "http://x/"\ninterval_secs = 0.1\n',
            "gbfs.systems.0.interval_secs:",
        ),
        (
            '[[gbfs.systems]]\nname = "a"\nurl = "http://x/"\n[[gbfs.systems]]\nname = "a"\nurl = "http://y/"\n',
            "system name 'a' is used twice",
        ),
        ('[influxdb\nurl = "x"', "c.toml"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(_write(tmp_path, text))
    assert named in str(raised.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "nope.toml")


def test_cli_exits_2_on_bad_config_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        '[influxdb]\nurl = "nope"\n[[gbfs.systems]]\nname = "a"\nurl = "http://127.0.0.1:9/"\n',
    )
    assert cli.main(["run", "--once", "--config", str(path)]) == 2
    assert "influxdb.url" in capsys.readouterr().err


def test_secrets_are_not_shown_in_settings_repr(tmp_path: Path) -> None:
    settings = load(
        _write(tmp_path, '[influxdb]\ntoken = "s3cr3t-token"\npassword = "pw-s3cr3t"\n')
    )
    text = repr(settings) + str(settings.model_dump())
    assert "s3cr3t-token" not in text and "pw-s3cr3t" not in text


@pytest.mark.influxdb
def test_check_reports_database_and_each_system(
    tmp_path: Path, influxd: InfluxD, feeds: FeedServer
) -> None:
    feeds.serve_folder(DATA / "gbfs" / "v2.3", "/v2.3")
    path = _write(
        tmp_path,
        f"""
[influxdb]
url = "{influxd.url}"
api = "v1"

[[gbfs.systems]]
name = "oslo"
url = "{feeds.url}/v2.3/gbfs.json"

[[gbfs.systems]]
name = "down"
url = "http://127.0.0.1:{free_port()}/gbfs.json"
""",
    )
    influxd.query('CREATE DATABASE "bikes"')
    influxd.query('CREATE DATABASE "collector"')
    proc = run_cli("check", config=path)
    assert proc.returncode == 1  # one system is down
    out = proc.stdout
    assert f"influxdb: v1 {influxd.url} ... ok (version 1." in out
    assert "gbfs oslo: ok, GBFS 2.3, 4 stations" in out
    assert "data-quality faults: invalid_value 1, over_capacity 1, unknown_station 1" in out
    assert "gbfs down: FAILED at fetch:" in out


def test_tls_opt_out_is_warned_about(tmp_path: Path, feeds: FeedServer) -> None:
    url = feeds.serve_folder(DATA / "gbfs" / "v2.3", "/v2.3")
    path = _write(
        tmp_path,
        f'[[gbfs.systems]]\nname = "careful"\nurl = "{url}"\n\n'
        f'[[gbfs.systems]]\nname = "insecure"\nurl = "{url}"\nverify_tls = false\n',
    )
    result = run_cli("run", "--once", "--dry-run", config=path)
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if "event=tls_verification_off" in line]
    assert len(warnings) == 1 and "source=insecure" in warnings[0]


def test_check_reports_the_spool_and_dead_letters(tmp_path: Path) -> None:
    from collector.sinks.spool import Spool

    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, 10_000_000)
    spool.put("bikes", "s", [["m v=1i 1", "m v=2i 2"], ["m v=3i 3"]])
    spool.close()
    (spool_dir / "dead-letter.lp").write_text("# refused\nm v=1.5 1\n")
    path = _write(
        tmp_path, f'[influxdb]\nurl = "http://127.0.0.1:9"\n[spool]\ndir = "{spool_dir}"\n'
    )
    out = run_cli("check", config=path).stdout
    assert f"spool: {spool_dir}: 2 batches, 3 lines waiting, oldest" in out
    assert "dead letters:" in out and "(20 bytes)" in out
