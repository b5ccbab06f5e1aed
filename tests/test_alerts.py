"""Alerts: the rules as a matrix, fire-once state, and the channels against real local servers.

The webhook receiver is ``http.server`` on a free port of 127.0.0.1; the mail
server is ``aiosmtpd`` (plain, and with STARTTLS and AUTH on a certificate made
here). No test sleeps: the webhook's backoff is recorded by an injected sleep.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import ValidationError
from structlog.testing import capture_logs

from provisioner import redaction
from provisioner.alerts import (
    AlertRules,
    AlertsConfig,
    Condition,
    EmailChannel,
    Notification,
    TargetFacts,
    WebhookChannel,
    dispatch,
    evaluate,
    send,
)
from provisioner.store import open_store

NOW = dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.UTC)
PASSWORD = "smtp-Pa55word-never-logged"
HEADER_TOKEN = "hook-token-0123456789abcdef"
URL_TOKEN = "T000-B000-XXXXsecretpath"


def minutes(n: float) -> dt.timedelta:
    return dt.timedelta(minutes=n)


def keys(conditions: list[Condition]) -> list[str]:
    return [c.key for c in conditions]


# --- evaluate() ----------------------------------------------------------------------------------

DEFAULT = AlertRules()


@pytest.mark.parametrize(
    ("facts", "rules", "expected"),
    [
        pytest.param(TargetFacts("app"), DEFAULT, [], id="quiet-target"),
        pytest.param(TargetFacts("app", failed_count=10), DEFAULT, [], id="failed-at-threshold"),
        pytest.param(TargetFacts("app", failed_count=11), DEFAULT, ["failed_operations:app"], id="failed-above"),
        pytest.param(
            TargetFacts("app", failed_count=500), AlertRules(failed_operations=None), [], id="failed-rule-off"
        ),
        pytest.param(
            TargetFacts("app", failed_count=1), AlertRules(failed_operations=0), ["failed_operations:app"],
            id="failed-threshold-zero",
        ),
        pytest.param(TargetFacts("app", failing_since=NOW - minutes(14)), DEFAULT, [], id="failing-too-short"),
        pytest.param(
            TargetFacts("app", failing_since=NOW - minutes(15)), DEFAULT, ["failing_target:app"], id="failing-long"
        ),
        pytest.param(
            TargetFacts("app", failing_since=(NOW - minutes(60)).replace(tzinfo=None)), DEFAULT,
            ["failing_target:app"], id="failing-naive-utc",
        ),
        pytest.param(
            TargetFacts("app", failing_since=NOW - minutes(600)), AlertRules(failing_target_minutes=None), [],
            id="failing-rule-off",
        ),
        pytest.param(TargetFacts("app", auth_failed=True), DEFAULT, ["auth_failure:app"], id="auth"),
        pytest.param(TargetFacts("app", auth_failed=True), AlertRules(auth_failure=False), [], id="auth-rule-off"),
        pytest.param(TargetFacts("app", held_runs=("r1",), held_kinds=(("disable", 3),)), DEFAULT, ["held_cycle:app"], id="held"),
        pytest.param(TargetFacts("app", held_kinds=(("disable", 3),)), AlertRules(held_cycle=False), [], id="held-rule-off"),
        pytest.param(TargetFacts("app", quarantined=True), DEFAULT, ["quarantined:app"], id="quarantined"),
        pytest.param(
            TargetFacts("app", quarantined=True), AlertRules(quarantined_target=False), [], id="quarantine-rule-off"
        ),
        pytest.param(TargetFacts("app", unstored_count=1), DEFAULT, ["unstored_writes:app"], id="unstored"),
        pytest.param(TargetFacts("app", unstored_count=9), AlertRules(unstored_writes=False), [], id="unstored-rule-off"),
        pytest.param(
            TargetFacts(
                "app", failed_count=40, held_kinds=(("disable", 2),), auth_failed=True, failing_since=NOW - minutes(30),
                quarantined=True,
            ),
            DEFAULT,
            ["auth_failure:app", "quarantined:app", "failing_target:app", "failed_operations:app", "held_cycle:app"],
            id="everything-at-once",
        ),
    ],
)  # fmt: skip
def test_evaluate_matrix(facts: TargetFacts, rules: AlertRules, expected: list[str]) -> None:
    assert keys(evaluate([facts], AlertsConfig(rules=rules), now=NOW)) == expected


@pytest.mark.parametrize(
    ("failed", "level"), [(11, 0), (19, 0), (20, 1), (39, 1), (40, 2), (80, 3)]
)  # fmt: skip
def test_failed_operations_level_doubles_from_the_threshold(failed: int, level: int) -> None:
    (condition,) = evaluate([TargetFacts("app", failed_count=failed)], AlertsConfig(), now=NOW)
    assert condition.level == level


def test_messages_name_the_target_and_the_numbers() -> None:
    facts = [
        TargetFacts("crm", failed_count=12),
        TargetFacts("hr-app", failing_since=NOW - minutes(42), last_error="HTTP 503:\n  Service Unavailable"),
        TargetFacts("wiki", held_runs=("20260302T0915-ab12cd",),
                    held_kinds=(("disable", 60), ("group_members", 1))),
        TargetFacts("chat", auth_failed=True, last_error="HTTP 401: invalid_token"),
        TargetFacts("chat2", quarantined=True, quarantine_reason="12 of 12 calls failed"),
    ]
    messages = {c.key: c.message for c in evaluate(facts, AlertsConfig(), now=NOW)}
    assert messages == {
        "failed_operations:crm": "crm: 12 failed operations wait for review (alert above 10)",
        "failing_target:hr-app": (
            "hr-app: every call has failed for 42 minutes (since 2026-03-02 08:48 UTC); last error: HTTP 503: Service Unavailable"
        ),
        "held_cycle:wiki": (
            "wiki: 60 leaver disables, 1 group member removal held for approval in run 20260302T0915-ab12cd"
            " (provisioner approve RUN_ID / reject RUN_ID)"
        ),
        "auth_failure:chat": "chat: authentication failed; last error: HTTP 401: invalid_token; check the target's credentials",
        "quarantined:chat2": "chat2: quarantined (12 of 12 calls failed); nothing is sent but probes, operations stay queued",
    }


def test_a_secret_in_the_last_error_is_masked_in_the_message() -> None:
    redaction.register("tok-3141592653")
    facts = TargetFacts("app", auth_failed=True, last_error="refused token tok-3141592653")
    (condition,) = evaluate([facts], AlertsConfig(), now=NOW)
    assert "tok-3141592653" not in condition.message
    assert "***" in condition.message


# --- dispatch(): once, changed, reminder, resolved ------------------------------------------------


class Outbox:
    """A sender that keeps what it was given."""

    def __init__(self) -> None:
        self.batches: list[list[Notification]] = []

    async def __call__(self, notifications: Any, config: AlertsConfig) -> None:
        self.batches.append(list(notifications))


@pytest.fixture
def engine(tmp_path: Path) -> sqlalchemy.Engine:
    return open_store(f"sqlite:///{tmp_path / 'state.db'}")


async def check(engine: sqlalchemy.Engine, facts: list[TargetFacts], at: dt.datetime, **kwargs: Any) -> list[str]:
    """Evaluate and dispatch at ``at``; return "status key" for each notification."""
    config = AlertsConfig()
    sent = await dispatch(engine, evaluate(facts, config, now=at), config, at, sender=Outbox(), **kwargs)
    return [f"{n.status} {n.key}" for n in sent]


def test_open_store_creates_the_alert_state_table(engine: sqlalchemy.Engine) -> None:
    assert "alert_state" in sqlalchemy.inspect(engine).get_table_names()


async def test_an_alert_fires_once_then_stays_quiet_while_unchanged(engine: sqlalchemy.Engine) -> None:
    facts = [TargetFacts("app", failed_count=12)]
    assert await check(engine, facts, NOW) == ["firing failed_operations:app"]
    assert await check(engine, facts, NOW + minutes(15)) == []
    # 19 is still in the first bracket above 10: not news.
    assert await check(engine, [TargetFacts("app", failed_count=19)], NOW + minutes(30)) == []


async def test_an_alert_is_repeated_after_renotify_after(engine: sqlalchemy.Engine) -> None:
    facts = [TargetFacts("app", auth_failed=True)]
    await check(engine, facts, NOW)
    assert await check(engine, facts, NOW + minutes(239)) == []
    assert await check(engine, facts, NOW + minutes(240)) == ["reminder auth_failure:app"]
    assert await check(engine, facts, NOW + minutes(300)) == []
    assert await check(engine, facts, NOW + minutes(480)) == ["reminder auth_failure:app"]


async def test_a_reminder_says_since_when(engine: sqlalchemy.Engine) -> None:
    config = AlertsConfig()
    facts = [TargetFacts("app", failed_count=12)]
    await dispatch(engine, evaluate(facts, config), config, NOW, sender=Outbox())
    (reminder,) = await dispatch(engine, evaluate(facts, config), config, NOW + minutes(240), sender=Outbox())
    assert reminder.text == (
        "still: app: 12 failed operations wait for review (alert above 10) (alerting since 2026-03-02 09:30 UTC)"
    )
    assert reminder.since == NOW


async def test_an_alert_fires_again_when_it_gets_worse_not_when_it_gets_better(engine: sqlalchemy.Engine) -> None:
    assert await check(engine, [TargetFacts("app", failed_count=12)], NOW) == ["firing failed_operations:app"]
    assert await check(engine, [TargetFacts("app", failed_count=25)], NOW + minutes(1)) == [
        "changed failed_operations:app"
    ]
    assert await check(engine, [TargetFacts("app", failed_count=12)], NOW + minutes(2)) == []
    # Back where it was last said: still not news.
    assert await check(engine, [TargetFacts("app", failed_count=30)], NOW + minutes(3)) == []
    assert await check(engine, [TargetFacts("app", failed_count=45)], NOW + minutes(4)) == [
        "changed failed_operations:app"
    ]


async def test_a_new_held_run_is_news(engine: sqlalchemy.Engine) -> None:
    first = TargetFacts("app", held_runs=("run-1",), held_kinds=(("disable", 60),))
    assert await check(engine, [first], NOW) == ["firing held_cycle:app"]
    assert await check(engine, [first], NOW + minutes(15)) == []
    both = TargetFacts("app", held_runs=("run-1", "run-2"), held_kinds=(("disable", 120),))
    assert await check(engine, [both], NOW + minutes(30)) == ["changed held_cycle:app"]


async def test_a_recovery_message_when_the_condition_clears(engine: sqlalchemy.Engine) -> None:
    config = AlertsConfig()
    facts = [TargetFacts("app", failed_count=12), TargetFacts("crm", quarantined=True)]
    await dispatch(engine, evaluate(facts, config), config, NOW, sender=Outbox())
    outbox = Outbox()
    cleared = [TargetFacts("app", failed_count=3), TargetFacts("crm", quarantined=True)]
    sent = await dispatch(engine, evaluate(cleared, config), config, NOW + minutes(20), sender=outbox)
    assert [(n.status, n.key, n.text) for n in sent] == [
        (
            "resolved",
            "failed_operations:app",
            "resolved: app: failed operations are back under the threshold;"
            " last said: 12 failed operations wait for review (alert above 10)",
        )
    ]
    assert outbox.batches == [sent]
    assert sent[0].since == NOW
    # Said once; and the next episode fires as new.
    assert await check(engine, cleared, NOW + minutes(40)) == []
    assert await check(engine, facts, NOW + minutes(60)) == ["firing failed_operations:app"]


async def test_checking_one_target_never_resolves_another(engine: sqlalchemy.Engine) -> None:
    await check(engine, [TargetFacts("app", auth_failed=True), TargetFacts("crm", auth_failed=True)], NOW)
    assert await check(engine, [TargetFacts("app")], NOW + minutes(5), targets=["app"]) == ["resolved auth_failure:app"]
    assert await check(engine, [], NOW + minutes(6)) == ["resolved auth_failure:crm"]


async def test_nothing_to_say_does_not_call_the_sender(engine: sqlalchemy.Engine) -> None:
    outbox = Outbox()
    assert await dispatch(engine, [], AlertsConfig(), NOW, sender=outbox) == []
    assert outbox.batches == []


async def test_the_log_channel_is_always_on(engine: sqlalchemy.Engine) -> None:
    config = AlertsConfig()
    with capture_logs() as logs:
        await dispatch(engine, evaluate([TargetFacts("app", quarantined=True)], config), config, NOW)
        await dispatch(engine, [], config, NOW + minutes(5))
    alerts = [(e["log_level"], e["status"], e["message"]) for e in logs if e["event"] == "alert"]
    assert alerts == [
        ("warning", "firing", "app: quarantined; nothing is sent but probes, operations stay queued"),
        (
            "info",
            "resolved",
            "resolved: app: out of quarantine; last said: quarantined; nothing is sent but probes, operations stay queued",
        ),
    ]


# --- the webhook, against a real HTTP receiver -----------------------------------------------------


class Receiver(ThreadingHTTPServer):
    """Records every POST; answers from ``replies`` (status, headers), then 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.requests: list[dict[str, Any]] = []
        self.replies: list[tuple[int, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/services/{URL_TOKEN}"


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 — http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        status, headers = self.server.replies.pop(0) if self.server.replies else (200, {})
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — the base class's name
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class Sleeps:
    """An injected sleep that records how long it was asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def notification(status: str = "firing", **overrides: Any) -> Notification:
    values: dict[str, Any] = {
        "key": "failed_operations:app",
        "rule": "failed_operations",
        "target": "app",
        "severity": "warning",
        "status": status,
        "text": "app: 12 failed operations wait for review (alert above 10)",
        "since": NOW,
        "at": NOW,
        "details": {"failed_count": 12, "threshold": 10},
    }
    values.update(overrides)
    return Notification(**values)


def webhook(receiver: Receiver, **options: Any) -> AlertsConfig:
    headers = {"Authorization": f"Bearer {HEADER_TOKEN}"}
    return AlertsConfig(webhook=WebhookChannel(url=receiver.url, headers=headers, **options))


async def test_webhook_posts_the_notification_as_json(receiver: Receiver) -> None:
    await send([notification()], webhook(receiver), sleep=Sleeps())
    (request,) = receiver.requests
    assert request["path"] == f"/services/{URL_TOKEN}"
    assert request["headers"]["Authorization"] == f"Bearer {HEADER_TOKEN}"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"] == {
        "source": "provisioner",
        "key": "failed_operations:app",
        "rule": "failed_operations",
        "target": "app",
        "severity": "warning",
        "status": "firing",
        "text": "app: 12 failed operations wait for review (alert above 10)",
        "since": "2026-03-02T09:30:00+00:00",
        "at": "2026-03-02T09:30:00+00:00",
        "details": {"failed_count": 12, "threshold": 10},
    }


async def test_webhook_slack_format_is_a_text_message(receiver: Receiver) -> None:
    notifications = [notification(), notification("resolved", text="resolved: app: failed operations are back under the threshold")]
    await send(notifications, webhook(receiver, format="slack"), sleep=Sleeps())
    assert [r["body"] for r in receiver.requests] == [
        {"text": "[provisioner] WARNING: app: 12 failed operations wait for review (alert above 10)"},
        {"text": "[provisioner] resolved: app: failed operations are back under the threshold"},
    ]


async def test_a_webhook_answering_500_three_times_is_logged_not_raised(receiver: Receiver) -> None:
    receiver.replies = [(500, {}), (500, {}), (500, {})]
    sleeps = Sleeps()
    with capture_logs() as logs:
        await send([notification()], webhook(receiver), sleep=sleeps)
    assert len(receiver.requests) == 3
    assert sleeps.waits == [1.0, 4.0]
    (failure,) = [e for e in logs if e["event"] == "alert channel failed"]
    assert failure["channel"] == "webhook"
    assert failure["log_level"] == "error"
    assert failure["error"] == "the webhook failed 3 times, last: HTTP 500 (0 of 1 notifications sent)"
    assert failure["to"] == f"http://127.0.0.1:{receiver.server_address[1]}"
    text = repr(logs)
    assert HEADER_TOKEN not in text and URL_TOKEN not in text


async def test_a_webhook_429_waits_for_retry_after(receiver: Receiver) -> None:
    receiver.replies = [(429, {"Retry-After": "2"})]
    sleeps = Sleeps()
    with capture_logs() as logs:
        await send([notification()], webhook(receiver), sleep=sleeps)
    assert len(receiver.requests) == 2
    assert sleeps.waits == [2.0]
    assert not [e for e in logs if e["event"] == "alert channel failed"]


async def test_a_webhook_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.replies = [(404, {})]
    sleeps = Sleeps()
    with capture_logs() as logs:
        await send([notification(), notification()], webhook(receiver), sleep=sleeps)
    assert len(receiver.requests) == 1
    assert sleeps.waits == []
    (failure,) = [e for e in logs if e["event"] == "alert channel failed"]
    assert failure["error"] == "the webhook answered HTTP 404: ok (0 of 2 notifications sent)"


async def test_an_unreachable_webhook_is_logged_not_raised() -> None:
    port = free_port()
    config = AlertsConfig(webhook=WebhookChannel(url=f"http://127.0.0.1:{port}/hook/{URL_TOKEN}", timeout=2))
    sleeps = Sleeps()
    with capture_logs() as logs:
        await send([notification()], config, sleep=sleeps)
    (failure,) = [e for e in logs if e["event"] == "alert channel failed"]
    assert failure["error"] == "the webhook failed 3 times, last: ConnectError (0 of 1 notifications sent)"
    assert URL_TOKEN not in repr(logs)


# --- e-mail, against a real SMTP server ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.envelopes: list[tuple[str, list[str], Message]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 — aiosmtpd's hook name
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), message_from_bytes(envelope.content, policy=policy.default)))
        return "250 OK"


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    handler = Mailbox()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield handler, controller.port
    controller.stop()


def email(port: int, **options: Any) -> AlertsConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "starttls": False,
        "from_addr": "provisioner@example.com",
        "to": ["ops@example.com", "iam@example.com"],
        "timeout": 5,
    }
    values.update(options)
    return AlertsConfig(email=EmailChannel(**values))


async def test_email_sends_one_message_per_notification(mailbox: tuple[Mailbox, int]) -> None:
    handler, port = mailbox
    notifications = [
        notification(),
        notification("resolved", text="resolved: app: failed operations are back under the threshold"),
    ]
    await send(notifications, email(port))
    assert [(mail_from, rcpt) for mail_from, rcpt, _ in handler.envelopes] == [
        ("provisioner@example.com", ["ops@example.com", "iam@example.com"])
    ] * 2
    first, second = (message for _, _, message in handler.envelopes)
    assert first["From"] == "provisioner@example.com"
    assert first["To"] == "ops@example.com, iam@example.com"
    assert first["Subject"] == "[provisioner] WARNING: app: 12 failed operations wait for review (alert above 10)"
    body = first.get_content()
    assert body.splitlines()[0] == "app: 12 failed operations wait for review (alert above 10)"
    assert "alert:    failed_operations:app" in body
    assert "failed_count: 12" in body
    assert second["Subject"] == "[provisioner] resolved: app: failed operations are back under the threshold"


async def test_a_failing_channel_does_not_stop_the_others(receiver: Receiver, mailbox: tuple[Mailbox, int]) -> None:
    handler, port = mailbox
    receiver.replies = [(503, {})] * 3
    config = AlertsConfig(webhook=webhook(receiver).webhook, email=email(port).email)
    with capture_logs() as logs:
        await send([notification()], config, sleep=Sleeps())
    assert len(handler.envelopes) == 1
    assert [e["channel"] for e in logs if e["event"] == "alert channel failed"] == ["webhook"]
    assert [e["event"] for e in logs if e["event"] == "alert"] == ["alert"]


# STARTTLS and AUTH: a certificate for 127.0.0.1, made here, trusted through ca_bundle.


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def secure_mailbox(certificate: tuple[Path, Path]) -> Iterator[tuple[Mailbox, int, list[tuple[str, str]]]]:
    """STARTTLS required, AUTH required, one account: alerts / PASSWORD."""
    logins: list[tuple[str, str]] = []

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login.decode(), data.password.decode()))
        ok = data.login == b"alerts" and data.password == PASSWORD.encode()
        # handled=False: aiosmtpd answers 535 itself (its default, handled=True, answers nothing).
        return AuthResult(success=ok, handled=False)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    handler = Mailbox()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=context,
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
    )
    controller.start()
    yield handler, controller.port, logins
    controller.stop()


async def test_email_uses_starttls_and_logs_in(
    secure_mailbox: tuple[Mailbox, int, list[tuple[str, str]]], certificate: tuple[Path, Path]
) -> None:
    handler, port, logins = secure_mailbox
    config = email(port, starttls=True, username="alerts", password=PASSWORD, ca_bundle=certificate[0])
    with capture_logs() as logs:
        await send([notification()], config)
    assert logins == [("alerts", PASSWORD)]
    assert len(handler.envelopes) == 1
    assert not [e for e in logs if e["event"] == "alert channel failed"]


async def test_a_refused_login_is_logged_without_the_password(
    secure_mailbox: tuple[Mailbox, int, list[tuple[str, str]]], certificate: tuple[Path, Path]
) -> None:
    handler, port, _ = secure_mailbox
    config = email(port, starttls=True, username="nobody", password=PASSWORD, ca_bundle=certificate[0])
    with capture_logs() as logs:
        await send([notification()], config)
    assert handler.envelopes == []
    (failure,) = [e for e in logs if e["event"] == "alert channel failed"]
    assert failure["channel"] == "email"
    assert failure["error"].startswith("SMTPAuthenticationError: (535")
    assert PASSWORD not in repr(logs)


async def test_starttls_refused_by_the_server_is_logged_without_the_password(mailbox: tuple[Mailbox, int]) -> None:
    """The plain server offers no STARTTLS: nothing is sent, no password travels, none is logged."""
    handler, port = mailbox
    config = email(port, starttls=True, username="alerts", password=PASSWORD)
    with capture_logs() as logs:
        await send([notification()], config)
    assert handler.envelopes == []
    (failure,) = [e for e in logs if e["event"] == "alert channel failed"]
    assert failure["error"] == "SMTPNotSupportedError: STARTTLS extension not supported by server."
    assert PASSWORD not in repr(logs)


async def test_an_unreachable_mail_server_is_logged_not_raised() -> None:
    with capture_logs() as logs:
        await send([notification()], email(free_port()))
    (failure,) = [e for e in logs if e["event"] == "alert channel failed"]
    assert failure["error"].startswith("ConnectionRefusedError")


# --- configuration ------------------------------------------------------------------------------------


def test_defaults() -> None:
    config = AlertsConfig()
    assert (config.webhook, config.email, config.renotify_after) == (None, None, 240)
    assert config.rules == AlertRules(
        failed_operations=10, failing_target_minutes=15, auth_failure=True, held_cycle=True, quarantined_target=True
    )


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param({"email": {"host": "h", "from_addr": "a@b", "to": ["c@d"], "password": "p4ssw0rd",
                                "username": "u", "starttls": False}}, "clear text", id="password-without-starttls"),
        pytest.param({"email": {"host": "h", "from_addr": "a@b", "to": ["c@d"], "password": "p4ssw0rd"}},
                     "go together", id="password-without-username"),
        pytest.param({"email": {"host": "h", "from_addr": "a@b", "to": []}}, "at least 1", id="no-recipient"),
        pytest.param({"email": {"host": "h", "from_addr": "a@b", "to": ["ops"]}}, "not an e-mail", id="bad-recipient"),
        pytest.param({"webhook": {"url": "ftp://x/y"}}, "http", id="webhook-scheme"),
        pytest.param({"webhook": {"url": "https://x/y", "format": "teams"}}, "slack", id="webhook-format"),
        pytest.param({"rules": {"failed_ops": 3}}, "Extra inputs", id="unknown-rule"),
    ],
)  # fmt: skip
def test_invalid_config_is_refused(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        AlertsConfig.model_validate(data)


def test_channel_secrets_are_registered_for_redaction() -> None:
    AlertsConfig.model_validate(
        {
            "webhook": {"url": "https://hooks.example.com/services/abc-registered-1", "headers": {"X-Key": "Token key-registered-2"}},
            "email": {"host": "h", "from_addr": "a@b", "to": ["c@d"], "username": "u", "password": "pw-registered-3"},
        }
    )
    text = "https://hooks.example.com/services/abc-registered-1 Token key-registered-2 key-registered-2 pw-registered-3"
    assert redaction.redact(text) == "*** *** *** ***"
    config = AlertsConfig.model_validate({"email": {"host": "h", "from_addr": "a@b", "to": ["c@d"], "username": "u",
                                                    "password": "pw-registered-3"}})  # fmt: skip
    assert "pw-registered-3" not in repr(config)

