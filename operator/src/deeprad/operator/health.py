"""The one liveness endpoint the site agent and a standby replica serve: GET answers 200 with
a small JSON body while `report()` says ok, else 503 (kopf serves the hub leader's own)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve_health(address: str, port: int, report: Callable[[], dict[str, Any]],
                 name: str = "health") -> ThreadingHTTPServer:
    """Serve `report()` (a dict with key "ok") on every GET, in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state = report()
            body = json.dumps(state).encode()
            self.send_response(200 if state.get("ok") else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name=name).start()
    return server
