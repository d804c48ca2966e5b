"""The collector's own metrics: declared labels, and the one call each for failures and writes."""

from __future__ import annotations

import logging
import re

import pytest

from collector.contract import EVENTS, QUALITY_KINDS
from collector.retry import Failure
from collector.sinks.base import SinkMetrics, WriteReport
from collector.telemetry import ONCE_SOURCES, RESULTS, STAGES, Counters
from tests.support import ROOT


def _events_row() -> str:
    readme = (ROOT / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `events` |")]
    return row


def test_readme_lists_every_declared_stage_and_result() -> None:
    named = set(re.findall(r"`([a-z_0-9]+)`", _events_row()))
    assert set(STAGES) <= named
    quality_table = (ROOT / "README.md").read_text().split("Data-quality faults", 1)[1]
    for kind in QUALITY_KINDS:  # "a data-quality kind": the contract's table names each
        assert f"| `{kind}` |" in quality_table, kind
    assert RESULTS - set(QUALITY_KINDS) <= named


def test_contract_describes_every_stage() -> None:
    for stage in STAGES:
        assert stage in EVENTS.description, stage


def test_an_undeclared_label_is_refused() -> None:
    counters = Counters()
    with pytest.raises(ValueError, match="undeclared"):
        counters.add("oslo", "fetch", "timed_out")
    with pytest.raises(ValueError, match="undeclared"):
        counters.add("oslo", "fetching", "ok")  # type: ignore[arg-type]  # the check under test
    assert counters.snapshot() == {}


def test_a_failure_is_counted_every_time_and_logged_once_when_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counters = Counters()
    failure = Failure("schema", "expected 6 sensors, got 5", stage="parse", reason="sensor_count")
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            counters.failed("patient-1", "poll_failed", failure, once=True)
        counters.failed("oslo", "poll_failed", Failure("cancelled", "cut by shutdown"))
    assert counters.get("patient-1", "parse", "schema") == 3
    assert counters.get("oslo", "fetch", "cancelled") == 1
    logged = [(r.source, r.levelno, r.reason) for r in caplog.records]  # type: ignore[attr-defined]  # fields set by logs.event
    assert logged == [
        ("patient-1", logging.WARNING, "sensor_count"),
        ("oslo", logging.DEBUG, None),  # our own shutdown: counted, not warned about
    ]


def test_many_sources_failing_alike_log_ten_lines_and_one_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 2,000 patients behind one dead server logged 2,000 warnings in 30 s (a new user's walk).
    counters = Counters()
    refused = Failure("connection", "connection refused: nothing listens on that host and port")
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            for patient in range(2000):
                counters.failed(f"patient-{patient}", "poll_failed", refused, once=True)
        counters.failed("patient-1", "poll_failed", Failure("timeout", "timed out"), once=True)
    assert counters.get("patient-1999", "fetch", "connection") == 3  # every one counted
    logged = [(getattr(r, "source", None), r.getMessage()) for r in caplog.records]
    assert logged[:ONCE_SOURCES] == [(f"patient-{i}", "poll_failed") for i in range(ONCE_SOURCES)]
    assert logged[ONCE_SOURCES][0] is None
    assert "counted, not logged" in caplog.records[ONCE_SOURCES].detail  # type: ignore[attr-defined]  # fields set by logs.event
    # Another reason starts its own count.
    assert logged[ONCE_SOURCES + 1 :] == [("patient-1", "poll_failed")]


def test_a_write_report_and_a_drain_are_counted() -> None:
    counters = Counters()
    report = WriteReport(
        written=7,
        spooled=3,
        errors=[Failure("rejected", "bad line", stage="write"), Failure("timeout", "slow")],
    )
    counters.wrote("bikes", report)
    counters.drained("bikes", WriteReport(written=40, rejected=2))
    assert counters.snapshot() == {
        ("bikes", "write", "ok"): 7,
        ("bikes", "write", "spooled"): 3,
        ("bikes", "write", "rejected"): 3,
        ("bikes", "write", "timeout"): 1,
        ("bikes", "write", "drained"): 40,
    }


def test_a_feed_never_heard_from_is_as_old_as_the_run() -> None:
    counters = Counters(started_secs=1_700_000_000)
    counters.expect_feed("dead")
    counters.expect_feed("alive")
    counters.feed("alive", 1_700_000_090, 12)
    counters.expect_feed("alive")  # expecting again keeps what was heard
    rows = counters.rows(1_700_000_100, SinkMetrics())
    assert rows["feed"] == [
        ((("system", "alive"),), (10, 12), 1_700_000_100),
        ((("system", "dead"),), (100, 0), 1_700_000_100),
    ]
    assert "spool" not in rows
