"""``collector check``: prove what ``run`` needs, printing a line per part as it is asked.

The server speaks the configured API, the credentials may write to every bucket the jobs
write, the spool can be read, and every source answers with data that parses. The sources
are asked through their jobs (``Job.check``), so a new kind of source is checked as it is
run, with nothing to add here.
"""

from __future__ import annotations

from collector import limits
from collector.archive import open_archive
from collector.contract import STATION_STATUS
from collector.http import redact_url
from collector.jobs import Job, build_jobs
from collector.retry import Failure
from collector.settings import ConfigError, Settings
from collector.sinks import spool
from collector.sinks.base import AuthError, Fatal
from collector.sinks.influxdb import api_mismatch, make_writer
from collector.sinks.stdout import StdoutSink
from collector.telemetry import Counters

__all__ = ["check"]


def check(config: Settings) -> int:
    """The exit code: 0 when everything answered as ``run`` needs it, 2 when the settings
    must change (refused credentials, the wrong API flavour, an archive that cannot be
    written), 1 when something else failed (a feed, a missing bucket)."""
    # Built as for `run --once`: nothing is written (check() polls without writing).
    counters = Counters()
    jobs = build_jobs(config, StdoutSink(), counters, Fatal(), once=True)
    sources, report = [*jobs.sources, *jobs.patients], jobs.report
    buckets = list(dict.fromkeys(b for job in (*sources, report) for b in job.buckets))
    database = _database(config, buckets)
    print(_spool(config))
    archive = _archive(config)
    ok = database == _OK and archive
    if not sources:
        print("sources: none configured (add [[gbfs.systems]] or [pressure] url)")
    for job in sources:
        ok = _source(job) and ok
    _limits(config, counters.stations())
    if database == _SETTINGS or not archive:
        return 2
    return 0 if ok else 1


_OK, _FAILED, _SETTINGS = "ok", "failed", "settings"


def _archive(config: Settings) -> bool:
    if config.archive.dir is None:
        print("archive: off")
        return True
    try:
        archive = open_archive(config.archive)
    except ConfigError as exc:
        print(f"archive: FAILED: {exc}")
        return False
    if archive is not None:
        archive.close()
    print(f"archive: {config.archive.dir}: writable")
    return True


def _database(config: Settings, buckets: list[str]) -> str:
    db = config.influxdb
    print(f"influxdb: {db.api} {redact_url(db.url)}", end=" ... ", flush=True)
    writer = make_writer(db, bucket_names=config.buckets.names())
    try:
        version = writer.ping()
        mismatch = api_mismatch(db.api, version)
        if mismatch:
            print(f"FAILED: {mismatch}")
            return _SETTINGS
        problems, refused = [], False
        for bucket in buckets:
            try:
                writer.probe(bucket)
            except AuthError as exc:
                problems.append(str(exc))
                refused = True
            except Failure as exc:
                problems.append(str(exc))
        if problems:
            print(f"FAILED (version {version}):")
            for problem in dict.fromkeys(problems):
                print(f"  {problem}")
            return _SETTINGS if refused else _FAILED
        print(f"ok (version {version}; may write to {', '.join(buckets)})")
        return _OK
    except Failure as failure:
        print(f"FAILED: {failure}")
        return _SETTINGS if failure.kind == "auth" else _FAILED
    finally:
        writer.close()


def _limits(config: Settings, stations: dict[str, int]) -> None:
    """The polled systems' stations held against the server's limits (a warning, not a
    failure: the server may have been configured past its defaults)."""
    if not stations:
        return
    bucket = config.buckets.of(STATION_STATUS.bucket).name
    for warning in limits.warnings(
        config.influxdb.api, sum(stations.values()), bucket, estimated=False
    ):
        print(f"limits: warning: {warning}")


def _spool(config: Settings) -> str:
    if not config.spool.enabled:
        return "spool: disabled (failed writes are lost after their retries)"
    return f"spool: {spool.describe(config.spool.dir)}"


def _source(job: Job) -> bool:
    print(f"{job.kind} {job.name}:", end=" ", flush=True)
    try:
        print(job.check())
    except Failure as failure:
        print(f"FAILED at {failure.stage}: {failure}")
        return False
    finally:
        job.close()
    return True
