"""Foot-pressure insoles: ``GET {url}/{patient_id}`` -> six sensor readings with anomaly flags.

``parse_reading`` is pure and strict: a response is written whole or not at all, never half.
``PatientPoller`` does the I/O for one patient on an event loop, with its own keep-alive
connection (``collector.http_async``: a third of the CPU of a thread per patient).

The response carries personal data (names, birth date, disability). It is parsed only to be
dropped, unless ``store_personal_data`` is set; then it goes to the ``patient`` measurement
alone, never into the pressure points.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from collector.contract import FEET, PATIENT, PRESSURE, SENSOR_MAX, SENSORS
from collector.http_async import AsyncFetcher
from collector.lineprotocol import Row, Tags
from collector.retry import Failure
from collector.settings import PressureSettings

if TYPE_CHECKING:  # the archive's replay imports this module's parser
    from collector.archive import Archive

assert PRESSURE.field_names == ("anomaly", "value"), "pressure fields changed: update rows()"
assert PATIENT.field_names == ("birthdate", "disabled", "firstname", "lastname")


@dataclass(frozen=True, slots=True)
class Person:
    firstname: str | None
    lastname: str | None
    birthdate: str | None
    disabled: bool | None


@dataclass(frozen=True, slots=True)
class Reading:
    patient_id: int
    time_ms: int
    values: tuple[int, ...]  # sensor ids 0-5, in SENSORS order
    anomalies: tuple[bool, ...]
    person: Person | None  # only kept when personal data may be stored


def _bad(reason: str, message: str) -> Failure:
    return Failure("schema", message, stage="parse", reason=reason)


def parse_reading(
    body: bytes, patient_id: int, time_ms: int, *, keep_person: bool = False
) -> Reading:
    """One API response. The patient id comes from the URL: the API always says 12."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        start = body[:40].decode("utf-8", "replace")
        raise Failure("not_json", f"not JSON; starts {start!r}", stage="parse") from None
    if type(doc) is not dict or type(doc.get("trace")) is not dict:
        raise _bad("no_trace", "no 'trace' object")
    sensors = doc["trace"].get("sensors")
    if type(sensors) is not list:
        raise _bad("no_sensors", "no 'trace.sensors' list")
    if len(sensors) != len(SENSORS):
        raise _bad("sensor_count", f"expected {len(SENSORS)} sensors, got {len(sensors)}")
    values: list[Any] = [None] * len(SENSORS)
    flags: list[Any] = [None] * len(SENSORS)
    for sensor in sensors:
        if type(sensor) is not dict:
            raise _bad("sensor_type", "a sensor is not an object")
        sensor_id, value, anomaly = sensor.get("id"), sensor.get("value"), sensor.get("anomaly")
        if type(sensor_id) is not int or not 0 <= sensor_id < len(SENSORS):
            raise _bad("sensor_id", f"sensor id {sensor_id!r} is not 0-5")
        if values[sensor_id] is not None:
            raise _bad("sensor_id", f"sensor id {sensor_id} twice")
        if type(value) is not int:
            raise _bad("value_type", f"sensor {sensor_id} value {value!r} is not an integer")
        if not 0 <= value <= SENSOR_MAX:
            raise _bad("value_range", f"sensor {sensor_id} value {value} outside 0-{SENSOR_MAX}")
        if type(anomaly) is not bool:
            raise _bad("anomaly_type", f"sensor {sensor_id} anomaly {anomaly!r} is not a boolean")
        values[sensor_id] = value
        flags[sensor_id] = anomaly
    person = None
    if keep_person:
        disabled = doc.get("disabled")
        firstname, lastname = (
            doc.get(k) if type(doc.get(k)) is str else None for k in ("firstname", "lastname")
        )
        person = Person(
            firstname,
            lastname,
            birthdate=None if doc.get("birthdate") is None else str(doc.get("birthdate")),
            disabled=disabled if type(disabled) is bool else None,
        )
    return Reading(
        patient_id,
        time_ms,
        tuple(values),
        tuple(flags),
        person,
    )


# What a response keeps once personal data is removed: a list of what is allowed, so that a
# field the API adds later (an address, a diagnosis) is left out until someone decides.
NOT_PERSONAL = ("id", "trace")


def without_person(body: bytes) -> bytes | None:
    """``body`` with only the NOT_PERSONAL fields; None when it is not a JSON object (its
    personal parts, if any, cannot be told apart)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict:
        return None
    return orjson.dumps({key: doc[key] for key in NOT_PERSONAL if key in doc})


_TAGS: dict[int, tuple[Tags, ...]] = {}


def sensor_tags(patient_id: int) -> tuple[Tags, ...]:
    """The six series of a patient, built once: rows reuse these tuples."""
    tags = _TAGS.get(patient_id)
    if tags is None:
        tags = _TAGS[patient_id] = tuple(
            (("foot", foot), ("patient_id", str(patient_id)), ("sensor", sensor))
            for sensor, foot in zip(SENSORS, FEET, strict=True)
        )
    return tags


def rows(reading: Reading) -> tuple[list[Row], list[Row]]:
    """(pressure rows: one per sensor, anomaly rows: one per flagged sensor)."""
    tags = sensor_tags(reading.patient_id)
    time_ms = reading.time_ms
    pressure: list[Row] = [
        (tags[i], (reading.anomalies[i], reading.values[i]), time_ms) for i in range(len(SENSORS))
    ]
    anomalies = [row for row, flagged in zip(pressure, reading.anomalies, strict=True) if flagged]
    return pressure, anomalies


def person_row(reading: Reading, person: Person) -> Row:
    """The ``patient`` row of ``person``, who came with ``reading``."""
    return (
        (("patient_id", str(reading.patient_id)),),
        (person.birthdate, person.disabled, person.firstname, person.lastname),
        reading.time_ms,
    )


def patient_url(base: str, patient_id: int) -> str:
    """``{base}/{patient_id}``, keeping a query string (an API key) after the path."""
    parts = urlsplit(base)
    path = f"{parts.path.rstrip('/')}/{patient_id}"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


class PatientPoller:
    """Polls one patient, one poll at a time, on one event loop (its connection is bound to
    that loop: ``close`` there, or after the loop has ended)."""

    def __init__(
        self,
        settings: PressureSettings,
        patient_id: int,
        *,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        archive: Archive | None = None,
    ) -> None:
        assert settings.url is not None
        self._archive = archive
        self.patient_id = patient_id
        self.name = f"patient-{patient_id}"
        self._url = patient_url(settings.url, patient_id)
        self._keep_person = settings.store_personal_data
        self._clock_ms = clock_ms
        self._last_ms = 0
        self._fetcher = AsyncFetcher(
            self._url,
            headers=settings.headers,
            timeout_secs=settings.timeout_secs,
            max_body_bytes=settings.max_body_bytes,
            verify_tls=settings.verify_tls,
        )

    def close(self) -> None:
        self._fetcher.close()

    async def poll(self) -> Reading:
        body = await self._fetcher.get()
        # Receive time, strictly increasing per patient: two readings never share a point.
        time_ms = max(self._clock_ms(), self._last_ms + 1)
        if self._archive is not None:
            kept = body if self._keep_person else without_person(body)
            self._archive.record("pressure", self.name, "reading", self._url, time_ms / 1000, kept)
        reading = parse_reading(body, self.patient_id, time_ms, keep_person=self._keep_person)
        self._last_ms = time_ms
        return reading
