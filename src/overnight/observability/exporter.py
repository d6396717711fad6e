"""GET /metrics for a worker that runs on its own (`overnight worker --metrics-port`): a worker
on another machine has no API process to be scraped through, so it serves its own values (and the
store's queue gauges) on a small HTTP server in a thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from overnight.observability.metrics import render_metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsExporter:
    def __init__(self, host: str, port: int, metrics_dir: Path | None,
                 queued_lines: Callable[[], Mapping[str, int]],
                 open_batches: Callable[[], Mapping[str, int]]) -> None:
        def render() -> bytes:
            return render_metrics(metrics_dir, queued_lines, open_batches)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                body = render()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="overnight-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
