"""The one settings tree: a TOML file, with every key overridable from the environment.

``COLLECTOR_INFLUXDB__URL`` overrides ``[influxdb] url``; lists such as ``gbfs.systems`` take
JSON (``COLLECTOR_GBFS__SYSTEMS='[{"name": "oslo", "url": "..."}]'``). Unknown keys are errors,
so a typo fails at start-up instead of being ignored.
"""

from __future__ import annotations

import json
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from collector.contract import (
    ANOMALIES_BUCKET,
    BIKES_1H_BUCKET,
    BIKES_BUCKET,
    BUCKETS,
    COLLECTOR_BUCKET,
    PRESSURE_1M_BUCKET,
    PRESSURE_BUCKET,
    TRIPS_BUCKET,
)
from collector.shard import Shard

CONFIG_ENV = "COLLECTOR_CONFIG"

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ConfigError(Exception):
    """Configuration that cannot be used; the message names every bad key."""


# The folder of the config file being loaded: relative paths in it are relative to it, as
# a user who writes `token_file = "secrets/token"` next to the file expects, wherever the
# collector is started from.
_CONFIG_DIR: ContextVar[Path | None] = ContextVar("config_dir", default=None)


def _beside_config(value: object) -> object:
    base = _CONFIG_DIR.get()
    if base is not None and isinstance(value, str | Path) and str(value):
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    return value


ConfigPath = Annotated[Path, BeforeValidator(_beside_config)]


def _http_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/") if parts.path in ("", "/") else value


def _read_secret(value: SecretStr | None, path: Path | None) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from exc
    return None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InfluxDBSettings(_Section):
    url: str = "http://127.0.0.1:8086"
    # v3: InfluxDB 3 Core and Enterprise (one HTTP API; `org` unused, the token a Bearer one).
    api: Literal["v1", "v2", "v3"] = "v2"
    org: str = "city"
    token: SecretStr | None = None
    token_file: ConfigPath | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: ConfigPath | None = None
    retention_policy: str | None = Field(
        default=None, description="v1 only: retention policy to write to (default if unset)"
    )
    # With the 4 s shutdown grace, keeps a SIGTERM'ed collector inside Docker's 10 s.
    timeout_secs: float = Field(default=5.0, gt=0, le=300)
    batch_lines: int = Field(default=5000, ge=1, le=5000)
    gzip_level: int = Field(default=1, ge=0, le=9)
    max_retries: int = Field(default=5, ge=0, le=100)
    retry_base_secs: float = Field(default=1.0, gt=0)
    retry_max_secs: float = Field(default=30.0, gt=0)
    verify_tls: bool = True

    _check_url = field_validator("url")(classmethod(lambda cls, v: _http_url(v)))

    @field_validator("token_file", "password_file")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path

    @model_validator(mode="after")
    def _one_source_per_secret(self) -> Self:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self

    def resolved_token(self) -> str | None:
        return _read_secret(self.token, self.token_file)

    def resolved_password(self) -> str | None:
        return _read_secret(self.password, self.password_file)


class GbfsSystemSettings(_Section):
    name: Name
    url: str | None = Field(default=None, description="the system's gbfs.json")
    station_information_url: str | None = None
    station_status_url: str | None = None
    vehicle_types_url: str | None = None
    language: str | None = Field(default=None, description="feed language; first one if unset")
    headers: dict[str, str] = Field(default_factory=dict)
    interval_secs: float = Field(default=15.0, ge=1, le=86_400)
    max_ttl_secs: float = Field(
        default=300.0,
        ge=0,
        description="a feed's ttl is honoured up to this; GBFS data should be under 5 min old",
    )
    info_refresh_secs: float = Field(default=3600.0, ge=10, le=86_400)
    timeout_secs: float = Field(default=10.0, gt=0, le=300)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    verify_tls: bool = True

    _check_urls = field_validator(
        "url", "station_information_url", "station_status_url", "vehicle_types_url"
    )(classmethod(lambda cls, v: _http_url(v)))

    @model_validator(mode="after")
    def _where_to_look(self) -> Self:
        direct = self.station_information_url is not None or self.station_status_url is not None
        if self.url is None and not direct:
            raise ValueError(
                "give url (gbfs.json), or station_information_url and station_status_url"
            )
        if self.url is None and self.station_status_url is None:
            raise ValueError("station_status_url is required when url is not given")
        if self.url is not None and direct:
            raise ValueError("give url or the direct feed URLs, not both")
        return self


class GbfsSettings(_Section):
    systems: list[GbfsSystemSettings] = Field(default_factory=list)
    shard: str | None = Field(
        default=None, description='"K/N": this replica polls its share of the systems'
    )

    @field_validator("shard")
    @classmethod
    def _shard_form(cls, shard: str | None) -> str | None:
        if shard is not None:
            Shard.parse(shard)  # raises ValueError, named as this key
        return shard

    def assigned(self) -> list[GbfsSystemSettings]:
        """The systems this replica polls: all, or its shard's (``collector.shard``)."""
        if self.shard is None:
            return list(self.systems)
        shard = Shard.parse(self.shard)
        return [system for system in self.systems if shard.owns(system.name)]

    @field_validator("systems")
    @classmethod
    def _unique_names(cls, systems: list[GbfsSystemSettings]) -> list[GbfsSystemSettings]:
        seen: set[str] = set()
        for system in systems:
            if system.name in seen:
                raise ValueError(f"system name {system.name!r} is used twice")
            seen.add(system.name)
        return systems


class PressureSettings(_Section):
    url: str | None = Field(default=None, description="the insole API; unset = not polled")
    patients: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    interval_secs: float = Field(default=0.3, ge=0.05, le=3600)
    store_personal_data: bool = Field(
        default=False, description="names and birth dates; only into the 'patient' measurement"
    )
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_secs: float = Field(default=2.0, gt=0, le=60)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    verify_tls: bool = True
    flush_interval_secs: float = Field(
        default=1.0, gt=0, le=60, description="readings are written in batches this often"
    )

    _check_url = field_validator("url")(classmethod(lambda cls, v: _http_url(v)))

    @field_validator("patients")
    @classmethod
    def _unique_patients(cls, patients: list[int]) -> list[int]:
        if len(set(patients)) != len(patients):
            raise ValueError("a patient id is listed twice")
        return patients


class BucketSettings(_Section):
    name: Name
    retention_hours: float = Field(ge=0, description="0 = forever; else at least 1 (InfluxDB)")

    @field_validator("retention_hours")
    @classmethod
    def _at_least_an_hour(cls, hours: float) -> float:
        if 0 < hours < 1:
            raise ValueError("InfluxDB keeps data at least 1 hour: use 0 (forever) or >= 1")
        return hours


def _bucket(logical: str) -> Any:
    return Field(
        default_factory=lambda: BucketSettings(name=logical, retention_hours=BUCKETS[logical])
    )


class BucketsSettings(_Section):
    """Name and retention of each bucket (v2) or database (v1), by its name in the contract."""

    bikes: BucketSettings = _bucket(BIKES_BUCKET)
    pressure: BucketSettings = _bucket(PRESSURE_BUCKET)
    anomalies: BucketSettings = _bucket(ANOMALIES_BUCKET)
    collector: BucketSettings = _bucket(COLLECTOR_BUCKET)
    bikes_1h: BucketSettings = _bucket(BIKES_1H_BUCKET)
    pressure_1m: BucketSettings = _bucket(PRESSURE_1M_BUCKET)
    trips: BucketSettings = _bucket(TRIPS_BUCKET)

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_key(cls, data: Any) -> Any:
        # `[buckets.bikes] retention_hours = 0` alone must keep the name "bikes" and the
        # retention given; an omitted retention keeps the contract's default.
        if not isinstance(data, dict):
            return data
        filled = {}
        for key, value in data.items():
            if isinstance(value, dict) and key in BUCKETS:
                value = {"name": key, "retention_hours": BUCKETS[key], **value}
            filled[key] = value
        return filled

    def of(self, logical: str) -> BucketSettings:
        bucket: BucketSettings = getattr(self, logical)
        return bucket

    def names(self) -> dict[str, str]:
        """Contract name -> configured name."""
        return {logical: self.of(logical).name for logical in BUCKETS}

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        names = list(self.names().values())
        if len(set(names)) != len(names):
            raise ValueError("two buckets have the same name")
        return self


class SetupSettings(_Section):
    """What ``collector setup`` creates besides buckets."""

    writer_token_file: ConfigPath | None = Field(
        default=None,
        description="v2, v3 Enterprise: write-only token for the collector, created once",
    )
    reader_token_file: ConfigPath | None = Field(
        default=None,
        description="v2, v3 Enterprise: read-only token for Grafana, created once",
    )
    task_offset_secs: int = Field(
        default=300, ge=0, le=3600, description="downsampling runs this late, for late data"
    )
    downsample_lookback_hours: float = Field(
        default=3,
        ge=0,
        le=7 * 24,
        description="each downsampling run recomputes this much (whole intervals, at least "
        "two): data up to this minus one interval late (a drained spool's) is aggregated too",
    )
    v1_retention_policy: str = Field(
        default="autogen", description="v1: the default retention policy given each duration"
    )


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "livestack-collector"


class SpoolSettings(_Section):
    """Batches the database cannot take now wait on disk here, in order, until it can."""

    enabled: bool = True
    dir: ConfigPath = Field(default_factory=lambda: _state_dir() / "spool")
    max_mb: float = Field(default=512, gt=0, description="when full, the oldest batches go")
    dead_letter_max_mb: float = Field(default=64, gt=0)


class ArchiveSettings(_Section):
    """Every raw response fetched, compressed, one file per source per hour; off unless
    ``dir`` is set. Oldest files go first when past ``retention_days`` or ``max_bytes``."""

    dir: ConfigPath | None = Field(default=None, description="where the archive lives; unset = off")
    retention_days: float = Field(default=14, gt=0, le=3660)
    max_bytes: int = Field(default=20 * 1024**3, ge=1024**2)


class GrafanaSettings(_Section):
    """What `collector dashboards` puts into the provisioning files."""

    org: str = "city"
    influxdb_url_env: str = Field(
        default="INFLUXDB_URL", description="env var (in Grafana) holding InfluxDB's URL"
    )
    reader_token_file: str = Field(
        default="/run/tokens/reader/influxdb-reader-token",
        description="InfluxDB 2.x (and 3.x): path (in Grafana) of the read-only token "
        "`collector setup` wrote",
    )
    # InfluxDB 1.x has users, not tokens: Grafana's read-only user is its own, never the
    # collector's `[influxdb] username` (a writer), and its password is no token.
    reader_username: str | None = Field(
        default=None,
        description="InfluxDB 1.x: the read-only user Grafana logs in as; unset: no "
        "authentication (a 1.x server with auth-enabled = false)",
    )
    reader_password_file: str = Field(
        default="/run/secrets/influxdb-reader-password",
        description="InfluxDB 1.x: path (in Grafana) of reader_username's password file",
    )
    webhook_url_env: str = Field(
        default="ALERT_WEBHOOK_URL", description="env var (in Grafana) holding the webhook URL"
    )
    empty_station_share: float = Field(
        default=0.25, gt=0, le=1, description="alert above this share of empty stations"
    )
    empty_station_for_mins: int = Field(default=30, ge=1)
    feed_stale_secs: float = Field(default=300, ge=60)
    collector_silent_secs: int = Field(default=120, ge=30)
    timezone: str = Field(
        default="browser",
        description="IANA zone of the systems (e.g. Europe/Oslo) for hour-of-week profiles; "
        "browser = the viewer's",
    )

    @field_validator("influxdb_url_env", "webhook_url_env")
    @classmethod
    def _env_name(cls, name: str) -> str:
        if not name.isidentifier():
            raise ValueError("must be an environment variable name")
        return name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COLLECTOR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    telemetry_interval_secs: float = Field(
        default=10.0, ge=1, le=3600, description="how often the collector's own metrics are written"
    )
    influxdb: InfluxDBSettings = Field(default_factory=InfluxDBSettings)
    gbfs: GbfsSettings = Field(default_factory=GbfsSettings)
    pressure: PressureSettings = Field(default_factory=PressureSettings)
    buckets: BucketsSettings = Field(default_factory=BucketsSettings)
    setup: SetupSettings = Field(default_factory=SetupSettings)
    grafana: GrafanaSettings = Field(default_factory=GrafanaSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    archive: ArchiveSettings = Field(default_factory=ArchiveSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load(path: str | Path | None = None) -> Settings:
    """Settings from ``path`` (or ``$COLLECTOR_CONFIG``) and the environment.

    Raises ConfigError naming each bad key, so the process stops before any job starts.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    token = _CONFIG_DIR.set(path.resolve().parent if path is not None else None)
    try:
        return _FromFile()
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except SettingsError as exc:
        raise ConfigError(_describe_env(exc) or f"{path}: {exc}") from None
    except ValueError as exc:  # TOML syntax errors arrive as ValueError subclasses
        raise ConfigError(f"{path}: {exc}") from None
    finally:
        _CONFIG_DIR.reset(token)


def _env_variable(loc: tuple[int | str, ...]) -> str | None:
    """The COLLECTOR_* variable that set the value at ``loc`` (or a list holding it)."""
    environ = {name.upper(): name for name in os.environ}
    parts = [str(part) for part in loc if isinstance(part, str)]
    for end in range(len(parts), 0, -1):
        name = "COLLECTOR_" + "__".join(parts[:end]).upper()
        if name in environ:
            return environ[name]
    return None


def _describe_env(exc: SettingsError) -> str | None:
    """A bad environment override, named: pydantic-settings names only the field."""
    match = re.search(r'field "([^"]+)" from source "EnvSettingsSource"', str(exc))
    if match is None:
        return None
    prefix = f"COLLECTOR_{match.group(1)}".upper()
    names = sorted(name for name in os.environ if name.upper().startswith(prefix))
    bad = []
    for name in names:
        value = os.environ[name].strip()
        if value[:1] in "[{":
            try:
                json.loads(value)
            except ValueError as error:
                bad.append(f"environment variable {name}: not valid JSON ({error})")
    return "\n".join(bad) or f"environment variable {' or '.join(names) or prefix}: {exc}"


def _describe(exc: ValidationError, path: Path | None) -> str:
    lines, from_file = [], False
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        variable = _env_variable(error["loc"])
        if variable:
            key = f"{key} (environment variable {variable})"
        else:
            from_file = True
        lines.append(f"  {key}: {message}")
    where = f" in {path}" if path and from_file else ""
    lines.insert(0, f"invalid configuration{where}:")
    return "\n".join(lines)
