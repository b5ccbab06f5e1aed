"""Prometheus metrics of the engine, and the small HTTP server for /metrics and /healthz."""

from __future__ import annotations

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
LAST_SUCCESS = Gauge("provisioner_last_successful_cycle_timestamp_seconds",
                     "When a target's last cycle finished without failures", ["target"], registry=REGISTRY)  # fmt: skip
UNSTORED = Counter(
    "provisioner_unstored_attributes", "Attributes a target accepted in a write but did not store",
    ["target", "attribute"], registry=REGISTRY,
)  # fmt: skip
QUARANTINED = Gauge("provisioner_target_quarantined", "1 when a target is quarantined or paused", ["target"],
                    registry=REGISTRY)  # fmt: skip

RECONCILE_ACCOUNTS = Gauge("provisioner_reconcile_accounts",
                           "Accounts by situation at a target's last reconciliation (midPoint's situations)",
                           ["target", "situation"], registry=REGISTRY)  # fmt: skip
RECONCILE_DRIFTED = Gauge("provisioner_reconcile_drifted_accounts",
                          "Linked accounts whose attributes drifted, at a target's last reconciliation",
                          ["target"], registry=REGISTRY)  # fmt: skip


def set_queue_depth(counts: dict[str, dict[str, int]], statuses: tuple[str, ...]) -> None:
    """Publish queue counts; statuses with no rows read 0 rather than vanishing."""
    for target, by_status in counts.items():
        for status in statuses:
            QUEUE_DEPTH.labels(target, status).set(by_status.get(status, 0))


class _Handler(BaseHTTPRequestHandler):
    health: Callable[[], dict[str, Any]] = staticmethod(lambda: {"status": "ok"})

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.path.split("?")[0] == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
        elif self.path.split("?")[0] == "/healthz":
            body = self.health()
            code = 200 if body.get("status") == "ok" else 503
            self._send(code, "application/json", orjson.dumps(body, default=str))
        else:
            self._send(404, "text/plain", b"not found\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        return  # scrapes every few seconds would drown the operation log


def serve(address: str, health: Callable[[], dict[str, Any]]) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on ``host:port`` in a background thread."""
    host, _, port = address.rpartition(":")
    handler = type("Handler", (_Handler,), {"health": staticmethod(health)})
    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
