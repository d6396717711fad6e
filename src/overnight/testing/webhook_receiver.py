"""A webhook receiver for tests: records every POST it gets, one JSON line per request, to a file.

    python -m overnight.testing.webhook_receiver --port 9001 --record hits.jsonl [--fail-first 2]

Each line is `{"path", "headers" (lower-cased names), "body" (the raw text), "status"}` where
`status` is what it answered: 500 for the first `--fail-first` requests, 200 after. GET /health
answers 200 (so a test can wait for it to listen).
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Receiver(BaseHTTPRequestHandler):
    server: _RecordingServer

    def do_GET(self) -> None:
        self._answer(200 if self.path == "/health" else 404)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        status = self.server.next_status()
        record = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                  "body": body.decode("utf-8", "replace"), "status": status}
        self.server.record(json.dumps(record))
        self._answer(status)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet: the record file says enough
        pass


class _RecordingServer(ThreadingHTTPServer):
    def __init__(self, port: int, path: Path, fail_first: int) -> None:
        super().__init__(("127.0.0.1", port), _Receiver)
        self.path = path
        self.fail_left = fail_first
        self.lock = threading.Lock()

    def next_status(self) -> int:
        with self.lock:
            if self.fail_left > 0:
                self.fail_left -= 1
                return 500
            return 200

    def record(self, line: str) -> None:
        with self.lock, self.path.open("a") as fh:
            fh.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args()
    _RecordingServer(args.port, args.record, args.fail_first).serve_forever()


if __name__ == "__main__":
    main()
