"""``collector check``: prove what ``run`` needs, printing a line per part as it is asked.

The server speaks the configured API, the credentials may write to every bucket the jobs
write, the spool can be read, and every source answers with data that parses. The sources
are asked through their jobs (``Job.check``), so a new kind of source is checked as it is
run, with nothing to add here.
"""

from __future__ import annotations

from collector.http import redact_url
from collector.jobs import Job, build_jobs
from collector.retry import Failure
from collector.settings import Settings
from collector.sinks import spool
from collector.sinks.base import AuthError, Fatal
from collector.sinks.influxdb import api_mismatch, make_writer
from collector.sinks.stdout import StdoutSink
from collector.telemetry import Counters

__all__ = ["check"]


def check(config: Settings) -> bool:
    """True when everything answered as ``run`` needs it."""
    # Built as for `run --once`: nothing is written (check() polls without writing).
    sources, report = build_jobs(config, StdoutSink(), Counters(), Fatal(), once=True)
    buckets = list(dict.fromkeys(b for job in (*sources, report) for b in job.buckets))
    ok = _database(config, buckets)
    print(_spool(config))
    if not sources:
        print("sources: none configured (add [[gbfs.systems]] or [pressure] url)")
    for job in sources:
        ok = _source(job) and ok
    return ok


def _database(config: Settings, buckets: list[str]) -> bool:
    db = config.influxdb
    print(f"influxdb: {db.api} {redact_url(db.url)}", end=" ... ", flush=True)
    writer = make_writer(db, bucket_names=config.buckets.names())
    try:
        version = writer.ping()
        mismatch = api_mismatch(db.api, version)
        if mismatch:
            print(f"FAILED: {mismatch}")
            return False
        problems = []
        for bucket in buckets:
            try:
                writer.probe(bucket)
            except (Failure, AuthError) as exc:
                problems.append(str(exc))
        if problems:
            print(f"FAILED (version {version}):")
            for problem in dict.fromkeys(problems):
                print(f"  {problem}")
            return False
        print(f"ok (version {version}; may write to {', '.join(buckets)})")
        return True
    except Failure as failure:
        print(f"FAILED: {failure}")
        return False
    finally:
        writer.close()


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
