"""Orchestration throughput: overnight end to end (upload, validate, run, finalize, download) vs
(a) the plain asyncio + official-SDK script users write instead, (b) a minimal raw aiohttp client
with keep-alive at the same concurrency on the same event loop as the server (uvloop): the ceiling
the issue names, and (c) the same minimal client on pyreqwest, the HTTP client overnight uses:
the ceiling of overnight's own client. All against the same fast upstream on 127.0.0.1,
interleaved in one run.

    ./dev bench bench_orchestration [--lines 50000] [--runs 3] [--sdk-lines 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
from pyreqwest.client import ClientBuilder

from harness import (
    chat_request_line,
    machine,
    median,
    overnight_process,
    save,
    upstream_process,
    write_chat_batch,
)
from overnight.runtime import exit_now

CONCURRENCY = 64


async def sdk_script(upstream_url: str, lines: int) -> float:
    """What a user writes without a batch server: AsyncOpenAI + a semaphore. Returns lines/s."""
    client = openai.AsyncOpenAI(base_url=upstream_url, api_key="unused", max_retries=2)
    gate = asyncio.Semaphore(CONCURRENCY)
    results: list[str] = []

    async def one(i: int) -> None:
        body = chat_request_line(i)["body"]
        async with gate:
            response = await client.chat.completions.create(**body)
        results.append(response.model_dump_json())

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(lines)))
    elapsed = time.perf_counter() - start
    await client.close()
    assert len(results) == lines
    return lines / elapsed


async def raw_client(upstream_url: str, lines: int) -> float:
    """The ceiling: pre-serialized bodies, one pooled aiohttp session, fixed sender tasks."""
    bodies = [orjson.dumps(chat_request_line(i)["body"]) for i in range(lines)]
    url = upstream_url + "/chat/completions"
    pending = iter(bodies)
    done = 0
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:

        async def sender() -> None:
            nonlocal done
            for body in pending:
                async with session.post(url, data=body) as resp:
                    orjson.loads(await resp.read())
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
    assert done == lines
    return lines / elapsed


async def raw_pyreqwest(upstream_url: str, lines: int) -> float:
    """The same minimal client on pyreqwest (what overnight's upstream engine is built on)."""
    bodies = [orjson.dumps(chat_request_line(i)["body"]) for i in range(lines)]
    url = upstream_url + "/chat/completions"
    pending = iter(bodies)
    done = 0
    builder = ClientBuilder().max_connections(CONCURRENCY).default_headers({"Content-Type": "application/json"})
    async with builder.build() as client:

        async def sender() -> None:
            nonlocal done
            for body in pending:
                response = await client.post(url).body_bytes(body).build().send()
                orjson.loads(bytes(await response.bytes()))
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
    assert done == lines
    return lines / elapsed


def run_on_fastest_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def overnight_run(base_url: str, input_path: Path, lines: int) -> dict[str, float]:
    """End to end through the official SDK, as a user would. Returns lines/s and phase times."""
    client = openai.OpenAI(base_url=base_url, api_key="sk-bench")
    start = time.perf_counter()
    with input_path.open("rb") as fh:
        file_id = client.files.create(file=fh, purpose="batch").id
    uploaded = time.perf_counter()
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    finished = time.perf_counter()
    assert batch.status == "completed" and batch.request_counts.completed == lines, batch
    received = 0
    with client.files.with_streaming_response.content(batch.output_file_id) as resp:
        for chunk in resp.iter_bytes():
            received += chunk.count(b"\n")
    end = time.perf_counter()
    assert received == lines
    client.close()
    return {"lines_per_s": lines / (end - start), "upload_s": uploaded - start, "run_s": finished - uploaded,
            "download_s": end - finished}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--sdk-lines", type=int, default=5_000, help="the SDK script is slow: fewer lines")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--overnight-arg", action="append", default=[], help="extra `overnight serve` flag")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="overnight-bench-") as tmp:
        workdir = Path(tmp)
        input_path = write_chat_batch(workdir / "input.jsonl", args.lines)
        with upstream_process(workdir) as upstream_url, \
                overnight_process(workdir, upstream_url, *args.overnight_arg) as (base_url, _proc):
            sdk = asyncio.run(sdk_script(upstream_url, args.sdk_lines))
            print(f"sdk script      {sdk:9,.0f} lines/s  ({args.sdk_lines:,} lines)")
            raw_rates: list[float] = []
            reqwest_rates: list[float] = []
            runs: list[dict[str, float]] = []
            for run in range(args.runs):
                # The ceilings run on the same event loop as the server (uvloop, via uvicorn[standard]).
                raw_rates.append(run_on_fastest_loop(raw_client(upstream_url, args.lines)))
                runs.append(overnight_run(base_url, input_path, args.lines))
                reqwest_rates.append(run_on_fastest_loop(raw_pyreqwest(upstream_url, args.lines)))
                print(f"run {run + 1}: raw aiohttp {raw_rates[-1]:7,.0f} | overnight "
                      f"{runs[-1]['lines_per_s']:7,.0f} (upload {runs[-1]['upload_s']:.2f}s, run "
                      f"{runs[-1]['run_s']:.2f}s, download {runs[-1]['download_s']:.2f}s) | raw pyreqwest "
                      f"{reqwest_rates[-1]:7,.0f} lines/s")
    raw = median(raw_rates)
    reqwest = median(reqwest_rates)
    ours = median([r["lines_per_s"] for r in runs])
    result: dict[str, Any] = {
        "lines": args.lines,
        "concurrency": CONCURRENCY,
        "sdk_script_lines_per_s": round(sdk),
        "raw_aiohttp_lines_per_s": round(raw),
        "raw_pyreqwest_lines_per_s": round(reqwest),
        "overnight_lines_per_s": round(ours),
        "overnight_vs_sdk": round(ours / sdk, 2),
        "overnight_vs_raw": round(ours / raw, 3),
        "overnight_vs_raw_pyreqwest": round(ours / reqwest, 3),
        "runs": runs,
        "raw_runs": raw_rates,
        "raw_pyreqwest_runs": reqwest_rates,
    }
    print()
    print(f"{'':34}{'lines/s':>10}")
    print(f"{'plain SDK script':34}{sdk:10,.0f}")
    print(f"{'raw aiohttp (the issue ceiling)':34}{raw:10,.0f}")
    print(f"{'raw pyreqwest (same client)':34}{reqwest:10,.0f}")
    print(f"{'overnight end to end':34}{ours:10,.0f}")
    print(f"overnight / SDK script = {ours / sdk:.1f}x   overnight / raw aiohttp = {ours / raw:.2f}   "
          f"overnight / raw pyreqwest = {ours / reqwest:.2f}")
    print(f"wrote {save('orchestration', result)}")


if __name__ == "__main__":
    main()
    exit_now(0)  # pyreqwest's runtime thread can abort interpreter finalization (see overnight.runtime)
