"""A real HTTP server on 127.0.0.1 for tests: byte ranges, redirects and injected faults.

    with TestServer() as server:
        server.add("/model.onnx", data)                 # serve bytes
        server.faults["/model.onnx"] = Fault(drop_after=1000)   # send 1000 bytes then hang up (once)
        url = server.url("/model.onnx")
        ...
        server.log  # [(path, range header or None, status), ...]
        server.redirects["/old.onnx"] = "/model.onnx"   # answer 302 with this Location

Used as an HTTP proxy (``http_proxy=http://127.0.0.1:PORT``) the client sends the absolute URL
(``GET http://host/path``): the server serves ``path`` and records the host in ``proxied_hosts``.

Faults: ``drop_after`` (bytes sent before the connection is closed, ``times`` requests),
``delay`` (seconds of silence before the body), ``throttle`` (seconds slept between 64 KiB chunks),
``ranges=False`` (ignore Range and answer 200), ``redirect_loop`` (redirect to itself forever),
``gate`` (a ``threading.Event``: the body is held back until the test sets it).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fault:
    drop_after: int | None = None
    times: int = 1
    delay: float = 0.0
    throttle: float = 0.0
    ranges: bool = True
    redirect_loop: bool = False
    gate: threading.Event | None = None  # headers are sent, then the body waits until the event is set


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        absolute = re.match(r"^https?://([^/]+)(/.*)?$", path)
        if absolute:  # proxy request: absolute-form target
            with owner.lock:
                owner.proxied_hosts.append(absolute.group(1))
            path = absolute.group(2) or "/"
        range_header = self.headers.get("Range")
        fault = owner.faults.get(path, Fault())
        if fault.redirect_loop:
            owner._log(path, range_header, 302)
            self.send_response(302)
            self.send_header("Location", path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in owner.redirects:
            owner._log(path, range_header, 302)
            self.send_response(302)
            self.send_header("Location", owner.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = owner.files.get(path)
        if data is None:
            owner._log(path, range_header, 404)
            self.send_error(404, "not found")
            return
        start = 0
        match = re.match(r"bytes=(\d+)-$", range_header or "")
        if match and fault.ranges:
            start = int(match.group(1))
            if start >= len(data):
                owner._log(path, range_header, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        else:
            status = 200
        owner._log(path, range_header, status)
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.flush()
        if fault.delay:
            time.sleep(fault.delay)
        if fault.gate is not None:
            fault.gate.wait(timeout=60)
        limit = len(body)
        with owner.lock:
            if fault.drop_after is not None and fault.times > 0:
                fault.times -= 1
                limit = min(limit, fault.drop_after)
        try:
            for offset in range(0, limit, 1 << 16):
                self.wfile.write(body[offset:min(offset + (1 << 16), limit)])
                self.wfile.flush()
                if fault.throttle:
                    time.sleep(fault.throttle)
        except (BrokenPipeError, ConnectionResetError):
            return
        if limit < len(body):  # hang up mid-file
            self.close_connection = True
            self.connection.shutdown(2)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "TestServer"


class TestServer:
    """Threaded HTTP server on 127.0.0.1 (random free port); use as a context manager."""

    __test__ = False  # not a pytest test class

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, Fault] = {}
        self.log: list[tuple[str, str | None, int]] = []
        self.redirects: dict[str, str] = {}
        self.proxied_hosts: list[str] = []
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _log(self, path: str, range_header: str | None, status: int) -> None:
        with self.lock:
            self.log.append((path, range_header, status))

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def requests_for(self, path: str) -> list[tuple[str, str | None, int]]:
        with self.lock:
            return [entry for entry in self.log if entry[0] == path]

    def __enter__(self) -> "TestServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
