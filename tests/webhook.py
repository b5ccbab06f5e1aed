"""A local webhook receiver: what arrives there is what an operator's chat channel would show."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every body and ``Authorization`` header it is sent."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        self.authorizations: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                outer.authorizations.append(self.headers.get("Authorization", ""))
                outer.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def texts(self) -> list[str]:
        """The ``text`` of every JSON body, in the order they arrived."""
        return [str(json.loads(body).get("text")) for body in self.bodies]
