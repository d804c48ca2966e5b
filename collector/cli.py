"""The ``collector`` command line: parses arguments and wires the parts; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from collector import __version__, limits, logs, replay, settings
from collector.archive import open_archive
from collector.contract import STATION_STATUS, TRIPS_BUCKET
from collector.http import redact_url
from collector.retry import Failure
from collector.scheduler import Scheduler
from collector.shard import Shard
from collector.sinks.base import AuthError, Fatal, Sink
from collector.sinks.influxdb import flavour_problem, make_writer
from collector.sinks.spool import DeadLetters, Spool, SpoolBusy, SpoolingSink
from collector.sinks.stdout import StdoutSink
from collector.sources.trips import Flows, Progress, TripFileError
from collector.telemetry import Counters

log = logging.getLogger("collector")

EXIT_OK, EXIT_FAILURES, EXIT_CONFIG = 0, 1, 2


def _fail(message: object, code: int = EXIT_CONFIG) -> int:
    """The error-and-exit path of every command: one line on stderr, the exit code back."""
    print(f"collector: {message}", file=sys.stderr)
    return code


_SHARD_HELP = (
    "K/N: poll only replica K's share of the GBFS systems, of N replicas (default: "
    "gbfs.shard, or all); give each replica its own spool.dir"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collector",
        description=(
            "Poll bike-share (GBFS) feeds and a foot-pressure API into InfluxDB, and provision "
            "InfluxDB and Grafana for them. Every command but simulate reads a TOML settings "
            f"file (--config, or ${settings.CONFIG_ENV})."
        ),
        epilog="collector COMMAND --help shows each command's options. Exit codes: 0 ok, "
        "1 a source or the database failed, 2 bad configuration, input or credentials.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--config", type=Path, help=f"TOML settings file (default: ${settings.CONFIG_ENV})"
        )
        return sub

    run = command("run", "poll every configured source and write to InfluxDB")
    run.add_argument("--once", action="store_true", help="one poll of every source, then exit")
    run.add_argument("--shard", help=_SHARD_HELP)
    run.add_argument(
        "--dry-run", action="store_true", help="print line protocol instead of writing"
    )
    command("setup", "create the buckets (v2) or databases (v1) the collector writes to")
    check = command("check", "check configuration and connectivity, and print a report")
    check.add_argument("--shard", help=_SHARD_HELP)
    dashboards = command(
        "dashboards", "generate Grafana provisioning: datasource, dashboards, alerts"
    )
    dashboards.add_argument(
        "--out", type=Path, default=Path("grafana/provisioning"), help="default: %(default)s"
    )
    dashboards.add_argument(
        "--check", action="store_true", help="only report files that differ; exit 1 if any"
    )

    replay = command(
        "replay",
        "replay Citi Bike trip history as docks and undocks per minute (trips), or the raw "
        "archive through today's parsers (archive)",
    )
    replay.add_argument("kind", choices=("trips", "archive"))
    replay.add_argument(
        "files", nargs="+", type=Path, help="trips: CSV files (plain, .gz or .zip); archive: DIR"
    )
    replay.add_argument(
        "--system", help="trips: the system tag (default: citibike); archive: only this system"
    )
    replay.add_argument("--from", dest="start", help="archive: from this time (ISO 8601, UTC)")
    replay.add_argument("--to", dest="end", help="archive: until this time (excluded)")
    mode = replay.add_mutually_exclusive_group()
    mode.add_argument(
        "--backfill", action="store_true", help="historical times, full speed (default)"
    )
    mode.add_argument("--speed", type=float, help="replay live at this many times real time")
    replay.add_argument(
        "--shift-to-now",
        action="store_true",
        help="backfill: move every minute by one offset so that the last one is now",
    )
    replay.add_argument(
        "--timezone",
        default="America/New_York",
        help="IANA zone of the file's times (default: %(default)s)",
    )
    replay.add_argument("--dry-run", action="store_true", help="print line protocol instead")

    systems = commands.add_parser(
        "systems",
        help="turn the GBFS catalogue (MobilityData's systems.csv) into [[gbfs.systems]]",
        description="Turn the GBFS catalogue into [[gbfs.systems]] settings: one entry per "
        "system, named from its System ID; those needing authentication commented out at the "
        "end, with what they need.",
    )
    systems_commands = systems.add_subparsers(dest="action", required=True, metavar="{import}")
    importing = systems_commands.add_parser(
        "import", help="systems.csv -> TOML", description="systems.csv -> [[gbfs.systems]] TOML"
    )
    importing.add_argument("csv", type=Path, help="the catalogue (systems.csv)")
    importing.add_argument("--country", help="only these country codes, e.g. NO,FR")
    importing.add_argument(
        "--version", dest="gbfs_version", help='only systems supporting e.g. ">=2.0", "<3", "2.3"'
    )
    importing.add_argument(
        "--interval-secs", type=_between(1, 86_400, float), help="interval_secs of each entry"
    )
    importing.add_argument("--out", type=Path, help="write here instead of stdout")

    simulate = commands.add_parser(
        "simulate",
        help="serve a stand-in for the foot-pressure API or a bike-share system",
        description="Serve a stand-in for an outside API, so the stack runs with no account.",
    )
    apis = simulate.add_subparsers(dest="api", required=True, metavar="{pressure,gbfs}")

    def simulator(name: str, help: str, port: int) -> argparse.ArgumentParser:
        sub = apis.add_parser(
            name,
            help=help,
            description=help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sub.add_argument("--host", default="127.0.0.1", help="address to listen on")
        sub.add_argument("--port", type=_port, default=port, help="port to listen on (0: any)")
        sub.add_argument("--seed", type=int, default=0, help="same seed, same data")
        return sub

    pressure_sim = simulator(
        "pressure", "the insole API: GET /1 .. /N, six sensors a reading, anomaly runs", 9080
    )
    pressure_sim.add_argument(
        "--patients",
        type=_between(1, 10_000, int),
        default=6,
        help="patient ids 1..N (beyond 6: load)",
    )
    pressure_sim.add_argument(
        "--anomaly-runs-per-hour",
        type=_between(0.0, 3600.0, float),
        default=6.0,
        help="flagged runs per patient and hour",
    )
    gbfs_sim = simulator("gbfs", "a bike-share city's GBFS feed at /gbfs.json", 9081)
    gbfs_sim.add_argument(
        "--version", dest="gbfs_version", choices=("2.3", "3.0"), default="2.3", help="GBFS"
    )
    gbfs_sim.add_argument(
        "--stations",
        type=_between(1, 100_000, int),
        default=300,
        help="stations in the city (a whole city is held in memory)",
    )
    return parser


def _between(low: float, high: float, kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {text}")
        return value

    return parse


def _port(text: str) -> int:
    return int(_between(0, 65535, int)(text))  # 0: any free port, named in the log line


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "systems":
        return _systems_import(args)
    try:
        config = settings.load(args.config)
    except settings.ConfigError as exc:
        return _fail(exc)
    logs.configure(config.log_level)
    if getattr(args, "shard", None) is not None:
        try:
            gbfs = config.gbfs.model_copy(update={"shard": str(Shard.parse(args.shard))})
        except ValueError as exc:
            return _fail(f"--shard: {exc}")
        config = config.model_copy(update={"gbfs": gbfs})
    try:
        commands = {
            "run": _run,
            "setup": _setup,
            "check": _check,
            "dashboards": _dashboards,
            "replay": _replay,
        }
        return commands[args.command](config, args)
    except (AuthError, settings.ConfigError) as exc:
        return _fail(exc)


def _warn_insecure(config: settings.Settings) -> None:
    off = [s.name for s in config.gbfs.systems if not s.verify_tls]
    if config.pressure.url and not config.pressure.verify_tls:
        off.append("pressure")
    if not config.influxdb.verify_tls:
        off.append("influxdb")
    for source in off:
        logs.event(
            log,
            logging.WARNING,
            "tls_verification_off",
            source=source,
            detail="certificates are not checked: anyone on the path can read and alter data",
        )


def _run(config: settings.Settings, args: argparse.Namespace) -> int:
    _warn_insecure(config)
    if not args.dry_run and (problem := flavour_problem(config.influxdb)):
        return _fail(problem)
    counters, fatal = Counters(), Fatal()
    stop = threading.Event()
    if not args.once:
        # Before anything starts (the spool's drainer first): a stop asked for while the
        # collector starts is a clean stop, not the default death by signal.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    try:
        sink = StdoutSink() if args.dry_run else _database_sink(config, counters, fatal)
    except SpoolBusy as exc:
        return _fail(exc)
    # One archive, handed to every source as it is made: they record what they fetch.
    archive = open_archive(config.archive, counters)
    scheduler = Scheduler.from_settings(
        config, sink, counters=counters, fatal=fatal, archive=archive, once=args.once
    )
    try:
        if not scheduler.jobs:
            return _fail("no source configured (add [[gbfs.systems]] or [pressure] url)")
        if args.once:
            summaries = scheduler.run_once()
            for summary in summaries:
                logs.event(
                    log,
                    logging.INFO,
                    "summary",
                    source=summary.source,
                    ok=summary.ok,
                    outcome=summary.outcome,
                    written=summary.written,
                )
            return EXIT_OK if all(s.ok for s in summaries) else EXIT_FAILURES
        scheduler.run(stop)
        return EXIT_OK if fatal.error is None else EXIT_CONFIG
    finally:
        scheduler.close()
        if archive is not None:
            archive.close()  # ends each file's gzip stream
        sink.close()
        if not args.once:
            # After the sink: its drainer and spool have said their last word by now.
            logs.event(log, logging.INFO, "stopped")


def _database_sink(config: settings.Settings, counters: Counters, fatal: Fatal) -> Sink:
    writer = make_writer(config.influxdb, bucket_names=config.buckets.names())
    spool = config.spool
    if not spool.enabled:
        return writer
    spooled = Spool(spool.dir, int(spool.max_mb * 1024 * 1024))
    # Before the drainer starts: what it would send the server drops.
    replay.warn_spooled_beyond_retention(
        config.influxdb, config.buckets.names(), spooled.oldest_by_bucket()
    )
    dead_letters = DeadLetters(
        spooled.dead_letter_path,
        int(spool.dead_letter_max_mb * 1024 * 1024),
        bucket_names=config.buckets.names(),
    )
    return SpoolingSink(writer, spooled, dead_letters, fatal=fatal, counters=counters)


def _replay(config: settings.Settings, args: argparse.Namespace) -> int:
    if args.kind == "archive":
        return _replay_archive(config, args)
    args.system = args.system or "citibike"
    problem = _replay_options_problem(args)
    if problem:
        return _fail(problem)
    bucket = config.buckets.of(TRIPS_BUCKET).name
    retention = None
    if not args.dry_run:
        if problem := flavour_problem(config.influxdb):
            return _fail(problem)
        # Before reading a file that may take a while: the database answers, the bucket exists.
        try:
            retention = replay.read_retention(config.influxdb, bucket)
        except replay.PreflightError as exc:
            return _fail(exc)
        except Failure as failure:
            return _unusable_database(config, failure)
    writer = (
        None if args.dry_run else make_writer(config.influxdb, bucket_names=config.buckets.names())
    )
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        # Not from the handler itself: it may interrupt this thread inside an Event's lock.
        def stopping() -> None:
            stop.set()
            if writer is not None:
                writer.stop_retrying()

        threading.Thread(target=stopping, daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    rename = replay.station_matcher(config, args.system)
    flows, progress = Flows(timezone=args.timezone), Progress()
    bar = replay.ProgressLine()
    try:
        outcome = replay.replay_trips(
            args.files,
            flows,
            progress,
            bar,
            StdoutSink() if writer is None else writer,
            system=args.system,
            speed=args.speed,
            shift_to_now=args.shift_to_now,
            retention=retention,
            rename=rename,
            stop=stop,
            writers=0 if writer is None else replay.WRITERS,
        )
        # A live replay ends with Ctrl-C by design; a stopped backfill is incomplete.
        incomplete = outcome.stopped and args.speed is None
        return EXIT_FAILURES if outcome.rows_failed or incomplete else EXIT_OK
    except (TripFileError, replay.PreflightError) as exc:
        return _fail(exc)
    except replay.Stopped:
        logs.event(log, logging.WARNING, "replay_stopped", stage="reading", written=0)
        return EXIT_FAILURES
    finally:
        flows.close()
        if writer is not None:
            writer.close()


def _replay_archive(config: settings.Settings, args: argparse.Namespace) -> int:
    from collector import archive

    problem, start, end = _archive_options(args)
    if problem:
        return _fail(problem)
    directory = args.files[0]
    selection = archive.select(directory, system=args.system, start=start, end=end)
    if not selection.files:
        which = f" of system {args.system!r}" if args.system else ""
        return _fail(f"no archive files{which} in that range under {directory}")
    outcome = archive.ReplayOutcome()
    keep_person = config.pressure.store_personal_data
    files, spans = archive.verify(selection, outcome, keep_person=keep_person)
    if not args.dry_run:
        if problem := flavour_problem(config.influxdb):
            return _fail(problem)
        try:
            archive.retention_preflight(config, spans, directory)
        except replay.PreflightError as exc:
            return _fail(exc)
        except Failure as failure:
            return _unusable_database(config, failure)
    sink = StdoutSink() if args.dry_run else _replay_sink(config)
    try:
        archive.replay(files, selection, sink, config, outcome)
    finally:
        sink.close()
    outcome.log()
    return EXIT_FAILURES if outcome.failed_any else EXIT_OK


def _archive_options(args: argparse.Namespace) -> tuple[str | None, float | None, float | None]:
    """(problem, --from, --to as epoch seconds)."""
    from datetime import UTC, datetime

    if args.speed is not None or args.shift_to_now or args.backfill:
        return "--speed, --backfill and --shift-to-now are for trips, not the archive", None, None
    if len(args.files) != 1 or not args.files[0].is_dir():
        return f"replay archive takes one directory: {' '.join(map(str, args.files))}", None, None
    times: list[float | None] = []
    for option, text in (("--from", args.start), ("--to", args.end)):
        if text is None:
            times.append(None)
            continue
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return f"{option} {text}: not an ISO 8601 time (2026-12-01T13:00Z)", None, None
        times.append((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
    start, end = times
    if start is not None and end is not None and start >= end:
        return f"--from {args.start} is not before --to {args.end}", None, None
    return None, start, end


def _unusable_database(config: settings.Settings, failure: Failure) -> int:
    where = redact_url(config.influxdb.url)
    code = EXIT_CONFIG if failure.kind == "auth" else EXIT_FAILURES
    return _fail(f"InfluxDB at {where} cannot be used: {failure}", code)


def _replay_sink(config: settings.Settings) -> Sink:
    """The live path, spool included; a running collector holds the spool, and then the
    replay writes directly (retrying as the writer does) and says so. Refused credentials
    met by the spool's drainer end nothing here: the replay's own writes raise them."""
    try:
        return _database_sink(config, Counters(), Fatal())
    except SpoolBusy as exc:
        logs.event(log, logging.INFO, "replay_direct", detail=f"{exc}: writing without it")
        return make_writer(config.influxdb, bucket_names=config.buckets.names())


def _replay_options_problem(args: argparse.Namespace) -> str | None:
    import math
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if args.speed is not None and not (math.isfinite(args.speed) and args.speed > 0):
        return f"--speed {args.speed}: must be a finite number above 0 (60 = an hour a minute)"
    if args.shift_to_now and args.speed is not None:
        return "--shift-to-now is for backfills; --speed already stamps minutes with now"
    try:
        ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return f"--timezone {args.timezone}: unknown time zone (an IANA name: America/New_York)"
    for path in args.files:
        if not path.is_file():
            return f"no such file: {path}"
    return None


def _setup(config: settings.Settings, args: argparse.Namespace) -> int:
    from collector.provision.influxdb import setup

    if problem := flavour_problem(config.influxdb):
        return _fail(f"setup failed: {problem}")
    try:
        for step in setup(config):
            print(step)
    except Failure as failure:
        # Refused credentials (401) or too few rights (403, "requires admin privilege"): the
        # operator must change the config; retrying the same cannot help.
        code = EXIT_CONFIG if failure.kind == "auth" else EXIT_FAILURES
        return _fail(f"setup failed: {failure}", code)
    # Before the first write: the systems' stations, estimated, against the server's limits.
    systems = len(config.gbfs.systems)
    for warning in limits.warnings(
        config.influxdb.api,
        limits.estimate_stations(systems),
        config.buckets.of(STATION_STATUS.bucket).name,
        estimated=True,
    ):
        print(f"limits: warning: {warning}")
    return EXIT_OK


def _dashboards(config: settings.Settings, args: argparse.Namespace) -> int:
    try:
        from collector.provision import grafana
    except ImportError as exc:  # the generator's libraries are an extra, not in the image
        return _fail(f"{exc}; pip install '.[dashboards]'")
    if args.check:
        missing, differing = grafana.compare(args.out, config)
        for relative in missing:
            print(f"missing: {args.out / relative}")
        for relative in differing:
            print(f"differs from the generator: {args.out / relative}")
        return EXIT_FAILURES if missing or differing else EXIT_OK
    for path in grafana.write(args.out, config):
        print(path)
    return EXIT_OK


def _check(config: settings.Settings, args: argparse.Namespace) -> int:
    from collector.check import check

    return check(config)


def _systems_import(args: argparse.Namespace) -> int:
    from collector import catalogue

    try:
        version = catalogue.VersionFilter(args.gbfs_version) if args.gbfs_version else None
        chosen = catalogue.entries(
            catalogue.read(args.csv),
            countries=(args.country or "").split(","),
            version=version,
        )
    except catalogue.CatalogueError as exc:
        return _fail(exc)
    if not chosen:
        return _fail("no system in the catalogue passes those filters")
    text = catalogue.to_toml(chosen, interval_secs=args.interval_secs)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        needs = sum(1 for e in chosen if e.auth)
        print(f"{args.out}: {len(chosen) - needs} systems, {needs} needing authentication")
    return EXIT_OK


def _simulate(args: argparse.Namespace) -> int:
    from collector.simulators.gbfs import GbfsSimulator
    from collector.simulators.pressure import PressureSimulator
    from collector.simulators.serve import WsgiApp, make_server

    logs.configure("INFO")
    if args.api == "pressure":
        app: WsgiApp = PressureSimulator(
            args.seed, anomaly_runs_per_hour=args.anomaly_runs_per_hour, patients=args.patients
        )
        path = ""  # [pressure] url; patients are /1 .. /N
    else:
        app = GbfsSimulator(args.seed, stations=args.stations, version=args.gbfs_version)
        path = "/gbfs.json"  # [[gbfs.systems]] url
    try:
        server = make_server(app, args.host, args.port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return _fail(f"cannot listen on {args.host}:{args.port}: {reason}")
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    port = server.server_address[1]
    logs.event(
        log,
        logging.INFO,
        "simulating",
        api=args.api,
        url=f"http://{args.host}:{port}{path}",
        seed=args.seed,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
