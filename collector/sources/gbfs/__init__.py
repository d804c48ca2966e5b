"""Bike-share station availability from GBFS feeds: ``parse`` (pure parsers of each document
and its real-world quirks) and ``system`` (one system polled, with what it keeps between polls).
"""

from collector.sources.gbfs.parse import (
    Catalog,
    Snapshot,
    load_document,
    parse_discovery,
    parse_station_information,
    parse_station_status,
    parse_timestamp,
    parse_vehicle_types,
)
from collector.sources.gbfs.system import GbfsSystem, Poll, PollOutcome

__all__ = [
    "Catalog",
    "GbfsSystem",
    "Poll",
    "PollOutcome",
    "Snapshot",
    "load_document",
    "parse_discovery",
    "parse_station_information",
    "parse_station_status",
    "parse_timestamp",
    "parse_vehicle_types",
]
