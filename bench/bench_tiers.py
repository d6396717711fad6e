"""The two tiers end to end: the same chat file (upload, run, download, lines/s) against the fast
upstream on 127.0.0.1, on

  * one-box: `overnight serve` (SQLite + a data dir, its default one worker process);
  * pg-Nw:   `overnight serve --no-worker` (one API process) and N `overnight worker` processes on
             PostgreSQL + SeaweedFS (S3), for N = 1, 2, 4.

Interleaved: round r runs every arm once, in an order rotated by r. Every run starts its own
processes on a fresh data dir (one-box) or a fresh database and bucket prefix (pg-Nw; PostgreSQL
and SeaweedFS themselves are started once), waits until every worker is registered, waits the same
settling time, runs the same warm-up batch, then times the measured batch.

Where the time goes: the CPU seconds (utime + stime from /proc) of every process over the measured
batch: the API, each worker, PostgreSQL (its postmaster and every child, including children that
exited during the run), SeaweedFS, the upstream, this client, and what the rest of the machine used
(other users' load). Divided by the wall time: cores; a single Python process near 1.0 is saturated.

    ./dev bench bench_tiers [--lines 50000] [--rounds 3] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai

from bench_orchestration import overnight_run
from harness import (
    TICK,
    children,
    cpu_snapshot,
    cpu_use,
    free_port,
    git_state,
    machine,
    median,
    own_ticks,
    process,
    save,
    spread,
    tree_ticks,
    wait_ready,
    write_chat_batch,
)
from overnight.runtime import exit_now
from overnight.testing.postgres import PostgresServer
from overnight.testing.seaweedfs import SeaweedFS

KEY = "sk-bench"
SETTLE_SECONDS = 3.0  # > 2.5 heartbeats: a worker that joins others sends nothing before that
SATURATED = 0.85  # cores: a single-threaded Python process this busy is the bottleneck

# -- processes ------------------------------------------------------------------------------


def overnight_args(port: int, data: Path, upstream_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "overnight", "serve", "--port", str(port), "--data-dir", str(data),
            "--upstream", f"*={upstream_url}", "--api-key", KEY, "--no-embedded", *extra]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


DURABLE_POSTGRES = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


def wait_workers(pg: PostgresServer, database: str, count: int, timeout: float = 90.0) -> None:
    """Until `count` workers have registered in the database (each does once it can claim)."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(pg.conninfo(database), autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(b"SELECT count(*) FROM workers").fetchone()
            if row is not None and row[0] >= count:
                return
            time.sleep(0.1)
    raise RuntimeError(f"{count} workers did not register in {timeout}s")


class Stack:
    """What the pg arms share: PostgreSQL with a migrated template database, and SeaweedFS."""

    def __init__(self, pg: PostgresServer, s3: SeaweedFS, upstream_pid: int) -> None:
        self.pg, self.s3, self.upstream_pid = pg, s3, upstream_pid


@contextlib.contextmanager
def one_box(workdir: Path, upstream_url: str, tag: str) -> Iterator[tuple[str, dict[str, Callable[[], int]]]]:
    port = free_port()
    args = overnight_args(port, workdir / f"data-{tag}", upstream_url)
    with process(args, f"http://127.0.0.1:{port}/health", workdir / f"{tag}.log") as proc:
        workers = []
        for child in children(proc.pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmdline:
                workers.append(child)
        groups: dict[str, Callable[[], int]] = {
            # The API process, and its small helpers (the multiprocessing resource tracker).
            "api": lambda: own_ticks(proc.pid) + sum(tree_ticks(c) for c in children(proc.pid) if c not in workers),
        }
        for i, pid in enumerate(workers):
            groups[f"worker{i + 1}"] = lambda pid=pid: tree_ticks(pid)  # type: ignore[misc]
        yield f"http://127.0.0.1:{port}/v1", groups


@contextlib.contextmanager
def many_box(stack: Stack, workdir: Path, upstream_url: str, tag: str, count: int
             ) -> Iterator[tuple[str, dict[str, Callable[[], int]]]]:
    database = f"tiers_{tag.replace('-', '_')}"
    url = stack.pg.create_database(database, template="tmpl")
    storage = stack.s3.storage_url(f"{tag}-{uuid.uuid4().hex[:8]}")
    shared = ["--database-url", url, "--storage-url", storage]
    port = free_port()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        with process(overnight_args(port, workdir / f"data-{tag}", upstream_url, "--no-worker", *shared),
                     f"http://127.0.0.1:{port}/health", workdir / f"{tag}-api.log") as api:
            try:
                for i in range(count):
                    args = [sys.executable, "-m", "overnight", "worker", "--data-dir", str(workdir / f"data-{tag}-w{i}"),
                            "--upstream", f"*={upstream_url}", "--no-embedded", *shared]
                    log = (workdir / f"{tag}-worker{i + 1}.log").open("wb")
                    workers.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
                    log.close()
                wait_workers(stack.pg, database, count)
                groups: dict[str, Callable[[], int]] = {"api": lambda: tree_ticks(api.pid)}
                for i, worker in enumerate(workers):
                    groups[f"worker{i + 1}"] = lambda pid=worker.pid: tree_ticks(pid)  # type: ignore[misc]
                yield f"http://127.0.0.1:{port}/v1", groups
            finally:
                for worker in workers:
                    if worker.poll() is None:
                        worker.send_signal(signal.SIGTERM)
                for worker in workers:
                    stop(worker)
    finally:
        stack.pg.drop_database(database)


def run_arm(arm: str, tag: str, stack: Stack, workdir: Path, upstream_url: str, warm: Path, warm_lines: int,
            measured: Path, lines: int) -> dict[str, Any]:
    started = time.perf_counter()
    if arm == "one-box":
        env = one_box(workdir, upstream_url, tag)
    else:
        env = many_box(stack, workdir, upstream_url, tag, int(arm.removeprefix("pg-").removesuffix("w")))
    with env as (base_url, groups):
        ready = time.perf_counter() - started
        time.sleep(SETTLE_SECONDS)
        client = openai.OpenAI(base_url=base_url, api_key=KEY)
        overnight_run(client, warm, warm_lines, None)  # polls: every arm alike
        groups = {
            **groups,
            "postgres": lambda: tree_ticks(stack.pg.proc.pid),  # type: ignore[union-attr]
            "seaweedfs": lambda: tree_ticks(stack.s3.proc.pid),  # type: ignore[union-attr]
            "upstream": lambda: tree_ticks(stack.upstream_pid),
            "client": lambda: own_ticks(os.getpid()),
        }
        before = cpu_snapshot(groups)
        began = time.perf_counter()
        result = overnight_run(client, measured, lines, None)
        wall = time.perf_counter() - began
        client.close()
        after = cpu_snapshot(groups)
    return {**{k: round(v, 4) for k, v in result.items()}, "wall_s": round(wall, 4), "startup_s": round(ready, 2),
            "cpu": cpu_use(before, after, wall), "log_problems": log_problems(workdir, tag)}


def log_problems(workdir: Path, tag: str) -> dict[str, Any]:
    """Warnings, errors and tracebacks the run's processes logged (the logs go with the temp dir)."""
    found: list[str] = []
    for log in sorted(workdir.glob(f"{tag}*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(word in line for word in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback", "Error:")):
                found.append(f"{log.name}: {line[:400]}")
    return {"count": len(found), "first": found[:10]}


def summarize(arms: list[str], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    base = "one-box"
    summary: dict[str, Any] = {}
    for arm in arms:
        rates = [r["lines_per_s"] for r in runs[arm]]
        entry: dict[str, Any] = {"lines_per_s": spread(rates, 0)}
        for phase in ("upload_s", "run_s", "download_s"):
            entry[phase] = spread([r[phase] for r in runs[arm]])
        if arm != base and base in runs:
            per_round = [a["lines_per_s"] / b["lines_per_s"] for a, b in zip(runs[arm], runs[base], strict=True)]
            entry["vs_one_box"] = {"per_round": spread(per_round), "of_medians": round(
                median(rates) / median([r["lines_per_s"] for r in runs[base]]), 3)}
        names = runs[arm][0]["cpu"].keys()
        entry["cores"] = {name: spread([r["cpu"][name]["cores"] for r in runs[arm]], 2) for name in names}
        entry["cpu_s_per_10k_lines"] = {
            name: spread([r["cpu"][name]["cpu_s"] / r["lines"] * 10_000 for r in runs[arm]], 3)
            for name in names if name not in ("machine", "other")
        }
        busiest = max((n for n in names if n not in ("machine", "other", "postgres", "seaweedfs")),
                      key=lambda n: entry["cores"][n]["median"])
        ours = [n for n in names if n not in ("machine", "other")]
        entry["cpu_s_per_10k_lines"]["all_ours"] = spread(
            [sum(r["cpu"][n]["cpu_s"] for n in ours) / r["lines"] * 10_000 for r in runs[arm]], 3)
        # overnight's own processes and the stores it runs on, without the fake upstream and the bench's client
        server = [n for n in ours if n not in ("upstream", "client")]
        entry["cpu_s_per_10k_lines"]["server"] = spread(
            [sum(r["cpu"][n]["cpu_s"] for n in server) / r["lines"] * 10_000 for r in runs[arm]], 3)
        cpus = os.cpu_count() or 1
        entry["busiest_process"] = {"name": busiest, "cores_median": entry["cores"][busiest]["median"],
                                    "saturated": entry["cores"][busiest]["median"] >= SATURATED,
                                    "machine_cores_median": entry["cores"]["machine"]["median"],
                                    "machine_saturated": entry["cores"]["machine"]["median"] >= SATURATED * cpus}
        summary[arm] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--warmup-lines", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4", help="worker processes of the pg arms")
    parser.add_argument("--no-one-box", action="store_true", help="leave the one-box arm out")
    args = parser.parse_args()
    arms = ([] if args.no_one_box else ["one-box"]) + [f"pg-{n}w" for n in args.workers.split(",")]
    print(f"machine: {machine()}", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    order_log = []
    git = git_state()  # before any result file is written
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="overnight-tiers-") as tmp:
        workdir = Path(tmp)
        measured = write_chat_batch(workdir / "input.jsonl", args.lines)
        warm = write_chat_batch(workdir / "warm-up.jsonl", args.warmup_lines)
        upstream_port = free_port()
        upstream_args = [sys.executable, "-m", "overnight.testing.upstream_server", "--port", str(upstream_port)]
        # Durable as the one box is (SQLite synchronous=FULL and fsynced files): the test instance's
        # fsync-off settings would flatter the PostgreSQL tier.
        with PostgresServer.start(settings=DURABLE_POSTGRES) as pg, SeaweedFS() as s3, \
                process(upstream_args, f"http://127.0.0.1:{upstream_port}/stats", workdir / "upstream.log") as up:
            tmpl = pg.create_database("tmpl")
            from overnight.store.sql import SqlStore

            store = SqlStore(tmpl)
            store.migrate()
            store.close()
            stack = Stack(pg, s3, up.pid)
            upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
            wait_ready(f"http://127.0.0.1:{upstream_port}/stats")
            for r in range(args.rounds):
                order = arms[r % len(arms):] + arms[: r % len(arms)]
                order_log.append(order)
                for arm in order:
                    run = run_arm(arm, f"{arm}-r{r + 1}", stack, workdir, upstream_url, warm, args.warmup_lines,
                                  measured, args.lines)
                    run["round"] = r + 1
                    run["lines"] = args.lines
                    runs[arm].append(run)
                    cores = ", ".join(f"{k} {v['cores']:.2f}" for k, v in run["cpu"].items() if v["cores"] >= 0.05)
                    print(f"round {r + 1} {arm:8} {run['lines_per_s']:8,.0f} lines/s "
                          f"(upload {run['upload_s']:.2f}s run {run['run_s']:.2f}s download {run['download_s']:.2f}s)"
                          f"  cores: {cores}  logged problems: {run['log_problems']['count']}", file=sys.stderr)
    summary = summarize(arms, runs)
    print()
    print(f"{'arm':10}{'lines/s median':>16}{'min-max':>18}{'vs one-box (per round)':>30}   busiest")
    for arm in arms:
        s = summary[arm]
        ratio = s.get("vs_one_box")
        ratio_text = (f"{ratio['per_round']['median']:.2f} [{ratio['per_round']['min']:.2f}-"
                      f"{ratio['per_round']['max']:.2f}]") if ratio else "1"
        rate = s["lines_per_s"]
        span = f"{rate['min']:,.0f}-{rate['max']:,.0f}"
        print(f"{arm:10}{rate['median']:16,.0f}{span:>18}{ratio_text:>30}   "
              f"{s['busiest_process']['name']} {s['busiest_process']['cores_median']:.2f} cores")
    result = {
        "git": git,
        "arguments": vars(args),
        "arms": arms,
        "order": order_log,
        "settings": {"settle_seconds": SETTLE_SECONDS, "upstream": "overnight.testing.upstream_server, no delay",
                     "postgres": "PostgreSQL 15 (testing/postgres.py), fsync, synchronous_commit and "
                                 "full_page_writes on",
                     "seaweedfs": "weed mini (testing/seaweedfs.py)", "clock_ticks_per_s": TICK,
                     "saturated_threshold_cores": SATURATED},
        "summary": summary,
        "runs": runs,
        "elapsed_s": round(time.perf_counter() - began, 1),
    }
    print(f"wrote {save('tiers', result)}")


if __name__ == "__main__":
    main()
    exit_now(0)  # pyreqwest's runtime thread can abort interpreter finalization (see overnight.runtime)
