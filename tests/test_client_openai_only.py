"""overnight.client needs nothing of overnight: it imports without the server's dependencies, and
the same library code gives the same results against a second server, configured differently and
reached through a gateway that passes only OpenAI's public Files and Batch API (its documented
routes, query parameters and object fields), as OpenAI itself would serve it."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import openai
import pytest

from conftest import API_KEY, Server, Upstream, raw_request
from overnight import client as batches

SERVER_MODULES = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "pyreqwest", "orjson", "aiohttp",
                  "psycopg", "boto3", "multipart", "python_multipart")

# OpenAI's public routes (reference/openai-batch-api.md sections 2 and 4), with the query parameters each takes.
PUBLIC_ROUTES: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("POST", r"/v1/files", frozenset()),
    ("GET", r"/v1/files", frozenset({"purpose", "limit", "order", "after"})),
    ("GET", r"/v1/files/[^/]+", frozenset()),
    ("GET", r"/v1/files/[^/]+/content", frozenset()),
    ("DELETE", r"/v1/files/[^/]+", frozenset()),
    ("POST", r"/v1/batches", frozenset()),
    ("GET", r"/v1/batches", frozenset({"after", "limit"})),
    ("GET", r"/v1/batches/[^/]+", frozenset()),
    ("POST", r"/v1/batches/[^/]+/cancel", frozenset()),
)
BATCH_FIELDS = frozenset({
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status", "output_file_id",
    "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
    "expired_at", "cancelling_at", "cancelled_at", "request_counts", "usage", "metadata"})
FILE_FIELDS = frozenset({"id", "object", "bytes", "created_at", "expires_at", "filename", "purpose", "status",
                         "status_details"})
LIST_FIELDS = frozenset({"object", "data", "first_id", "last_id", "has_more"})
PASSED_HEADERS = ("content-type", "x-request-id", "x-should-retry", "retry-after")


def _public(value: Any) -> Any:
    """An API object with only the fields OpenAI documents for it."""
    if not isinstance(value, dict):
        return value
    kind = value.get("object")
    if kind == "list":
        return {k: [_public(x) for x in v] if k == "data" else v for k, v in value.items() if k in LIST_FIELDS}
    fields = {"batch": BATCH_FIELDS, "file": FILE_FIELDS}.get(str(kind))
    return {k: v for k, v in value.items() if k in fields} if fields else value


class OpenAIOnlyGateway:
    """A reverse proxy to `target` that answers 404 to any route OpenAI does not document, 400 to
    undocumented query parameters, and drops undocumented fields from the objects it returns. It
    records the routes it served."""

    def __init__(self, target: Server) -> None:
        self.routes_seen: set[tuple[str, str]] = set()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                url = urlsplit(self.path)
                route = next((r for r in PUBLIC_ROUTES if r[0] == self.command and re.fullmatch(r[1], url.path)), None)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if route is None:
                    return self._answer(404, {"error": {"message": f"Invalid URL ({self.command} {url.path})",
                                                        "type": "invalid_request_error", "param": None, "code": None}})
                unknown = {k for k, _ in parse_qsl(url.query)} - route[2]
                if unknown:
                    return self._answer(400, {"error": {"message": f"Unknown parameter: {sorted(unknown)}",
                                                        "type": "invalid_request_error", "param": None, "code": None}})
                gateway.routes_seen.add((route[0], route[1]))
                conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                passed = {k: v for k, v in response.getheaders() if k.lower() in PASSED_HEADERS}
                if "json" in passed.get("content-type", passed.get("Content-Type", "")):
                    data = json.dumps(_public(json.loads(data))).encode()
                self._send(response.status, passed, data)

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                self._send(status, {"content-type": "application/json", "x-should-retry": "false"},
                           json.dumps(payload).encode())

            def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _forward

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def second_server(tmp_path: Path, upstream: Upstream) -> Iterator[Server]:
    """Another deployment: its own keys, only `gpt-4o-*` routed (no fallback), the worker in the API process."""
    srv = Server(tmp_path / "second", ["--upstream", f"gpt-4o-*={upstream.base_url}", "--no-embedded", "--no-fallback",
                                       "--api-key", "sk-second-deployment", "--workers", "0", "--shard-lines", "3"])
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def gateway(second_server: Server) -> Iterator[OpenAIOnlyGateway]:
    proxy = OpenAIOnlyGateway(second_server)
    yield proxy
    proxy.close()


def workflow(api: openai.OpenAI, workdir: Path) -> tuple[str, list[tuple[Any, ...]], str]:
    """Everything a user does with the library, written once: the test runs it on both servers."""
    records = [{"custom_id": f"r{i}", "question": f"q {i}", "fault": "400" if i in (2, 5) else "slow:1"}
               for i in range(8)]
    template = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "{question}"}], "x_fault": "{fault}"}
    workdir.mkdir()
    batches.write_batch_file(workdir / "batch.jsonl", records, template)
    submitted = batches.submit(api, workdir / "batch.jsonl", metadata={"run": "compat"})
    done = batches.wait(api, submitted.id, poll_seconds=0.2)
    assert submitted.id in [b.id for b in batches.list_batches(api, 100)]
    downloaded = batches.download(api, done, workdir / "out")
    assert downloaded.statuses == {"succeeded": 6, "failed": 2}
    rows = [(r.custom_id, r.status, r.input, r.answer, r.status_code, r.error_code)
            for r in batches.iter_results(api, done)]
    with pytest.raises(openai.ConflictError):
        batches.cancel(api, done.id)
    return batches.settle(api, done).summary(), rows, (workdir / "out" / "results.csv").read_text()


def test_the_same_library_code_runs_against_a_server_that_speaks_only_openais_api(
    server: Server, second_server: Server, gateway: OpenAIOnlyGateway, tmp_path: Path
) -> None:
    with pytest.raises(openai.AuthenticationError):  # a different deployment: the first one's key is refused
        openai.OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0).batches.list()
    here = workflow(server.client(), tmp_path / "overnight")
    there = workflow(openai.OpenAI(base_url=gateway.base_url, api_key="sk-second-deployment"), tmp_path / "openai-only")
    assert here[0] == there[0] == "completed: 6 of 8 succeeded, 2 failed (invalid_value: 2)"
    assert here[1] == there[1] and here[2] == there[2]
    assert [row[1] for row in there[1]] == ["succeeded"] * 2 + ["failed"] + ["succeeded"] * 2 + ["failed"] + ["succeeded"] * 2
    assert there[1][0][3] == "echo: q 0" and there[1][2][5] == "invalid_value"
    # Every call went through a documented route (an extension route would have failed the workflow).
    assert gateway.routes_seen >= {("POST", "/v1/files"), ("GET", "/v1/files/[^/]+/content"), ("POST", "/v1/batches"),
                                   ("GET", "/v1/batches"), ("GET", "/v1/batches/[^/]+"),
                                   ("POST", "/v1/batches/[^/]+/cancel")}
    # ...and the gateway does refuse what OpenAI does not document.
    assert raw_request("GET", f"{gateway.base_url}/batches?status=completed")[0] == 400
    assert raw_request("GET", f"{gateway.base_url}/models")[0] == 404


def test_the_client_imports_and_runs_without_the_server_dependencies(server: Server, tmp_path: Path) -> None:
    poison = f"import sys\nfor name in {SERVER_MODULES!r}:\n    sys.modules[name] = None  # import fails\n"
    library = poison + (
        "import overnight.client as c\n"
        "n = c.write_batch_file(sys.argv[1], ['a', 'b'], {'model': 'm', 'prompt': '{prompt}'})\n"
        "assert n == 2, n\n"
        "server_side = sorted(m for m in sys.modules if m.startswith('overnight.') and not m.startswith('overnight.client'))\n"
        "assert server_side == [], server_side\n"
        "for name in " + repr(SERVER_MODULES) + ":\n"
        "    assert sys.modules[name] is None, name\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", library, str(tmp_path / "b.jsonl")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-3000:]
    assert [json.loads(x)["body"]["prompt"] for x in (tmp_path / "b.jsonl").read_text().splitlines()] == ["a", "b"]

    # The CLI too: `python -m overnight batch ...` with the server's modules unimportable.
    command = poison + "import runpy\nsys.argv = ['overnight', *sys.argv[1:]]\nrunpy.run_module('overnight', run_name='__main__')\n"
    base = ["--base-url", server.base_url, "--api-key", API_KEY]
    submit = subprocess.run([sys.executable, "-c", command, "batch", *base, "submit", str(tmp_path / "b.jsonl"),
                             "--endpoint", "/v1/completions", "--wait", "--poll-seconds", "0.2"],
                            capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr[-3000:]
    assert "completed: 2 of 2 succeeded, 0 failed" in submit.stderr
    listed = subprocess.run([sys.executable, "-c", command, "batch", "ls", *base], capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and submit.stdout.strip() in listed.stdout, listed.stderr[-3000:]
