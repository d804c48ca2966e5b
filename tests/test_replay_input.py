"""`collector replay trips` with bad input, without a database, under SIGTERM, and its progress
(issue #12, defects 6, 7 and 8)."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from collector import replay
from collector.sources.trips import Flows, Progress
from tests.support import DATA, FeedServer, MemorySink, Reply, Request, free_port, run_cli, wait_for

NEW_SCHEMA = (DATA / "trips" / "new-schema.csv").read_bytes()
HEADER = NEW_SCHEMA.split(b"\n", 1)[0] + b"\n"


def _truncated_gz() -> bytes:
    whole = gzip.compress(NEW_SCHEMA * 50)
    return whole[: len(whole) // 2]


def _zip_without_csv() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("README.txt", "no trips here")
    return buffer.getvalue()


BAD_FILES = {
    "random.csv": (bytes(range(256)) * 8, "not UTF-8 text"),
    "utf16.csv": (NEW_SCHEMA.decode().encode("utf-16"), "not UTF-8 text"),
    "text.csv.gz": (NEW_SCHEMA, "named .gz but not gzip-compressed"),
    "text.zip": (NEW_SCHEMA, "named .zip but not a zip archive"),
    "truncated.csv.gz": (_truncated_gz(), "truncated or damaged compressed data"),
    "empty.csv": (b"", "empty: no header, no trips"),
    "header-only.csv": (HEADER, "a header and no trips"),
    "no-csv.zip": (_zip_without_csv(), "a zip with no .csv file in it"),
}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "replay.toml"
    path.write_text("")
    return path


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("collector: ")
    return lines[0]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_file_is_one_clear_line_and_exit_2(tmp_path: Path, config: Path, name: str) -> None:
    content, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    result = run_cli("replay", "trips", str(path), "--dry-run", config=config)
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert f"{path}: {reason}" in line
    assert result.stdout == ""  # nothing was written


def test_a_bad_file_among_good_ones_stops_everything_before_writing(
    tmp_path: Path, config: Path
) -> None:
    bad = tmp_path / "b.csv"
    bad.write_bytes(HEADER)
    result = run_cli(
        "replay",
        "trips",
        str(DATA / "trips" / "new-schema.csv"),
        str(bad),
        "--dry-run",
        config=config,
    )
    assert result.returncode == 2 and f"{bad}: a header and no trips" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("option", "named"),
    [
        (["--timezone", "Mars/Olympus"], "--timezone Mars/Olympus: unknown time zone"),
        (["--timezone", "../../etc/passwd"], "--timezone ../../etc/passwd: unknown time zone"),
        (["--speed", "nan"], "--speed nan: must be a finite number above 0"),
        (["--speed", "inf"], "--speed inf: must be a finite number above 0"),
        (["--speed", "0"], "--speed 0.0: must be a finite number above 0"),
        (["--speed", "60", "--shift-to-now"], "--shift-to-now is for backfills"),
    ],
)
def test_a_bad_option_is_one_clear_line_and_exit_2(
    config: Path, option: list[str], named: str
) -> None:
    path = DATA / "trips" / "new-schema.csv"
    result = run_cli("replay", "trips", str(path), *option, "--dry-run", config=config)
    assert result.returncode == 2
    assert named in _one_error_line(result.stderr)


def _flows(path: Path) -> Flows:
    flows = Flows()
    replay.read_flows([path], flows, Progress(), None)
    return flows


def test_a_huge_speed_still_gives_every_minute_its_own_millisecond() -> None:
    flows = _flows(DATA / "trips" / "old-schema.csv")
    sink = MemorySink()
    outcome = replay.live(
        flows, sink, "citibike", 1e12, lambda s: s, clock=lambda: 1_800_000_000.0, sleep=print
    )
    stamps = [int(line.rsplit(" ", 1)[1]) for line in sink.lines()]
    minutes = sorted(set(stamps))
    assert outcome.minutes == len(minutes) == 4
    assert minutes == [1_800_000_000_000 + i for i in range(4)]


# ------------------------------------------------------------------------------ progress


class Ticking:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def big_file(tmp_path: Path, trips: int) -> Path:
    """``trips`` trips, each in its own minute, so that there are 2 x trips rows to write."""
    path = tmp_path / "big.csv"
    with path.open("w") as f:
        f.write(HEADER.decode())
        for i in range(trips):
            day, minute = divmod(i, 1440)
            start = f"2021-02-{1 + day % 28:02d} {minute // 60:02d}:{minute % 60:02d}:10"
            end = f"2021-02-{1 + day % 28:02d} {minute // 60:02d}:{minute % 60:02d}:50"
            f.write(f"R{i},classic_bike,{start},{end},A,JC001,B,JC002,40.7,-74.0,40.8,-74.1,m\n")
    return path


def test_progress_moves_while_reading_and_while_writing_as_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = big_file(tmp_path, 20_000)
    stream = io.StringIO()  # not a terminal: log lines every every_secs
    bar = replay.ProgressLine(stream, clock=Ticking(), every_secs=1.0)
    flows, progress = Flows(), Progress()
    caplog.set_level(logging.INFO, logger="collector.replay")
    replay.read_flows([path], flows, progress, bar)
    replay.backfill(flows, MemorySink(), "jc", lambda s: s, bar=bar)
    events = [r for r in caplog.records if r.getMessage() == "replay_progress"]
    reading = [r for r in events if r.stage == "reading" and not r.final]
    writing = [r for r in events if r.stage == "writing" and not r.final]
    # Offered every 4,096 rows while reading, every 5,000-line batch while writing.
    assert [r.done for r in reading] == sorted({r.done for r in reading}) and len(reading) >= 2
    assert len(writing) >= 2 and writing[0].done < writing[-1].done
    # The bytes are counted as they are read: the ETA is known mid-file.
    assert all(r.eta_secs is not None for r in reading)
    finals = [(r.stage, r.done) for r in events if r.final]
    assert finals == [("reading", 20_001 - 1), ("writing", 40_000)]
    assert stream.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_terminal_line_while_reading(tmp_path: Path) -> None:
    path = big_file(tmp_path, 12_000)
    stream = Terminal()
    bar = replay.ProgressLine(stream, clock=Ticking())
    replay.read_flows([path], Flows(), Progress(), bar)
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) >= 3  # 4,096, 8,192 and the end
    assert frames[0].startswith("reading: rows 4,096  ") and "ETA " in frames[0]
    assert frames[-1].startswith("reading: rows 12,000") and frames[-1].endswith("\n")


# ------------------------------------------------------------ the database: down, or slow


def test_an_unreachable_database_is_named_before_reading(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    config = tmp_path / "down.toml"
    config.write_text(f'[influxdb]\nurl = "http://127.0.0.1:{port}"\napi = "v1"\n')
    result = run_cli("replay", "trips", str(DATA / "trips" / "new-schema.csv"), config=config)
    assert result.returncode == 1
    line = _one_error_line(result.stderr)
    assert f"InfluxDB at http://127.0.0.1:{port} cannot be used" in line
    assert "write_retry" not in result.stderr and "trips_read" not in result.stderr


def _v1_answers(request: Request) -> Reply:
    """What InfluxDB 1.x answers the pre-flight: the database and its default policy."""
    q = parse_qs(request.body.decode())["q"][0]
    if q == "SHOW DATABASES":
        series = {"name": "databases", "columns": ["name"], "values": [["trips"]]}
    else:
        series = {
            "columns": ["name", "duration", "shardGroupDuration", "replicaN", "default"],
            "values": [["autogen", "0s", "168h0m0s", 1, True]],
        }
    body = {"results": [{"statement_id": 0, "series": [series]}]}
    return Reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})


# Three trips: one batch. 20,000 trips: eight batches, two writes in flight, two queued.
@pytest.mark.parametrize("trips", [3, 20_000])
def test_sigterm_stops_a_replay_whose_writes_keep_failing(
    tmp_path: Path, feeds: FeedServer, trips: int
) -> None:
    path = DATA / "trips" / "new-schema.csv" if trips == 3 else big_file(tmp_path, trips)
    in_flight = 1 if trips == 3 else replay.WRITERS
    feeds.routes["/query"] = _v1_answers
    feeds.routes["/write"] = Reply(503, b'{"error": "overloaded"}')
    config = tmp_path / "slow.toml"
    # Long waits between many retries: without a prompt stop, this replay would take minutes.
    config.write_text(
        f'[influxdb]\nurl = "{feeds.url}"\napi = "v1"\nmax_retries = 50\n'
        "retry_base_secs = 20\nretry_max_secs = 60\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "collector.cli",
            "replay",
            "trips",
            str(path),
            "--config",
            str(config),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for(lambda: feeds.hits("/write") >= in_flight, what="the first writes")
        proc.send_signal(signal.SIGTERM)
        # A bound for failure, not a pause: a replay that ignores SIGTERM waits 20 s and more.
        assert proc.wait(timeout=8) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "event=replay_stopped" in line]
    # Each writer's wait ends at the signal; it sends the batch in hand once more at most
    # (collector/sinks/influxdb.py checks the stop before each further wait). Queued batches
    # are never sent, and only the batches in flight are counted, as not confirmed.
    assert feeds.hits("/write") <= 2 * in_flight
    rows = _rows(path)
    unconfirmed = min(rows, in_flight * replay.CHUNK)
    assert f"written=0 not_confirmed={unconfirmed} unsent={rows - unconfirmed} " in line
    assert "re-running the same files is safe" in line


def _rows(path: Path) -> int:
    """The rows a backfill of ``path`` writes, counted from the lines it makes."""
    flows = _flows(path)
    rows = sum(len(lines) for lines, _events in flows.lines("x", replay.CHUNK))
    flows.close()
    return rows


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split(" detail=", 1)[0].split()[1:])


def _go_down_after_first_write(feeds: FeedServer, how: str) -> None:
    """The database stores the first write, then goes away: it stops listening (``refused``:
    what is already accepted is answered 500, as influxd does while it shuts down) or answers
    every later write 503 (``503``: a proxy in front of it)."""
    writes: list[Request] = []
    lock = threading.Lock()  # two writes arrive at once

    def write(request: Request) -> Reply:
        with lock:
            writes.append(request)
            first = len(writes) == 1
        close = {"Connection": "close"}  # every write on a new connection
        if first:
            if how == "refused":
                # From this handler's thread: the accept loop runs on another one.
                feeds.stop()
            return Reply(204, headers=close)
        status = 500 if how == "refused" else 503
        return Reply(status, b'{"error": "shutting down"}', close)

    feeds.routes["/query"] = _v1_answers
    feeds.routes["/write"] = write


@pytest.mark.parametrize("how", ["refused", "503"])
def test_a_replay_gives_up_when_the_database_goes_down_mid_replay(
    tmp_path: Path, feeds: FeedServer, how: str
) -> None:
    path = big_file(tmp_path, 40_000)  # 80,000 rows: 16 batches
    _go_down_after_first_write(feeds, how)
    config = tmp_path / "down.toml"
    config.write_text(
        f'[influxdb]\nurl = "{feeds.url}"\napi = "v1"\nmax_retries = 1\n'
        "retry_base_secs = 0.01\nretry_max_secs = 0.01\n"
    )
    result = run_cli("replay", "trips", str(path), config=config)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "event=replay_gave_up" in line]
    assert "level=error" in line
    fields = _fields(line)
    assert fields["error"] == ("connection" if how == "refused" else "http_5xx")
    written, unconfirmed, unsent = (
        int(fields[key]) for key in ("written", "not_confirmed", "unsent")
    )
    assert written == replay.CHUNK  # the first write, stored
    assert written + unconfirmed + unsent == 80_000 == _rows(path)
    assert "the database is unreachable: 3 batches in a row failed after every retry" in line
    assert f"{written:,} rows written, {unconfirmed:,} not confirmed" in line
    assert f"{unsent:,} not sent; re-running the same files is safe" in line
    # It gave up after three failed batches, with the batches made by then: not after all 16.
    # The writer logs each batch it gives up on; the server sees those it could reach (the
    # same gzipped bytes at every attempt).
    failed = result.stderr.count("event=write_failed")
    most = 1 + replay.GIVE_UP_AFTER + 2 * replay.WRITERS - 1  # one more, 3 failed, 3 ahead
    assert replay.GIVE_UP_AFTER <= failed <= most < 16
    assert unconfirmed == failed * replay.CHUNK
    sent = {r.body for r in feeds.requests if r.path == "/write"}
    if how == "503":
        assert len(sent) == 1 + failed
