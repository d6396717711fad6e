"""API latency while a batch runs, and fairness when many batches from many keys run at once.

1. While a 50,000-line batch runs: p50/p99 of GET /v1/batches/{id} and GET /v1/files.
2. 100 batches of 500 lines from 5 API keys at once: total throughput against one batch of the
   same 50,000 lines measured in the same run the same way, and the spread of per-key completion
   times.

    ./dev bench bench_api_latency [--lines 50000] [--batches 100] [--batch-lines 500] [--keys 5]
"""

from __future__ import annotations

import argparse
import http.client
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai

from harness import machine, overnight_process, save, upstream_process, write_chat_batch

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


def many_batches(base_url: str, workdir: Path, batches: int, batch_lines: int, keys: list[str]) -> dict[str, Any]:
    """`batches` batches of `batch_lines` lines, created round-robin across `keys` at once."""
    path = write_chat_batch(workdir / f"batch-{batch_lines}.jsonl", batch_lines)
    per_key: dict[str, list[str]] = {k: [] for k in keys}
    clients = {k: openai.OpenAI(base_url=base_url, api_key=k) for k in keys}
    file_ids = {k: clients[k].files.create(file=path.open("rb"), purpose="batch").id for k in keys}
    start = time.perf_counter()
    for i in range(batches):
        key = keys[i % len(keys)]
        batch = clients[key].batches.create(input_file_id=file_ids[key], endpoint="/v1/chat/completions",
                                            completion_window="24h")
        per_key[key].append(batch.id)
    finished: dict[str, float] = {}

    def watch(key: str) -> None:
        # One list call per key and poll (a page holds all of a key's batches), as a client
        # watching many batches would do; a retrieve per batch would load the server itself.
        pending = set(per_key[key])
        while pending:
            for batch in clients[key].batches.list(limit=100).data:
                if batch.status in TERMINAL:
                    pending.discard(batch.id)
            # Polling fast all along would mostly measure the watchers' own load on the server;
            # near the end it polls fast, so the finish time is not rounded up by half a second.
            time.sleep(0.5 if len(pending) > 2 else 0.05)
        finished[key] = time.perf_counter() - start

    threads = [threading.Thread(target=watch, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = max(finished.values())
    return {
        "batches": batches,
        "lines_per_batch": batch_lines,
        "keys": len(keys),
        "lines_per_s": round(batches * batch_lines / elapsed),
        "per_key_done_s": {k[-6:]: round(v, 2) for k, v in finished.items()},
        "spread_s": round(max(finished.values()) - min(finished.values()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-lines", type=int, default=500)
    parser.add_argument("--keys", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    keys = [f"sk-bench-key{i}" for i in range(args.keys)]
    with tempfile.TemporaryDirectory(prefix="overnight-lat-") as tmp:
        workdir = Path(tmp)
        input_path = write_chat_batch(workdir / "input.jsonl", args.lines)
        extra = [arg for k in keys for arg in ("--api-key", k)]
        with upstream_process(workdir) as upstream_url, \
                overnight_process(workdir, upstream_url, *extra) as (base_url, _proc):
            latency = latency_during_run(base_url, input_path, args.lines)
            print(f"during a {args.lines:,}-line batch ({latency['lines_per_s']:,} lines/s): "
                  f"GET /v1/batches/{{id}} p50 {latency['retrieve_p50_ms']} ms p99 {latency['retrieve_p99_ms']} ms; "
                  f"GET /v1/files p50 {latency['files_p50_ms']} ms p99 {latency['files_p99_ms']} ms")
            single = many_batches(base_url, workdir, 1, args.batches * args.batch_lines, keys[:1])
            fairness = many_batches(base_url, workdir, args.batches, args.batch_lines, keys)
            ratio = fairness["lines_per_s"] / single["lines_per_s"]
            print(f"one batch of {args.batches * args.batch_lines:,} lines: {single['lines_per_s']:,} lines/s")
            print(f"{args.batches} batches x {args.batch_lines} lines from {args.keys} keys: "
                  f"{fairness['lines_per_s']:,} lines/s = {ratio:.2f} of one batch; per-key "
                  f"completion {fairness['per_key_done_s']} (spread {fairness['spread_s']} s)")
    result = {"latency": latency, "single_batch": single, "many_batches": fairness, "ratio": round(ratio, 3)}
    print(f"wrote {save('api_latency', result)}")


if __name__ == "__main__":
    main()
