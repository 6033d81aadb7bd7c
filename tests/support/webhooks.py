"""A webhook receiver on loopback, where the tests' alert automations deliver (Prefect's
CustomWebhookNotificationBlock posting JSON): every POST's path and body, in order."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.helpers import wait_until


@dataclass
class Delivery:
    path: str
    json: dict
    at: float  # time.monotonic() when it arrived

    @property
    def text(self) -> str:
        return self.json.get("body") or self.json.get("text", "")


class Listener:
    """A webhook receiver on 127.0.0.1: every POST's path and JSON body, in order."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                received.append(Delivery(self.path, json.loads(body), time.monotonic()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, path: str, subject: str, run_id: str, says: str = "", timeout: float = 60) -> Delivery:
        """The delivery to ``path`` with ``subject`` about the flow run ``run_id`` (its link names it)
        whose text ``says`` something."""
        return wait_until(lambda: next((d for d in self.received if d.path == path and subject in
                                        json.dumps(d.json) and run_id in d.text and says in d.text), None),
                          timeout, f"{subject!r} for run {run_id} at {path}", 0.2)
