"""A live bike-share system served as GBFS 2.3 (or 3.0): a synthetic city whose bikes move.

Stations sit around a centre; inner ones are "work" places, outer ones "home". Every 10 s of
simulated time riders start trips (more in the morning and evening rush hours: home -> work in
the morning, work -> home in the evening), each taking 4-25 minutes, and dock at their
destination, or at the nearest station with a free dock when it is full. Some bikes break and
are repaired; a few stations are out of service. By construction, at every station
``bikes (incl. e-bikes) + disabled bikes + free docks + disabled docks == capacity``.

Serves ``gbfs.json``, ``system_information``, ``station_information``, ``station_status`` and
``vehicle_types`` (with and without ``.json``), with feed URLs built from the request's Host.
Deterministic for a seed: state advances with the clock from the simulator's start.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STEP_SECS = 10.0
FEEDS = ("system_information", "station_information", "station_status", "vehicle_types")


@dataclass
class _Station:
    id: str
    name: str
    lat: float
    lon: float
    capacity: int
    work: float  # 0 = home, 1 = work: how much the morning rush pulls bikes here
    installed: bool = True
    bikes: int = 0  # all available bikes, e-bikes included
    ebikes: int = 0
    disabled: int = 0
    docks_disabled: int = 0
    last_reported: int = 0

    @property
    def docks(self) -> int:
        return self.capacity - self.bikes - self.disabled - self.docks_disabled


@dataclass(order=True)
class _Trip:
    arrives: float
    destination: int = field(compare=False)
    ebike: bool = field(compare=False)


STREETS = (
    "Storgata",
    "Parkveien",
    "Torggata",
    "Kirkeveien",
    "Sjøgata",
    "Bryggen",
    "Skolegata",
    "Elvebakken",
    "Møllergata",
    "Tollbugata",
    "Grønland",
    "Bjørvika",
)


class GbfsSimulator:
    def __init__(
        self,
        seed: int = 0,
        *,
        stations: int = 300,
        version: str = "2.3",
        clock: Callable[[], float] = time.time,
        epoch: float | None = None,
        utc_offset_hours: float = 1.0,
        trips_per_station_hour: float = 1.5,
    ) -> None:
        if version not in ("2.3", "3.0"):
            raise ValueError("version must be 2.3 or 3.0")
        if stations < 1:
            raise ValueError(f"stations must be at least 1, not {stations}")
        self.version = version
        self.clock = clock
        self.epoch = clock() if epoch is None else epoch
        self._offset = utc_offset_hours * 3600
        self._rng = random.Random(seed)
        self._trip_rate = trips_per_station_hour * stations * STEP_SECS / 3600
        self._t = 0.0
        self._trips: list[_Trip] = []
        self._lock = threading.Lock()
        self.stations = [self._make_station(i) for i in range(stations)]

    def _make_station(self, i: int) -> _Station:
        rng = self._rng
        radius = 0.05 * math.sqrt(rng.random())  # degrees, about 5 km
        angle = rng.uniform(0, 2 * math.pi)
        capacity = rng.choice((12, 15, 18, 20, 24, 30, 36))
        station = _Station(
            id=str(1000 + i),
            name=f"{rng.choice(STREETS)} {rng.randint(1, 120)}",
            lat=round(59.91 + radius * math.sin(angle), 6),
            lon=round(10.75 + 2 * radius * math.cos(angle), 6),
            capacity=capacity,
            work=max(0.0, 1.0 - radius / 0.03),
            installed=rng.random() > 0.02,
            last_reported=int(self.epoch),
        )
        station.docks_disabled = 1 if rng.random() < 0.05 else 0
        station.bikes = rng.randint(0, capacity - station.docks_disabled)
        station.ebikes = sum(1 for _ in range(station.bikes) if rng.random() < 0.3)
        return station

    # -- simulation
    def _rush(self, t: float) -> float:
        hour = ((self.epoch + t + self._offset) / 3600) % 24
        morning = math.exp(-((hour - 8) ** 2) / 2)
        evening = math.exp(-((hour - 17) ** 2) / 2)
        return morning - evening  # > 0: towards work, < 0: towards home

    def _pick(self, weights: list[float]) -> int | None:
        total = sum(weights)
        if total <= 0:
            return None
        u = self._rng.random() * total
        for i, w in enumerate(weights):
            u -= w
            if u <= 0:
                return i
        return len(weights) - 1

    def _step(self) -> None:
        rng, t = self._rng, self._t
        stations = self.stations
        rush = self._rush(t)
        rate = self._trip_rate * (0.3 + 2.5 * abs(rush) + 0.4 * (1 - abs(rush)))
        starts = int(rate) + (1 if rng.random() < rate - int(rate) else 0)
        for _ in range(starts):
            # Riders leave home in the morning and work in the evening.
            pull = [
                s.bikes * (1 + 3 * max(0.0, rush) * (1 - s.work) + 3 * max(0.0, -rush) * s.work)
                if s.installed
                else 0.0
                for s in stations
            ]
            origin = self._pick(pull)
            if origin is None:
                break
            station = stations[origin]
            ebike = rng.random() < station.ebikes / station.bikes
            station.bikes -= 1
            station.ebikes -= ebike
            station.last_reported = int(self.epoch + t)
            attract = [
                (1 + 3 * max(0.0, rush) * s.work + 3 * max(0.0, -rush) * (1 - s.work))
                if s.installed
                else 0.0
                for s in stations
            ]
            destination = self._pick(attract)
            self._trips.append(_Trip(t + rng.uniform(240, 1500), destination or 0, ebike))
        arriving = [trip for trip in self._trips if trip.arrives <= t]
        self._trips = [trip for trip in self._trips if trip.arrives > t]
        for trip in arriving:
            target = stations[trip.destination]
            if target.docks <= 0:  # full: the rider goes to the nearest station with room
                free = [s for s in stations if s.installed and s.docks > 0]
                if not free:
                    trip.arrives = t + 60
                    self._trips.append(trip)
                    continue
                target = min(
                    free, key=lambda s: (s.lat - target.lat) ** 2 + (s.lon - target.lon) ** 2
                )
            if rng.random() < 0.01:
                target.disabled += 1  # broken on the way
            else:
                target.bikes += 1
                target.ebikes += trip.ebike
            target.last_reported = int(self.epoch + t)
        for station in stations:  # repairs
            if station.disabled and rng.random() < 0.002:
                station.disabled -= 1
                if station.docks > 0:
                    station.bikes += 1
        self._t += STEP_SECS

    def advance(self) -> float:
        """Run the city up to the clock; returns the simulated time reached (epoch seconds)."""
        with self._lock:
            target = self.clock() - self.epoch
            while self._t + STEP_SECS <= target:
                self._step()
            return self.epoch + self._t

    # -- documents
    def _text(self, value: str) -> Any:
        return [{"text": value, "language": "en"}] if self.version == "3.0" else value

    def _stamp(self, epoch: float) -> Any:
        if self.version == "3.0":
            return datetime.fromtimestamp(int(epoch), UTC).isoformat().replace("+00:00", "Z")
        return int(epoch)

    def document(self, feed: str, base_url: str) -> dict[str, Any]:
        now = self.advance()
        if feed == "gbfs":
            feeds = [{"name": name, "url": f"{base_url}/{name}.json"} for name in FEEDS]
            data: dict[str, Any] = (
                {"feeds": feeds} if self.version == "3.0" else {"en": {"feeds": feeds}}
            )
        elif feed == "system_information":
            data = {
                "system_id": "livestack_sim",
                "language": "en",
                "languages": ["en"],
                "name": self._text("Livestack City Bikes (simulated)"),
                "timezone": "Europe/Oslo",
                "opening_hours": "24/7",
            }
        elif feed == "vehicle_types":
            data = {
                "vehicle_types": [
                    {
                        "vehicle_type_id": "bike",
                        "form_factor": "bicycle",
                        "propulsion_type": "human",
                        "name": self._text("City bike"),
                    },
                    {
                        "vehicle_type_id": "ebike",
                        "form_factor": "bicycle",
                        "propulsion_type": "electric_assist",
                        "max_range_meters": 60000,
                        "name": self._text("E-bike"),
                    },
                ]
            }
        elif feed == "station_information":
            data = {
                "stations": [
                    {
                        "station_id": s.id,
                        "name": self._text(s.name),
                        "lat": s.lat,
                        "lon": s.lon,
                        "capacity": s.capacity,
                    }
                    for s in self.stations
                ]
            }
        else:
            with self._lock:
                data = {"stations": [self._status(s) for s in self.stations]}
        return {"last_updated": self._stamp(now), "ttl": 10, "version": self.version, "data": data}

    def _status(self, s: _Station) -> dict[str, Any]:
        available = "num_vehicles_available" if self.version == "3.0" else "num_bikes_available"
        disabled = "num_vehicles_disabled" if self.version == "3.0" else "num_bikes_disabled"
        return {
            "station_id": s.id,
            available: s.bikes if s.installed else 0,
            disabled: s.disabled,
            "num_docks_available": s.docks if s.installed else 0,
            "num_docks_disabled": s.docks_disabled,
            "vehicle_types_available": [
                {"vehicle_type_id": "bike", "count": (s.bikes - s.ebikes) if s.installed else 0},
                {"vehicle_type_id": "ebike", "count": s.ebikes if s.installed else 0},
            ],
            "is_installed": s.installed,
            "is_renting": s.installed,
            "is_returning": s.installed,
            "last_reported": self._stamp(s.last_reported),
        }

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        name = environ.get("PATH_INFO", "/").strip("/").removesuffix(".json")
        if name not in ("gbfs", *FEEDS):
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"error": "not found"}']
        host = environ.get("HTTP_HOST") or f"{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"
        body = json.dumps(self.document(name, f"http://{host}"), ensure_ascii=False).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]
