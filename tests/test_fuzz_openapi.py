"""schemathesis over the server's own OpenAPI document: generated requests (valid and not), and
state machines that follow links between operations. No response may be a 5xx, and responses must
conform to the documented statuses, content types, headers and schemas."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import API_KEY, Server

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def test_schemathesis_finds_no_server_error(server: Server, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", f"{server.base_url[:-3]}/openapi.json",
            "-H", f"Authorization: Bearer {API_KEY}", "--checks", CHECKS, "--max-examples", "25",
            "--seed", "7", "--no-color",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated is not None, output[-2000:]
    assert int(generated.group(1)) >= 300 and generated.group(1) == generated.group(2)
