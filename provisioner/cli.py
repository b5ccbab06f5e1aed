"""The ``provisioner`` command line."""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

# Only what building the parser needs is imported here: `provisioner --help` must not load the
# engine (SQLAlchemy, the SCIM client, the scheduler). Each command imports what it runs.
from provisioner import redaction
from provisioner.errors import ConfigError, SafetyStop, SourceError, UserError
from provisioner.lifecycle import (
    EXIT_BROKEN_PIPE,
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_NOT_OK,
    EXIT_OK,
    EXIT_SAFETY_STOP,
    EXIT_USAGE,
    STATUSES,
    Reason,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from provisioner.config import Config
    from provisioner.health import TargetHealth
    from provisioner.queue import Selection
    from provisioner.sync import TargetReport

EPILOG = """exit codes (sync and status alike, from the targets' health):
  0  every target is healthy: nothing failed, waits for a retry or is held
  1  internal error (a bug: please report it with the log)
  2  wrong command-line usage
  3  config, mapping or source error: fix the file named in the message
  4  operations failed or wait for a retry (this cycle's or earlier ones'), or the target is
     paused or quarantined: see `provisioner status` and `provisioner queue list`
  5  safety stop: the cycle was refused (an empty or truncated source), or leavers
     or group member removals are held by a brake (see `provisioner plan --held`)
"""

class UsageError(Exception):
    """The command line asks for something that cannot be done as written."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the return value is the process exit code.

    Everything printed goes through the masking registry (``provisioner.redaction``),
    tracebacks of internal errors included.
    """
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Masked(out), _Masked(err)
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`provisioner queue list | head`): stop quietly, as a shell's SIGPIPE
        # exit would. The signal itself is never reset to its default: in a process that also holds
        # sockets (sync's HTTP clients, the daemon's listener, a test runner) it would kill the whole
        # process on any peer that closes early (Python docs, signal: "Note on SIGPIPE").
        _silence(out)
        return EXIT_BROKEN_PIPE
    finally:
        sys.stdout, sys.stderr = out, err


def _silence(stream: Any) -> None:
    """Send what is left of ``stream`` to /dev/null, so that flushing it at exit raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # After parsing: --help, --version and usage errors end inside parse_args, without structlog.
    from provisioner import logs

    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.handler(args))
    except BrokenPipeError:
        raise
    except SafetyStop as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_SAFETY_STOP
    except (ConfigError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"provisioner: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; operations not yet sent stay queued for the next cycle", file=sys.stderr)
        return 130
    except Exception:
        # A bug: the traceback is for the report, with every known secret masked like any other output.
        print(traceback.format_exc(), file=sys.stderr, end="")
        print("internal error (a bug): please report it with the lines above", file=sys.stderr)
        return EXIT_INTERNAL


def _unmasked(line: str) -> None:
    """Print one line past the masking: only for a value the user must copy (the demo's throwaway token)."""
    stream = sys.stdout._stream if isinstance(sys.stdout, _Masked) else sys.stdout  # noqa: SLF001
    stream.write(line + "\n")


class _Masked(io.TextIOBase):
    """A text stream that masks every known secret in what is written to it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redaction.redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    def fileno(self) -> int:
        return int(self._stream.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._stream, "encoding", "utf-8"))

    def writable(self) -> bool:
        return True


CONFIG_HELP = "the config file (default: config.yaml)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provisioner",
        description="Outbound SCIM 2.0 provisioning: HR source to SaaS accounts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    _global_options(parser)
    made: list[argparse.ArgumentParser] = []

    class CommandParser(argparse.ArgumentParser):
        """The parser of every command, however nested: ``add_subparsers(parser_class=)`` is the
        documented way to choose it, and a command's own ``add_subparsers`` makes parsers of its class."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    demo = commands.add_parser("demo", help="run one cycle of the sample HR file into a local SCIM server")
    demo.add_argument("--dir", type=Path, default=Path(".provisioner-demo"), help="where the demo keeps its state")
    demo.add_argument("--keep-running", action="store_true", help="keep the SCIM server up until Ctrl-C")
    demo.set_defaults(handler=_demo)

    run = commands.add_parser("run", help="the daemon: cycles on each source's schedule, retries, metrics")
    run.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    run.set_defaults(handler=_run)

    sync = commands.add_parser("sync", help="run one cycle for every configured target, then exit")
    _config_options(sync)
    sync.add_argument("--json", action="store_true", help="print the summary as JSON")
    sync.add_argument("--only", nargs="+", metavar="KEY",
                      help="plan and send only these identities (and their group memberships), each step printed")  # fmt: skip
    sync.set_defaults(handler=_sync)

    plan = commands.add_parser("plan", help="print what a cycle would do; sends nothing")
    _config_options(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--held", action="store_true", help="show the leavers and member removals held by the brakes")
    plan.set_defaults(handler=_plan)

    reconcile = commands.add_parser(
        "reconcile", help="read every account of a target back and name its situation; --repair reacts"
    )
    _config_options(reconcile)
    reconcile.add_argument("--json", action="store_true", help="print the findings as JSON")
    reconcile.add_argument("--csv", type=Path, metavar="FILE", help="also write every account's situation to FILE")
    reconcile.add_argument(
        "--repair", action="store_true", help="queue and send the configured reactions (without it nothing is written)"
    )
    reconcile.set_defaults(handler=_reconcile)

    approve = commands.add_parser("approve", help="release a held run's leavers or member removals (sent by the next cycle)")
    approve.add_argument("run_id", help="the held run, as `provisioner plan --held` names it")
    approve.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    approve.set_defaults(handler=_release, approve=True)
    reject = commands.add_parser("reject", help="drop a held run's leavers or member removals")
    reject.add_argument("run_id", help="the held run, as `provisioner plan --held` names it")
    reject.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    reject.set_defaults(handler=_release, approve=False)

    preview = commands.add_parser("preview", help="what records become through a target's mapping; sends nothing")
    preview.add_argument("keys", nargs="+", metavar="KEY", help="identity keys in the source")
    preview.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    preview.add_argument("--target", help="the target whose mapping to use (default: the first configured)")
    preview.set_defaults(handler=_preview)

    check = commands.add_parser(
        "check", help="every mistake in the config and the mappings it uses (file:line:column), the state "
        "database and the metrics address"
    )
    check.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    check.add_argument("--target", action="append", help="check only this target, against the schemas it declares "
                       "(GET /Schemas, /ResourceTypes); repeatable. Default: every target, against RFC 7643")  # fmt: skip
    check.set_defaults(handler=_check)

    queue = commands.add_parser("queue", help="review recorded operations")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    listing = queue_commands.add_parser("list", help="list operations, newest first")
    listing.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    listing.add_argument("--status", choices=STATUSES, help="only operations in this status")
    listing.add_argument("--target", help="only this target's operations")
    listing.add_argument("--identity", help="only this identity key")
    listing.add_argument("--reason", choices=[r.value for r in Reason], help="only operations with this reason")
    listing.add_argument("--since", type=_since, help="updated since: an ISO date/time, or an age like 2h, 30m, 7d")
    listing.add_argument("--limit", type=_positive, default=200,
                         help="at most this many, newest first (default 200; says so when more match)")  # fmt: skip
    listing.add_argument("--json", action="store_true", help="print a JSON object: operations, limit, truncated")
    listing.set_defaults(handler=_queue_list)
    show = queue_commands.add_parser("show", help="one operation with every HTTP call made for it")
    show.add_argument("id", type=int, help="the operation's ID (first column of `queue list`)")
    show.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    show.add_argument("--json", action="store_true", help="print the operation and its calls as JSON")
    show.set_defaults(handler=_queue_show)

    retry = queue_commands.add_parser("retry", help="send failed or waiting operations again at the next cycle")
    _selection_options(retry)
    retry.set_defaults(handler=_queue_retry)
    resolve = queue_commands.add_parser("resolve", help="mark operations handled by hand (kept for audit)")
    _selection_options(resolve)
    resolve.add_argument("--note", required=True, help="what was done, for the audit trail")
    resolve.set_defaults(handler=_queue_close, close_as="resolved")
    cancel = queue_commands.add_parser("cancel", help="drop operations that must not be sent")
    _selection_options(cancel)
    cancel.add_argument("--note", help="why, for the audit trail")
    cancel.set_defaults(handler=_queue_close, close_as="cancelled")
    export = queue_commands.add_parser("export", help="operations as CSV or JSON, for a ticket")
    export.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    export.add_argument("--format", choices=["csv", "json"], default="csv", help="the output format (default csv)")
    export.add_argument("--status", choices=STATUSES, help="only operations in this status")
    export.add_argument("--target", help="only this target's operations")
    export.add_argument("--since", type=_since, help="updated since: an ISO date/time, or an age like 2h, 30m, 7d")
    export.add_argument("--limit", type=_positive, default=100_000, help="at most this many, newest first")
    export.set_defaults(handler=_queue_export)
    prune_parser = queue_commands.add_parser("prune", help="delete finished operations older than an age")
    prune_parser.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    prune_parser.add_argument("--older-than", required=True, type=_age, help="an age like 90d or 12h")
    prune_parser.set_defaults(handler=_queue_prune)

    target = commands.add_parser("target", help="pause or resume a target by hand (maintenance)")
    target_commands = target.add_subparsers(dest="target_command", required=True, metavar="ACTION")
    pause = target_commands.add_parser("pause", help="send nothing to this target; operations stay queued")
    pause.add_argument("name", help="the target's name in the config")
    pause.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    pause.add_argument("--note", help="why, shown by `provisioner status` and in alerts")
    pause.set_defaults(handler=_pause, paused=True)
    resume = target_commands.add_parser("resume", help="send to this target again")
    resume.add_argument("name", help="the target's name in the config")
    resume.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    resume.set_defaults(handler=_pause, paused=False, note=None)

    db = commands.add_parser("db", help="the state database's schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_upgrade = db_commands.add_parser("upgrade", help="migrate the state database to this version's schema")
    db_upgrade.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    db_upgrade.set_defaults(handler=_db_upgrade)

    status = commands.add_parser("status", help="per target: health, last cycle, operations by status, held cycles")
    status.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status)

    probe = commands.add_parser("probe", help="what a SCIM target really does, and the quirks: block that suits it")
    probe.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    probe.add_argument("--target", required=True, help="the target to probe, as named in the config")
    probe.add_argument(
        "--write",
        action="store_true",
        help="also create, change and delete a test user and groups named provisioner-probe-…",
    )
    output = probe.add_mutually_exclusive_group()
    output.add_argument("--suggest", action="store_true", help="print only the quirks: block to paste under the target")
    output.add_argument("--json", action="store_true", help="print one JSON object")
    probe.set_defaults(handler=_probe)

    # Every command takes the global options after its name too; added last, they come last in its usage.
    for command in made:
        _global_options(command, suppress=True)
    return parser


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """--log-level and --log-format: before the command, or after it (``suppress``: keep the first one given)."""
    level_default: Any = argparse.SUPPRESS if suppress else "info"
    format_default: Any = argparse.SUPPRESS if suppress else "auto"
    parser.add_argument("--log-level", default=level_default, choices=["debug", "info", "warning", "error"],
                        help="the least severe log lines written (default info)")  # fmt: skip
    parser.add_argument("--log-format", default=format_default, choices=["auto", "json", "console"],
                        help="auto: console on a terminal, else JSON lines")  # fmt: skip


class _Version(argparse.Action):
    """``--version``: the installed version is read when asked for, not each time the parser is built."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        print(f"{parser.prog} {_version()}")
        parser.exit()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("provisioner")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        return "unknown"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _selection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="operation IDs (first column of `queue list`)")
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    parser.add_argument("--status", choices=STATUSES, help="every operation in this status (with or without IDs)")
    parser.add_argument("--target", help="only this target's operations")


def _age(text: str) -> datetime:
    from provisioner.config import parse_duration

    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str) -> datetime:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date/time or an age like 2h: {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help=CONFIG_HELP)
    parser.add_argument("--target", action="append", help="only this target (repeatable)")


def _demo(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.demo import TOKEN_VARIABLE, start_scim_server, write_demo_config

    folder: Path = args.dir.resolve()
    # Stopped by a service manager or `kill`, the demo still stops its server on the way out: by default
    # SIGTERM/SIGHUP end the process at once, and the server would go on, orphaned, holding its port.
    for stop_signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, _interrupt)
    print("starting a local SCIM 2.0 server (scim2-server) ...", file=sys.stderr)
    with start_scim_server() as server:
        config_path = write_demo_config(folder, server)
        config = load_config(config_path)
        # The server starts empty, so the state of an earlier demo would be wrong about it.
        for suffix in ("", "-wal", "-shm"):
            Path(str(folder / "state.db") + suffix).unlink(missing_ok=True)
        code, reports, healths = _run_sync(config, None)
        _print_summary(reports, healths, as_json=False)
        print(f"\nstate database: {folder / 'state.db'}")
        print(f"review queue:   provisioner queue list --config {config_path}")
        if not args.keep_running:
            print("the SCIM server has stopped with the demo (its data was in memory); "
                  "provisioner demo --keep-running keeps it up")  # fmt: skip
        else:
            print(f"SCIM server:    {server.base_url}  (bearer token in ${'{'}PROVISIONER_DEMO_TOKEN{'}'})")
            # The demo's own throwaway token, printed on purpose so that curl can be pasted.
            _unmasked(f"\nin another terminal: export {TOKEN_VARIABLE}={server.token}")
            _unmasked(f"try: curl -s -H 'Authorization: Bearer {server.token}' {server.base_url}/Users")
            print("the server keeps running until Ctrl-C (its data is in memory and goes with it)")
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
        return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _probe(args: argparse.Namespace) -> int:
    from provisioner import probe

    return probe.command(args)


def _sync(args: argparse.Namespace) -> int:
    from provisioner.config import load_config

    config = load_config(args.config)
    if args.only:
        return _sync_only(config, args)
    code, reports, healths = _run_sync(config, args.target)
    _print_summary(reports, healths, as_json=args.json)
    return code


def _sync_only(config: Config, args: argparse.Namespace) -> int:
    """``sync --only KEY…``: provision these identities now (provisioner.ondemand); the exit code is about them alone."""
    import asyncio

    from provisioner.ondemand import sync_only
    from provisioner.sync import load_target_mapping, selected_targets

    targets = selected_targets(config, args.target)
    mappings = {name: load_target_mapping(config, name) for name in targets}

    def echo(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    with _planning(config, targets) as engine:
        reports = [asyncio.run(sync_only(engine, config, name, mappings[name], args.only, echo)) for name in targets]
    if args.json:
        print(orjson.dumps([{"target": r.target, "run_id": r.run_id, "ok": r.ok, "missing": r.missing,
                             "rejected": r.rejected, "held": r.held, "statuses": r.statuses} for r in reports],
                           option=orjson.OPT_INDENT_2).decode())  # fmt: skip
    for report in reports:
        if not args.json:
            outcome = "ok" if report.ok else "not ok"
            counts = [f"{status} {count}" for status, count in sorted(report.statuses.items())] or ["nothing sent"]
            print(f"{report.target}: {outcome}  {'  '.join(counts)}  (run {report.run_id})")
    if any(r.held for r in reports):
        return EXIT_SAFETY_STOP
    return EXIT_OK if all(r.ok for r in reports) else EXIT_NOT_OK


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from provisioner.config import load_config
    from provisioner.daemon import Daemon
    from provisioner.lock import StateLock
    from provisioner.store import open_store

    config = load_config(args.config)
    with StateLock(config.state):
        engine = open_store(config.state)
        return asyncio.run(Daemon(config, engine).run())


def _run_sync(config: Config, names: list[str] | None) -> tuple[int, list[TargetReport], dict[str, TargetHealth]]:
    import asyncio

    from provisioner.daemon import check_alerts, keep_leases
    from provisioner.health import exit_code, target_health
    from provisioner.queue import default_instance, identify
    from provisioner.sync import load_target_mapping, selected_targets, sync_target

    targets = selected_targets(config, names)
    mappings = {name: load_target_mapping(config, name) for name in targets}

    async def cycle() -> list[TargetReport]:
        renewer = asyncio.create_task(keep_leases(engine, identify(default_instance()).lease))
        try:
            return list(await asyncio.gather(*(sync_target(engine, config, n, mappings[n]) for n in targets)))
        finally:
            renewer.cancel()
            await check_alerts(engine, config, targets)

    with _planning(config, targets) as engine:
        reports = asyncio.run(cycle())
        # The exit code says how the targets are now, not only what this cycle sent: work left
        # waiting by an earlier cycle (a 401 an hour ago) still waits.
        healths = target_health(engine, targets)
    return exit_code(healths), reports, healths


@contextmanager
def _planning(config: Config, targets: list[str]) -> Iterator[Engine]:
    """The state database, locked for a one-shot cycle, with these targets' planner lock held.

    Raises UserError when a running daemon instance plans one of them: on a shared
    database one planner at a time. Rows an earlier process left running are recovered first.
    """
    from provisioner.lock import PlannerLock, StateLock
    from provisioner.queue import recover_orphans
    from provisioner.store import open_store

    with StateLock(config.state):
        engine = open_store(config.state)
        planners = PlannerLock(engine)
        try:
            busy = [name for name in targets if not planners.holds(name)]
            if busy:
                raise UserError(f"target {busy[0]!r} is being planned by a running daemon instance; "
                                "let it run the cycle (`provisioner status` shows its progress)")  # fmt: skip
            recover_orphans(engine)
            yield engine
        finally:
            planners.close()


def _print_summary(reports: list[TargetReport], healths: dict[str, TargetHealth], *, as_json: bool) -> None:
    if as_json:
        data = [
            {"target": r.target, "run_id": r.run_id, **r.summary(), "health": _health_json(healths.get(r.target))}
            for r in reports
        ]
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    for report in reports:
        counts = "  ".join(f"{name} {value}" for name, value in report.summary().items())
        print(f"{report.target}: {counts}  (run {report.run_id})")
        health = healths.get(report.target)
        if health is not None and not health.ok:
            # Waiting work of every cycle, not only this one's: what the exit code is about.
            print(f"  {health.status}: " + "; ".join(health.problems))


def _health_json(health: TargetHealth | None) -> dict[str, Any] | None:
    if health is None:
        return None
    data = health.as_dict()
    return {k: data[k] for k in ("status", "ok", "failed", "rejected", "retry_wait", "held", "held_kinds", "paused",
                                 "quarantined", "problems")}  # fmt: skip


def _plan(args: argparse.Namespace) -> int:
    if args.held:
        return _held(args)
    from provisioner.config import load_config
    from provisioner.group_executor import plan_groups_once, would_hold
    from provisioner.store import open_store
    from provisioner.sync import describe_plan, load_target_mapping, plan_once, selected_targets

    config = load_config(args.config)
    engine = open_store(config.state)
    plans = []
    for name in selected_targets(config, args.target):
        mapping = load_target_mapping(config, name)
        plan, active = plan_once(engine, config, name, mapping)
        # A cycle sends users first, then plans groups: joiners and rehires are members by then.
        groups = plan_groups_once(engine, config, name, mapping, plan) if config.targets[name].groups else None
        described = describe_plan(engine, plan, active, config.targets[name], groups, mapping.omit_if_empty)
        # The brakes the cycle's group step applies (group_members: exact, group deletes), judged the same way.
        removals, deletes = would_hold(engine, name, config.targets[name], groups) if groups else (False, False)
        described["would_hold_member_removals"] = removals
        described["would_hold_group_deletes"] = deletes
        plans.append(described)
    if args.json:
        print(orjson.dumps(plans, option=orjson.OPT_INDENT_2).decode())
        return _plan_exit(plans)
    for plan in plans:
        counts = plan["counts"]
        assert isinstance(counts, dict)
        print(f"{plan['target']}: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
        if plan["would_hold_leavers"]:
            print("  the deletion brake would hold this cycle's leavers until `provisioner approve RUN_ID`")
        if plan["would_hold_member_removals"]:
            print("  the member brake would hold this cycle's group member removals until `provisioner approve RUN_ID`")
        if plan["would_hold_group_deletes"]:
            print("  the member brake would hold this cycle's group deletes until `provisioner approve RUN_ID`")
        for op in plan["operations"]:  # type: ignore[attr-defined]
            changes = f"  [{', '.join(op['changes'])}]" if op.get("changes") else ""
            who = f" {op['userName']}" if op.get("userName") else ""
            print(f"  {op['kind']:<8} {op['reason']:<7} {op['identity_key']}{who}{changes}")
        for rejected in plan["rejected"]:  # type: ignore[attr-defined]
            print(f"  rejected {rejected['identity_key']}: {rejected['reason']}")
        groups = plan["groups"]
        if isinstance(groups, dict):
            print("  groups: " + "  ".join(f"{k} {v}" for k, v in groups["counts"].items()))
            for op in groups["operations"]:
                print(f"  {op['kind']:<13} {op['reason']:<10} {op['group']}  +{op['add']} -{op['remove']}")
    return _plan_exit(plans)


def _plan_exit(plans: list[dict[str, Any]]) -> int:
    """A plan that rejects records is not a clean plan: exit 4, as the sync of those records would."""
    return EXIT_NOT_OK if any(plan["rejected"] for plan in plans) else EXIT_OK


def _reconcile(args: argparse.Namespace) -> int:
    import asyncio
    import csv

    from connectors import ScimError
    from provisioner.config import load_config
    from provisioner.lock import StateLock
    from provisioner.queue import recover_orphans
    from provisioner.reconcile import reconcile_target
    from provisioner.store import open_store
    from provisioner.sync import load_target_mapping, selected_targets

    config = load_config(args.config)
    targets = selected_targets(config, args.target)
    mappings = {name: load_target_mapping(config, name) for name in targets}

    unreadable: list[str] = []

    def run(engine: Any) -> list[Any]:
        async def each() -> list[Any]:
            reports = []
            for name in targets:
                try:
                    reports.append(await reconcile_target(engine, config, name, mappings[name], repair=args.repair))
                except ScimError as exc:
                    # Nothing is concluded from a read that failed: no situation, no reaction.
                    print(f"error: {name}: could not read the target's accounts: {exc}", file=sys.stderr)
                    unreadable.append(name)
            return reports

        return asyncio.run(each())

    if args.repair:
        with StateLock(config.state):
            engine = open_store(config.state)
            recover_orphans(engine)
            reports = run(engine)
    else:
        reports = run(open_store(config.state))
    try:
        if args.csv:
            with args.csv.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["target", "situation", "identity", "id", "userName", "drift"])
                for report in reports:
                    for f in report.findings:
                        writer.writerow([report.target, f.situation.value, f.identity or "", f.id or "",
                                         f.user_name or "", " ".join(f.drift)])  # fmt: skip
        if args.json:
            for report in reports:  # one object per target, one per line, written as it is read from the run's spill
                for chunk in report.json_chunks():
                    sys.stdout.write(chunk)
                sys.stdout.write("\n")
        else:
            for report in reports:
                _print_reconcile(report)
    finally:
        for report in reports:
            report.close()
    if any(r.held for r in reports):
        return EXIT_SAFETY_STOP
    failed = unreadable or any(r.statuses.get("failed") or r.statuses.get("retry_wait") for r in reports)
    return EXIT_NOT_OK if failed else EXIT_OK


def _print_reconcile(report: Any) -> None:
    counts = report.counts()
    print(f"{report.target}: " + "  ".join(f"{k} {v}" for k, v in counts.items()) + f"  (drifted {report.drifted})")
    if report.without_account:
        print(f"  identities with no account yet: {report.without_account} (the next cycle creates them)")
    if report.unreadable_records:
        print(f"  source records that could not be read: {report.unreadable_records} (unmatched accounts are left alone)")
    for f in report.findings:
        if f.situation.value == "linked" and not f.drift:
            continue
        drift = f"  drift: {', '.join(f.drift)}" if f.drift else ""
        print(f"  {f.situation.value:<9} {f.identity or '-':<12} {f.user_name or '-'}  id {f.id or '-'}{drift}")
    if report.groups:
        groups = report.group_counts()
        print("  groups: " + "  ".join(f"{k} {v}" for k, v in groups.items()))
        for g in report.groups:
            if g.situation.value == "linked" and not g.foreign_members:
                continue
            foreign = f"  foreign members: {', '.join(g.foreign_members)}" if g.foreign_members else ""
            print(f"  group {g.situation.value:<9} {g.display_name or '-'}  id {g.id or '-'}{foreign}")
    if not report.repaired:
        # The adoption preview (a target with accounts, before the first cycle): what a repair and the
        # cycles after it would do, accounts linked by the match attribute and identities created.
        create = report.without_account + counts["deleted"]
        print(f"  would link {counts['unlinked']}, create {create}, unmatched {counts['unmatched']}, "
              f"disputed {counts['disputed']}")  # fmt: skip
        print("  report only: nothing was written; --repair queues and sends the configured reactions")
        return
    queued = "  ".join(f"{k} {v}" for k, v in report.queued.items()) or "nothing"
    if report.foreign_removals:
        queued += f"  (foreign group members to remove {report.foreign_removals})"
    print(f"  repair (run {report.run_id}): queued {queued}")
    if report.held:
        print(f"  held by the deletion brake: {report.held} (provisioner plan --held, then approve {report.run_id})")
    if report.held_removals:
        print(f"  of them, {report.held_removals} group operations removing foreign members "
              f"(above max_member_removals / max_member_removal_share): the members stay until approved")
    if report.statuses:
        print("  sent: " + "  ".join(f"{k} {v}" for k, v in sorted(report.statuses.items())))


def _preview(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.planner import preview_record
    from provisioner.queue import load_links
    from provisioner.sources import BadRecord, read_source
    from provisioner.store import open_store
    from provisioner.sync import load_target_mapping, selected_targets

    config = load_config(args.config, secrets=False)
    names = selected_targets(config, [args.target] if args.target else None)
    if not names:
        raise ConfigError(f"{args.config}: no enabled target to preview with (name one with --target)")
    name = names[0]
    mapping = load_target_mapping(config, name)
    links = load_links(open_store(config.state), name)
    wanted = set(args.keys)
    found: dict[str, dict[str, Any]] = {}
    for record in read_source(config.sources[config.targets[name].source]):
        if record.key not in wanted or record.key in found:
            continue
        if isinstance(record, BadRecord):  # a row that cannot be read, or one of several with this key
            found[record.key] = {"origin": record.origin, "error": record.reason}
            continue
        found[record.key] = preview_record(mapping, record, links)
        # A password the mapping renders is a secret like any other: printed masked.
        redaction.register_write_only(found[record.key])
    results = [{"identity_key": key, **found.get(key, {"error": "not in the source"})} for key in args.keys]
    for result in results:
        print(_json(result))
    return EXIT_CONFIG if any("error" in result for result in results) else EXIT_OK


# How many members a held group row names in `plan --held` before "and N more".
_NAMED_MEMBERS = 5


def _held(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.payload import loads
    from provisioner.queue import list_operations
    from provisioner.store import open_store

    engine = open_store(load_config(args.config, secrets=False).state)
    rows = list_operations(engine, status="held", limit=100_000)
    if args.target:
        rows = [row for row in rows if row["target"] in args.target]
    for row in rows:
        # An object, as `queue list --json` gives it; a password still to be sent is never printed.
        row["payload"] = redaction.mask_write_only(loads(row["payload"])) if row.get("payload") else None
    if args.json:
        print(_json(rows))
        return EXIT_OK
    if not rows:
        print("no held operations")
        return EXIT_OK
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        runs.setdefault((row["target"], row["run_id"]), []).append(row)
    for (target, run_id), ops in sorted(runs.items()):
        from provisioner.health import held_phrase

        kinds: dict[str, int] = {}
        for op in ops:
            kinds[op["kind"]] = kinds.get(op["kind"], 0) + 1
        print(f"{target}: run {run_id} holds {held_phrase(kinds)}")
        for op in sorted(ops, key=lambda o: o["identity_key"]):
            # A group row's note says what it removes (and whether an operator rejected it before).
            note = f"  {op['note']}" if op["kind"] not in ("disable", "delete") and op["note"] else ""
            print(f"  {op['kind']:<8} {op['identity_key']}{note}{_removed_members(op['payload'])}")
        print(f"  release: provisioner approve {run_id}    drop: provisioner reject {run_id}")
    return EXIT_OK


def _removed_members(payload: Any) -> str:
    """The members a held group row removes, by identity key (the SCIM id of one we do not manage), a few at most."""
    removed = payload.get("remove") if isinstance(payload, dict) else None
    if not removed:
        return ""
    names = sorted(str(m.get("identity") or m.get("value")) for m in removed if isinstance(m, dict))
    more = f" and {len(names) - _NAMED_MEMBERS} more" if len(names) > _NAMED_MEMBERS else ""
    return f": {', '.join(names[:_NAMED_MEMBERS])}{more}"


def _release(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.queue import release_held
    from provisioner.store import open_store

    engine = open_store(load_config(args.config, secrets=False).state)
    count = release_held(engine, args.run_id, approve=args.approve)
    if count == 0:
        print(f"error: run {args.run_id} has no held operations", file=sys.stderr)
        return EXIT_CONFIG
    verb = "approved; the next cycle sends them" if args.approve else "rejected; they will not be sent"
    print(f"{count} operations of run {args.run_id} {verb}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    import asyncio

    from connectors import ScimError
    from provisioner.checker import check_target
    from provisioner.config import config_warnings, load_config
    from provisioner.store import check_state_driver

    config = load_config(args.config)
    names = list(config.targets)
    if args.target:
        # Only a check against the targets' own schemas talks to them, and needs the engine's HTTP side.
        from provisioner.sync import selected_targets
        from provisioner.targets import discover_schemas

        names = selected_targets(config, args.target)
    found: dict[str, None] = {}
    for name in names:
        schemas = extensions = None
        if args.target:
            try:
                schemas, extensions = asyncio.run(discover_schemas(config.targets[name]))
            except ScimError as exc:
                print(f"warning: {name}: cannot read the target's schemas ({exc}); checked against RFC 7643",
                      file=sys.stderr)  # fmt: skip
        # Targets that share a mapping share its mistakes: each is said once.
        found.update(dict.fromkeys(str(d) for d in check_target(config, name, schemas=schemas, extensions=extensions)))
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"{len(found)} mistake{'s' if len(found) > 1 else ''} found; nothing was sent", file=sys.stderr)
        return EXIT_CONFIG
    check_state_driver(config.state)
    _check_listen(config)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config}: ok ({len(config.sources)} sources, {len(config.targets)} targets)")
    return EXIT_OK


def _check_listen(config: Config) -> None:
    """The daemon's metrics address can be bound, unless the daemon of this state holds it now."""
    from provisioner import metrics
    from provisioner.lock import StateLock

    listen = config.daemon.listen
    if not listen:
        return
    lock = StateLock(config.state)
    try:
        lock.acquire()
    except UserError:
        return  # the daemon of this very state runs, and holds its port: a restart gets it back
    try:
        server = metrics.serve(listen, lambda: {"status": "ok"})
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"{config.origin}: daemon.listen {listen}: cannot be served: {reason}; another daemon on this host? "
            "choose another port in daemon.listen, or null for none"
        ) from None
    else:
        server.shutdown()
        server.server_close()
    finally:
        lock.release()


_LIST_COLUMNS = ("id", "target", "identity_key", "kind", "reason", "status", "attempts", "last_http_status", "updated_at")


def _queue_list(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.payload import loads
    from provisioner.queue import list_operations
    from provisioner.store import open_store

    engine = open_store(load_config(args.config, secrets=False).state)
    rows = list_operations(
        engine,
        status=args.status,
        target=args.target,
        identity=args.identity,
        reason=args.reason,
        since=args.since,
        limit=args.limit + 1,
    )
    truncated = len(rows) > args.limit
    rows = rows[: args.limit]
    if args.json:
        for row in rows:
            # A password still waiting to be sent is in the queue row; it is never printed.
            row["payload"] = redaction.mask_write_only(loads(row["payload"])) if row.get("payload") else None
        print(_json({"operations": rows, "limit": args.limit, "truncated": truncated}))
        return EXIT_OK
    table = [[_cell(row.get(c)) for c in _LIST_COLUMNS] + [_cell(_problem(row))] for row in rows]
    _print_table([*(c.replace("last_", "") for c in _LIST_COLUMNS), "problem"], table)
    if truncated:
        print(f"showing the newest {args.limit} operations; more match (narrow with --status, --target, "
              "--since, or raise --limit)", file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _queue_show(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.payload import loads, readable
    from provisioner.queue import get_operation
    from provisioner.store import open_store

    engine = open_store(load_config(args.config, secrets=False).state)
    found = get_operation(engine, args.id)
    if found is None:
        print(f"error: no operation {args.id}", file=sys.stderr)
        return EXIT_CONFIG
    row, calls = found
    if row["payload"] is not None:
        # As planned: references to accounts not yet created then show as ref(KEY); the calls show what was sent.
        row["payload"] = readable(redaction.mask_write_only(loads(row["payload"])))
    if args.json:
        print(_json({**row, "calls": calls}))
        return EXIT_OK
    if row["payload"] is not None:
        row["payload"] = orjson.dumps(row["payload"]).decode()
    # Bodies and errors come from the target: terminal escape sequences in them are shown, not obeyed.
    for key, value in row.items():
        if value is not None:
            print(f"{key + ':':<18}{_printable(_cell(value))}")
    for call in calls:
        print(f"\ncall {call['id']} (attempt {call['number']}, {_cell(call['started_at'])}, {call['duration_ms']} ms)")
        print(f"  {call['method']} {_printable(_cell(call['url']))} -> {_printable(_cell(call['http_status'] or call['error']))}")
        for field_name in ("scim_type", "detail", "request_body", "response_body"):
            if call[field_name]:
                print(f"  {field_name}: {_printable(_cell(call[field_name]))}")
    return EXIT_OK


def _selection(args: argparse.Namespace) -> Selection:
    from provisioner.queue import Selection

    if not args.ids and not args.status and not args.target:
        raise UsageError("name operation IDs, or select them with --status and/or --target")
    return Selection(ids=tuple(args.ids), status=args.status, target=args.target)


def _queue_retry(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.queue import retry_now
    from provisioner.store import open_store

    engine = open_store(load_config(args.config, secrets=False).state)
    retried, skipped = retry_now(engine, _selection(args))
    print(f"{retried} operations back to pending; the next cycle (or the daemon's retry job) sends them")
    if skipped:
        print(f"{skipped} skipped: records that could not be mapped are fixed in the source, then replanned")
    return EXIT_OK


def _queue_close(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.queue import close
    from provisioner.store import open_store

    engine = open_store(load_config(args.config, secrets=False).state)
    count = close(engine, _selection(args), status=args.close_as, note=args.note)
    print(f"{count} operations {args.close_as}")
    return EXIT_OK


_EXPORT_COLUMNS = (
    "id", "run_id", "target", "identity_key", "kind", "reason", "status", "attempts", "last_http_status",
    "last_scim_type", "last_detail", "last_error", "note", "created_at", "updated_at", "finished_at",
)  # fmt: skip


def _queue_prune(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.queue import prune
    from provisioner.store import open_store

    engine = open_store(load_config(args.config, secrets=False).state)
    removed = prune(engine, args.older_than)
    print(f"{removed} finished operations deleted (succeeded, superseded, cancelled, resolved); "
          "failed and waiting ones are kept")  # fmt: skip
    return EXIT_OK


def _queue_export(args: argparse.Namespace) -> int:
    import csv

    from provisioner.config import load_config
    from provisioner.queue import list_operations
    from provisioner.store import open_store

    engine = open_store(load_config(args.config, secrets=False).state)
    rows = list_operations(engine, status=args.status, target=args.target, since=args.since, limit=args.limit)
    if args.format == "json":
        print(_json([{k: row[k] for k in _EXPORT_COLUMNS} for row in rows]))
        return EXIT_OK
    writer = csv.writer(sys.stdout)
    writer.writerow(_EXPORT_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(_cell(row[k])) for k in _EXPORT_COLUMNS])
    return EXIT_OK


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(text: str) -> str:
    """A cell a spreadsheet shows as text: a leading formula character is escaped with a quote."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _pause(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.quarantine import set_paused
    from provisioner.store import open_store
    from provisioner.sync import selected_targets

    config = load_config(args.config, secrets=False)
    selected_targets(config, [args.name])
    set_paused(open_store(config.state), args.name, args.paused, args.note)
    print(f"{args.name}: {'paused; nothing is sent until' if args.paused else 'resumed; the next cycle sends its queue'}"
          + (" `provisioner target resume`" if args.paused else ""))  # fmt: skip
    return EXIT_OK


def _db_upgrade(args: argparse.Namespace) -> int:
    from provisioner import store
    from provisioner.config import load_config

    # Starting any command migrates too; this one does only that, e.g. before starting several daemons.
    config = load_config(args.config, secrets=False)
    before, after = store.upgrade(store.connect(config.state))
    if before == after:
        print(f"state database: at revision {after}, the newest this version knows; nothing to do")
    else:
        print(f"state database: upgraded from {before or 'an empty database'} to revision {after}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from provisioner.config import load_config
    from provisioner.health import exit_code, last_runs, target_health
    from provisioner.quarantine import all_states
    from provisioner.queue import running_by_instance, status_by_target
    from provisioner.quirks import describe as describe_quirk
    from provisioner.quirks import learned as learned_quirks
    from provisioner.quirks import unstored_writes
    from provisioner.store import open_store

    config = load_config(args.config, secrets=False)
    engine = open_store(config.state)
    counts = status_by_target(engine)
    names = sorted(set(config.targets) | set(counts))
    states = all_states(engine)
    runs = last_runs(engine)
    healths = target_health(engine, names, states=states, runs=runs)
    claimants = running_by_instance(engine)
    lessons = learned_quirks(engine)
    dropped = unstored_writes(engine)
    data = []
    for name in names:
        health = healths[name]
        stored = states.get(name)
        run = runs.get(name) or {}
        data.append(
            {
                "target": name,
                "enabled": name in config.targets and config.targets[name].enabled,
                "health": health.status,
                "ok": health.ok,
                "problems": list(health.problems),
                "last_run": health.last_run_id,
                "last_run_started_at": _timestamp(health.last_run_started_at),
                "last_run_status": health.last_run_status,
                "last_run_counts": orjson.loads(str(run["counts"])) if run.get("counts") else None,
                "operations": counts.get(name, {}),
                "failed": health.failed,
                "rejected": health.rejected,
                "retry_wait": health.retry_wait,
                "held": health.held,
                "held_kinds": health.held_kinds,
                "running_by_instance": claimants.get(name, {}),
                "paused": health.paused,
                "quarantined": health.quarantined,
                "quarantine_reason": health.quarantine_reason,
                "next_probe_at": _timestamp(stored.next_probe_at if stored else None),
                "last_success_at": _timestamp(stored.last_success_at if stored else None),
                "last_error": health.last_error,
                "learned_quirks": [describe_quirk(q) for q in lessons if q.target == name],
                "unstored_writes": dropped.get(name, 0),
            }
        )
    # The same code as a cycle's, from the same health: a script polling status sees what sync would say.
    code = exit_code(healths)
    if args.json:
        print(_json(data))
        return code
    for item in data:
        started = item["last_run_started_at"] or "never"
        print(f"{item['target']}: {item['health']}, last cycle {started} ({item['last_run_status'] or '-'})"
              + ("" if item["enabled"] else "  [disabled]"))  # fmt: skip
        ops = item["operations"]
        assert isinstance(ops, dict)
        print("  operations: " + ("  ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "none"))
        running = item["running_by_instance"]
        assert isinstance(running, dict)
        if running:
            print("  running on: " + "  ".join(f"{k} {v}" for k, v in sorted(running.items())))
        for problem in item["problems"]:
            print(f"  {_printable(problem)}")
        if item["held"]:
            print("  release or drop held operations: provisioner plan --held")
        if item["paused"]:
            print("  resume: provisioner target resume NAME")
        if item["quarantined"]:
            print(f"  next probe {item['next_probe_at']}")
        if item["last_error"]:
            print(f"  last error: {_printable(str(item['last_error']))}")
        for line in item["learned_quirks"]:
            print(f"  {_printable(line)}")
        if item["unstored_writes"]:
            print(f"  UNSTORED: {item['unstored_writes']} writes the target accepted without storing every attribute "
                  "(provisioner queue list; the note says what)")  # fmt: skip
    return code


def _problem(row: dict[str, Any]) -> str:
    text = " ".join(str(row[k]) for k in ("last_scim_type", "last_detail") if row.get(k)) or row.get("last_error") or ""
    return text if len(text) <= 80 else text[:79] + "…"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return _timestamp(value) or ""
    return str(value)


def _timestamp(value: datetime | None) -> str | None:
    """ISO 8601 with its UTC offset (every stored time is UTC): 2026-11-30T05:09:32+00:00."""
    from provisioner.store import as_utc

    return None if value is None else as_utc(value).isoformat(timespec="seconds")


# Control characters (ESC starts every terminal escape sequence), except newline and tab.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Text from a target, safe on a terminal: escape sequences and control characters shown as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Rich table on a terminal; plain aligned columns, stable for scripts, when piped.

    Cells are data (a target's error text): never read as Rich markup, never terminal escapes.
    """
    rows = [[_printable(cell) for cell in row] for row in rows]
    if sys.stdout.isatty():
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(*header, box=box.SIMPLE_HEAD, highlight=False)
        for row in rows:
            style = _ROW_STYLES.get(row[header.index("status")]) if "status" in header else None
            table.add_row(*(Text(cell) for cell in row), style=style)
        Console(file=sys.stdout).print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


_ROW_STYLES = {"failed": "red", "held": "yellow", "retry_wait": "yellow", "succeeded": "green"}


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z, default=str).decode()


if __name__ == "__main__":
    sys.exit(main())
