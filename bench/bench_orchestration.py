"""Orchestration throughput: overnight end to end (upload, validate, run, finalize, download) against
the bare clients a skeptic would write instead, all against the same fast upstream on 127.0.0.1:

- raw pyreqwest: pre-serialized bodies, one pooled client on overnight's own HTTP library, fixed
  sender tasks at the same concurrency: the ceiling of what overnight's client can do (the headline
  ratio is against this);
- raw aiohttp: the same minimal client on aiohttp;
- SDK script: what users write without a batch server, AsyncOpenAI and a semaphore (fewer lines:
  it is ~30x slower; same rounds);
- overnight at each size, and many small batches from several keys at once against one batch of the
  same total. Every overnight arm learns that its batches finished from the server's
  `batch.completed` webhooks, as OpenAI's webhooks tell a user, not by polling: the bench's client
  and the server share the 2 cores with the upstream, and polling often enough not to round a
  small batch up (every 5 ms) cost the SDK client 0.38 of a core at 1,000 lines (results at
  f60c4a8), besides the API's work answering it, slowing the batch it was waiting for.

Every arm runs the same number of rounds, interleaved (the order rotates each round), on the same
event loop policy (uvloop, as the server), after one untimed warm-up round of every arm. Each bare
client opens its pool's connections before its clock starts, as overnight's worker keeps its own
open between batches. Ratios are taken within a round (each arm's run divided by the other arm's
run of the same round, not adjacent in time: several arms run between) and reported as the median
and min-max over the rounds.

A size under `--repeat-lines` runs back to back that many lines' worth per arm and round (1,000
lines: 10 runs), so that a round measures more than the machine's jitter over ~0.1 s.

    ./dev bench bench_orchestration [--sizes 50000,1000] [--rounds 5] [--sdk-lines 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
from pyreqwest.client import ClientBuilder

from harness import (
    busiest_thread_cores,
    chat_request_line,
    cpu_snapshot,
    cpu_use,
    git_state,
    machine,
    overnight_process,
    own_ticks,
    save,
    spread,
    thread_ticks,
    tree_ticks,
    upstream_process,
    write_chat_batch,
)
from overnight.constants import TERMINAL_STATES
from overnight.runtime import exit_now, run_on_fastest_loop

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

    first = chat_request_line(0)["body"]
    await asyncio.gather(*(client.chat.completions.create(**first) for _ in range(CONCURRENCY)))  # the pool
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(lines)))
    elapsed = time.perf_counter() - start
    await client.close()
    assert len(results) == lines
    return lines / elapsed


async def raw_aiohttp(upstream_url: str, lines: int) -> float:
    """Pre-serialized bodies, one pooled aiohttp session, fixed sender tasks."""
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

        async def open_connection() -> None:
            async with session.post(url, data=bodies[0]) as resp:
                await resp.read()

        await asyncio.gather(*(open_connection() for _ in range(CONCURRENCY)))  # the pool, untimed
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

        async def open_connection() -> None:
            await (await client.post(url).body_bytes(bodies[0]).build().send()).bytes()

        await asyncio.gather(*(open_connection() for _ in range(CONCURRENCY)))  # the pool, untimed
        start = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
    assert done == lines
    return lines / elapsed


def poll_interval(lines: int) -> float:
    """How often a client without webhooks asks whether the batch is done: about 1% of the expected
    run time at ~10k lines/s, so small batches are not rounded up to the poll and large ones are not
    slowed by the polling itself (each retrieve costs the API ~1 ms of CPU)."""
    return min(0.05, max(0.005, lines / 1_000_000))


def repeats(lines: int, round_lines: int) -> int:
    """How many runs of `lines` make a round of about `round_lines` (at least one)."""
    return max(1, round_lines // lines)


def back_to_back(run: Callable[[], float], times: int) -> float:
    """Lines/s of `times` runs of the same size one after another: the harmonic mean of their rates
    (total lines over total time)."""
    return times / sum(1 / run() for _ in range(times))


def overnight_run(client: openai.OpenAI, input_path: Path, lines: int,
                  hooks: CompletionHooks | None) -> dict[str, float]:
    """End to end through the official SDK, as a user would: upload, create, wait for the
    `batch.completed` webhook (without `hooks`: poll), retrieve, download. Returns lines/s and
    phase times. `client` is made once by the caller, as a user's script makes it (making one
    costs ~25 ms of CPU, mostly httpx loading CA certificates: 0.3 of a 1,000-line batch's time)
    and as the bare clients' pools are opened before their clocks start."""
    start = time.perf_counter()
    with input_path.open("rb") as fh:
        file_id = client.files.create(file=fh, purpose="batch").id
    uploaded = time.perf_counter()
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    if hooks is not None:
        hooks.wait({batch.id})
        batch = client.batches.retrieve(batch.id)
    while batch.status not in TERMINAL_STATES:
        time.sleep(poll_interval(lines))
        batch = client.batches.retrieve(batch.id)
    finished = time.perf_counter()
    assert batch.status == "completed" and batch.request_counts.completed == lines, batch
    received = 0
    with client.files.with_streaming_response.content(batch.output_file_id) as resp:
        for chunk in resp.iter_bytes():
            received += chunk.count(b"\n")
    end = time.perf_counter()
    assert received == lines
    return {"lines_per_s": lines / (end - start), "upload_s": uploaded - start, "run_s": finished - uploaded,
            "download_s": end - finished}


class CompletionHooks:
    """Receives the server's `batch.completed` (and `batch.failed`) webhooks and notes when each
    arrived: how every overnight arm sees its batches finish, with no polling (watchers listing 100
    batches every 0.1 s cost the API a sizeable part of a core)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.changed = threading.Condition()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                event = orjson.loads(body)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                with hooks.changed:
                    hooks.arrived.setdefault(event["data"]["id"], time.perf_counter())
                    hooks.changed.notify_all()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def config(self, keys: list[str]) -> str:
        return "".join(f'[[webhooks]]\napi_key = "{key}"\nurl = "{self.url}"\nsecret = "whsec_{SECRET}"\n'
                       f'events = ["batch.completed", "batch.failed"]\n\n' for key in keys)

    def wait(self, batch_ids: set[str], timeout: float = 600) -> float:
        """When the last of `batch_ids` was reported completed."""
        with self.changed:
            assert self.changed.wait_for(lambda: batch_ids <= self.arrived.keys(), timeout), "webhooks missing"
            return max(self.arrived[b] for b in batch_ids)


SECRET = "c2VjcmV0LWZvci10aGUtYmVuY2htYXJrLW9ubHk="  # base64, as OpenAI's whsec_ secrets


def batches_at_once(base_url: str, path: Path, batches: int, lines_each: int, keys: list[str],
                    hooks: CompletionHooks) -> float:
    """`batches` batches of the file at `path`, from `keys` at once (one thread per key, each
    uploading a file per batch and creating it, as separate users would), then every output
    downloaded. Returns lines/s from the first upload to the last download: each batch's own
    upload, validation, run, finalize and download are timed, as in `overnight_run`."""
    clients = {k: openai.OpenAI(base_url=base_url, api_key=k) for k in keys}
    share = {k: [i for i in range(batches) if i % len(keys) == j] for j, k in enumerate(keys)}

    def submit(key: str) -> list[str]:
        created = []
        for _ in share[key]:
            with path.open("rb") as fh:
                file_id = clients[key].files.create(file=fh, purpose="batch").id
            created.append(clients[key].batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                       completion_window="24h").id)
        return created

    def download(key: str, batch_ids: list[str]) -> int:
        received = 0
        for batch_id in batch_ids:
            batch = clients[key].batches.retrieve(batch_id)
            assert batch.status == "completed" and batch.output_file_id, batch
            with clients[key].files.with_streaming_response.content(batch.output_file_id) as resp:
                received += sum(chunk.count(b"\n") for chunk in resp.iter_bytes())
        return received

    with ThreadPoolExecutor(len(keys)) as pool:
        start = time.perf_counter()
        created = dict(zip(keys, pool.map(submit, keys), strict=True))
        hooks.wait({b for ids in created.values() for b in ids})
        received = sum(pool.map(download, keys, [created[k] for k in keys]))
        end = time.perf_counter()
    assert received == batches * lines_each, received
    for client in clients.values():
        client.close()
    return batches * lines_each / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50000,1000", help="batch sizes (lines) to run every arm at")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sdk-lines", type=int, default=5_000, help="the SDK script is slow: at most this many lines")
    parser.add_argument("--repeat-lines", type=int, default=10_000,
                        help="a smaller size runs back to back until a round holds this many lines of it")
    parser.add_argument("--many", default="100x500", help="many batches: COUNTxLINES (0 to skip)")
    parser.add_argument("--keys", type=int, default=5, help="API keys the many batches come from")
    parser.add_argument("--overnight-arg", action="append", default=[], help="extra `overnight serve` flag")
    args = parser.parse_args()
    state = git_state()
    sizes = [int(x) for x in args.sizes.split(",")]
    many_count, many_lines = (int(x) for x in args.many.split("x")) if args.many != "0" else (0, 0)
    keys = [f"sk-bench-key{i}" for i in range(args.keys)]
    print(f"machine: {machine()}  commit {state['commit'][:10]}{' (dirty)' if state['dirty'] else ''}")
    samples: dict[str, list[float]] = {}
    cpu: dict[str, list[dict[str, dict[str, float]]]] = {}
    phases: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="overnight-bench-") as tmp:
        workdir = Path(tmp)
        inputs = {n: write_chat_batch(workdir / f"input-{n}.jsonl", n) for n in sizes}
        extra = [arg for k in keys for arg in ("--api-key", k)]
        hooks = CompletionHooks()
        (workdir / "hooks.toml").write_text(hooks.config(["sk-bench", *keys]))
        extra += ["--config", str(workdir / "hooks.toml")]
        with upstream_process(workdir) as (upstream_url, upstream), \
                overnight_process(workdir, upstream_url, *extra, *args.overnight_arg) as (base_url, server):
            client = openai.OpenAI(base_url=base_url, api_key="sk-bench")  # once, as a user's script
            arms: list[tuple[str, int, Callable[[], float]]] = []  # name, lines, run -> lines/s
            for n in sizes:
                size_arms: list[tuple[str, int, Callable[[], float]]] = [
                    (f"raw_pyreqwest@{n}", n, lambda n=n: run_on_fastest_loop(raw_pyreqwest(upstream_url, n))),
                    (f"raw_aiohttp@{n}", n, lambda n=n: run_on_fastest_loop(raw_aiohttp(upstream_url, n))),
                    (f"sdk_script@{n}", min(n, args.sdk_lines),  # the SDK script is slow: fewer lines
                     lambda n=n: run_on_fastest_loop(sdk_script(upstream_url, min(n, args.sdk_lines)))),
                ]

                def ours(n: int = n) -> float:
                    result = overnight_run(client, inputs[n], n, hooks)
                    phases.setdefault(f"overnight@{n}", []).append(result)
                    return result["lines_per_s"]

                size_arms.append((f"overnight@{n}", n, ours))
                # A 1,000-line run takes ~0.1 s: one such span per round measured this machine's
                # jitter (the raw client's rounds ranged 4,800-15,700 lines/s). Small sizes run
                # back to back until a round holds ~10,000 lines of each arm.
                times = repeats(n, args.repeat_lines)
                arms += [(name, lines * times, lambda run=run, times=times: back_to_back(run, times))
                         for name, lines, run in size_arms]
            if many_count:
                total = many_count * many_lines
                many_input = write_chat_batch(workdir / f"many-{many_lines}.jsonl", many_lines)
                one_input = write_chat_batch(workdir / f"one-{total}.jsonl", total)
                arms.append((f"one_batch_watched@{total}", total,
                             lambda: batches_at_once(base_url, one_input, 1, total, keys[:1], hooks)))
                arms.append((f"many_batches@{many_count}x{many_lines}", total,
                             lambda: batches_at_once(base_url, many_input, many_count, many_lines, keys, hooks)))
            print("warm-up: one untimed round of every arm")
            for _name, _lines, arm in arms:
                arm()
            phases.clear()
            # Where the CPU goes: this process (the bare clients, or the SDK calls and the webhook
            # receiver of overnight's arms), the fake upstream, overnight's server (API + workers).
            groups = {"client": lambda: own_ticks(os.getpid()), "upstream": lambda: tree_ticks(upstream.pid),
                      "overnight": lambda: tree_ticks(server.pid)}
            # And each group's busiest thread: whether one thread (an event loop, the upstream's one
            # thread) is saturated and so sets the pace, or the 2 cores are shared out between them.
            threads = {"client": lambda: thread_ticks(os.getpid(), descendants=False),  # not the servers
                       "upstream": lambda: thread_ticks(upstream.pid), "overnight": lambda: thread_ticks(server.pid)}
            for round_ in range(args.rounds):
                shift = round_ % len(arms)
                for name, lines, arm in arms[shift:] + arms[:shift]:
                    before, started = cpu_snapshot(groups), time.perf_counter()
                    threads_before = {group: read() for group, read in threads.items()}
                    samples.setdefault(name, []).append(arm())
                    wall = time.perf_counter() - started
                    used = cpu_use(before, cpu_snapshot(groups), wall)
                    busiest = {group: busiest_thread_cores(threads_before[group], read(), wall)
                               for group, read in threads.items()}
                    # (machine and other are no one process: their "busiest thread" is their cores)
                    cpu.setdefault(name, []).append({group: {"us_per_line": round(v["cpu_s"] / lines * 1e6, 1),
                                                             "cores": v["cores"],
                                                             "busiest_thread_cores": busiest.get(group, v["cores"])}
                                                     for group, v in used.items()})
                print(f"round {round_ + 1}: " + " | ".join(f"{name} {values[-1]:,.0f}" for name, values in samples.items()),
                      flush=True)
    def per_round(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(samples[a], samples[b], strict=True)]

    ratios: dict[str, list[float]] = {}
    for n in sizes:
        ratios[f"overnight_vs_raw_pyreqwest@{n}"] = per_round(f"overnight@{n}", f"raw_pyreqwest@{n}")
        ratios[f"overnight_vs_raw_aiohttp@{n}"] = per_round(f"overnight@{n}", f"raw_aiohttp@{n}")
        ratios[f"overnight_vs_sdk_script@{n}"] = per_round(f"overnight@{n}", f"sdk_script@{n}")
    if many_count:
        ratios["many_vs_one_batch"] = per_round(f"many_batches@{many_count}x{many_lines}",
                                                f"one_batch_watched@{many_count * many_lines}")
    result: dict[str, Any] = {
        "git": state,
        "args": vars(args),
        "concurrency": CONCURRENCY,
        "loop": "uvloop for every arm and the server",
        "arms_lines_per_s": {name: spread(values, 0) for name, values in samples.items()},
        "ratios": {name: spread(values) for name, values in ratios.items()},
        "samples": samples,
        "overnight_phases": phases,
        # per arm and group (client, upstream, overnight, machine = all CPUs, other = the rest):
        # CPU microseconds per line, cores busy and the cores of the group's busiest thread (for
        # machine and other: the cores again), median [min-max] over the rounds
        "cpu": {name: {group: {key: spread([r[group][key] for r in runs], 2)
                               for key in ("us_per_line", "cores", "busiest_thread_cores")}
                       for group in runs[0]} for name, runs in cpu.items()},
    }
    print()
    for name, values in samples.items():
        s = spread(values, 0)
        print(f"{name:34}{s['median']:10,.0f} lines/s  [{s['min']:,.0f}-{s['max']:,.0f}]")
    for name, values in ratios.items():
        s = spread(values)
        print(f"{name:34}{s['median']:10.3f}          [{s['min']:.3f}-{s['max']:.3f}]")
    print(f"wrote {save('orchestration', result)}")


if __name__ == "__main__":
    main()
    exit_now(0)  # pyreqwest's runtime thread can abort interpreter finalization (see overnight.runtime)
