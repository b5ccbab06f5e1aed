"""Prometheus metrics of the engine, and the small HTTP server for /metrics and /healthz.

The server runs in its own threads: a scrape never waits for a cycle, and a
client that disconnects before reading its answer costs one quiet thread,
never the daemon (no command resets Python's SIGPIPE handling, so a
write to a closed socket is an ``OSError`` here, not a signal).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry()

OPERATIONS = Counter(
    "provisioner_operations", "Operations finished, by target, kind and outcome", ["target", "kind", "outcome"],
    registry=REGISTRY,
)  # fmt: skip
REQUEST_SECONDS = Histogram(
    "provisioner_request_seconds", "SCIM request latency by target and method", ["target", "method"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY,
)  # fmt: skip
QUEUE_DEPTH = Gauge("provisioner_queue_operations", "Operations in the queue by target and status",
                    ["target", "status"], registry=REGISTRY)  # fmt: skip
# A successful cycle (see provisioner.health.cycle_succeeded): it read the source, planned, and the
# target took what it was sent. Records that failed alone (a bad HR row, a 400 on one account) do not
# make it unsuccessful: they are counted in provisioner_queue_operations{status="failed"}.
LAST_SUCCESS = Gauge("provisioner_last_successful_cycle_timestamp_seconds",
                     "When a target's last successful cycle ended: source read, plan queued, "
                     "the target reachable and taking what was sent (records failing alone do not count)",
                     ["target"], registry=REGISTRY)  # fmt: skip
TARGET_OK = Gauge("provisioner_target_ok", "1 when a target's health is ok (nothing failed, waiting, held, "
                  "quarantined or paused), else 0", ["target"], registry=REGISTRY)  # fmt: skip
UNSTORED = Counter(
    "provisioner_unstored_attributes", "Attributes a target accepted in a write but did not store",
    ["target", "attribute"], registry=REGISTRY,
)  # fmt: skip
INSTANCE = Gauge("provisioner_instance_info", "1 for this daemon instance, labelled with its name (daemon.instance)",
                 ["provisioner_instance"], registry=REGISTRY)  # fmt: skip
QUARANTINED = Gauge("provisioner_target_quarantined", "1 when a target is quarantined or paused", ["target"],
                    registry=REGISTRY)  # fmt: skip

RECONCILE_ACCOUNTS = Gauge("provisioner_reconcile_accounts",
                           "Accounts by situation at a target's last reconciliation (midPoint's situations)",
                           ["target", "situation"], registry=REGISTRY)  # fmt: skip
RECONCILE_DRIFTED = Gauge("provisioner_reconcile_drifted_accounts",
                          "Linked accounts whose attributes drifted, at a target's last reconciliation",
                          ["target"], registry=REGISTRY)  # fmt: skip
RECONCILE_GROUPS = Gauge("provisioner_reconcile_groups",
                         "Groups by situation at a target's last reconciliation (unmatched: no rule defines it)",
                         ["target", "situation"], registry=REGISTRY)  # fmt: skip
RECONCILE_FOREIGN_MEMBERS = Gauge("provisioner_reconcile_foreign_members",
                                  "Members of managed groups that are not accounts we manage, at a target's last "
                                  "reconciliation", ["target"], registry=REGISTRY)  # fmt: skip


def set_queue_depth(counts: dict[str, dict[str, int]], statuses: tuple[str, ...]) -> None:
    """Publish queue counts; statuses with no rows read 0 rather than vanishing."""
    for target, by_status in counts.items():
        for status in statuses:
            QUEUE_DEPTH.labels(target, status).set(by_status.get(status, 0))


def set_health(healths: dict[str, Any]) -> None:
    """Publish each target's health (``provisioner.health.TargetHealth`` values)."""
    for name, health in healths.items():
        TARGET_OK.labels(name).set(1 if health.ok else 0)
        QUARANTINED.labels(name).set(1 if health.quarantined or health.paused else 0)


class _Handler(BaseHTTPRequestHandler):
    # A client that connects and sends nothing must not hold a thread for ever.
    timeout = 10
    health: Callable[[], dict[str, Any]] = staticmethod(lambda: {"status": "ok"})

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.path.split("?")[0] == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
        elif self.path.split("?")[0] == "/healthz":
            try:
                body = self.health()
            except Exception as exc:  # noqa: BLE001 - a health check that cannot be read is not ok
                body = {"status": "error", "error": f"{type(exc).__name__}: the health could not be read"}
            code = 200 if body.get("status") == "ok" else 503
            self._send(code, "application/json", orjson.dumps(body, default=str))
        else:
            self._send(404, "text/plain", b"not found\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            # The client went away before reading its answer: nothing to do, nobody to tell.
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        return  # scrapes every few seconds would drown the operation log


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr for a client that reset its connection.
        return


def serve(address: str, health: Callable[[], dict[str, Any]]) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on ``host:port`` in a background thread.

    Raises OSError when the address cannot be bound (the port is in use).
    """
    host, _, port = address.rpartition(":")
    handler = type("Handler", (_Handler,), {"health": staticmethod(health)})
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    server_class = type("Server", (_Server,), {"address_family": family})
    server = server_class((host.strip("[]") or "127.0.0.1", int(port)), handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
