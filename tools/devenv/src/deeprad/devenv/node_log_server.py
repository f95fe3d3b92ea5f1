"""The kubelet-like HTTPS endpoint the API server calls for `kubectl logs`.

Serves `GET /containerLogs/{namespace}/{pod}/{container}` with the query parameters kubelet
understands (follow, previous, timestamps, tailLines, limitBytes, sinceSeconds, sinceTime) from
the CRI-format log files the pod workers write. Only clients with a certificate from the
cluster's CA (the API server's --kubelet-client-certificate) are accepted. exec, attach and
port-forward answer 501: there is no container to enter.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class LogSource(Protocol):
    """What the server needs from a pod worker."""

    def log_path(self, name: str, previous: bool = False) -> Path | None: ...

    def running(self, name: str) -> bool: ...


FindPod = Callable[[str, str], LogSource | None]


def _parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _format_lines(path: Path, timestamps: bool, since: float | None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from _format_stream(f.read().splitlines(), timestamps, since)


def _format_stream(lines: list[bytes], timestamps: bool, since: float | None) -> Iterator[bytes]:
    for raw in lines:
        parts = raw.split(b" ", 3)
        if len(parts) < 4:
            continue
        ts, _stream, tag, content = parts
        if since is not None and _parse_time(ts.decode()) < since:
            continue
        line = content + (b"\n" if tag == b"F" else b"")
        yield ts + b" " + line if timestamps else line


class _Handler(BaseHTTPRequestHandler):
    server: _LogServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("log server: " + fmt, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts == ["healthz"]:
            self._reply(200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._reply(501, b"not supported by the deeprad devenv node agent\n")
            return
        _, ns, pod_name, container = parts
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        pod = self.server.find_pod(ns, pod_name)
        if pod is None:
            self._reply(404, f"pod {ns}/{pod_name} not found on this node\n".encode())
            return
        path = pod.log_path(container, previous=q.get("previous") == "true")
        if path is None or not path.exists():
            self._reply(404, f"no logs for container {container} of {ns}/{pod_name}\n".encode())
            return
        self._stream(pod, container, path, q)

    def do_POST(self) -> None:
        self._reply(501, b"exec/attach/port-forward not supported by the devenv node agent\n")

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, pod: LogSource, container: str, path: Path, q: dict[str, str]) -> None:
        timestamps = q.get("timestamps") == "true"
        since: float | None = None
        if "sinceSeconds" in q:
            since = time.time() - float(q["sinceSeconds"])
        elif "sinceTime" in q:
            since = _parse_time(q["sinceTime"])
        lines = list(_format_lines(path, timestamps, since))
        if "tailLines" in q:
            n = int(q["tailLines"])
            lines = lines[-n:] if n > 0 else []
        limit = int(q["limitBytes"]) if "limitBytes" in q else None
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            for line in lines:
                if limit is not None and sent + len(line) > limit:
                    self._chunk(line[: limit - sent])
                    sent = limit
                    break
                self._chunk(line)
                sent += len(line)
            if q.get("follow") == "true" and (limit is None or sent < limit):
                self._follow(pod, container, path, timestamps)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return

    def _follow(self, pod: LogSource, container: str, path: Path, timestamps: bool) -> None:
        with open(path, "rb") as f:
            f.seek(0, 2)
            pending = b""
            while True:
                data = f.read()
                if data:
                    pending += data
                    *complete, pending = pending.split(b"\n")
                    for line in _format_stream(complete, timestamps, None):
                        self._chunk(line)
                elif not pod.running(container):
                    return
                else:
                    time.sleep(0.2)

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()


class _LogServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, find_pod: FindPod, context: ssl.SSLContext) -> None:
        self.find_pod = find_pod
        self._context = context
        super().__init__(("127.0.0.1", port), _Handler)

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, addr = super().get_request()
        # The handshake happens on first read, in the handler thread, not in the accept loop.
        wrapped = self._context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False)
        return wrapped, addr


def start_log_server(port: int, find_pod: FindPod, cert: str, key: str, client_ca: str
                     ) -> ThreadingHTTPServer:
    """Serve container logs over mutual TLS on 127.0.0.1:port in a background thread."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    server = _LogServer(port, find_pod, context)
    threading.Thread(target=server.serve_forever, name=f"log-server-{port}", daemon=True).start()
    return server
