"""``collector setup``: buckets with retention, downsampling, scoped tokens; safe to run on
every start (each step says created, updated, unchanged or kept).

InfluxDB 2.x: the organization must exist; each bucket with its retention (and a shard group
duration that keeps expired data from lingering), a downsampling task per ``DOWNSAMPLES``
entry, a DBRP mapping per bucket so InfluxQL works too, a write-only token for the collector
and a read-only one for Grafana, written to files once (2.9 stores tokens hashed: a token can
only be read when it is created).

InfluxDB 1.x: a database per bucket whose default retention policy has the bucket's duration,
and a continuous query per ``DOWNSAMPLES`` entry.

InfluxDB 3 (Core, Enterprise): a database per bucket with the bucket's retention period, and on
Enterprise a write token for the collector and a read token for Grafana. 3.x has no tasks or
continuous queries: downsampling is the user's to configure (README, "Downsampling").
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from influxdb_client import (
    Authorization,
    BucketRetentionRules,
    Permission,
    PermissionResource,
    TaskCreateRequest,
    TaskUpdateRequest,
)
from influxdb_client.domain.dbrp_create import DBRPCreate
from influxdb_client.service.dbr_ps_service import DBRPsService

from collector.contract import (
    ANOMALIES_BUCKET,
    BIKES_BUCKET,
    BUCKETS,
    COLLECTOR_BUCKET,
    DOWNSAMPLES,
    PRESSURE_BUCKET,
    TRIPS_BUCKET,
    Downsample,
)
from collector.retry import Failure
from collector.settings import Settings
from collector.sinks.influxdb import InfluxV1Writer, InfluxV2Writer, InfluxV3Writer

# "manual": the server cannot do it through its API; the detail says what the user must do.
StepOutcome = Literal["created", "updated", "unchanged", "kept", "manual"]

# The collector (and `collector replay`, with the same config) writes these; Grafana reads all.
WRITTEN_BUCKETS = (BIKES_BUCKET, PRESSURE_BUCKET, ANOMALIES_BUCKET, COLLECTOR_BUCKET, TRIPS_BUCKET)
NAME_PREFIX = "livestack"


@dataclass(frozen=True)
class Step:
    what: str
    name: str
    outcome: StepOutcome
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.what} {self.name}: {self.outcome}" + (
            f" ({self.detail})" if self.detail else ""
        )


def shard_hours(retention_hours: float) -> int:
    """InfluxDB's own defaults: data is deleted a whole shard group at a time, so it lives up
    to retention + shard duration; short retentions need short shards."""
    if retention_hours == 0 or retention_hours > 180 * 24:
        return 7 * 24
    return 1 if retention_hours < 48 else 24


def describe_retention(hours: float) -> str:
    return "forever" if hours == 0 else f"{hours:g}h"


# ---------------------------------------------------------------------------- downsampling


def lookback_secs(ds: Downsample, hours: float) -> int:
    """How far back each run recomputes: ``hours`` rounded up to whole intervals, and at least
    two, so that the interval just closed is computed again one run later, when the points
    stamped at its end (written seconds after it closed) have arrived."""
    every = duration_secs(ds.every)
    return max(2, math.ceil(hours * 3600 / every)) * every


def flux_task(
    ds: Downsample, names: dict[str, str], offset_secs: int, lookback: int
) -> tuple[str, str]:
    """(task name, Flux script) for one downsampling that recomputes the last ``lookback``
    seconds of whole intervals on every run. Writing the same series at the same window
    start again overwrites: a recomputed window replaces the one computed before."""
    source, target = names[ds.source.bucket], names[ds.target.bucket]
    name = f"{NAME_PREFIX} downsample {source} to {target}"
    fields = " or ".join(f'r._field == "{field}"' for field in ds.fields)
    parts = [
        'import "date"',
        "",
        f'option task = {{name: "{name}", every: {ds.every}, offset: {offset_secs}s}}',
        "",
        # now() is the run's scheduled time (the offset delays the run, not its range), but a
        # manual run's is any time: both ends are truncated to whole intervals so that no
        # partial window overwrites a complete one.
        f"start = date.truncate(t: -{lookback}s, unit: task.every)",
        "stop = date.truncate(t: now(), unit: task.every)",
        "",
        f'data = from(bucket: "{source}")',
        "    |> range(start: start, stop: stop)",
        f'    |> filter(fn: (r) => r._measurement == "{ds.source.name}")',
        f"    |> filter(fn: (r) => {fields})",
    ]
    for fn in ds.functions:
        parts += [
            "",
            "data",
            f"    |> aggregateWindow(every: task.every, fn: {fn}, createEmpty: false,"
            ' timeSrc: "_start")',
            f'    |> map(fn: (r) => ({{r with _field: r._field + "_{fn}"}}))',
            f'    |> to(bucket: "{target}")',
        ]
    return name, "\n".join(parts) + "\n"


def continuous_query(
    ds: Downsample, names: dict[str, str], rp: str, lookback: int
) -> tuple[str, str, str]:
    """(database, CQ name, statement). FOR is ``lookback``, whole intervals: 1.x truncates
    each run's start to the GROUP BY interval, so a FOR with a remainder rounds down
    (services/continuous_querier/service.go, ExecuteContinuousQuery). The name carries a hash
    of the statement, so a changed definition is recognised and replaced."""
    source, target = names[ds.source.bucket], names[ds.target.bucket]
    selects = ", ".join(
        f'{fn}("{field}") AS "{field}_{fn}"' for field in ds.fields for fn in ds.functions
    )
    body = (
        f"RESAMPLE EVERY {ds.every} FOR {lookback}s BEGIN SELECT {selects} "
        f'INTO "{target}"."{rp}"."{ds.target.name}" FROM "{ds.source.name}" '
        f"GROUP BY time({ds.every}), * END"
    )
    digest = hashlib.sha1(body.encode()).hexdigest()[:8]
    name = f"{NAME_PREFIX}_{target}_{digest}"
    return source, name, f'CREATE CONTINUOUS QUERY "{name}" ON "{source}" {body}'


def duration_secs(duration: str) -> int:
    """Seconds in a duration: Flux/InfluxQL literals ("1h") and Go's ("720h0m0s"; "0s" is
    an infinite retention policy)."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d|w)", duration):
        scale = {
            "ns": 1e-9,
            "us": 1e-6,
            "µs": 1e-6,
            "ms": 1e-3,
            "s": 1,
            "m": 60,
            "h": 3600,
            "d": 86400,
            "w": 604800,
        }[unit]
        total += float(number) * scale
    return int(total)


# ---------------------------------------------------------------------------------- 1.x


def setup_v1(settings: Settings, client: InfluxV1Writer) -> list[Step]:
    steps: list[Step] = []
    rp = settings.setup.v1_retention_policy
    names = settings.buckets.names()

    def rows(q: str, db: str | None = None) -> list[dict[str, Any]]:
        out = []
        for result in client.query(q, db):
            for series in result.get("series", []):
                for values in series.get("values", []):
                    out.append(
                        {
                            "_series": series.get("name"),
                            **dict(zip(series["columns"], values, strict=True)),
                        }
                    )
        return out

    existing = {row["name"] for row in rows("SHOW DATABASES")}
    for logical in BUCKETS:
        bucket = settings.buckets.of(logical)
        name, hours = bucket.name, bucket.retention_hours
        duration = "INF" if hours == 0 else f"{round(hours * 60)}m"
        shard = f"{shard_hours(hours)}h"
        created = name not in existing
        if created:
            client.query(f'CREATE DATABASE "{name}"')
        policies = {row["name"]: row for row in rows(f'SHOW RETENTION POLICIES ON "{name}"')}
        current = policies.get(rp)
        want_secs = round(hours * 3600)
        if current is None:
            client.query(
                f'CREATE RETENTION POLICY "{rp}" ON "{name}" DURATION {duration} '
                f"REPLICATION 1 SHARD DURATION {shard} DEFAULT"
            )
            changed = True
        elif (
            duration_secs(current["duration"]) != want_secs
            or duration_secs(current["shardGroupDuration"]) != shard_hours(hours) * 3600
            or not current["default"]
        ):
            client.query(
                f'ALTER RETENTION POLICY "{rp}" ON "{name}" DURATION {duration} '
                f"SHARD DURATION {shard} DEFAULT"
            )
            changed = True
        else:
            changed = False
        outcome: StepOutcome = "created" if created else "updated" if changed else "unchanged"
        steps.append(Step("database", name, outcome, f"retention {describe_retention(hours)}"))

    current_cqs = {(row["_series"], row["name"]) for row in rows("SHOW CONTINUOUS QUERIES")}
    hours = settings.setup.downsample_lookback_hours
    wanted = {
        ds.target.bucket: continuous_query(ds, names, rp, lookback_secs(ds, hours))
        for ds in DOWNSAMPLES
    }
    # Every livestack CQ that is not wanted goes, on whichever database it sits: after a
    # bucket rename the old one would otherwise keep writing into the same target as the new.
    stale = {
        (cq_db, cq)
        for cq_db, cq in current_cqs
        if cq.startswith(f"{NAME_PREFIX}_") and (cq_db, cq) not in {w[:2] for w in wanted.values()}
    }
    for cq_db, cq in sorted(stale):
        client.query(f'DROP CONTINUOUS QUERY "{cq}" ON "{cq_db}"')
        steps.append(Step("continuous query", f"{cq_db}.{cq}", "updated", "dropped"))
    for db, name, statement in wanted.values():
        if (db, name) in current_cqs:
            steps.append(Step("continuous query", name, "unchanged"))
        else:
            client.query(statement)
            steps.append(Step("continuous query", name, "created"))
    return steps


# ---------------------------------------------------------------------------------- 2.x


def _rules(hours: float) -> list[BucketRetentionRules]:
    if hours == 0:
        return []
    return [
        BucketRetentionRules(
            type="expire",
            every_seconds=round(hours * 3600),
            shard_group_duration_seconds=shard_hours(hours) * 3600,
        )
    ]


def _every_seconds(bucket: Any) -> int:
    rules = bucket.retention_rules or []
    return int(rules[0].every_seconds or 0) if rules else 0


def setup_v2(settings: Settings, writer: InfluxV2Writer) -> list[Step]:
    client = writer.client
    call = writer.call
    org_name = settings.influxdb.org
    orgs = call(
        "find organization", lambda: client.organizations_api().find_organizations(org=org_name)
    )
    if not orgs:
        raise Failure("rejected", f"organization {org_name!r} not found", stage="write")
    org_id = orgs[0].id
    steps: list[Step] = []
    buckets_api = client.buckets_api()
    dbrps = DBRPsService(client.api_client)
    bucket_ids: dict[str, str] = {}
    names = settings.buckets.names()

    for logical in BUCKETS:
        config = settings.buckets.of(logical)
        name, hours = config.name, config.retention_hours
        bucket = call("find bucket", partial(buckets_api.find_bucket_by_name, name))
        if bucket is None:
            bucket = call(
                "create bucket",
                partial(
                    buckets_api.create_bucket,
                    bucket_name=name,
                    retention_rules=_rules(hours),
                    org=org_id,
                ),
            )
            outcome: StepOutcome = "created"
        elif _every_seconds(bucket) != round(hours * 3600):
            bucket.retention_rules = _rules(hours)
            bucket = call("update bucket", partial(buckets_api.update_bucket, bucket))
            outcome = "updated"
        else:
            outcome = "unchanged"
        bucket_ids[logical] = bucket.id
        steps.append(Step("bucket", name, outcome, f"retention {describe_retention(hours)}"))

        mapped = call("find dbrp", partial(dbrps.get_dbr_ps, org_id=org_id, db=name))
        if any(m.bucket_id == bucket.id for m in (mapped.content or [])):
            steps.append(Step("dbrp", f"{name}/autogen", "unchanged"))
        else:
            call(
                "create dbrp",
                partial(
                    dbrps.post_dbrp,
                    DBRPCreate(
                        org_id=org_id,
                        bucket_id=bucket.id,
                        database=name,
                        retention_policy="autogen",
                        default=True,
                    ),
                ),
            )
            steps.append(Step("dbrp", f"{name}/autogen", "created"))

    tasks_api = client.tasks_api()
    for ds in DOWNSAMPLES:
        lookback = lookback_secs(ds, settings.setup.downsample_lookback_hours)
        name, flux = flux_task(ds, names, settings.setup.task_offset_secs, lookback)
        found = call("find task", partial(tasks_api.find_tasks, name=name)) or []
        task = next((t for t in found if t.name == name), None)
        if task is None:
            call(
                "create task",
                partial(
                    tasks_api.create_task,
                    task_create_request=TaskCreateRequest(
                        flux=flux,
                        org_id=org_id,
                        status="active",
                        description="downsampling, generated by collector setup",
                    ),
                ),
            )
            steps.append(Step("task", name, "created"))
        elif task.flux != flux:
            call(
                "update task",
                partial(
                    tasks_api.update_task_request,
                    task.id,
                    TaskUpdateRequest(flux=flux, status="active"),
                ),
            )
            steps.append(Step("task", name, "updated"))
        else:
            steps.append(Step("task", name, "unchanged"))

    # Listing buckets shows a token only those it may read (authorizer/bucket.go,
    # AuthorizeFindBuckets): the writer also reads `trips`, so that the replay's retention
    # pre-flight can see that bucket's expire rule. Trip history holds no personal data.
    writer_grants = [("write", logical) for logical in WRITTEN_BUCKETS] + [("read", TRIPS_BUCKET)]
    tokens = (
        ("writer token", settings.setup.writer_token_file, writer_grants, "livestack collector"),
        (
            "reader token",
            settings.setup.reader_token_file,
            [("read", logical) for logical in BUCKETS],
            "livestack grafana: read",
        ),
    )
    for what, path, grants, description in tokens:
        if path is None:
            continue
        if path.is_file() and path.read_text().strip():
            steps.append(Step(what, str(path), "kept"))
            continue
        permissions = [
            Permission(
                action=action,
                resource=PermissionResource(type="buckets", id=bucket_ids[logical], org_id=org_id),
            )
            for action, logical in grants
        ]
        authorization = call(
            "create token",
            partial(
                client.authorizations_api().create_authorization,
                authorization=Authorization(
                    org_id=org_id, permissions=permissions, description=description
                ),
            ),
        )
        write_secret(path, authorization.token)
        summary = ", ".join(
            f"{action} on {sum(1 for a, _ in grants if a == action)} buckets"
            for action in sorted({a for a, _ in grants}, reverse=True)
        )
        steps.append(Step(what, str(path), "created", summary))
    return steps


# ---------------------------------------------------------------------------------- 3.x

# Retention period units of InfluxDB 3 ("Create a database", "Retention period syntax":
# m, h, d, w, mo, y; "none" is forever, and "0d" would expire everything at once).
_V3_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 604800, "mo": 30 * 86400, "y": 365 * 86400}


def v3_retention(hours: float) -> str | None:
    """The retention period to create a database with; None (omitted) keeps data forever."""
    if hours == 0:
        return None
    minutes = round(hours * 60)
    return f"{minutes // 60}h" if minutes % 60 == 0 else f"{minutes}m"


def v3_retention_secs(period: str | None) -> int:
    """Seconds in a retention period as InfluxDB 3 lists it; 0 = forever ("none" or absent)."""
    if period is None or period.strip() in ("", "none"):
        return 0
    total = 0
    for number, unit in re.findall(r"(\d+)\s*(mo|y|w|d|h|m)", period):
        total += int(number) * _V3_UNITS[unit]
    return total


def setup_v3(settings: Settings, writer: InfluxV3Writer) -> list[Step]:
    steps: list[Step] = []
    existing = writer.databases()
    for logical in BUCKETS:
        config = settings.buckets.of(logical)
        name, hours = config.name, config.retention_hours
        wanted = describe_retention(hours)
        if name not in existing:
            doc: dict[str, Any] = {"db": name}
            period = v3_retention(hours)
            if period is not None:
                doc["retention_period"] = period
            writer.configure("POST", "/api/v3/configure/database", doc)
            steps.append(Step("database", name, "created", f"retention {wanted}"))
        elif v3_retention_secs(existing[name]) == round(hours * 3600):
            steps.append(Step("database", name, "unchanged", f"retention {wanted}"))
        else:
            # Core cannot change a retention period after creation ("Retention periods are
            # immutable in Core"); we do not guess Enterprise's update call either.
            steps.append(
                Step(
                    "database",
                    name,
                    "manual",
                    f"retention is {existing[name] or 'none'} on the server, {wanted} here: "
                    "Enterprise: `influxdb3 update database --retention-period`; Core: "
                    "recreate the database",
                )
            )
    for ds in DOWNSAMPLES:
        steps.append(
            Step(
                "downsampling",
                f"{ds.source.name} -> {ds.target.name}",
                "manual",
                "InfluxDB 3 has no tasks or continuous queries: see README, Downsampling",
            )
        )

    names = settings.buckets.names()
    tokens = (
        (
            "writer token",
            settings.setup.writer_token_file,
            # Write on what the collector writes; read on trips for the replay's pre-flight.
            [
                {
                    "resource_type": "db",
                    "resource_identifier": [names[b] for b in WRITTEN_BUCKETS],
                    "actions": ["write"],
                },
                {
                    "resource_type": "db",
                    "resource_identifier": [names[TRIPS_BUCKET]],
                    "actions": ["read"],
                },
            ],
            "livestack collector",
        ),
        (
            "reader token",
            settings.setup.reader_token_file,
            [
                {
                    "resource_type": "db",
                    "resource_identifier": [names[b] for b in BUCKETS],
                    "actions": ["read"],
                }
            ],
            "livestack grafana: read",
        ),
    )
    for what, path, permissions, token_name in tokens:
        if path is None:
            continue
        if path.is_file() and path.read_text().strip():
            steps.append(Step(what, str(path), "kept"))
            continue
        # Resource tokens are Enterprise's ("Resource tokens are user-defined and available
        # only in InfluxDB 3 Enterprise"): POST /api/v3/enterprise/configure/token; Core has
        # no such route and answers 404.
        try:
            created = writer.configure(
                "POST",
                "/api/v3/enterprise/configure/token",
                {"token_name": token_name, "permissions": permissions},
            )
        except Failure as failure:
            if failure.status != 404:
                raise
            steps.append(
                Step(
                    what,
                    str(path),
                    "manual",
                    "InfluxDB 3 Core has no database tokens: write an admin token "
                    "(`influxdb3 create token --admin`) to this file yourself",
                )
            )
            continue
        secret = created.get("token") if isinstance(created, dict) else None
        if not isinstance(secret, str) or not secret:
            raise Failure("rejected", "create token: no token in the answer", stage="write")
        write_secret(path, secret)
        summary = "; ".join(
            f"{'/'.join(p['actions'])} on {len(p['resource_identifier'])} databases"
            for p in permissions
        )
        steps.append(Step(what, str(path), "created", summary))
    return steps


def write_secret(path: Path, secret: str) -> None:
    """Write ``secret`` readable by its owner only; never through a world-readable moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secret.encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)


def setup(settings: Settings) -> list[Step]:
    if settings.influxdb.api == "v1":
        client = InfluxV1Writer(settings.influxdb)
        try:
            return setup_v1(settings, client)
        finally:
            client.close()
    if settings.influxdb.api == "v3":
        writer3 = InfluxV3Writer(settings.influxdb)
        try:
            return setup_v3(settings, writer3)
        finally:
            writer3.close()
    writer = InfluxV2Writer(settings.influxdb)
    try:
        return setup_v2(settings, writer)
    finally:
        writer.close()
