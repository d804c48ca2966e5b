"""One GBFS poll, bytes -> parsed -> line protocol bytes, on a 2,000-station status payload.

Three pipelines measured side by side in one run, interleaved so that machine noise hits all
of them alike:

- project: ``parse_station_status`` (validation, quirks, quality counts) + ``Encoder`` (full
  escaping, byte-identical to influxdb-client's Point);
- naive:   ``json.loads`` + one ``influxdb_client.Point`` per station + ``to_line_protocol()``;
- floor:   ``orjson.loads`` + one bare f-string per station with the same fields, no
  validation and no escaping: the least work that produces the same bytes for clean input.

Run: python bench/gbfs_poll.py [--stations 2000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable

import orjson
from influxdb_client import Point

from collector.contract import STATION_STATUS
from collector.lineprotocol import Encoder
from collector.sources.gbfs import parse_station_information, parse_station_status

NOW = 1_700_000_100


def payloads(n: int, seed: int = 1) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    info, status = [], []
    for i in range(n):
        sid = f"{rng.randrange(10**8):08d}-{i}"
        capacity = rng.randint(10, 60)
        bikes = rng.randint(0, capacity)
        ebikes = rng.randint(0, bikes)
        info.append(
            {
                "station_id": sid,
                "name": f"{rng.choice(['Main St', 'Park Ave', 'Quai', 'Torget'])} & {i} Street",
                "lat": round(40 + rng.random(), 8),
                "lon": round(-74 + rng.random(), 8),
                "capacity": capacity,
            }
        )
        status.append(
            {
                "station_id": sid,
                "num_bikes_available": bikes,
                "num_ebikes_available": ebikes,
                "num_bikes_disabled": rng.randint(0, 2),
                "num_docks_available": capacity - bikes,
                "num_docks_disabled": 0,
                "is_installed": True,
                "is_renting": True,
                "is_returning": rng.random() > 0.05,
                "last_reported": NOW - rng.randint(0, 600),
            }
        )
    wrap = lambda stations: json.dumps(  # noqa: E731
        {"last_updated": NOW, "ttl": 10, "version": "2.3", "data": {"stations": stations}}
    ).encode()
    return wrap(info), wrap(status)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    info_body, status_body = payloads(args.stations)
    catalog = parse_station_information(info_body, "bench")
    facts = {s["station_id"]: s for s in json.loads(info_body)["data"]["stations"]}
    encoder = Encoder(STATION_STATUS)

    def project() -> bytes:
        snapshot = parse_station_status(status_body, "bench", catalog, NOW)
        lines, _ = encoder.lines(snapshot.rows)
        return ("\n".join(lines) + "\n").encode()

    def naive() -> bytes:
        doc = json.loads(status_body)
        ts = doc["last_updated"]
        out = []
        for s in doc["data"]["stations"]:
            f = facts.get(s["station_id"], {})
            p = (
                Point("station_status")
                .tag("system", "bench")
                .tag("station_id", s["station_id"])
                .field("bikes_available", s["num_bikes_available"])
                .field("bikes_disabled", s["num_bikes_disabled"])
                .field("capacity", f.get("capacity"))
                .field("docks_available", s["num_docks_available"])
                .field("docks_disabled", s["num_docks_disabled"])
                .field("ebikes_available", s["num_ebikes_available"])
                .field("is_installed", bool(s["is_installed"]))
                .field("is_renting", bool(s["is_renting"]))
                .field("is_returning", bool(s["is_returning"]))
                .field("last_reported", s["last_reported"])
                .field("lat", f.get("lat"))
                .field("lon", f.get("lon"))
                .field("name", f.get("name"))
                .time(ts, "s")
            )
            out.append(p.to_line_protocol())
        return ("\n".join(out) + "\n").encode()

    def floor() -> bytes:
        doc = orjson.loads(status_body)
        ts = doc["last_updated"]
        tf = {True: "true", False: "false"}
        out = []
        for s in doc["data"]["stations"]:
            f = facts[s["station_id"]]
            out.append(
                f"station_status,station_id={s['station_id']},system=bench "
                f"bikes_available={s['num_bikes_available']}i,"
                f"bikes_disabled={s['num_bikes_disabled']}i,capacity={f['capacity']}i,"
                f"docks_available={s['num_docks_available']}i,"
                f"docks_disabled={s['num_docks_disabled']}i,"
                f"ebikes_available={s['num_ebikes_available']}i,"
                f"is_installed={tf[s['is_installed']]},is_renting={tf[s['is_renting']]},"
                f"is_returning={tf[s['is_returning']]},last_reported={s['last_reported']}i,"
                f'lat={f["lat"]},lon={f["lon"]},name="{f["name"]}" {ts}'
            )
        return ("\n".join(out) + "\n").encode()

    # Same bytes from all three, or the comparison means nothing.
    reference = project()
    assert naive() == reference, "naive output differs"
    assert floor() == reference, "floor output differs"

    cold_encoder_start = time.perf_counter()
    fresh = Encoder(STATION_STATUS)
    fresh.lines(parse_station_status(status_body, "bench", catalog, NOW).rows)
    cold_ms = (time.perf_counter() - cold_encoder_start) * 1000

    pipelines: dict[str, Callable[[], bytes]] = {"project": project, "naive": naive, "floor": floor}
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    # As timeit does: garbage collection off while timing, so that a collection triggered by
    # one pipeline's garbage is not charged to whichever pipeline happens to run next.
    gc.collect()
    gc.disable()
    try:
        for _ in range(args.rounds):
            for name, run in pipelines.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    median = {name: statistics.median(t) * 1000 for name, t in times.items()}

    print(
        f"GBFS poll, {args.stations} stations, {len(status_body):,} bytes of JSON -> "
        f"{len(reference):,} bytes of line protocol; median of {args.rounds} interleaved rounds"
    )
    for name in pipelines:
        rate = args.stations / (median[name] / 1000)
        print(f"  {name:8s} {median[name]:8.2f} ms/poll  {rate:12,.0f} stations/s")
    print(f"  project, first poll (cold caches): {cold_ms:.2f} ms")
    print(f"  naive / project = {median['naive'] / median['project']:.1f}x  (target >= 8x)")
    print(f"  project / floor = {median['project'] / median['floor']:.2f}x  (target <= 1.5x)")


if __name__ == "__main__":
    main()
