"""Renders the README's benchmark numbers from bench/results/*.json, so that no number in the README
is one no script produced. Each rendered block sits between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->` markers; the text around it carries no measured numbers.

    python bench/report.py            # rewrite the blocks in README.md
    python bench/report.py --check    # exit 1 if README.md and the results disagree (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
_BLOCK = re.compile(r"(<!-- bench:(?P<name>[a-z_]+) -->)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.DOTALL)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    return data


def measured_at(name: str, data: dict[str, Any]) -> str:
    """Which code a results file measured: the commit it recorded, else the commit that last wrote
    the file (older results files did not record one)."""
    git = data.get("git")
    simd = data.get("machine", {}).get("simd")
    # the kernels llama.cpp picks, and so the speeds, differ with AVX-512 (files before did not say)
    where = "" if simd is None else (" on an AVX-512 CPU" if "avx512f" in simd else " on an AVX2 CPU")
    if isinstance(git, dict) and git.get("commit"):
        return f"commit {git['commit'][:7]}" + (" with uncommitted changes" if git.get("dirty") else "") + where
    out = subprocess.run(["git", "log", "-1", "--format=%h", "--", f"bench/results/{name}.json"], cwd=ROOT,
                         capture_output=True, text=True, check=False).stdout.strip()
    return f"written at commit {out} (the file records no commit)" if out else "commit not recorded"


def n(value: float, digits: int = 0) -> str:
    """A number with thousands separators; negative `digits` rounds to tens, hundreds, ..."""
    if digits < 0:
        return f"{round(value, digits):,.0f}"
    return f"{value:,.{digits}f}"


def med(s: dict[str, float], digits: int = 0) -> str:
    """A spread as `median [min-max]`."""
    return f"{n(s['median'], digits)} [{n(s['min'], digits)}-{n(s['max'], digits)}]"


def times(s: dict[str, float], digits: int = 1) -> str:
    """A spread of factors as `28.2x [26.0-30.1]`."""
    return f"{n(s['median'], digits)}x [{n(s['min'], digits)}-{n(s['max'], digits)}]"


# -- blocks ------------------------------------------------------------------------------------


def orchestration_headline() -> str:
    d = load("orchestration")
    big = max(int(k.split("@")[1]) for k in d["arms_lines_per_s"] if k.startswith("overnight@"))
    r = d["ratios"]
    sdk = min(big, d["args"]["sdk_lines"])
    return (f"{med(r[f'overnight_vs_raw_pyreqwest@{big}'], 2)} of a bare client on the same HTTP library and "
            f"{med(r[f'overnight_vs_raw_aiohttp@{big}'], 2)} of one on aiohttp at {n(big)} lines, "
            f"{times(r[f'overnight_vs_sdk_script@{big}'])} a plain asyncio script with the SDK "
            f"(at {n(sdk)} lines)")


def orchestration() -> str:
    d = load("orchestration")
    arms, ratios, args = d["arms_lines_per_s"], d["ratios"], d["args"]
    sizes = sorted((int(k.split("@")[1]) for k in arms if k.startswith("overnight@")), reverse=True)
    lines = [
        f"{args['rounds']} interleaved rounds of every arm after one untimed warm-up round, every bare client's "
        f"connections opened before its clock starts, uvloop for the server and every bare client (overnight's "
        f"arms are driven by the synchronous SDK), medians [min-max]; ratios are taken within each round; "
        f"{measured_at('orchestration', d)} "
        f"(`bench/results/orchestration.json`).",
        "",
        "| lines per batch | arm | lines/s | overnight's ratio to it |",
        "|---|---|---|---|",
    ]
    for size in sizes:
        sdk = min(size, args["sdk_lines"])
        lines += [
            f"| {n(size)} | **overnight**, durable, end to end | **{med(arms[f'overnight@{size}'])}** | |",
            f"| | raw pyreqwest (overnight's HTTP library), concurrency {d['concurrency']} | "
            f"{med(arms[f'raw_pyreqwest@{size}'])} | **{med(ratios[f'overnight_vs_raw_pyreqwest@{size}'], 2)}** |",
            f"| | raw aiohttp, concurrency {d['concurrency']} | {med(arms[f'raw_aiohttp@{size}'])} | "
            f"{med(ratios[f'overnight_vs_raw_aiohttp@{size}'], 2)} |",
            f"| | asyncio + official SDK, semaphore {d['concurrency']} ({n(sdk)} lines) | "
            f"{med(arms[f'sdk_script@{size}'])} | {times(ratios[f'overnight_vs_sdk_script@{size}'])} |",
        ]
    many = [k for k in arms if k.startswith("many_batches@")]
    if many:
        count, each = many[0].split("@")[1].split("x")
        one = next(k for k in arms if k.startswith("one_batch_watched@"))
        lines += [
            "",
            f"**Many batches**: {count} batches of {each} lines from {args['keys']} API keys at once (a thread per "
            f"key uploads a file for each of its batches and creates it; then every output is downloaded), timed "
            f"from the first upload to the last download, run at "
            f"{med(arms[many[0]])} lines/s, **{med(ratios['many_vs_one_batch'], 2)}** of one "
            f"{n(int(one.split('@')[1]))}-line batch run the same way ({med(arms[one])} lines/s).",
        ]
    phases = d.get("overnight_phases", {}).get(f"overnight@{sizes[0]}", [])
    if phases:
        def phase(key: str) -> str:
            return n(phase_median(phases, key), 2)

        lines += ["", f"Where a {n(sizes[0])}-line batch's time goes (medians): upload, validated as it arrives, "
                      f"{phase('upload_s')} s, run + finalize {phase('run_s')} s, download {phase('download_s')} s."]
    if "cpu" in d:
        lines += ["", orchestration_cpu(d["cpu"], sizes[0]), "", orchestration_wall(d, sizes[0])]
    if len(sizes) > 1 and d.get("overnight_phases", {}).get(f"overnight@{sizes[-1]}"):
        lines += ["", orchestration_small_wall(d, sizes[-1])]
    return "\n".join(lines)


def orchestration_cpu(cpu: dict[str, Any], size: int) -> str:
    """Where the CPU goes per line at the largest size: the 2-core machine is the ceiling."""
    def us(arm: str, group: str) -> str:
        return med(cpu[f"{arm}@{size}"][group]["us_per_line"], 1)

    def busy(arm: str) -> str:
        return med(cpu[f"{arm}@{size}"]["machine"]["cores"], 2)

    def thread(arm: str, group: str) -> str:
        return med(cpu[f"{arm}@{size}"][group]["busiest_thread_cores"], 2)

    return (f"CPU per line at {n(size)} lines (microseconds, medians [min-max]): the bare pyreqwest client "
            f"{us('raw_pyreqwest', 'client')} + the fake upstream {us('raw_pyreqwest', 'upstream')} "
            f"({busy('raw_pyreqwest')} of the machine's cores busy); overnight's server (API + worker) "
            f"{us('overnight', 'overnight')} + the SDK client {us('overnight', 'client')} + the fake upstream "
            f"{us('overnight', 'upstream')} ({busy('overnight')} cores busy). The busiest single thread, in "
            f"cores (1.00 is saturated): with the bare client, the upstream's {thread('raw_pyreqwest', 'upstream')} "
            f"and the client's {thread('raw_pyreqwest', 'client')}; with overnight, the upstream's "
            f"{thread('overnight', 'upstream')} and overnight's {thread('overnight', 'overnight')}.")


def orchestration_wall(d: dict[str, Any], size: int, goal: float = 0.90) -> str:
    """What overnight may spend per line to reach `goal` of the bare pyreqwest client on this machine:
    at goal x its lines/s, the upstream and the SDK client still take their CPU per line, and the
    machine is at best as busy as the bare client's arm kept it."""
    cpu = d["cpu"]

    def per_line(arm: str, group: str) -> float:
        return float(cpu[f"{arm}@{size}"][group]["us_per_line"]["median"])

    rate = float(d["arms_lines_per_s"][f"raw_pyreqwest@{size}"]["median"])
    busy = float(cpu[f"raw_pyreqwest@{size}"]["machine"]["cores"]["median"])
    others = per_line("overnight", "upstream") + per_line("overnight", "client")
    budget = busy / (goal * rate) * 1e6 - others
    full = d["machine"]["cpus"] / (goal * rate) * 1e6 - others
    return (f"From the medians above: at {goal:.2f} of the bare client's {n(rate)} lines/s, with the upstream and the SDK client taking "
            f"{n(others, 1)} us per line and the machine as busy as the bare client's arm kept it ({n(busy, 2)} "
            f"cores), overnight could spend **{n(budget, 1)} us per line** ({n(full, 1)} with every core busy all "
            f"the time), against the bare client's {n(per_line('raw_pyreqwest', 'client'), 1)} for its HTTP work "
            f"alone and overnight's {n(per_line('overnight', 'overnight'), 1)} today.")


def phase_median(phases: list[dict[str, float]], key: str) -> float:
    """The median of one phase's seconds over overnight's runs (the upper one of an even count)."""
    return sorted(p[key] for p in phases)[len(phases) // 2]


def orchestration_small_wall(d: dict[str, Any], size: int, goal: float = 0.80) -> str:
    """What a small batch may take end to end to reach `goal` of the bare pyreqwest client, against
    the time the bare client itself takes to send its lines (no client on the same HTTP library and
    upstream sends them faster) and the calls that only a batch API makes (the upload, the create,
    the retrieve after the webhook, the download)."""
    rate = float(d["arms_lines_per_s"][f"raw_pyreqwest@{size}"]["median"])
    phases = d["overnight_phases"][f"overnight@{size}"]

    def ms(key: str) -> float:
        return phase_median(phases, key) * 1000

    allowed, sending = size / (goal * rate) * 1000, size / rate * 1000
    return (f"And a {n(size)}-line batch: at {goal:.2f} of the bare client's {n(rate)} lines/s it may take "
            f"**{n(allowed, 1)} ms** from upload to download, of which the bare client's own sending of its lines "
            f"takes {n(sending, 1)} (nothing on the same HTTP library sends them faster), leaving "
            f"**{n(allowed - sending, 1)} ms** for everything only a batch API does; overnight's upload alone "
            f"takes {n(ms('upload_s'), 1)} ms (medians of {len(phases)} runs), its run and finalize "
            f"{n(ms('run_s'), 1)} (the sending, the create and the retrieve included) and its download "
            f"{n(ms('download_s'), 1)}.")


def api_latency() -> str:
    d = load("api_latency")
    lat = d["latency"]
    return (f"while a {n(lat['lines'])}-line batch runs at {n(lat['lines_per_s'])} lines/s with the client polling "
            f"twice every 10 ms, `GET /v1/batches/{{id}}` answers in p50 {lat['retrieve_p50_ms']} ms / p99 "
            f"{lat['retrieve_p99_ms']} ms and `GET /v1/files` in p50 {lat['files_p50_ms']} ms / p99 "
            f"{lat['files_p99_ms']} ms ({measured_at('api_latency', d)}).")


def memory() -> str:
    d = load("memory")
    rows = ["| input | lines | peak growth over idle |", "|---|---|---|"]
    for r in d["rows"]:
        rows.append(f"| {n(r['input_bytes'] / 2**20)} MiB | {n(r['lines'])} | {n(r['growth_mb'])} MB (idle "
                    f"{n(r['idle_rss_mb'])} MB, peak {n(r['peak_rss_mb'])} MB) |")
    return "\n".join(rows) + f"\n\n({measured_at('memory', d)}.)"


def worker_cpu() -> str:
    one, many = load("worker_cpu"), load("worker_cpu_many")
    return (f"{med(one['cpu_us_per_line'], 1)} us of CPU per line for one {n(one['args']['lines'])}-line batch "
            f"({one['args']['rounds']} rounds; {measured_at('worker_cpu', one)}), "
            f"{med(many['cpu_us_per_line'], 1)} us per line for {many['args']['batches']} batches of "
            f"{n(many['args']['lines'])} lines at once ({many['args']['rounds']} rounds; "
            f"{measured_at('worker_cpu_many', many)})")


def tiers() -> str:
    d = load("tiers")
    s = d["summary"]
    labels = {"one-box": "one box (SQLite, 1 worker)", "pg-1w": "PostgreSQL + SeaweedFS, 1 worker",
              "pg-2w": "PostgreSQL + SeaweedFS, 2 workers", "pg-4w": "PostgreSQL + SeaweedFS, 4 workers"}
    rows = [f"{d['arguments']['rounds']} interleaved rounds of {n(d['arguments']['lines'])} lines, medians [min-max]; "
            f"{measured_at('tiers', d)} (`bench/results/tiers.json`).", "",
            f"Both tiers durable: SQLite `synchronous=FULL` with fsynced files; {d['settings']['postgres']}.", "",
            "| | lines/s | vs one box (per round) | CPU-s per 10k lines: overnight + its stores "
            "(+ the fake upstream and the bench's client) |", "|---|---|---|---|"]
    for arm in d["arms"]:
        vs = s[arm].get("vs_one_box", {}).get("per_round")
        rows.append(f"| {labels.get(arm, arm)} | {med(s[arm]['lines_per_s'])} | {med(vs, 2) if vs else '1'} | "
                    f"{med(s[arm]['cpu_s_per_10k_lines']['server'], 2)} "
                    f"({med(s[arm]['cpu_s_per_10k_lines']['all_ours'], 2)}) |")
    return "\n".join(rows)


def claims() -> str:
    d = load("claims")
    e, probes = d["estimate"], d["summary"]
    by_pending = ", ".join(f"{n(probes[f'probe-{p}']['claim_ms_p50']['median'], 1)} ms at {n(int(p))}"
                           for p in str(d["arguments"]["probe_pending"]).split(","))
    return (f"about {n(e['postgres_cpu_ms_per_shard'], 1)} ms of PostgreSQL CPU per shard (claim and commit) and "
            f"{n(e['postgres_cpu_ms_per_heartbeat'], 1)} ms per worker heartbeat; at 1,000 lines per shard one 2-core "
            f"PostgreSQL could serve on the order of {n(e['capacity_lines_per_s'], -5)} lines/s before the queue is "
            f"its bottleneck. A claim's latency grows with the pending shards (p50 {by_pending}) "
            f"({measured_at('claims', d)}, `bench/results/claims.json`).")


def embedded() -> str:
    d = load("embedded")
    t, r, cfg = d["tok_s"], d["ratios"], d["llama_server_config"]
    same = d.get("llama_server_same_weights_config", cfg)
    server = (f"`llama-server` at its best configuration found by the sweep ({cfg['ftype']}, flash attention "
              f"{'on' if cfg['flash_attn'] else 'off'}, `-np {cfg['np']}`), fed by an asyncio SDK script at "
              f"concurrency {cfg['np']}")
    rows = [
        f"**Embedded engine** (`bench_embedded`): {d['lines']} distinct chat lines (system + user, `max_tokens` "
        f"{d['max_tokens']}, temperature 0), SmolLM2-135M-Instruct, {d['threads']} threads; "
        f"{d['args']['rounds']} interleaved rounds, medians [min-max]; {measured_at('embedded', d)} "
        "(`bench/results/embedded.json`, the sweep in `embedded_sweep.json`)."
        + (f" Both servers keep {d['settings']['ctx_per_slot']} KV cells per slot; {d['settings']['loop']}. The "
           "arms' rates divide different token counts (other weights answer at other lengths)."
           if "settings" in d else ""),
        "",
        "| what ran the lines | tokens/s | |",
        "|---|---|---|",
        f"| (a) {server} | {med(t['a'], 1)} | |",
        *([f"| (a') `llama-server` at its best on overnight's own weights ({same['ftype']}, flash attention "
           f"{'on' if same['flash_attn'] else 'off'}, `-np {same['np']}`) | {med(t['a_same'], 1)} | "
           f"(b) is {times(r['b_over_a_same_weights'], 2)} (a'), per round |"] if "a_same" in t else []),
        "| (b) **overnight**, the batch file end to end through `overnight serve`"
        + (f" (its default weights on this CPU: {d['overnight_weights']})" if "overnight_weights" in d else "")
        + f" | **{med(t['b'], 1)}** | "
        f"**{times(r['b_over_a'], 2)} (a)**, per round |",
        *([f"| (b'') the same with `--weights {cfg['ftype']}`, (a)'s weights (the table below says what they "
           f"cost in quality) | {med(t['b_a'], 1)} | {times(r['b_a_over_a'], 2)} (a), per round |"]
          if "b_a" in t else []),
        f"| (b') the same with `--deterministic` | {med(t['b_det'], 1)} | {med(r['b_det_over_b'], 2)} of (b) |",
        f"| (c) one line at a time through the same engine (what an online server does), "
        f"{d['args']['one_lines']} lines taken across the file | {med(t['c'], 1)} | "
        f"(b) is {times(r['b_over_c'])} |",
    ]
    levers = load("embedded_levers")
    rows += ["", f"What moved it (`--levers`: the engine alone, all {levers['lines']} lines at once, one run each; "
                 f"{measured_at('embedded_levers', levers)}):", ""]
    rows += [f"- {step}: {n(result['tok_s'], 1)} tokens/s" for step, result in levers["levers"].items()]
    quality = load("embedded_quality")
    formats = {name: q for name, q in quality.items() if isinstance(q, dict) and "identical_answers" in q}
    rows += ["", f"Weight formats against the packaged Q4_1 (`--quality`: {quality['lines']} prompts, greedy "
                 f"answers of {quality['max_tokens']} tokens one at a time; then each format scored on the prompts "
                 f"followed by Q4_1's answers, {n(quality['scored_tokens'])} tokens, as `llama-perplexity "
                 f"--kl-divergence` scores a quantization; {measured_at('embedded_quality', quality)}):", "",
             "| format | identical greedy answers | answer length agreeing | mean KL divergence from Q4_1 "
             "| same most likely token | perplexity |", "|---|---|---|---|---|---|",
             f"| Q4_1 (packaged) | | | | | {quality['Q4_1_perplexity']:.3f} |"]
    rows += [f"| {name} | {q['identical_answers']}/{quality['lines']} | {q['mean_agreeing_prefix']:.0%} | "
             f"{q['mean_kld']:.4f} (p99 {q['p99_kld']:.3f}) | {q['same_top_token']:.1%} | {q['perplexity']:.3f} |"
             for name, q in formats.items()]
    return "\n".join(rows)


def online() -> str:
    d = load("online")
    s, c = d["summary"], d["config"]
    return (f"with a {c['lines']}-line batch ({c['new']} tokens a line) running on the embedded engine and a "
            f"streamed chat request every {c['gap']} s, online time to first token p50 is "
            f"{med(s['loaded_ttft_p50'], 3)} s against {med(s['idle_ttft_p50'], 3)} s on the idle engine "
            f"(**{med(s['ttft_ratio'], 2)}x**, per round; goal 1.5x at most), and the batch keeps "
            f"**{med(s['throughput_ratio'], 2)}** of its solo tokens/s ({med(s['loaded_tokens_per_s'], 1)} against "
            f"{med(s['solo_tokens_per_s'], 1)}; goal 0.70 at least). {c['rounds']} interleaved rounds, medians "
            f"[min-max]; {measured_at('online', d)} (`bench/results/online.json`).")


BLOCKS: dict[str, Callable[[], str]] = {
    "orchestration_headline": orchestration_headline,
    "orchestration": orchestration,
    "api_latency": api_latency,
    "memory": memory,
    "worker_cpu": worker_cpu,
    "tiers": tiers,
    "claims": claims,
    "embedded": embedded,
    "online": online,
}


def render(text: str) -> str:
    def block(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"README.md has a block `{name}` that bench/report.py cannot render")
        body = BLOCKS[name]()
        inline = "\n" not in match.group("body")
        sep = "" if inline else "\n"
        return f"{match.group(1)}{sep}{body}{sep}{match.group(4)}"

    return _BLOCK.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if README.md is not what the results render")
    args = parser.parse_args()
    current = README.read_text()
    rendered = render(current)
    found = {m.group("name") for m in _BLOCK.finditer(current)}
    if args.check:
        missing = sorted(set(BLOCKS) - found)
        if missing:
            print(f"README.md lacks the blocks {missing}", file=sys.stderr)
            return 1
        if rendered != current:
            print("README.md's benchmark numbers differ from bench/results: run `python bench/report.py`",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(rendered)
    print(f"rendered {len(found)} blocks into README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
