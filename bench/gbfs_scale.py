"""One collector polling M bike-share systems at ttl 60 into a real InfluxDB 1.x.

A feed server (its own process, so its CPU is not the collector's) answers for M systems of
realistic sizes (most under 150 stations, a few over 2,000: seeded), each a GBFS 2.3
``gbfs.json``, ``station_information`` and ``station_status`` with ``ttl`` 60 and a new
``last_updated`` on every request. The collector runs as it runs in production
(``collector run`` with ``interval_secs = 60``), writing to Debian's ``influxd`` started here
with ``max-values-per-tag = 0`` (unlimited: the default 100,000 is met near 700 systems).

Measured:
- on time: the gaps between two ``station_status`` requests of one system, as the server saw
  them, within 10% of 60 s (54-66 s); slots missed are gaps of ~120 s or more;
- first round: seconds from the collector's start until every system had been polled once;
- the collector's CPU (cores, from /proc user+system time), peak RSS, threads, file
  descriptors (sampled every 2 s), and log lines: "connection pool is full", write_rejected.

Run (never alongside another benchmark, on a machine otherwise idle):
    flock /tmp/livestack-bench.lock .venv/bin/python bench/gbfs_scale.py --systems 1520 --secs 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import InfluxD, free_port  # noqa: E402  (after the path above)

INTERVAL_SECS = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sizes(systems: int, seed: int) -> list[int]:
    """Stations per system: ~80% small (5-150), ~17% mid (150-800), ~3% large (2,000-3,500);
    about 150 on average, as in the world catalogue (~225,000 station ids over 1,520)."""
    rng = random.Random(seed)
    out = []
    for _ in range(systems):
        r = rng.random()
        if r < 0.80:
            out.append(rng.randint(5, 150))
        elif r < 0.97:
            out.append(rng.randint(150, 500))
        else:
            out.append(rng.randint(2000, 3500))
    return out


def serve(port: int, systems: int, seed: int, log_path: str) -> None:
    """The feed server (run in a child process): answers until SIGTERM, then writes its
    request log (system, epoch seconds of each station_status request) to ``log_path``."""
    counts = sizes(systems, seed)
    info: list[bytes] = []
    status: list[bytes] = []
    for i, n in enumerate(counts):
        ids = [f"s{i}-{j}" for j in range(n)]
        info.append(
            json.dumps(
                {
                    "last_updated": 1_700_000_000,
                    "ttl": 3600,
                    "version": "2.3",
                    "data": {
                        "stations": [
                            {
                                "station_id": sid,
                                "name": f"Station {sid}",
                                "lat": 59.9 + j * 1e-4,
                                "lon": 10.7 + j * 1e-4,
                                "capacity": 20,
                            }
                            for j, sid in enumerate(ids)
                        ]
                    },
                }
            ).encode()
        )
        status.append(
            json.dumps(
                [
                    {
                        "station_id": sid,
                        "num_bikes_available": j % 20,
                        "num_docks_available": 20 - j % 20,
                        "is_installed": True,
                        "is_renting": True,
                        "is_returning": True,
                        "last_reported": 1_700_000_000,
                    }
                    for j, sid in enumerate(ids)
                ]
            ).encode()
        )
    seen: dict[int, list[float]] = defaultdict(list)
    base = f"http://127.0.0.1:{port}"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")
            now = time.time()
            try:
                i, feed = int(parts[1]), parts[2]
                if feed == "gbfs.json":
                    feeds = [
                        {"name": name, "url": f"{base}/s/{i}/{name}.json"}
                        for name in ("station_information", "station_status")
                    ]
                    body = json.dumps(
                        {
                            "last_updated": int(now),
                            "ttl": 60,
                            "version": "2.3",
                            "data": {"en": {"feeds": feeds}},
                        }
                    ).encode()
                elif feed == "station_information.json":
                    body = info[i]
                elif feed == "station_status.json":
                    seen[i].append(now)
                    body = (
                        b'{"last_updated":%d,"ttl":60,"version":"2.3","data":{"stations":'
                        % int(now)
                        + status[i]
                        + b"}}"
                    )
                else:
                    raise ValueError(feed)
            except (ValueError, IndexError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    Path(log_path).write_text(json.dumps({str(k): v for k, v in seen.items()}))


def sample(pid: int) -> tuple[float, int, int, int]:
    """CPU seconds (user+system), RSS bytes, threads, open file descriptors of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    threads = int(fields[17])
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return cpu, rss, threads, fds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", type=int, default=100)
    parser.add_argument("--secs", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--code",
        type=Path,
        help="run the collector from this source tree (e.g. an older commit, `git archive`d)",
    )
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.systems, args.seed, args.serve[1])
        return

    work = Path(tempfile.mkdtemp(prefix="gbfs-scale-"))
    influx = InfluxD(work / "influxd", data_options="max-values-per-tag = 0")
    (work / "influxd").mkdir()
    influx.start()
    port = free_port()
    request_log = work / "requests.json"
    server = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--systems",
            str(args.systems),
            "--seed",
            str(args.seed),
            "--serve",
            str(port),
            str(request_log),
        ]
    )
    config = work / "collector.toml"
    systems = "".join(
        f'[[gbfs.systems]]\nname = "sys-{i}"\nurl = "http://127.0.0.1:{port}/s/{i}/gbfs.json"\n'
        f"interval_secs = {INTERVAL_SECS:g}\n"
        for i in range(args.systems)
    )
    config.write_text(
        f'[influxdb]\nurl = "{influx.url}"\napi = "v1"\n[spool]\ndir = "{work}/spool"\n{systems}'
    )
    total_stations = sum(sizes(args.systems, args.seed))
    try:
        time.sleep(1.0)  # the server builds its documents: ~1 s for 1,520 systems
        env = {**os.environ, "COLLECTOR_CONFIG": str(config)}
        if args.code is not None:  # ahead of the editable install's path
            env["PYTHONPATH"] = str(args.code.resolve())
        setup = subprocess.run(
            [str(ROOT / ".venv/bin/collector"), "setup"], env=env, capture_output=True
        )
        if setup.returncode:
            raise SystemExit(setup.stderr.decode())
        log_path = work / "collector.log"
        with log_path.open("wb") as log:
            started = time.time()
            proc = subprocess.Popen(
                [str(ROOT / ".venv/bin/collector"), "run"], env=env, stderr=log, stdout=log
            )
            peak_rss = peak_threads = peak_fds = 0
            cpu_samples: list[tuple[float, float]] = []
            while time.time() - started < args.secs:
                time.sleep(2.0)
                cpu, rss, threads, fds = sample(proc.pid)
                cpu_samples.append((time.time(), cpu))
                peak_rss, peak_threads = max(peak_rss, rss), max(peak_threads, threads)
                peak_fds = max(peak_fds, fds)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
        influx.stop()

    seen = {int(k): v for k, v in json.loads(request_log.read_text()).items()}
    gaps = [b - a for times in seen.values() for a, b in itertools.pairwise(times)]
    on_time = sum(1 for g in gaps if abs(g - INTERVAL_SECS) <= INTERVAL_SECS / 10)
    missed = sum(round(g / INTERVAL_SECS) - 1 for g in gaps if g > INTERVAL_SECS * 1.5)
    firsts = [times[0] for times in seen.values() if times]
    (t0, c0), (t1, c1) = cpu_samples[0], cpu_samples[-1]
    steady = (c1 - c0) / (t1 - t0)
    lines = log_path.read_text(errors="replace")
    result = {
        "systems": args.systems,
        "stations": total_stations,
        "secs": round(args.secs),
        "systems_polled": len(seen),
        "gaps": len(gaps),
        "on_time_share": round(on_time / len(gaps), 4) if gaps else None,
        "slots_missed": missed,
        "first_round_secs": round(max(firsts) - started, 1) if firsts else None,
        "cpu_cores_mean": round(cpu_samples[-1][1] / (cpu_samples[-1][0] - started), 3),
        "cpu_cores_after_first_sample": round(steady, 3),
        "rss_mb_peak": round(peak_rss / 2**20),
        "threads_peak": peak_threads,
        "fds_peak": peak_fds,
        # urllib3's words: "Connection pool is full, discarding connection: ...".
        "pool_full_warnings": lines.lower().count("connection pool is full"),
        "write_rejected": lines.count("write_rejected"),
    }
    systems_lines = [ln for ln in lines.splitlines() if "systems" in ln and "late" in ln]
    result["last_systems_summary"] = systems_lines[-1][-200:] if systems_lines else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
