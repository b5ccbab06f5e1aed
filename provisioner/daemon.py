"""The long-running daemon: APScheduler triggers cycles and retries; the logic lives elsewhere.

Jobs: one sync cycle per source on its schedule (every target fed by it),
followed by the target's reconciliation when ``reconcile_every`` has passed; a
job that sends due queue rows (retries, approved leavers) every minute. A
cycle never overlaps itself or the retry job of the same target. A cycle reads
its source in a thread (``sources.read_off_loop``), still holding the target's
lock: a slow query or HR endpoint stalls neither the other targets nor the
heartbeat ``/healthz`` reads. Records are rendered on the loop's thread, the
main one, where a mapping's time limit holds.

Stopping: the first SIGTERM/SIGINT stops new work and lets in-flight requests
finish (bounded by ``shutdown_grace``); a second one exits at once. Either
way nothing is lost: every operation is in the queue before it is sent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from sqlalchemy import Engine

from provisioner import alerts, metrics, quarantine
from provisioner.config import Config, ScheduleConfig, config_warnings, parse_duration, parse_interval
from provisioner.errors import UserError
from provisioner.health import TargetHealth, cycle_succeeded, overall, target_health
from provisioner.lifecycle import STATUSES
from provisioner.lock import PlannerLock
from provisioner.mapping import AttributeMapping
from provisioner.memo import load_memo
from provisioner.planner import RenderMemo
from provisioner.quarantine import Admission, admission
from provisioner.queue import (
    count_status,
    default_instance,
    identify,
    list_operations,
    prune,
    recover_orphans,
    renew_leases,
    running_by_instance,
    status_by_target,
)
from provisioner.quirks import unstored_writes
from provisioner.reconcile import last_reconciled, publish, publish_last, reconcile_target
from provisioner.store import as_utc, utcnow
from provisioner.sync import TargetReport, load_target_mapping, send_due, sync_target

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

log = structlog.get_logger("provisioner.daemon")

# A second signal exits the process with this code, at once.
EXIT_FORCED = 130


class Daemon:
    """Schedules cycles and retries for every enabled target until told to stop."""

    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.targets = [name for name, target in config.targets.items() if target.enabled]
        self.mappings: dict[str, AttributeMapping] = {name: load_target_mapping(config, name) for name in self.targets}
        self.locks = {name: asyncio.Lock() for name in self.targets}
        # Renders of earlier cycles: a record unchanged since is not rendered again (the mappings are
        # fixed). Read from the state database at the first cycle, kept in memory after.
        self.memos: dict[str, RenderMemo] = {}
        self.stopping = asyncio.Event()
        self.inflight: set[asyncio.Task[Any]] = set()
        self.last_cycle: dict[str, dict[str, Any]] = {}
        self.started_at = datetime.now(UTC)
        # The event loop's last sign of life (monotonic seconds): a loop that stops ticking is stuck
        # (a mapping expression that never ends runs on it), and /healthz says so from its own thread.
        self.heartbeat = time.monotonic()
        self.instance = config.daemon.instance or default_instance()
        self.lease = timedelta(seconds=parse_duration(config.daemon.lease))
        # Instances sharing a database plan a target one at a time; the others only send.
        self.planners = PlannerLock(engine)
        self.planning: dict[str, bool] = {}

    async def run(self) -> int:
        """Run until a signal; return the process exit code."""
        identify(self.instance, self.lease)
        structlog.contextvars.bind_contextvars(instance=self.instance)
        metrics.INSTANCE.labels(self.instance).set(1)
        recovered = recover_orphans(self.engine)
        if recovered:
            log.warning("recovered operations left running by an earlier process", count=recovered)
        for warning in config_warnings(self.config):
            log.warning("config", warning=warning)
        server = self._serve()
        renewer = asyncio.create_task(keep_leases(self.engine, self.lease))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        for name in self.targets:
            publish_last(self.engine, name)  # the gauges say what the last reconciliation found, until the next
        beat = asyncio.create_task(self._beat())
        scheduler = self._scheduler()
        scheduler.start()
        log.info("daemon started", targets=self.targets, listen=self.config.daemon.listen, pid=os.getpid())
        await self.stopping.wait()
        # Paused, not shut down, until the drain is over: APScheduler's asyncio executor cancels the
        # running jobs at shutdown, which cut in-flight requests at once instead of after the grace.
        scheduler.pause()
        await self._drain()
        scheduler.shutdown(wait=False)
        beat.cancel()
        renewer.cancel()
        self.planners.close()
        if server is not None:
            server.shutdown()
            server.server_close()
        log.info("daemon stopped")
        return 0

    def _serve(self) -> Any:
        listen = self.config.daemon.listen
        if not listen:
            return None
        try:
            return metrics.serve(listen, self.health)
        except OSError as exc:
            raise UserError(
                f"daemon.listen {listen}: cannot serve /metrics and /healthz there: {exc.strerror or exc}; "
                "another daemon on this host? choose another port in daemon.listen, or null for none"
            ) from None
        except ValueError as exc:
            raise UserError(f"daemon.listen {listen}: not host:port ({exc})") from None

    async def _beat(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(1)

    def _scheduler(self) -> AsyncIOScheduler:
        # Imported here: `sync` uses this module's lease and alert helpers, not the scheduler (~0.035 s).
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        scheduler = AsyncIOScheduler(timezone=UTC)
        # Each job starts once at start-up, then on its trigger; a late run is coalesced, never stacked.
        options = {"max_instances": 1, "coalesce": True, "misfire_grace_time": 300, "next_run_time": datetime.now(UTC)}
        for source_name, source in self.config.sources.items():
            targets = [t for t in self.targets if self.config.targets[t].source == source_name]
            if targets:
                scheduler.add_job(
                    self._job, _trigger(source.schedule), args=[self.cycle, targets], id=f"sync:{source_name}", **options
                )
        retry = IntervalTrigger(seconds=self.config.daemon.retry_interval)
        scheduler.add_job(self._job, retry, args=[self.send_due, self.targets], id="retry", **options)
        if self.config.daemon.retention:
            scheduler.add_job(self._prune, IntervalTrigger(days=1), id="prune", **options)
        return scheduler

    async def _prune(self) -> None:
        retention = self.config.daemon.retention
        assert retention is not None
        removed = prune(self.engine, utcnow() - timedelta(seconds=parse_duration(retention)))
        if removed:
            log.info("pruned finished operations", count=removed, older_than=retention)

    async def _job(self, work: Callable[[str], Awaitable[None]], targets: list[str]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.inflight.add(task)
        try:
            await asyncio.gather(*(self._guarded(work, name) for name in targets))
        except asyncio.CancelledError:
            if not self.stopping.is_set():
                raise
            # Cancelled when the shutdown grace ran out (said once by _drain): not a failure of the job.
        finally:
            self.inflight.discard(task)

    async def _guarded(self, work: Callable[[str], Awaitable[None]], name: str) -> None:
        if self.stopping.is_set():
            return
        async with self.locks[name]:
            if self.stopping.is_set():
                return
            try:
                await work(name)
            except UserError as exc:
                log.error("cycle refused", target=name, error=str(exc))
                self.last_cycle[name] = {"status": "refused", "error": str(exc), "at": datetime.now(UTC)}
            except Exception:
                log.exception("cycle crashed", target=name)
                self.last_cycle[name] = {"status": "error", "at": datetime.now(UTC)}
            finally:
                self._publish(name)
                await self._check_alerts(name)

    async def cycle(self, name: str) -> None:
        """One sync cycle of one target, then its reconciliation when one is due.

        Planned (and reconciled) by the target's planner; the other instances only send.
        """
        planner = self.planners.holds(name)
        if self.planning.get(name) != planner and not planner:
            log.info("another instance plans this target; this one sends", target=name)
        self.planning[name] = planner
        if not planner:
            await self.send_due(name)
            self.last_cycle[name] = {"status": "sent only: another instance plans", "at": datetime.now(UTC)}
            return
        if name not in self.memos:
            self.memos[name] = load_memo(self.engine, name)
        report = await sync_target(
            self.engine, self.config, name, self.mappings[name], stop=self.stopping, memo=self.memos[name]
        )
        self._remember(name, report)
        busy = count_status(self.engine, name, "running") or count_status(self.engine, name, "pending")
        if self.planners.shared and busy:
            # Other instances are still sending: their new accounts would read as unlinked. Next cycle.
            return
        await self.reconcile_if_due(name)

    async def reconcile_if_due(self, name: str, now: datetime | None = None) -> bool:
        """Reconcile a target with its reactions (``--repair``) when ``reconcile_every`` has passed; never raises.

        Runs after a cycle, under the target's lock: the links it reads are the cycle's.
        A paused or quarantined target is not read.
        """
        every = parse_interval(self.config.targets[name].reconcile_every)
        now = now or datetime.now(UTC)
        last = last_reconciled(self.engine, name)
        if every is None or self.stopping.is_set() or admission(self.engine, name) is Admission.SKIP:
            return False
        if last is not None and now - as_utc(last["started_at"]) < timedelta(seconds=every):
            return False
        try:
            report = await reconcile_target(self.engine, self.config, name, self.mappings[name], repair=True)
        except UserError as exc:
            log.error("reconciliation refused", target=name, error=str(exc))
            return False
        except Exception as exc:
            # The next cycle tries again: nothing was concluded from a read that failed.
            log.warning("reconciliation failed", target=name, error=str(exc))
            return False
        try:
            publish(name, report.recorded_counts(self.config.targets[name].groups is not None), report.drifted)
        finally:
            report.close()
        return True

    async def send_due(self, name: str) -> None:
        """Send a target's due queue rows."""
        report = await send_due(self.engine, self.config, name, self.mappings[name], stop=self.stopping)
        if report.statuses:
            log.info("due operations sent", target=name, outcomes=dict(report.statuses))

    def _remember(self, name: str, report: TargetReport) -> None:
        succeeded = cycle_succeeded(report)
        self.last_cycle[name] = {
            "status": "succeeded" if succeeded else "incomplete",
            "run_id": report.run_id,
            "at": datetime.now(UTC),
            **report.summary(),
        }
        if succeeded:
            metrics.LAST_SUCCESS.labels(name).set(datetime.now(UTC).timestamp())

    async def _check_alerts(self, name: str) -> None:
        await check_alerts(self.engine, self.config, [name])

    def _publish(self, name: str) -> None:
        try:
            metrics.set_queue_depth(status_by_target(self.engine), STATUSES)
            metrics.set_health(target_health(self.engine, [name]))
        except Exception:
            log.exception("metrics update failed", target=name)

    def stuck_for(self) -> float:
        """Seconds the event loop has not ticked beyond what is normal; 0 while it runs."""
        silent = time.monotonic() - self.heartbeat
        return silent if silent > self.config.daemon.stuck_after else 0.0

    def health(self) -> dict[str, Any]:
        """What /healthz answers (HTTP 200 only when ``status`` is ``ok``).

        ``targets``: each target's health (``provisioner.health``) with its last
        cycle in this process; ``status``: ``stopping``, ``stuck`` (the event loop
        has not ticked for ``daemon.stuck_after`` seconds), else the most urgent
        status of the targets — ``ok`` only when every target is ok.
        Called from the HTTP server's thread: it works while the loop is blocked.
        """
        healths: dict[str, TargetHealth] = target_health(self.engine, self.targets)
        stuck = self.stuck_for()
        status = "stopping" if self.stopping.is_set() else "stuck" if stuck else overall(healths)
        body: dict[str, Any] = {
            "status": status,
            "instance": self.instance,
            "planning": sorted(name for name, planner in self.planning.items() if planner),
            "started_at": self.started_at.isoformat(),
            "targets": {
                name: {**healths[name].as_dict(), "last_cycle": self.last_cycle.get(name)} for name in self.targets
            },
        }
        if stuck:
            body["stuck_for_seconds"] = round(stuck, 1)
        return body

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            log.warning("second signal: exiting now; unsent operations stay queued", signal=sig.name)
            os._exit(EXIT_FORCED)
        self.stopping.set()
        # What the stop waits for, said up front: a restart that seems to hang is waiting on a slow target.
        claimed = sum(by.get(self.instance, 0) for by in running_by_instance(self.engine).values())
        grace = self.config.daemon.shutdown_grace
        log.info(f"stopping: {len(self.inflight)} jobs in flight, waiting up to {grace:g}s for their requests",
                 signal=sig.name, in_flight=len(self.inflight), claimed_operations=claimed,
                 grace_seconds=grace)  # fmt: skip

    async def _drain(self) -> None:
        if not self.inflight:
            return
        done, pending = await asyncio.wait(set(self.inflight), timeout=self.config.daemon.shutdown_grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
            log.warning("grace period over: cancelled in-flight work; it is picked up at the next start",
                        tasks=len(pending))  # fmt: skip


async def keep_leases(engine: Engine, lease: timedelta) -> None:
    """Renew this instance's leases every third of a lease, until cancelled, so no live call is taken back."""
    while True:
        await asyncio.sleep(lease.total_seconds() / 3)
        try:
            renew_leases(engine)
        except Exception:
            # The next renewal tries again; a lease that runs out costs a resend, never a loss.
            log.exception("lease renewal failed")


async def check_alerts(engine: Engine, config: Config, names: list[str]) -> None:
    """Evaluate the alert rules for some targets and send what is new; never raises."""
    try:
        conditions = alerts.evaluate([target_facts(engine, name) for name in names], config.alerts)
        await alerts.dispatch(engine, conditions, config.alerts, utcnow(), targets=names)
    except Exception:
        # Alerting must never stop provisioning; the failure itself is logged.
        log.exception("alert check failed", targets=names)


def target_facts(engine: Engine, name: str) -> alerts.TargetFacts:
    """What the alert rules need to know of a target: its health (``provisioner.health``) and its record."""
    health = target_health(engine, [name])[name]
    stored = quarantine.state(engine, name)
    held_runs = sorted({str(row["run_id"]) for row in list_operations(engine, status="held", target=name, limit=10_000)})
    reconciled = last_reconciled(engine, name)
    found = orjson.loads(reconciled["counts"]) if reconciled and reconciled["counts"] else {}
    # Group counts are recorded only for a target that manages groups.
    groups = found.get("groups") if isinstance(found.get("groups"), dict) else None
    return alerts.TargetFacts(
        target=name,
        failed_count=health.failed,
        held_runs=tuple(held_runs),
        held_kinds=tuple(sorted(health.held_kinds.items())),
        auth_failed=bool(stored and stored.auth_failures),
        failing_since=stored.failing_since if stored else None,
        quarantined=health.quarantined or health.paused,
        quarantine_reason=(health.quarantine_reason or (f"paused: {stored.pause_note or 'by an operator'}"
                           if health.paused and stored else None)),  # fmt: skip
        last_error=health.last_error,
        refused=(health.last_run_error or "see the log") if health.last_run_status == "refused" else None,
        unstored_count=unstored_writes(engine, since=utcnow() - timedelta(days=1)).get(name, 0),
        unmatched_accounts=found.get("unmatched") if reconciled else None,
        drifted_accounts=int(reconciled["drifted"]) if reconciled else None,
        unmatched_groups=groups.get("unmatched") if groups else None,
        foreign_members=groups.get("foreign_members") if groups else None,
    )


def _trigger(schedule: ScheduleConfig) -> IntervalTrigger | CronTrigger:
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    if schedule.cron:
        return CronTrigger.from_crontab(schedule.cron, timezone=UTC)
    return IntervalTrigger(seconds=schedule.every_seconds)
