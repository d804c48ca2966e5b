"""Trip history: both schemas, three containers, exact totals, bounded memory, live replay."""

from __future__ import annotations

import csv
import gzip
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from collector import replay
from collector.contract import STATION_FLOW
from collector.lineprotocol import Encoder
from collector.retry import Failure
from collector.sinks.base import AuthError, WriteReport
from collector.sources import gbfs, trips
from collector.sources.trips import Flows, Progress, TripFileError
from tests.support import DATA, wait_for
from tests.test_replay_input import big_file

TRIPS = DATA / "trips"
NEW_YORK = ZoneInfo("America/New_York")


def _flows(*paths: Path, **options: object) -> Flows:
    flows, progress = Flows(**options), Progress()  # type: ignore[arg-type]  # each test's own Flows options
    replay.read_flows(paths, flows, progress, None)
    return flows


def _lines(flows: Flows, system: str = "citibike") -> list[str]:
    rows = [row for _minute, row in flows.rows(system)]
    return sorted(Encoder(STATION_FLOW).lines(rows)[0])


GROVE = ("3186", "Grove St PATH", "40.71958611647166", "-74.04311746358871")
NEWARK = ("3211", "Newark Ave", "40.72152515", "-74.046304543")
HOBOKEN = ("JC105", "Hoboken Ave at Monmouth St", "40.735208", "-74.046964")
CHRIST = ("JC034", "Christ Hospital", "40.734786", "-74.050444")  # the first name seen


def flow(station: tuple[str, str, str, str], docks: int, undocks: int, minute: int) -> str:
    station_id, name, lat, lon = station
    return (
        f"station_flow,station_id={station_id},system=citibike docks={docks}i,lat={lat},"
        f'lon={lon},name="{name}",net={docks - undocks}i,undocks={undocks}i {minute}'
    )


def test_old_schema_exact_rows_and_bad_rows() -> None:
    flows = _flows(TRIPS / "old-schema.csv")
    # Times are New York's: 00:01 EST = 05:01 UTC = 1514782860. Two trips leave Grove St
    # in that minute (one with millisecond times); the negative, unparsable and short rows go.
    assert _lines(flows) == sorted(
        [
            flow(GROVE, 0, 2, 1514782860),
            flow(NEWARK, 1, 0, 1514782980),
            flow(NEWARK, 0, 1, 1514783340),
            flow(GROVE, 2, 0, 1514783400),
        ]
    )
    assert flows.trips == 3
    assert dict(flows.bad) == {"negative_duration": 1, "bad_time": 1, "short_row": 1}


def test_new_schema_exact_rows_and_bad_rows() -> None:
    flows = _flows(TRIPS / "new-schema.csv")
    # 23:11 EST on 3 Feb = 04:11 UTC on 4 Feb = 1612411860. Christ Hospital docks one bike
    # and lends one in the same minute: docks 1, undocks 1, net 0.
    assert _lines(flows) == sorted(
        [
            flow(HOBOKEN, 0, 1, 1612411860),
            flow(CHRIST, 1, 1, 1612412280),
            flow(HOBOKEN, 1, 0, 1612413000),
        ]
    )
    assert dict(flows.bad) == {"no_end_station": 1, "no_start_station": 1}


def test_plain_gzip_and_zip_give_the_same_rows(tmp_path: Path) -> None:
    plain = TRIPS / "new-schema.csv"
    gz = tmp_path / "trips.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    archive = tmp_path / "trips.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(plain, "2021-02-citibike-tripdata.csv")
        z.writestr("__MACOSX/._2021-02-citibike-tripdata.csv", "junk")
    expected = _lines(_flows(plain))
    assert _lines(_flows(gz)) == expected
    assert _lines(_flows(archive)) == expected


# The real files in ../shared/fixtures/trips and their time and station columns.
REAL_FILES = [
    (
        "JC-201801-citibike-tripdata.csv",
        ("starttime", "stoptime", "start station id", "end station id"),
    ),
    (
        "JC-202102-citibike-tripdata.csv",
        ("started_at", "ended_at", "start_station_id", "end_station_id"),
    ),
]


def _independent_totals(
    path: Path, start: str, end: str, start_id: str, end_id: str
) -> tuple[Counter, Counter, int, int]:
    undocks: Counter[str] = Counter()
    docks: Counter[str] = Counter()
    no_end = negative = 0
    with path.open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            if not row[end_id]:
                no_end += 1
                continue
            if row[end] < row[start]:
                negative += 1
                continue
            undocks[row[start_id]] += 1
            docks[row[end_id]] += 1
    return undocks, docks, no_end, negative


@pytest.mark.parametrize(("name", "columns"), REAL_FILES)
@pytest.mark.parametrize("max_events", [1_000_000, 500])  # in memory, and spilled to disk
def test_real_files_exact_per_station_totals(
    shared_fixtures: Path, name: str, columns: tuple[str, ...], max_events: int
) -> None:
    path = shared_fixtures / "trips" / name
    undocks, docks, no_end, negative = _independent_totals(path, *columns)
    flows = _flows(path, max_events_in_memory=max_events)
    assert flows.spilled == (max_events == 500)
    got_undocks: Counter[str] = Counter()
    got_docks: Counter[str] = Counter()
    for _minute, (tags, values, _t) in flows.rows("citibike"):
        station = dict(tags)["station_id"]
        fields = dict(zip(STATION_FLOW.field_names, values, strict=True))
        assert fields["net"] == fields["docks"] - fields["undocks"]
        got_undocks[station] += fields["undocks"]
        got_docks[station] += fields["docks"]
    assert +got_undocks == undocks and +got_docks == docks
    assert flows.bad["no_end_station"] == no_end and flows.bad["negative_duration"] == negative
    assert flows.trips == sum(undocks.values())
    flows.close()


class PinnedClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, secs: float) -> None:
        self.sleeps.append(secs)
        self.now += secs


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[str, list[str]]] = []

    def write(self, bucket: str, lines: list[str], precision: str) -> replay.WriteReport:
        self.writes.append((precision, lines))
        return replay.WriteReport(written=len(lines))


def test_live_replay_emits_minutes_in_order_at_speed() -> None:
    flows = _flows(TRIPS / "old-schema.csv")
    clock, sink = PinnedClock(), Recorder()
    outcome = replay.live(
        flows, sink, "citibike", 60.0, lambda s: s, clock=clock.time, sleep=clock.sleep
    )
    # Minutes 05:01, 05:03, 05:09, 05:10 UTC: at 60x, 0, 2, 8 and 9 seconds after the start.
    assert outcome.minutes == 4 and outcome.rows_written == 4
    assert clock.sleeps == [2.0, 6.0, 1.0]
    stamps = [int(lines[0].rsplit(" ", 1)[1]) for _p, lines in sink.writes]
    assert stamps == [1_800_000_000_000, 1_800_000_002_000, 1_800_000_008_000, 1_800_000_009_000]
    assert {precision for precision, _ in sink.writes} == {"ms"}


def test_live_replay_stops_when_asked() -> None:
    flows = _flows(TRIPS / "old-schema.csv")
    clock, sink = PinnedClock(), Recorder()
    outcome = replay.live(
        flows,
        sink,
        "citibike",
        600.0,
        lambda s: s,
        clock=clock.time,
        sleep=clock.sleep,
        stop=lambda: len(sink.writes) >= 2,
    )
    assert outcome.minutes == 2


def test_trip_ids_are_matched_to_gbfs_station_ids() -> None:
    info = (
        b'{"data": {"stations": [{"station_id": "66db-uuid", "short_name": "JC105", '
        b'"name": "Hoboken"}, {"station_id": "3186", "name": "Grove"}]}}'
    )
    mapping = replay.gbfs_ids(gbfs.parse_station_information(info, "citibike"))
    assert mapping["JC105"] == "66db-uuid" and mapping["3186"] == "3186"
    flows = _flows(TRIPS / "new-schema.csv")
    stations = {
        dict(tags)["station_id"]
        for _m, (tags, _v, _t) in flows.rows("citibike", rename=lambda s: mapping.get(s, s))
    }
    assert stations == {"66db-uuid", "JC034"}  # JC034 is not in the feed: kept as it is


def test_span_is_the_same_in_memory_and_spilled(shared_fixtures: Path) -> None:
    path = shared_fixtures / "trips" / "JC-201801-citibike-tripdata.csv"
    in_memory, spilled = _flows(path), _flows(path, max_events_in_memory=500)
    assert spilled.spilled and not in_memory.spilled
    minutes = [minute for minute, _row in in_memory.rows("x")]
    assert in_memory.span() == spilled.span() == (min(minutes), max(minutes))
    assert in_memory.events == spilled.events == 2 * in_memory.trips
    in_memory.close()
    spilled.close()


def _independent_flows(path: Path, *columns: str) -> dict[tuple[str, int], tuple[int, int]]:
    """(station, epoch minute) -> (docks, undocks), read straight from the CSV."""
    start, end, start_id, end_id = columns
    counts: dict[tuple[str, int], list[int]] = {}
    with path.open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            if not row[end_id] or not row[start_id] or row[end] < row[start]:
                continue
            for station, time, dock in ((row[start_id], row[start], 0), (row[end_id], row[end], 1)):
                moment = datetime.fromisoformat(time[:16]).replace(tzinfo=NEW_YORK)
                counts.setdefault((station, int(moment.timestamp())), [0, 0])[dock] += 1
    return {key: (docks, undocks) for key, (undocks, docks) in counts.items()}


def _joined(batches: Iterable[tuple[list[str], int]]) -> list[str]:
    return [line for lines, _events in batches for line in lines]


@pytest.mark.parametrize(("name", "columns"), REAL_FILES)
def test_spilled_runs_give_the_same_lines_as_one_run_in_memory(
    shared_fixtures: Path, monkeypatch: pytest.MonkeyPatch, name: str, columns: tuple[str, ...]
) -> None:
    path = shared_fixtures / "trips" / name
    in_memory = _flows(path)
    encoder = Encoder(STATION_FLOW)
    expected = encoder.lines([row for _m, row in in_memory.rows("citibike")])[0]
    # The backfill's own line making is the generic encoder's.
    assert _joined(in_memory.lines("citibike", 1000)) == expected
    in_memory.close()
    # Runs of 100 events (hundreds of them), read 3 events at a time, merged 5 at once: every
    # path of the merge, including runs merged into longer ones first.
    monkeypatch.setattr(trips, "WINDOW_EVENTS", 7)
    monkeypatch.setattr(trips, "MIN_BLOCK_EVENTS", 3)
    monkeypatch.setattr(trips, "MAX_MERGE_RUNS", 5)
    spilled = _flows(path, max_events_in_memory=100)
    assert spilled.spilled
    rows = [row for _m, row in spilled.rows("citibike")]
    assert encoder.lines(rows)[0] == expected  # the same lines in the same order
    batches = list(spilled.lines("citibike", 1000))
    assert _joined(batches) == expected
    assert sum(events for _lines, events in batches) == 2 * spilled.trips
    spilled.close()
    stamps = [stamp for _tags, _values, stamp in rows]
    assert stamps == sorted(stamps)  # time order, as a live replay needs
    counted = {}
    for tags, values, stamp in rows:
        fields = dict(zip(STATION_FLOW.field_names, values, strict=True))
        counted[(dict(tags)["station_id"], stamp)] = (fields["docks"], fields["undocks"])
    assert counted == _independent_flows(path, *columns)


@pytest.mark.parametrize(("name", "columns"), REAL_FILES)
@pytest.mark.parametrize("max_events", [1_000_000, 100])  # in memory, and spilled to disk
def test_rows_are_counted_as_many_as_lines_even_in_the_middle_of_a_backfill(
    shared_fixtures: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    columns: tuple[str, ...],
    max_events: int,
) -> None:
    path = shared_fixtures / "trips" / name
    expected = len(_independent_flows(path, *columns))
    # Tiny windows: a (station, minute) whose undock and dock fall in two windows of the merge
    # is still one row.
    monkeypatch.setattr(trips, "WINDOW_EVENTS", 7)
    monkeypatch.setattr(trips, "MIN_BLOCK_EVENTS", 3)
    monkeypatch.setattr(trips, "MAX_MERGE_RUNS", 5)
    flows = _flows(path, max_events_in_memory=max_events)
    assert flows.spilled == (max_events == 100)
    assert flows.count_rows() == expected
    # Counted while a backfill's merge is half-way (a stopped replay counts what is unsent):
    # the count is right, and the merge goes on unharmed.
    batches = flows.lines("citibike", 1000)
    first = [next(batches), next(batches)]
    assert flows.count_rows() == expected
    assert len(_joined(first)) + len(_joined(batches)) == expected
    flows.close()


def test_an_unknown_header_names_the_required_columns_it_lacks(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(TripFileError) as error:
        _flows(path)
    # Neither schema is near: both are listed, with the header as it is.
    message = str(error.value)
    assert message.startswith(f"{path}: unknown trip file header: none of the required columns (")
    assert message.endswith("; the header is: a, b, c")
    assert "2013-2020: starttime, stoptime" in message and "2021+: started_at, ended_at" in message


@pytest.mark.parametrize(("name", "columns"), REAL_FILES)
def test_a_renamed_column_of_a_real_header_is_named(
    shared_fixtures: Path, tmp_path: Path, name: str, columns: tuple[str, ...]
) -> None:
    # The end station's id, the 8th column of both schemas: past the 6 names once shown.
    end_id = columns[3]
    with (shared_fixtures / "trips" / name).open(encoding="utf-8-sig", newline="") as f:
        head = [next(f) for _ in range(4)]
    assert f'"{end_id}"' in head[0] or f",{end_id}," in head[0]
    renamed = head[0].replace(end_id, "end station code")
    path = tmp_path / name
    path.write_text(renamed + "".join(head[1:]))
    with pytest.raises(TripFileError) as error:
        _flows(path)
    message = str(error.value)
    schema = "2013-2020" if "start station id" in columns else "2021+"
    assert f"missing {end_id} (required by the {schema} schema)" in message
    assert "end station code" in message  # the header is shown, the renamed name in it
    assert "\n" not in message


# ------------------------------------------------------- giving up on an unreachable database

TRANSIENT = {
    "connection": Failure("connection", "http://db:8086/write: connection refused", stage="write"),
    "timeout": Failure("timeout", "http://db:8086/write timed out", stage="write"),
    "http_5xx": Failure("http_5xx", "HTTP 503: shutting down", stage="write", status=503),
}
REFUSED = Failure("http_4xx", "HTTP 400: field type conflict", stage="write", status=400)


class AnsweringSink:
    """Answers each batch as ``answer(number)`` says: "ok", "refused" (4xx) or a key of
    TRANSIENT (after every retry). The number is the batch's place in the backfill, found from
    its first line, so the answer does not depend on which write thread sends it first."""

    def __init__(self, flows: Flows, answer: Callable[[int], str]) -> None:
        self.numbers = {
            lines[0]: number for number, (lines, _e) in enumerate(flows.lines("jc", replay.CHUNK))
        }
        self.answer = answer
        self.sent: list[int] = []
        self.stopped_retrying = False
        self._lock = threading.Lock()

    def write(self, bucket: str, lines: list[str], precision: str) -> WriteReport:
        number = self.numbers[lines[0]]
        with self._lock:
            self.sent.append(number)
        how = self.answer(number)
        if how == "ok":
            return WriteReport(written=len(lines))
        if how == "refused":
            return WriteReport(rejected=len(lines), errors=[REFUSED], refused=[(lines, REFUSED)])
        return WriteReport(failed=len(lines), errors=[TRANSIENT[how]], unsent=[lines])

    def stop_retrying(self) -> None:
        self.stopped_retrying = True


@pytest.fixture
def eighty_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flows]:
    """40,000 rows in batches of 500."""
    monkeypatch.setattr(replay, "CHUNK", 500)
    flows = _flows(big_file(tmp_path, 20_000))
    yield flows
    flows.close()


@pytest.mark.parametrize("how", sorted(TRANSIENT))
def test_a_backfill_gives_up_after_three_batches_in_a_row_fail_for_a_transient_reason(
    eighty_batches: Flows, how: str
) -> None:
    flows = eighty_batches
    sink = AnsweringSink(flows, lambda number: "ok" if number < 5 else how)
    outcome = replay.backfill(flows, sink, "jc", lambda s: s, writers=replay.WRITERS)  # type: ignore[arg-type]  # the sink's protocol, less metrics and close
    assert outcome.gave_up and outcome.cause is TRANSIENT[how] and not outcome.stopped
    assert sink.stopped_retrying  # the writes in flight give up their retries at once
    # Batches 5, 6 and 7 failed: the backfill gives up when the 7th is counted. Only the
    # batches made by then (at most 2 x WRITERS ahead of it) may have been sent.
    assert set(range(8)) <= set(sink.sent)
    assert max(sink.sent) <= 7 + 2 * replay.WRITERS - 1 < 79
    assert outcome.rows_written == 5 * 500
    assert outcome.rows_unconfirmed == 500 * (len(sink.sent) - 5)
    assert outcome.rows_written + outcome.rows_failed + outcome.rows_unsent == 40_000
    assert not any(t.name.startswith("backfill-write") for t in threading.enumerate())


@pytest.mark.parametrize(
    "pattern",
    [
        ("connection", "timeout", "ok"),  # two failed, then one written: the database is back
        ("http_5xx", "connection", "refused"),  # a refusal is an answer: the database is up
        ("refused",),  # refusals alone never stop a backfill
    ],
)
def test_failures_not_three_in_a_row_do_not_stop_a_backfill(
    eighty_batches: Flows, pattern: tuple[str, ...]
) -> None:
    flows = eighty_batches
    sink = AnsweringSink(flows, lambda number: pattern[number % len(pattern)])
    outcome = replay.backfill(flows, sink, "jc", lambda s: s, writers=replay.WRITERS)  # type: ignore[arg-type]  # the sink's protocol, less metrics and close
    assert not outcome.gave_up and not sink.stopped_retrying
    assert sorted(sink.sent) == list(range(80))
    answers = Counter(pattern[number % len(pattern)] for number in range(80))
    assert outcome.rows_refused == 500 * answers["refused"]
    assert outcome.rows_written == 500 * answers["ok"]
    assert outcome.rows_unconfirmed == 500 * (80 - answers["refused"] - answers["ok"])
    assert outcome.rows_unsent == 0


def test_a_live_replay_gives_up_too() -> None:
    flows = _flows(TRIPS / "old-schema.csv")  # four minutes
    per_minute = Counter(minute for minute, _row in flows.rows("citibike"))
    clock = PinnedClock()

    class Down(Recorder):
        def write(self, bucket: str, lines: list[str], precision: str) -> replay.WriteReport:
            self.writes.append((precision, lines))
            return WriteReport(failed=len(lines), errors=[TRANSIENT["connection"]])

    sink = Down()
    outcome = replay.live(
        flows, sink, "citibike", 60.0, lambda s: s, clock=clock.time, sleep=clock.sleep
    )
    assert outcome.gave_up and outcome.minutes == replay.GIVE_UP_AFTER == len(sink.writes) == 3
    first_three = sum(n for _minute, n in sorted(per_minute.items())[:3])
    assert outcome.rows_unconfirmed == first_three and outcome.rows_written == 0
    assert outcome.rows_unsent == sum(per_minute.values()) - first_three > 0


# ------------------------------------------------------------- overlapped backfill writes


class GatedSink:
    """Keeps each batch it is given; every write waits for ``gate``, so a test sees what is
    in flight and what the backfill made meanwhile."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.gate = threading.Event()
        self.batches: list[list[str]] = []
        self.in_flight = self.most_in_flight = 0
        self._fail_at = fail_at
        self._lock = threading.Lock()

    def write(self, bucket: str, lines: list[str], precision: str) -> replay.WriteReport:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            number = len(self.batches)
            self.batches.append(lines)
        assert self.gate.wait(30), "the test never opened the gate"
        with self._lock:
            self.in_flight -= 1
        if number == self._fail_at:
            raise AuthError("refused")
        return replay.WriteReport(written=len(lines))


class CountedFlows:
    """Flows whose batches of lines are counted as the backfill takes them."""

    def __init__(self, flows: Flows) -> None:
        self.flows, self.made = flows, 0
        self.trips, self.events = flows.trips, flows.events

    def lines(self, *args: Any, **kwargs: Any) -> Iterator[tuple[list[str], int]]:
        for batch in self.flows.lines(*args, **kwargs):
            self.made += 1
            yield batch

    def count_rows(self) -> int:
        return self.flows.count_rows()


def _backfill_in_thread(
    flows: CountedFlows, sink: GatedSink, stop: Callable[[], bool] = lambda: False
) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["outcome"] = replay.backfill(
                flows,  # type: ignore[arg-type]  # the Flows the backfill reads, counted
                sink,
                "jc",
                lambda s: s,
                stop=stop,
                writers=2,
            )
        except Exception as exc:  # handed to the test, which asserts on it
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_overlapped_writes_are_two_in_flight_and_four_made_ahead_at_most(tmp_path: Path) -> None:
    flows = _flows(big_file(tmp_path, 20_000))  # 40,000 rows: 8 batches
    expected = _joined(flows.lines("jc", replay.CHUNK))
    counted, sink = CountedFlows(flows), GatedSink()
    thread, result = _backfill_in_thread(counted, sink)
    wait_for(lambda: counted.made == 4 and sink.in_flight == 2, what="two writes, four batches")
    # No write can end while the gate is shut: the backfill waits instead of making more.
    assert counted.made == 4 and len(sink.batches) == 2
    sink.gate.set()
    thread.join(30)
    assert result["outcome"].rows_written == len(expected) == 40_000
    assert sink.most_in_flight == 2
    assert sorted(line for lines in sink.batches for line in lines) == sorted(expected)
    flows.close()


def test_a_refused_overlapped_write_is_raised_by_the_backfill(tmp_path: Path) -> None:
    flows = _flows(big_file(tmp_path, 20_000))
    sink = GatedSink(fail_at=1)
    sink.gate.set()
    thread, result = _backfill_in_thread(CountedFlows(flows), sink)
    thread.join(30)
    assert isinstance(result["error"], AuthError)
    # The writes already handed over end (four, and the fifth made as the first was counted);
    # no batch is made after the refusal is seen.
    assert len(sink.batches) <= 5
    assert not any(t.name.startswith("backfill-write") for t in threading.enumerate())
    flows.close()


def test_a_stopped_overlapped_backfill_counts_what_was_written(tmp_path: Path) -> None:
    flows = _flows(big_file(tmp_path, 20_000))
    counted, sink = CountedFlows(flows), GatedSink()
    stopping = threading.Event()
    thread, result = _backfill_in_thread(counted, sink, stop=stopping.is_set)
    wait_for(lambda: counted.made == 4 and sink.in_flight == 2, what="two writes, four batches")
    stopping.set()
    sink.gate.set()
    thread.join(30)
    outcome = result["outcome"]
    assert outcome.stopped
    # The two writes in flight end; the two queued and the fifth, made as the first write was
    # counted, are never sent, and what was sent is what is counted.
    assert counted.made == 5
    assert len(sink.batches) == 2
    assert outcome.rows_written == 2 * replay.CHUNK
    # Everything else is counted as unsent: the 40,000 rows are all accounted for.
    assert outcome.rows_unsent == 40_000 - 2 * replay.CHUNK and outcome.rows_failed == 0
