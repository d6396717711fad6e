"""API latency while a batch runs: p50/p99 of GET /v1/batches/{id} and GET /v1/files, polled
twice every 10 ms while a 50,000-line batch runs. (Many batches at once: bench_orchestration.)

    ./dev bench bench_api_latency [--lines 50000]
"""

from __future__ import annotations

import argparse
import http.client
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from harness import git_state, machine, overnight_process, save, upstream_process, write_chat_batch

TERMINAL = ("completed", "failed", "cancelled", "expired")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_during_run(base_url: str, input_path: Path, lines: int) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base_url, api_key="sk-bench")
    with input_path.open("rb") as fh:
        file_id = client.files.create(file=fh, purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    host, port = base_url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port))
    headers = {"Authorization": "Bearer sk-bench"}
    samples: dict[str, list[float]] = {"retrieve": [], "files": []}
    start = time.perf_counter()
    status = "validating"
    while status not in TERMINAL:
        for name, path in (("retrieve", f"/v1/batches/{batch.id}"), ("files", "/v1/files?limit=20")):
            t0 = time.perf_counter()
            conn.request("GET", path, headers=headers)
            body = conn.getresponse().read()
            samples[name].append((time.perf_counter() - t0) * 1000)
            if name == "retrieve":
                status = openai.types.Batch.model_validate_json(body).status
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    return {
        "lines": lines,
        "lines_per_s": round(lines / elapsed),
        **{f"{name}_p50_ms": round(percentile(v, 0.5), 2) for name, v in samples.items()},
        **{f"{name}_p99_ms": round(percentile(v, 0.99), 2) for name, v in samples.items()},
        "samples": sum(len(v) for v in samples.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    args = parser.parse_args()
    state = git_state()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="overnight-lat-") as tmp:
        workdir = Path(tmp)
        input_path = write_chat_batch(workdir / "input.jsonl", args.lines)
        with upstream_process(workdir) as (upstream_url, _upstream), \
                overnight_process(workdir, upstream_url) as (base_url, _proc):
            latency = latency_during_run(base_url, input_path, args.lines)
            print(f"during a {args.lines:,}-line batch ({latency['lines_per_s']:,} lines/s): "
                  f"GET /v1/batches/{{id}} p50 {latency['retrieve_p50_ms']} ms p99 {latency['retrieve_p99_ms']} ms; "
                  f"GET /v1/files p50 {latency['files_p50_ms']} ms p99 {latency['files_p99_ms']} ms")
    print(f"wrote {save('api_latency', {'git': state, 'args': vars(args), 'latency': latency})}")


if __name__ == "__main__":
    main()
