"""Online requests beside a running batch on the embedded chat engine: does a batch slow down an
interactive user, and does the interactive traffic cost the batch much?

Per round, interleaved (this shared machine's speed drifts by 10-20% over minutes):
  idle    streamed chat requests one after another on the idle engine: time to first token (TTFT);
  solo    a batch alone: its generated tokens per second (created -> completed);
  loaded  the same batch again, with a streamed online request every `--gap` seconds while it runs:
          the online TTFTs and the batch's tokens per second.
Reports medians of the rounds' values with min-max spreads, and the two ratios the issue sets as
goals: loaded TTFT p50 / idle TTFT p50 <= 1.5, loaded batch tokens/s / solo >= 0.7.
Writes bench/results/online.json.
Usage: ./dev bench bench_online [--quick] [--rounds 5] [--lines 128] [--new 64] [--gap 1.0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai

from harness import free_port, git_state, median, process, save, spread

KEY = "sk-bench-online"
TOPICS = ["a dragon", "the sea", "a robot", "a city at night", "an old library", "a mountain village",
          "a lost key", "a space station", "a bakery", "a desert storm", "a clockmaker", "a river"]
QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello politely."]


def batch_lines(n: int, new: int) -> bytes:
    lines = []
    for i in range(n):
        body = {"model": "gpt-4o-mini", "max_tokens": new, "temperature": 0,
                "messages": [{"role": "user", "content": f"Write a story about {TOPICS[i % len(TOPICS)]} ({i})."}]}
        lines.append({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def ttft(client: openai.OpenAI, i: int, new: int) -> float:
    """Seconds from sending a streamed chat request to its first content token."""
    started = time.perf_counter()
    first = None
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        max_tokens=new, temperature=0, stream=True)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the online request produced no token")
    return first


def run_batch(client: openai.OpenAI, data: bytes) -> tuple[float, Any]:
    """(generated tokens per second from create to completed, the finished batch)."""
    file_id = client.files.create(file=("bench.jsonl", data), purpose="batch").id
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    took = time.perf_counter() - started
    if batch.status != "completed" or batch.usage is None:
        raise RuntimeError(f"the batch ended {batch.status}")
    return batch.usage.output_tokens / took, batch


def loaded_round(client: openai.OpenAI, data: bytes, online_new: int, gap: float) -> tuple[float, list[float]]:
    """The batch with online requests alongside: (its tokens/s, the online TTFTs)."""
    done = threading.Event()
    samples: list[float] = []
    result: dict[str, Any] = {}

    def batch() -> None:
        try:
            result["tps"] = run_batch(client, data)[0]
        finally:
            done.set()

    runner = threading.Thread(target=batch)
    runner.start()
    time.sleep(min(gap, 0.5))  # the batch is validated and fills the engine
    i = 0
    while True:  # at least one sample, however short the batch
        samples.append(ttft(client, i, online_new))
        i += 1
        if done.wait(gap):
            break
    runner.join()
    return float(result["tps"]), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke check, no meaningful numbers)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lines", type=int, default=128, help="batch lines")
    parser.add_argument("--new", type=int, default=64, help="max_tokens of a batch line")
    parser.add_argument("--online-new", type=int, default=16, help="max_tokens of an online request")
    parser.add_argument("--idle-requests", type=int, default=8, help="online requests per round on the idle engine")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between online requests under load")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `overnight serve` flag (repeatable)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.lines, args.new, args.online_new, args.idle_requests, args.gap = 1, 16, 8, 4, 2, 0.3
    state = git_state()
    workdir = Path(tempfile.mkdtemp(prefix="bench-online-"))
    port = free_port()
    server = [sys.executable, "-m", "overnight", "serve", "--port", str(port), "--data-dir", str(workdir / "data"),
              "--api-key", KEY, *args.serve_arg]
    rounds: list[dict[str, Any]] = []
    with process(server, f"http://127.0.0.1:{port}/health", workdir / "server.log"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)
        data = batch_lines(args.lines, args.new)
        ttft(client, 0, args.online_new)  # warm-up: the first request pays for lazy set-up
        for r in range(args.rounds):
            idle = [ttft(client, i, args.online_new) for i in range(args.idle_requests)]
            # Alternate which batch run goes first, so drift does not favour one. Solo is the batch
            # with nobody online.
            if r % 2 == 0:
                solo_tps = run_batch(client, data)[0]
                loaded_tps, loaded = loaded_round(client, data, args.online_new, args.gap)
            else:
                loaded_tps, loaded = loaded_round(client, data, args.online_new, args.gap)
                solo_tps = run_batch(client, data)[0]
            row = {"idle_ttft_p50": median(idle), "loaded_ttft_p50": median(loaded), "online_requests": len(loaded),
                   "solo_tokens_per_s": solo_tps, "loaded_tokens_per_s": loaded_tps}
            row["ttft_ratio"] = row["loaded_ttft_p50"] / row["idle_ttft_p50"]
            row["throughput_ratio"] = loaded_tps / solo_tps
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in row.items()), flush=True)
    summary = {key: spread([row[key] for row in rounds]) for key in
               ("idle_ttft_p50", "loaded_ttft_p50", "ttft_ratio", "solo_tokens_per_s", "loaded_tokens_per_s",
                "throughput_ratio")}
    goals = {"ttft_ratio_at_most_1_5": summary["ttft_ratio"]["median"] <= 1.5,
             "throughput_ratio_at_least_0_7": summary["throughput_ratio"]["median"] >= 0.7}
    config = {k: v for k, v in vars(args).items()}
    path = save("online", {"git": state, "config": config, "rounds": rounds, "summary": summary, "goals": goals})
    print(json.dumps({"summary": summary, "goals": goals}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
