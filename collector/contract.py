"""The data contract: every bucket, measurement, tag and field the collector writes.

Dashboards, alerts, set-up and tests import these names; nothing else spells them out.
Changing a name here is a breaking change for everyone who queries the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FieldType = Literal["integer", "float", "boolean", "string"]

# Data-quality faults of bike-share feeds (README "Data contract"): the ``result`` of the
# ``quality`` stage in EVENTS, counted per system and logged once per poll.
QUALITY_KINDS = (
    "invalid_station",
    "negative_count",
    "invalid_value",
    "duplicate_station",
    "unknown_station",
    "over_capacity",
    "implausible_last_reported",
)
Precision = Literal["s", "ms", "us", "ns"]


@dataclass(frozen=True)
class Measurement:
    bucket: str
    name: str
    tags: tuple[str, ...]
    fields: dict[str, FieldType]
    precision: Precision
    description: str

    @property
    def field_names(self) -> tuple[str, ...]:
        """Field order of a row's values: sorted, as line protocol writes them."""
        return tuple(sorted(self.fields))


BIKES_BUCKET = "bikes"

STATION_STATUS = Measurement(
    bucket=BIKES_BUCKET,
    name="station_status",
    tags=("station_id", "system"),
    fields={
        "bikes_available": "integer",
        "bikes_disabled": "integer",
        "capacity": "integer",
        "docks_available": "integer",
        "docks_disabled": "integer",
        "ebikes_available": "integer",
        "is_installed": "boolean",
        "is_renting": "boolean",
        "is_returning": "boolean",
        "last_reported": "integer",
        "lat": "float",
        "lon": "float",
        "name": "string",
    },
    precision="s",
    description=(
        "One point per station per status update. Timestamp: the feed's last_updated when "
        "plausible, else the fetch time. Fields are present only where the feed knows them."
    ),
)

PRESSURE_BUCKET = "pressure"
ANOMALIES_BUCKET = "anomalies"

# Sensor ids 0-5 as the insole API numbers them: front (big-toe ball), middle (5th metatarsal),
# heel; left foot first.
SENSORS: tuple[str, ...] = ("L0", "L1", "L2", "R0", "R1", "R2")
FEET: tuple[str, ...] = ("left", "left", "left", "right", "right", "right")
SENSOR_MAX = 1023  # 10-bit; 1023 = saturated, maximum pressure

PRESSURE = Measurement(
    bucket=PRESSURE_BUCKET,
    name="pressure",
    tags=("foot", "patient_id", "sensor"),
    fields={"anomaly": "boolean", "value": "integer"},
    precision="ms",
    description=(
        "One point per sensor per reading, timestamped with the receive time (ms), strictly "
        "increasing per patient so that no reading overwrites another."
    ),
)

ANOMALY = Measurement(
    bucket=ANOMALIES_BUCKET,
    name="anomaly",
    tags=PRESSURE.tags,
    fields=PRESSURE.fields,
    precision="ms",
    description="The pressure points whose sensor the device flagged as anomalous; kept forever.",
)

# Personal data: written only when pressure.store_personal_data is true.
PATIENT = Measurement(
    bucket=PRESSURE_BUCKET,
    name="patient",
    tags=("patient_id",),
    fields={
        "birthdate": "string",
        "disabled": "boolean",
        "firstname": "string",
        "lastname": "string",
    },
    precision="ms",
    description="Who a patient is, as the API says; only with store_personal_data = true.",
)

COLLECTOR_BUCKET = "collector"  # the collector's own metrics
BIKES_1H_BUCKET = "bikes_1h"
PRESSURE_1M_BUCKET = "pressure_1m"
TRIPS_BUCKET = "trips"  # trip history: years old by nature, so kept forever

# Every bucket, with its default retention in hours (0 = forever); settings may change both
# names and retentions.
BUCKETS: dict[str, float] = {
    BIKES_BUCKET: 30 * 24,
    PRESSURE_BUCKET: 24,  # InfluxDB's minimum is 1 hour
    ANOMALIES_BUCKET: 0,  # anomalies are kept forever
    COLLECTOR_BUCKET: 7 * 24,
    BIKES_1H_BUCKET: 2 * 365 * 24,
    PRESSURE_1M_BUCKET: 90 * 24,
    TRIPS_BUCKET: 0,
}


@dataclass(frozen=True)
class Downsample:
    """``functions`` of ``fields`` of ``source`` per ``every``, into ``target``.

    Target fields are named ``<field>_<function>``; the tags are kept. InfluxDB 2 runs it as
    a task, InfluxDB 1 as a continuous query, both generated from this.
    """

    source: Measurement
    target: Measurement
    every: str  # a duration literal valid in both Flux and InfluxQL: "1h", "1m"
    fields: tuple[str, ...]
    functions: tuple[str, ...]

    @property
    def target_fields(self) -> tuple[str, ...]:
        return tuple(f"{field}_{fn}" for field in self.fields for fn in self.functions)


_COUNTS = ("bikes_available", "docks_available", "ebikes_available")

STATION_STATUS_1H = Measurement(
    bucket=BIKES_1H_BUCKET,
    name="station_status",
    tags=STATION_STATUS.tags,
    fields={
        f"{field}_{fn}": "float" if fn == "mean" else "integer"
        for field in sorted(_COUNTS)
        for fn in ("max", "mean", "min")
    },
    precision="s",
    description="Hourly mean, min and max of the station counts, kept for years.",
)

PRESSURE_1M = Measurement(
    bucket=PRESSURE_1M_BUCKET,
    name="pressure",
    tags=PRESSURE.tags,
    fields={"value_max": "integer", "value_mean": "float"},
    precision="s",
    description="Per-minute mean and max of each sensor, kept beyond the raw retention.",
)

DOWNSAMPLES: tuple[Downsample, ...] = (
    Downsample(STATION_STATUS, STATION_STATUS_1H, "1h", _COUNTS, ("mean", "min", "max")),
    Downsample(PRESSURE, PRESSURE_1M, "1m", ("value",), ("mean", "max")),
)

# The collector's own metrics, written every telemetry_interval_secs.
EVENTS = Measurement(
    bucket=COLLECTOR_BUCKET,
    name="events",
    tags=("result", "source", "stage"),
    fields={"count": "integer"},
    precision="s",
    description=(
        "Cumulative count per source (a system, a patient, a bucket), stage (fetch, parse, "
        "write, quality, schedule, anomaly, archive, poll) and result (ok or a small fixed set "
        "of error and quality kinds, collector.telemetry.RESULTS) since the collector started: "
        "use difference(nonNegative: true)."
    ),
)

FEED = Measurement(
    bucket=COLLECTOR_BUCKET,
    name="feed",
    tags=("system",),
    fields={"age_secs": "float", "stations": "integer"},
    precision="s",
    description="Per bike-share system: age of its newest data (feed time) and stations stored.",
)

WRITES = Measurement(
    bucket=COLLECTOR_BUCKET,
    name="writes",
    tags=("bucket",),
    fields={"batches": "integer", "latency_ms_max": "float", "latency_ms_mean": "float"},
    precision="s",
    description="Write requests accepted per bucket since the last report, and their latency.",
)

SPOOL = Measurement(
    bucket=COLLECTOR_BUCKET,
    name="spool",
    tags=(),
    fields={
        "batches": "integer",
        "bytes": "integer",
        "dropped_lines": "integer",
        "lines": "integer",
        "oldest_age_secs": "float",
    },
    precision="s",
    description="What waits on disk for the database; dropped_lines: evicted when full.",
)

# Backfilled minutes are written in seconds (this precision); a live replay stamps each minute
# with the moment it is written, in milliseconds (``replay.LIVE_PRECISION``).
STATION_FLOW = Measurement(
    bucket=TRIPS_BUCKET,
    name="station_flow",
    tags=("station_id", "system"),
    fields={
        "docks": "integer",
        "lat": "float",
        "lon": "float",
        "name": "string",
        "net": "integer",
        "undocks": "integer",
    },
    precision="s",
    description=(
        "Trips replayed from history: per station per minute, bikes taken (undocks) and "
        "returned (docks); net = docks - undocks. Timestamp: the minute (or now, replayed live)."
    ),
)

# What the collector writes (an encoder is compiled for each).
MEASUREMENTS: tuple[Measurement, ...] = (
    STATION_STATUS,
    PRESSURE,
    ANOMALY,
    PATIENT,
    EVENTS,
    FEED,
    WRITES,
    SPOOL,
    STATION_FLOW,
)
