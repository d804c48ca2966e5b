"""The compose stack's files, checked without a Docker engine (and with `docker compose config`
where one is installed)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from collector import __version__
from collector.settings import load
from tests.support import ROOT

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
EXACT = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+(-[\w.]+)?$")


def test_every_image_is_pinned_to_an_exact_version() -> None:
    for name, service in SERVICES.items():
        assert EXACT.match(service["image"]), (name, service["image"])
    assert SERVICES["influxdb"]["image"].startswith("influxdb:2.7.")
    assert SERVICES["grafana"]["image"].startswith("grafana/grafana:12.")
    assert SERVICES["collector"]["image"] == f"livestack-collector:{__version__}"


def test_start_order_and_health() -> None:
    def needs(service: str) -> dict[str, str]:
        return {
            dep: spec["condition"] for dep, spec in SERVICES[service].get("depends_on", {}).items()
        }

    assert needs("influxdb") == {"secrets": "service_completed_successfully"}
    assert needs("setup") == {"influxdb": "service_healthy"}
    assert needs("collector") == {"setup": "service_completed_successfully"}
    assert needs("grafana") == {"setup": "service_completed_successfully"}
    health = SERVICES["influxdb"]["healthcheck"]["test"]
    assert "http://localhost:8086/health" in health and health[0] == "CMD"
    assert SERVICES["collector"]["restart"] == "unless-stopped"
    assert SERVICES["secrets"]["restart"] == SERVICES["setup"]["restart"] == "no"
    grace = SERVICES["collector"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) <= 10  # the collector needs 8 s at most
    assert {n for n, s in SERVICES.items() if "demo" in s.get("profiles", [])} == {
        "pressure-sim",
        "gbfs-sim",
    }


def test_only_loopback_ports() -> None:
    published = [(n, p) for n, s in SERVICES.items() for p in s.get("ports", [])]
    assert published  # Grafana at least
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), (name, port)


def test_no_secret_inline() -> None:
    env_file = (ROOT / ".env").read_text()
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert key.endswith("_FILE"), (name, key)
                assert str(value).startswith("/run/"), (name, key, value)
    assert not re.search(r"(?i)(password|token)\s*=\s*\S", env_file)
    assert "secrets/" in (ROOT / ".gitignore").read_text()


def test_grafana_is_closed_to_strangers() -> None:
    env = SERVICES["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    mounts = SERVICES["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_tokens_reach_only_who_needs_them() -> None:
    def mounts(service: str) -> set[str]:
        return {v.split(":")[0] for v in SERVICES[service].get("volumes", [])}

    assert "writer-token" in mounts("collector") and "reader-token" not in mounts("collector")
    assert "reader-token" in mounts("grafana") and "writer-token" not in mounts("grafana")
    assert "influxdb-secrets" not in mounts("grafana") | mounts("collector")


def test_the_stacks_collector_config_is_valid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    env = SERVICES["collector"]["environment"]
    monkeypatch.setenv("COLLECTOR_INFLUXDB__TOKEN_FILE", str(token))  # compose's path, here
    assert env["COLLECTOR_CONFIG"] == "/etc/livestack/collector.toml"
    settings = load(ROOT / "deploy" / "collector.toml")
    assert settings.influxdb.url == "http://influxdb:8086" and settings.influxdb.api == "v2"
    assert settings.pressure.url == "http://pressure-sim:9080"
    assert [s.url for s in settings.gbfs.systems] == ["http://gbfs-sim:9081/gbfs.json"]
    assert not settings.pressure.store_personal_data


def test_dockerfile_is_slim_pinned_and_not_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert re.match(r"python:3\.11\.\d+-slim-\w+$", base)
    assert re.findall(r"^USER (\S+)", dockerfile, re.M) == ["10001:10001"]
    assert "--requirement requirements.lock" in dockerfile
    # The token volumes' mount points belong to the user that writes and reads the tokens.
    assert "chown -R 10001:10001 /run/tokens /var/lib/livestack" in dockerfile
    collector = SERVICES["collector"]
    assert collector["environment"]["COLLECTOR_SPOOL__DIR"].startswith("/var/lib/livestack/")
    assert "collector-spool:/var/lib/livestack" in collector["volumes"]  # survives restarts
    for service in ("setup", "collector"):
        assert any(
            v.split(":")[1].startswith("/run/tokens/")
            for v in SERVICES[service]["volumes"]
            if v.count(":") >= 1
        )


def test_lock_pins_every_runtime_dependency() -> None:
    lock = {
        line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line and not line.startswith("#")
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].lower()
        assert name in lock, name
        pinned = re.search(r"==([\w.]+)", requirement)
        if pinned:
            assert lock[name] == pinned.group(1)


@pytest.mark.skipif(
    os.geteuid() != 0, reason="the script sets owners: run as root, as in the container"
)
def test_make_secrets_creates_once_with_owner_only_modes(tmp_path: Path) -> None:
    influx, grafana = tmp_path / "influx", tmp_path / "grafana"
    influx.mkdir()
    grafana.mkdir()
    script = ROOT / "deploy" / "make-secrets.sh"
    run = subprocess.run(
        ["sh", str(script), str(influx), str(grafana)], capture_output=True, text=True, check=True
    )
    files = {
        influx / "influxdb-admin-password": (0o400, 0, 0),
        influx / "influxdb-admin-token": (0o440, 0, 10001),
        grafana / "grafana-admin-password": (0o400, 10001, 10001),
    }
    first = {}
    for path, (mode, uid, gid) in files.items():
        info = path.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, uid, gid), path
        first[path] = path.read_text()
        assert len(first[path]) >= 32 and first[path].isalnum()
        assert first[path] not in run.stdout
    assert len(set(first.values())) == 3
    subprocess.run(["sh", str(script), str(influx), str(grafana)], check=True, capture_output=True)
    assert {p: p.read_text() for p in files} == first  # never replaced


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no Docker CLI with the compose plugin here",
)
def test_docker_compose_config_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "--profile", "demo", "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
