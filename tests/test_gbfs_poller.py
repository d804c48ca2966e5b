"""The stateful poller against a local feed server, with a pinned clock (no sleeping)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from collector.retry import Failure
from collector.settings import GbfsSystemSettings
from collector.sources.gbfs import GbfsSystem
from tests.support import DATA, FeedServer, Reply, Request
from tests.test_gbfs_parse import fields

SPEC = DATA / "gbfs" / "v2.3"


class Clock:
    def __init__(self, now: float = 1_700_000_310.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _serve_spec(feeds: FeedServer, status_ttl: int = 0) -> None:
    feeds.serve_folder(SPEC, "/v2.3")
    doc = json.loads((SPEC / "station_status.json").read_bytes())
    doc["ttl"] = status_ttl
    feeds.routes["/v2.3/station_status.json"] = Reply(200, json.dumps(doc).encode())


def _system(feeds: FeedServer, clock: Clock, **overrides: object) -> GbfsSystem:
    settings = GbfsSystemSettings(
        name="oslo", url=f"{feeds.url}/v2.3/gbfs.json", interval_secs=15, **overrides
    )
    return GbfsSystem(settings, clock=clock)


def _status_with(last_updated: int, etag: str | None = None) -> Callable[[Request], Reply]:
    body = json.loads((SPEC / "station_status.json").read_bytes())
    body["last_updated"] = last_updated
    payload = json.dumps(body).encode()

    def reply(request: Request) -> Reply:
        if etag and request.headers.get("If-None-Match") == etag:
            return Reply(304)
        return Reply(200, payload, {"ETag": etag} if etag else {})

    return reply


def test_first_poll_discovers_and_returns_every_station(feeds: FeedServer) -> None:
    _serve_spec(feeds)
    system = _system(feeds, Clock())
    poll = system.poll()
    assert poll.outcome == "new"
    assert poll.stations == 4
    assert system.version == "2.3"
    assert poll.feed_time == 1_700_000_300
    assert [
        feeds.hits(f"/v2.3/{n}.json")
        for n in ("gbfs", "station_information", "vehicle_types", "station_status")
    ] == [1, 1, 1, 1]


def test_conditional_get_and_unchanged_feed_write_nothing(feeds: FeedServer) -> None:
    _serve_spec(feeds)
    feeds.routes["/v2.3/station_status.json"] = _status_with(1_700_000_300, etag='"v1"')
    clock = Clock()
    system = _system(feeds, clock)
    assert system.poll().outcome == "new"
    clock.now += 15
    assert system.poll().outcome == "not_modified"
    status_requests = [r for r in feeds.requests if r.path == "/v2.3/station_status.json"]
    assert status_requests[-1].headers["If-None-Match"] == '"v1"'

    # Same last_updated served again without validators: skipped, not written twice.
    feeds.routes["/v2.3/station_status.json"] = _status_with(1_700_000_300)
    clock.now += 15
    assert system.poll().outcome == "unchanged"
    feeds.routes["/v2.3/station_status.json"] = _status_with(1_700_000_320)
    clock.now += 15
    poll = system.poll()
    assert (poll.outcome, poll.feed_time) == ("new", 1_700_000_320)
    assert {r[2] for r in poll.rows} == {1_700_000_320}


@pytest.mark.parametrize(("ttl", "max_ttl", "fresh_until"), [(60, 300, 60), (3600, 300, 300)])
def test_ttl_is_honoured_up_to_max_ttl(
    feeds: FeedServer, ttl: int, max_ttl: float, fresh_until: float
) -> None:
    _serve_spec(feeds, status_ttl=ttl)
    clock = Clock()
    start = clock.now
    system = _system(feeds, clock, max_ttl_secs=max_ttl)
    system.poll()
    clock.now = start + fresh_until - 1
    assert system.poll().outcome == "fresh"
    assert feeds.hits("/v2.3/station_status.json") == 1
    clock.now = start + fresh_until
    system.poll()
    assert feeds.hits("/v2.3/station_status.json") == 2


def test_a_late_start_does_not_make_the_next_slot_fresh(feeds: FeedServer) -> None:
    # ttl 60 polled every 60 s: the first poll of slot 0 starts 5 s late; slot 1 starts on
    # time, 55 s after that start. Judged from the actual start it would be "fresh" and the
    # system polled every 120 s; judged slot to slot it is due.
    _serve_spec(feeds, status_ttl=60)
    clock = Clock()
    slot = clock.now
    system = _system(feeds, clock)  # the slots are given: its own interval plays no part
    clock.now = slot + 5
    assert system.poll(slot).outcome == "new"
    clock.now = slot + 60
    assert system.poll(slot + 60).outcome != "fresh"
    assert feeds.hits("/v2.3/station_status.json") == 2


def test_the_ttl_is_still_honoured_slot_to_slot(feeds: FeedServer) -> None:
    # ttl 60 polled every 15 s: the slots 15, 30 and 45 s after the one that fetched are
    # fresh, however late that one started; the slot at 60 s fetches.
    _serve_spec(feeds, status_ttl=60)
    clock = Clock()
    slot = clock.now
    system = _system(feeds, clock)
    clock.now = slot + 3
    system.poll(slot)
    for k in (1, 2, 3):
        clock.now = slot + 15 * k
        assert system.poll(slot + 15 * k).outcome == "fresh"
    clock.now = slot + 60
    system.poll(slot + 60)
    assert feeds.hits("/v2.3/station_status.json") == 2


def test_station_information_is_not_refetched_every_poll(feeds: FeedServer) -> None:
    _serve_spec(feeds)
    clock = Clock()
    system = _system(feeds, clock, info_refresh_secs=600)
    for _ in range(5):  # ttl 0 in the file: our floor of 60 s applies
        system.poll()
        clock.now += 15
    assert feeds.hits("/v2.3/station_information.json") == 2  # at 0 and at 60 s
    assert feeds.hits("/v2.3/station_status.json") == 5


def test_429_backs_off_for_retry_after_without_requests(feeds: FeedServer) -> None:
    _serve_spec(feeds)
    clock = Clock()
    system = _system(feeds, clock)
    feeds.routes["/v2.3/station_status.json"] = Reply(429, b"slow down", {"Retry-After": "120"})
    with pytest.raises(Failure) as raised:
        system.poll()
    assert (raised.value.kind, raised.value.status, raised.value.transient) == (
        "http_4xx",
        429,
        True,
    )
    clock.now += 15
    assert system.poll().outcome == "backing_off"
    assert feeds.hits("/v2.3/station_status.json") == 1
    _serve_spec(feeds)
    clock.now += 106
    assert system.poll().outcome == "new"


def test_feed_that_moved_is_looked_up_again(feeds: FeedServer) -> None:
    _serve_spec(feeds)
    clock = Clock()
    system = _system(feeds, clock)
    system.poll()
    moved = feeds.routes.pop("/v2.3/station_status.json")
    with pytest.raises(Failure) as raised:
        system.poll()
    assert raised.value.status == 404 and not raised.value.transient
    # gbfs.json now points somewhere else; the next poll follows it.
    feeds.routes["/v2.3/gbfs.json"] = Reply(
        200,
        (SPEC / "gbfs.json")
        .read_bytes()
        .replace(b"{BASE}/v2.3/station_status", f"{feeds.url}/new/status".encode()),
    )
    feeds.routes["/new/status.json"] = moved
    clock.now += 15
    assert system.poll().outcome == "unchanged"  # same data, now from the new address
    assert feeds.hits("/new/status.json") == 1
    assert feeds.hits("/v2.3/gbfs.json") == 2


def test_station_information_failure_still_stores_status(feeds: FeedServer) -> None:
    _serve_spec(feeds)
    feeds.routes["/v2.3/station_information.json"] = Reply(500, b"oops")
    poll = _system(feeds, Clock()).poll()
    assert poll.outcome == "new" and poll.stations == 4
    assert [e.kind for e in poll.errors] == ["http_5xx"]
    assert all(fields(r)["lat"] is None for r in poll.rows)


def test_discovery_without_station_status_is_a_clear_error(feeds: FeedServer) -> None:
    feeds.routes["/v2.3/gbfs.json"] = Reply(
        200, b'{"data": {"en": {"feeds": [{"name": "free_bike_status", "url": "x"}]}}}'
    )
    with pytest.raises(Failure, match="lists no station_status feed"):
        _system(feeds, Clock()).poll()


def test_oversized_body_is_refused(feeds: FeedServer) -> None:
    _serve_spec(feeds)
    system = _system(feeds, Clock(), max_body_bytes=1024)
    feeds.routes["/v2.3/station_status.json"] = Reply(200, b" " * 5000)
    with pytest.raises(Failure) as raised:
        system.poll()
    assert raised.value.kind == "too_large"


def test_direct_urls_without_discovery(feeds: FeedServer) -> None:
    _serve_spec(feeds)
    settings = GbfsSystemSettings(
        name="direct",
        station_information_url=f"{feeds.url}/v2.3/station_information.json",
        station_status_url=f"{feeds.url}/v2.3/station_status.json",
    )
    poll = GbfsSystem(settings, clock=Clock()).poll()
    assert poll.stations == 4
    assert feeds.hits("/v2.3/gbfs.json") == 0
    # No vehicle_types known: e-bikes cannot be told apart, so none are claimed.
    assert {fields(r)["ebikes_available"] for r in poll.rows} == {None}
