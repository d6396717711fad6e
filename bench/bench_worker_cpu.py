"""The orchestration's own CPU per line, the engine excluded: a batch runs through the real store,
file store, validation, shards, worker and finalize in one process, against an engine that answers
every request at once with a canned chat completion (no HTTP). What it measures is what overnight
adds on top of a bare client; the bare client's own cost is bench_orchestration's raw arms.

    ./dev bench bench_worker_cpu [--lines 50000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from harness import git_state, machine, save, spread, write_chat_batch
from overnight.constants import TERMINAL_STATES
from overnight.engines.port import EngineRequest, EngineResponse
from overnight.engines.router import Route, Router
from overnight.runtime import freeze_startup_objects, run_on_fastest_loop
from overnight.settings import Settings
from overnight.wiring import build_api, build_core, build_worker

_ANSWER = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32},
})


class InstantEngine:
    """Answers at once, as the upstream engine would return a parsed 200 (body + raw bytes)."""

    name = "instant"
    max_in_flight = 64
    owned_by = "bench"
    shard_lines = 1000
    sends_raw_body = True  # as the upstream engine: the worker need not parse bodies for it

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def served_models(self) -> list[str]:
        return []

    async def execute(self, request: EngineRequest) -> EngineResponse:
        await asyncio.sleep(0)  # one trip through the event loop, as a real response takes
        return EngineResponse(200, orjson.loads(_ANSWER), None, raw=_ANSWER)


async def one_batch(settings: Settings, data: bytes, lines: int, batches: int = 1) -> dict[str, float]:
    """`batches` batches of the file at once (each `lines` lines); CPU per line over all of them."""
    core = build_core(settings)
    router = Router([Route("*", InstantEngine())])
    worker = build_worker(core, router)
    services = build_api(core, router, None, on_change=worker.wake)
    freeze_startup_objects()  # as a worker process does once it is built
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        file_id = services.files.new_upload_id()
        with core.files.writer(services.files.storage_key(file_id)) as out:
            out.write(data)
        services.files.register_upload("bench", file_id, "in.jsonl", "batch", len(data), data, None)
        created = [services.batches.create("bench", file_id, "/v1/chat/completions", "24h") for _ in range(batches)]
        for batch in created:
            while (record := services.batches.get(None, batch.id)).status not in TERMINAL_STATES:
                await asyncio.sleep(0.1)  # seldom: the polls are not what this measures
            assert record.status == "completed" and record.request_completed == lines, record
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        lines *= batches
    finally:
        stop.set()
        await task
        core.close()
    return {"cpu_us_per_line": cpu / lines * 1e6, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=1, help="batches of --lines lines each, created at once")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one more round")
    args = parser.parse_args()
    state = git_state()
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="overnight-worker-cpu-") as tmp:
        data = write_chat_batch(Path(tmp) / "in.jsonl", args.lines).read_bytes()
        for round_ in range(args.rounds + 1):  # the first is the warm-up
            settings = Settings(data_dir=Path(tmp) / f"data-{round_}")
            result = run_on_fastest_loop(one_batch(settings, data, args.lines, args.batches))
            if round_:
                runs.append(result)
            print(f"round {round_}{' (warm-up)' if not round_ else ''}: {result['cpu_us_per_line']:.1f} us of CPU "
                  f"per line, {result['wall_s']:.2f} s", flush=True)
        if args.profile:
            settings = Settings(data_dir=Path(tmp) / "data-profile")
            profiler = cProfile.Profile()
            profiler.enable()
            run_on_fastest_loop(one_batch(settings, data, args.lines, args.batches))
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    result: dict[str, Any] = {
        "git": state, "args": vars(args), "loop": "uvloop (run_on_fastest_loop), as a worker process runs",
        "cpu_us_per_line": spread([r["cpu_us_per_line"] for r in runs], 1),
        "wall_s": spread([r["wall_s"] for r in runs], 2),
        "runs": runs,
    }
    print(f"orchestration CPU per line, engine excluded: {result['cpu_us_per_line']}")
    print(f"wrote {save('worker_cpu' if args.batches == 1 else 'worker_cpu_many', result)}")


if __name__ == "__main__":
    print(f"machine: {machine()}")
    main()
