"""Alerts: rules over per-target facts, fired once per condition, sent to the log, a webhook and e-mail.

Three steps, each callable alone:

1. ``evaluate(facts, config)`` — purely computational, no side effects: the
   facts the caller read from the queue for each target become the
   conditions that hold now (one per rule and target, with a stable key).
2. ``dispatch(engine, conditions, config, now)`` — compares them with the
   ``alert_state`` table, decides what to say, records it in one transaction,
   then hands the notifications to the sender (``send``).
3. ``send(notifications, config)`` — the channels: the log (always), a
   webhook, e-mail. A failing channel is logged and never stops the others,
   nor the caller.

When a condition is said again (``decide``, a flat ladder):

- no active state for its key ........................ ``firing``
- its fingerprint changed and its level did not drop .. ``changed``
  (failed operations crossed into a higher doubling bracket, a new held run,
  a new failure episode)
- ``renotify_after`` passed since it was last sent .... ``reminder``
- otherwise (unchanged, or better) ..................... nothing
- an active key the conditions no longer hold ......... ``resolved``

The state table keeps what was last *sent*, so a condition that gets better
stays quiet and one that comes back to where it was does not fire again.
"""

from __future__ import annotations

import asyncio
import email.policy
import smtplib
import ssl
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from sqlalchemy import Engine, insert, select, update
from sqlmodel import Field as Column
from sqlmodel import SQLModel

from connectors import parse_retry_after
from provisioner import redaction
from provisioner.health import held_phrase
from provisioner.store import as_utc, utcnow
from provisioner.transport import is_clear_text, is_loopback, url_host

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger("provisioner.alerts")

Severity = Literal["warning", "critical"]
Status = Literal["firing", "changed", "reminder", "resolved"]
Rule = Literal[
    "failed_operations", "failing_target", "auth_failure", "held_cycle", "quarantined", "refused_cycle",
    "unmatched_accounts", "drifted_accounts", "unmatched_groups", "foreign_members", "unstored_writes",
]  # fmt: skip

# The webhook's own retry: 3 attempts, waiting these many seconds between them.
WEBHOOK_BACKOFF = (1.0, 4.0)
# A Retry-After longer than this is not waited for: the next alert check tries again.
WEBHOOK_MAX_WAIT = 30.0
# Error text from a target or a channel, quoted in a message or a log line, is capped.
ERROR_CAP = 200


# --- configuration ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WebhookChannel(_Strict):
    """A JSON POST per notification; ``slack`` posts Slack-compatible ``{"text": …}``.

    The URL is a secret: Slack and Teams incoming-webhook URLs carry their token
    in the path. Logs name only its scheme, host and port.
    """

    url: SecretStr
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    format: Literal["json", "slack"] = "json"
    timeout: float = Field(default=10.0, gt=0, le=120)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        import httpx  # here, not at the top: loading a config must not load the HTTP client

        url = value.get_secret_value()
        # Blank: a secret reference left unresolved (config loaded with secrets=False).
        if url and httpx.URL(url).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _no_credentials_in_clear_text(self) -> WebhookChannel:
        url = self.url.get_secret_value()
        credentials = [name for name in self.headers if name.lower() in ("authorization", "proxy-authorization")]
        if credentials and is_clear_text(url) and not is_loopback(url_host(url) or ""):
            raise ValueError(
                f"an {credentials[0]} header over http:// would travel in clear text; use an https:// URL"
            )
        return self

    def model_post_init(self, _context: Any) -> None:
        redaction.register(self.url.get_secret_value())
        for value in self.headers.values():
            _register_credential(value.get_secret_value())


class EmailChannel(_Strict):
    """One message per notification over SMTP, STARTTLS unless turned off."""

    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    username: str | None = None
    password: SecretStr | None = None
    from_addr: str = Field(min_length=3)
    to: list[str] = Field(min_length=1)
    timeout: float = Field(default=30.0, gt=0, le=300)
    # A private CA for the relay's certificate (PEM); the system's CAs otherwise.
    ca_bundle: Path | None = None

    @field_validator("from_addr")
    @classmethod
    def _one_address(cls, value: str) -> str:
        if "@" not in value:
            raise ValueError("must be an e-mail address")
        return value

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if "@" not in address:
                raise ValueError(f"{address!r} is not an e-mail address")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> EmailChannel:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.password is not None and not self.starttls:
            raise ValueError("a password needs starttls: true (it would travel in clear text)")
        return self

    def model_post_init(self, _context: Any) -> None:
        if self.password is not None:
            redaction.register(self.password.get_secret_value())


class AlertRules(_Strict):
    """Which conditions alert, and their thresholds; null turns a threshold rule off."""

    # Failed operations waiting for review in a target: alert above this count.
    failed_operations: int | None = Field(default=10, ge=0)
    # A target whose every call has failed for at least this many minutes.
    failing_target_minutes: int | None = Field(default=15, ge=1)
    auth_failure: bool = True
    held_cycle: bool = True
    quarantined_target: bool = True
    # A cycle refused before planning (an empty or truncated source).
    refused_cycle: bool = True
    # Writes the target answered with success without storing every attribute sent (last 24 hours).
    unstored_writes: bool = True
    # The last reconciliation found more accounts than this that no identity owns (orphans).
    unmatched_accounts: int | None = Field(default=10, ge=0)
    # The last reconciliation found more linked accounts than this whose attributes drifted.
    drifted_accounts: int | None = Field(default=10, ge=0)
    # The last reconciliation found more groups than this that no rule defines. Off by default:
    # most targets hold groups made by hand or by other tools, and that is not drift.
    unmatched_groups: int | None = Field(default=None, ge=0)
    # The last reconciliation found more members than this in our groups that are not accounts we manage.
    foreign_members: int | None = Field(default=10, ge=0)


class AlertsConfig(_Strict):
    """The ``alerts:`` section: rules, how often to remind, and the channels besides the log."""

    rules: AlertRules = AlertRules()
    # An unchanged condition is said again after this many minutes.
    renotify_after: int = Field(default=240, ge=1)
    webhook: WebhookChannel | None = None
    email: EmailChannel | None = None


def _register_credential(value: str) -> None:
    redaction.register(value)
    # "Bearer abc…" / "Token abc…": the credential alone may be echoed back without its scheme.
    scheme, _, credential = value.partition(" ")
    if credential:
        redaction.register(credential.strip())


# --- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetFacts:
    """What the caller read about one target, right after its cycle."""

    # The target's name in the config.
    target: str
    # Operations of this target in status ``failed``: waiting for an operator's review.
    failed_count: int = 0
    # The run ids of the operations held by a brake (what ``provisioner approve`` takes).
    held_runs: tuple[str, ...] = ()
    # The operations of this target in status ``held`` by kind (``disable``, ``delete``: the deletion
    # brake; ``group_members``, ``group_delete``: the member brake), as pairs.
    held_kinds: tuple[tuple[str, int], ...] = ()
    # The target's last call was refused as an authentication failure (401, or the token endpoint said no).
    auth_failed: bool = False
    # Since when every call to the target has failed (the first failure after the last success);
    # None when the last call succeeded or none was made. Naive datetimes are taken as UTC.
    failing_since: datetime | None = None
    # The target is quarantined (or paused by an operator): cycles do not send to it.
    quarantined: bool = False
    # Why, in a few words ("12 of 12 calls failed", "paused by an operator"); optional.
    quarantine_reason: str | None = None
    # The last failed call in a few words ("HTTP 503", "connect timeout"); quoted in messages, redacted.
    last_error: str | None = None
    # Why the target's last cycle was refused before planning (an empty or truncated source); None if it was not.
    refused: str | None = None
    # Operations of the last 24 hours whose write the target accepted without storing all of it.
    unstored_count: int = 0
    # What the target's last reconciliation found: unmatched accounts, linked accounts that drifted.
    # None: the target has not been reconciled.
    unmatched_accounts: int | None = None
    drifted_accounts: int | None = None
    # Of a target that manages groups: groups no rule defines, members of our groups we did not add.
    # None: not reconciled, or no groups managed.
    unmatched_groups: int | None = None
    foreign_members: int | None = None

    @property
    def held_count(self) -> int:
        """Operations of this target held by a brake, of every kind."""
        return sum(count for _, count in self.held_kinds)


@dataclass(frozen=True, slots=True)
class Condition:
    """A rule that holds for a target now.

    ``fingerprint`` changes only when the condition changes in a way worth
    saying again; ``level`` orders those changes (a higher bracket of failed
    operations), so that getting better is not announced until it clears.
    """

    key: str
    rule: Rule
    target: str
    severity: Severity
    message: str
    fingerprint: str
    level: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)


def evaluate(facts: Iterable[TargetFacts], config: AlertsConfig, *, now: datetime | None = None) -> list[Condition]:
    """The conditions that hold for these targets; purely computational, no side effects.

    ``now`` (default: the current UTC time) measures how long a target has been failing.
    """
    at = as_utc(now or utcnow())
    conditions: list[Condition] = []
    for target_facts in facts:
        for rule in _RULES:
            condition = rule(target_facts, config.rules, at)
            if condition is not None:
                conditions.append(condition)
    return conditions


def _failed_operations(facts: TargetFacts, rules: AlertRules, now: datetime) -> Condition | None:
    threshold = rules.failed_operations
    if threshold is None or facts.failed_count <= threshold:
        return None
    # Brackets double: with a threshold of 10, 11–19 is 0, 20–39 is 1, 40–79 is 2, …
    bracket = (facts.failed_count // max(threshold, 1)).bit_length() - 1
    return Condition(
        key=_key("failed_operations", facts.target),
        rule="failed_operations",
        target=facts.target,
        severity="warning",
        message=f"{facts.target}: {facts.failed_count} failed operations wait for review (alert above {threshold})",
        fingerprint=f"bracket={bracket}",
        level=bracket,
        details={
            "failed_count": facts.failed_count,
            "threshold": threshold,
            "hint": f"provisioner queue list --status failed --target {facts.target}",
        },
    )


def _failing_target(facts: TargetFacts, rules: AlertRules, now: datetime) -> Condition | None:
    if rules.failing_target_minutes is None or facts.failing_since is None:
        return None
    since = as_utc(facts.failing_since)
    minutes = int((now - since).total_seconds() // 60)
    if minutes < rules.failing_target_minutes:
        return None
    return Condition(
        key=_key("failing_target", facts.target),
        rule="failing_target",
        target=facts.target,
        severity="critical",
        message=(
            f"{facts.target}: every call has failed for {minutes} minutes"
            f" (since {since:%Y-%m-%d %H:%M} UTC){_last_error(facts)}"
        ),
        # A new failure episode (a success in between that we did not see) is said again.
        fingerprint=f"since={since.isoformat()}",
        details={
            "failing_since": since.isoformat(),
            "minutes": minutes,
            "threshold_minutes": rules.failing_target_minutes,
            "last_error": _short(facts.last_error),
        },
    )


def _auth_failure(facts: TargetFacts, rules: AlertRules, now: datetime) -> Condition | None:
    if not rules.auth_failure or not facts.auth_failed:
        return None
    return Condition(
        key=_key("auth_failure", facts.target),
        rule="auth_failure",
        target=facts.target,
        severity="critical",
        message=f"{facts.target}: authentication failed{_last_error(facts)}; check the target's credentials",
        fingerprint="auth",
        details={"last_error": _short(facts.last_error)},
    )


def _held_cycle(facts: TargetFacts, rules: AlertRules, now: datetime) -> Condition | None:
    if not rules.held_cycle or facts.held_count <= 0:
        return None
    runs = sorted(facts.held_runs)
    where = f" in run {', '.join(runs)}" if runs else ""
    return Condition(
        key=_key("held_cycle", facts.target),
        rule="held_cycle",
        target=facts.target,
        severity="warning",
        message=(
            f"{facts.target}: {held_phrase(dict(facts.held_kinds))} held for approval{where}"
            " (provisioner approve RUN_ID / reject RUN_ID)"
        ),
        # Another held run is news; the same runs are not.
        fingerprint="runs=" + (",".join(runs) if runs else str(facts.held_count)),
        details={"held_count": facts.held_count, "held_runs": runs, "held_kinds": dict(facts.held_kinds)},
    )


def _quarantined(facts: TargetFacts, rules: AlertRules, now: datetime) -> Condition | None:
    if not rules.quarantined_target or not facts.quarantined:
        return None
    reason = f" ({_short(facts.quarantine_reason)})" if facts.quarantine_reason else ""
    return Condition(
        key=_key("quarantined", facts.target),
        rule="quarantined",
        target=facts.target,
        severity="critical",
        message=f"{facts.target}: quarantined{reason}; nothing is sent but probes, operations stay queued",
        fingerprint="quarantined",
        details={"reason": _short(facts.quarantine_reason)},
    )


def _refused_cycle(facts: TargetFacts, rules: AlertRules, now: datetime) -> Condition | None:
    if not rules.refused_cycle or not facts.refused:
        return None
    return Condition(
        key=_key("refused_cycle", facts.target),
        rule="refused_cycle",
        target=facts.target,
        severity="critical",
        message=f"{facts.target}: cycle refused, nothing planned or sent: {_short(facts.refused)}",
        fingerprint="refused:" + (_short(facts.refused) or ""),
        details={"reason": _short(facts.refused)},
    )


def _unstored_writes(facts: TargetFacts, rules: AlertRules, now: datetime) -> Condition | None:
    if not rules.unstored_writes or facts.unstored_count <= 0:
        return None
    # Said again when the count doubles: 1, 2–3, 4–7, …
    bracket = facts.unstored_count.bit_length() - 1
    return Condition(
        key=_key("unstored_writes", facts.target),
        rule="unstored_writes",
        target=facts.target,
        severity="warning",
        message=(f"{facts.target}: {facts.unstored_count} writes in the last 24 hours were answered with success "
                 "but the target did not store every attribute (declare or map them differently)"),  # fmt: skip
        fingerprint=f"bracket={bracket}",
        level=bracket,
        details={"unstored_count": facts.unstored_count,
                 "hint": f"provisioner queue list --target {facts.target} (the note says what was dropped)"},  # fmt: skip
    )
def _reconciled(
    rule: Literal["unmatched_accounts", "drifted_accounts", "unmatched_groups", "foreign_members"], what: str, hint: str
) -> Callable[
    [TargetFacts, AlertRules, datetime], Condition | None
]:
    """A threshold rule over a count the last reconciliation found."""

    def check(facts: TargetFacts, rules: AlertRules, now: datetime) -> Condition | None:
        threshold = getattr(rules, rule)
        count = getattr(facts, rule)
        if threshold is None or count is None or count <= threshold:
            return None
        bracket = (count // max(threshold, 1)).bit_length() - 1
        return Condition(
            key=_key(rule, facts.target),
            rule=rule,
            target=facts.target,
            severity="warning",
            message=f"{facts.target}: reconciliation found {count} {what} (alert above {threshold})",
            fingerprint=f"bracket={bracket}",
            level=bracket,
            details={"count": count, "threshold": threshold, "hint": f"{hint} --target {facts.target}"},
        )

    return check


_RULES: tuple[Callable[[TargetFacts, AlertRules, datetime], Condition | None], ...] = (
    _refused_cycle,
    _auth_failure,
    _quarantined,
    _failing_target,
    _failed_operations,
    _held_cycle,
    _unstored_writes,
    _reconciled("unmatched_accounts", "accounts that no identity owns", "provisioner reconcile"),
    _reconciled("drifted_accounts", "linked accounts whose attributes drifted", "provisioner reconcile"),
    _reconciled("unmatched_groups", "groups that no rule defines", "provisioner reconcile"),
    _reconciled("foreign_members", "members of managed groups that are not accounts we manage",
                "provisioner reconcile"),
)


def _key(rule: Rule, target: str) -> str:
    return f"{rule}:{target}"


def _short(text: str | None) -> str | None:
    """One line, secrets masked, capped: safe to quote in a message."""
    if text is None:
        return None
    line = " ".join(redaction.redact(text).split())
    return line if len(line) <= ERROR_CAP else line[: ERROR_CAP - 1] + "…"


def _last_error(facts: TargetFacts) -> str:
    return f"; last error: {_short(facts.last_error)}" if facts.last_error else ""




# --- state and dispatch ----------------------------------------------------------------------


class AlertState(SQLModel, table=True):
    """What was last said about one condition, so that it is said once, not every cycle."""

    __tablename__ = "alert_state"

    key: str = Column(primary_key=True)
    rule: str
    target: str = Column(index=True)
    severity: str
    fingerprint: str
    level: int = 0
    # The message last sent: the recovery message repeats it.
    message: str
    active: bool = True
    first_fired_at: datetime
    last_sent_at: datetime
    resolved_at: datetime | None = None


STATE = AlertState.__table__


@dataclass(frozen=True, slots=True)
class Notification:
    """One thing to tell the operators about one condition."""

    key: str
    rule: str
    target: str
    severity: str
    status: Status
    # One line, naming the target and the numbers.
    text: str
    # When the condition first fired (this episode), and when this was said.
    since: datetime
    at: datetime
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        """The line for a chat message or a mail subject: severity first, unless resolved."""
        return self.text if self.status == "resolved" else f"{self.severity.upper()}: {self.text}"


Sender = Callable[[Sequence[Notification], AlertsConfig], Awaitable[None]]


def decide(
    previous: Mapping[str, Mapping[str, Any]],
    conditions: Iterable[Condition],
    *,
    now: datetime,
    renotify_after: timedelta,
    targets: Collection[str] | None = None,
) -> list[Notification]:
    """What to say, given the state last recorded per key; purely computational.

    ``targets`` limits recovery to the targets whose facts were evaluated
    (None: every target), so that checking one target never resolves another's alerts.
    """
    now = as_utc(now)
    current = {c.key: c for c in conditions}
    notifications: list[Notification] = []
    for key, condition in current.items():
        state = previous.get(key)
        status = _status(state, condition, now, renotify_after)
        if status is None:
            continue
        since = now if status == "firing" else as_utc(state["first_fired_at"])  # type: ignore[index]
        text = condition.message
        if status == "reminder":
            text = f"still: {text} (alerting since {since:%Y-%m-%d %H:%M} UTC)"
        notifications.append(
            Notification(
                key=key,
                rule=condition.rule,
                target=condition.target,
                severity=condition.severity,
                status=status,
                text=text,
                since=since,
                at=now,
                details=dict(condition.details),
            )
        )
    for key, state in previous.items():
        if not state["active"] or key in current:
            continue
        if targets is not None and state["target"] not in targets:
            continue
        notifications.append(
            Notification(
                key=key,
                rule=state["rule"],
                target=state["target"],
                severity=state["severity"],
                status="resolved",
                text=_resolved_text(state["rule"], state["target"], state["message"]),
                since=as_utc(state["first_fired_at"]),
                at=now,
            )
        )
    return notifications


# What a rule's recovery says, before repeating what was last said.
_CLEARED: dict[str, str] = {
    "failed_operations": "failed operations are back under the threshold",
    "failing_target": "calls succeed again",
    "auth_failure": "authentication works again",
    "held_cycle": "nothing is held for approval any more",
    "quarantined": "out of quarantine",
    "refused_cycle": "cycles run again",
    "unstored_writes": "no write left attributes unstored in the last 24 hours",
}


def _resolved_text(rule: str, target: str, message: str) -> str:
    last = message.removeprefix(f"{target}: ")
    return f"resolved: {target}: {_CLEARED.get(rule, 'cleared')}; last said: {last}"


def _status(
    state: Mapping[str, Any] | None, condition: Condition, now: datetime, renotify_after: timedelta
) -> Status | None:
    if state is None or not state["active"]:
        return "firing"
    if condition.fingerprint != state["fingerprint"] and condition.level >= state["level"]:
        return "changed"
    if now - as_utc(state["last_sent_at"]) >= renotify_after:
        return "reminder"
    return None


async def dispatch(
    engine: Engine,
    conditions: Iterable[Condition],
    config: AlertsConfig,
    now: datetime,
    *,
    targets: Collection[str] | None = None,
    sender: Sender | None = None,
) -> list[Notification]:
    """Decide what to say about these conditions, record it in one transaction, then send it.

    Recorded before sending: a channel that is down loses that notification
    (it is in the log, which is always written) instead of repeating every
    alert on every check. ``targets``: see ``decide``. ``sender`` defaults to ``send``.
    """
    conditions = list(conditions)
    by_key = {c.key: c for c in conditions}
    with engine.begin() as conn:
        rows = conn.execute(select(STATE).with_for_update()).mappings().all()
        previous = {row["key"]: row for row in rows}
        notifications = decide(
            previous, conditions, now=now, renotify_after=timedelta(minutes=config.renotify_after), targets=targets
        )
        for n in notifications:
            _save(conn, n, by_key.get(n.key), exists=n.key in previous)
    if notifications:
        await (sender or send)(notifications, config)
    return notifications


def _save(conn: Any, n: Notification, condition: Condition | None, *, exists: bool) -> None:
    if n.status == "resolved":
        conn.execute(update(STATE).where(STATE.c.key == n.key).values(active=False, resolved_at=n.at, last_sent_at=n.at))
        return
    assert condition is not None
    values = {
        "rule": condition.rule,
        "target": condition.target,
        "severity": condition.severity,
        "fingerprint": condition.fingerprint,
        "level": condition.level,
        "message": redaction.redact(condition.message),
        "active": True,
        "first_fired_at": n.since,
        "last_sent_at": n.at,
        "resolved_at": None,
    }
    if exists:
        conn.execute(update(STATE).where(STATE.c.key == n.key).values(**values))
    else:
        conn.execute(insert(STATE).values(key=n.key, **values))


# --- channels --------------------------------------------------------------------------------


class ChannelError(Exception):
    """A channel could not deliver; the message names no secret."""


async def send(
    notifications: Sequence[Notification],
    config: AlertsConfig,
    *,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """Tell every channel: the log always, then the webhook and e-mail if configured. Never raises."""
    for n in notifications:
        notify_log(n)
    if config.webhook is not None:
        try:
            await post_webhook(notifications, config.webhook, sleep=sleep)
        except Exception as exc:  # noqa: BLE001 — a channel that fails must not stop the others
            _channel_failed("webhook", exc, notifications, where=_origin(config.webhook.url.get_secret_value()))
    if config.email is not None:
        try:
            await asyncio.to_thread(send_email, notifications, config.email)
        except Exception as exc:  # noqa: BLE001 — same: logged, the engine goes on
            _channel_failed("email", exc, notifications, where=f"{config.email.host}:{config.email.port}")


def notify_log(n: Notification) -> None:
    """The log channel: a warning while a condition holds, info when it clears."""
    emit = log.info if n.status == "resolved" else log.warning
    emit(
        "alert",
        alert=n.key,
        status=n.status,
        severity=n.severity,
        target=n.target,
        rule=n.rule,
        message=n.text,
        since=n.since.isoformat(),
        details=dict(n.details),
    )


def webhook_payload(n: Notification, fmt: Literal["json", "slack"]) -> dict[str, Any]:
    """The JSON body posted for one notification, every known secret masked."""
    if fmt == "slack":
        return {"text": redaction.redact(f"[provisioner] {n.headline}")}
    return redaction.redact_value({
        "source": "provisioner",
        "key": n.key,
        "rule": n.rule,
        "target": n.target,
        "severity": n.severity,
        "status": n.status,
        "text": n.text,
        "since": n.since.isoformat(),
        "at": n.at.isoformat(),
        "details": dict(n.details),
    })


async def post_webhook(
    notifications: Sequence[Notification],
    channel: WebhookChannel,
    *,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """POST each notification, 3 attempts each on 429, 5xx or a network error; raise ChannelError if one fails.

    The first notification that cannot be delivered stops the batch: the
    receiver is down, and the rest would only wait for the same timeouts.
    """
    import httpx

    headers = {name: value.get_secret_value() for name, value in channel.headers.items()}
    url = channel.url.get_secret_value()
    async with httpx.AsyncClient(timeout=httpx.Timeout(channel.timeout), follow_redirects=False) as client:
        for sent, n in enumerate(notifications):
            try:
                await _post(client, url, headers, webhook_payload(n, channel.format), sleep)
            except ChannelError as exc:
                raise ChannelError(f"{exc} ({sent} of {len(notifications)} notifications sent)") from None


async def _post(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    sleep: Callable[[float], Awaitable[Any]],
) -> None:
    import httpx

    attempts = len(WEBHOOK_BACKOFF) + 1
    for attempt in range(1, attempts + 1):
        wait = WEBHOOK_BACKOFF[min(attempt, len(WEBHOOK_BACKOFF)) - 1]
        try:
            response = await client.post(url, json=body, headers=headers)
        except httpx.TransportError as exc:
            # httpx puts the URL in some messages: only the exception's class is kept.
            problem = f"{type(exc).__name__}"
        else:
            if response.is_success:
                return
            problem = f"HTTP {response.status_code}"
            if response.status_code != 429 and response.status_code < 500:
                raise ChannelError(f"the webhook answered {problem}: {_short(response.text[:ERROR_CAP]) or '(no body)'}")
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is not None:
                wait = min(retry_after, WEBHOOK_MAX_WAIT)
        if attempt == attempts:
            raise ChannelError(f"the webhook failed {attempts} times, last: {problem}")
        log.info("alert webhook retry", attempt=attempt, problem=problem, wait=wait)
        await sleep(wait)


# Python's header folder moves a long subject that starts with "[provisioner]" whole onto a
# continuation line (which some readers show with a leading space): subjects are capped instead,
# and kept on one line (RFC 5322 §2.1.1: at most 998 characters, 78 recommended).
SUBJECT_CAP = 250
_MAIL_POLICY = email.policy.SMTP.clone(max_line_length=998)


def email_message(n: Notification, channel: EmailChannel) -> EmailMessage:
    """The e-mail for one notification: the headline as subject, the details in the body."""
    message = EmailMessage(policy=_MAIL_POLICY)
    message["From"] = channel.from_addr
    message["To"] = ", ".join(channel.to)
    subject = redaction.redact(f"[provisioner] {n.headline}")
    message["Subject"] = subject if len(subject) <= SUBJECT_CAP else subject[: SUBJECT_CAP - 1] + "…"
    message["Date"] = formatdate(n.at.timestamp(), usegmt=True)
    message["Message-ID"] = make_msgid(domain=channel.from_addr.rpartition("@")[2] or None)
    lines = [
        n.text,
        "",
        f"alert:    {n.key}",
        f"status:   {n.status}",
        f"severity: {n.severity}",
        f"target:   {n.target}",
        f"since:    {n.since:%Y-%m-%d %H:%M:%S} UTC",
        f"at:       {n.at:%Y-%m-%d %H:%M:%S} UTC",
    ]
    lines += [f"{name}: {value}" for name, value in n.details.items() if value not in (None, "", [])]
    message.set_content(redaction.redact("\n".join(lines) + "\n"))
    return message


def send_email(notifications: Sequence[Notification], channel: EmailChannel) -> None:
    """Blocking: one SMTP session, STARTTLS (verified) when configured, one message per notification.

    Call it through ``asyncio.to_thread`` from the event loop (``send`` does).
    """
    try:
        with smtplib.SMTP(channel.host, channel.port, timeout=channel.timeout) as smtp:
            smtp.ehlo()
            if channel.starttls:
                cafile = str(channel.ca_bundle) if channel.ca_bundle else None
                smtp.starttls(context=ssl.create_default_context(cafile=cafile))
                smtp.ehlo()
            if channel.username is not None and channel.password is not None:
                smtp.login(channel.username, channel.password.get_secret_value())
            for n in notifications:
                smtp.send_message(email_message(n, channel))
    except (smtplib.SMTPException, OSError) as exc:
        raise ChannelError(f"{type(exc).__name__}: {_short(str(exc))}") from None


def _channel_failed(channel: str, exc: Exception, notifications: Sequence[Notification], *, where: str) -> None:
    error = str(exc) if isinstance(exc, ChannelError) else f"{type(exc).__name__}: {_short(str(exc))}"
    log.error(
        "alert channel failed",
        channel=channel,
        to=where,
        error=redaction.redact(error),
        alerts=[n.key for n in notifications],
    )


def _origin(url: str) -> str:
    """scheme://host[:port] — never the path or query, where webhook tokens live."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "(invalid URL)"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}"
