"""The data contract: every bucket, measurement, tag and field the collector writes.

Dashboards, alerts, set-up and tests import these names; nothing else spells them out.
Changing a name here is a breaking change for everyone who queries the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FieldType = Literal["integer", "float", "boolean", "string"]
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

MEASUREMENTS: tuple[Measurement, ...] = (STATION_STATUS,)
