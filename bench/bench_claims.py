"""The work queue's claim rate, straight against the store (no HTTP, no upstream): one batch in
progress with many one-line shards, drained by K contending claimers that claim a shard
(`claim_shard`, the database's clock) and commit it at once (`commit_shard`, an empty result)
until none is left. PostgreSQL for K = 1, 2, 4, 8, SQLite for K = 1, 2.

Claimers are processes (forked; this process holds no connection or thread when it forks), each
with its own SqlStore and connection pool, not threads: under the GIL, threads of one interpreter
would take turns in Python and measure the client's lock rather than the database's; processes
contend in the database as workers on many machines do. They start together (a barrier, then one go signal); each records every claim's and commit's
latency and any error (the exact message).

Also measured, to estimate what one PostgreSQL can serve:
  * the database's CPU per shard (claim + commit): PostgreSQL's postmaster and all its children
    (exited ones too) from /proc, over each run;
  * how a claim's cost grows with the number of pending shards (probe-N: 200 claims + commits,
    one claimer, on a queue of N pending shards);
  * a worker's once-a-second heartbeat (8 shard leases extended + its membership row), the load a
    worker puts on the database besides its claims;
  * EXPLAIN ANALYZE of the claim statement on the full queue.

Every arm runs once per round, in an order rotated by round; each run on a fresh copy of the same
populated database (a PostgreSQL template / a copy of the SQLite file).

    ./dev bench bench_claims [--shards 4000] [--rounds 3] [--claimers 1,2,4,8] [--sqlite-claimers 1,2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

from harness import (
    RESULTS,
    TICK,
    git_state,
    machine_busy_ticks,
    median,
    save,
    spread,
    tree_ticks,
)
from overnight.testing.postgres import PostgresServer

BATCH = "batch_claims"
LEASE_SECONDS = 600.0  # no lease expires during a run: every claim takes a pending shard
PROBE_CLAIMS = 200
HEARTBEATS = 300
HEARTBEAT_SHARDS = 8  # a worker's default max_shards_in_flight


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the database ---------------------------------------------------------------------------


def populate(url: str, shards: int) -> None:
    """A migrated database with one batch in progress and `shards` one-line pending shards, made
    the way a worker's validation makes them (claim the validate task, start_batch)."""
    from overnight import constants as C
    from overnight.store.records import BatchRecord, FileRecord, ShardPlan
    from overnight.store.sql import SqlStore

    store = SqlStore(url)
    try:
        store.migrate()
        now = int(time.time())
        store.files.insert_file(FileRecord("file-claims", "owner", "batch", "in.jsonl", shards * 100, now, None,
                                           "files/file-claims"))
        store.batches.insert_batch(BatchRecord(BATCH, "owner", C.CHAT_COMPLETIONS, "file-claims", "24h",
                                               C.VALIDATING, now, now + 86400))
        task = store.queue.claim_batch_task(None, LEASE_SECONDS, "validate-token")
        assert task is not None and task.kind == "validate"
        plans = [ShardPlan(i, i, 1, i * 100, 100) for i in range(shards)]
        assert store.queue.start_batch(BATCH, "validate-token", plans, shards, now)
    finally:
        store.close()


def explain_claim(url: str) -> list[str]:
    """EXPLAIN ANALYZE of one claim, rolled back."""
    from overnight.store import queue
    from overnight.store.sql import SqlStore

    store = SqlStore(url)
    try:
        compiled = queue._CLAIM_SHARD.compile(dialect=store.db.engine.dialect)
        params = {**compiled.params, "p_now": None, "p_token": "explain", "p_lease_seconds": LEASE_SECONDS}
        with store.db.engine.connect() as conn:
            tx = conn.begin()
            plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {compiled}", params).scalars().all()
            tx.rollback()
        return [str(line) for line in plan]
    finally:
        store.close()


class Databases:
    """Fresh copies of populated databases: PostgreSQL from templates, SQLite from a file."""

    def __init__(self, pg: PostgresServer, workdir: Path) -> None:
        self.pg = pg
        self.workdir = workdir
        self.count = 0

    def template(self, shards: int) -> str:
        name = f"tmpl_{shards}"
        populate(self.pg.create_database(name), shards)
        return name

    def pg_copy(self, shards: int) -> tuple[str, str]:
        self.count += 1
        name = f"run_{self.count}"
        return name, self.pg.create_database(name, template=f"tmpl_{shards}")

    def sqlite_template(self, shards: int) -> Path:
        path = self.workdir / f"tmpl_{shards}.sqlite"
        populate(f"sqlite:///{path}", shards)  # closed: the WAL is checkpointed into the file
        return path

    def sqlite_copy(self, shards: int) -> str:
        self.count += 1
        path = self.workdir / f"run_{self.count}.sqlite"
        shutil.copyfile(self.workdir / f"tmpl_{shards}.sqlite", path)
        return f"sqlite:///{path}"


# -- claimers -------------------------------------------------------------------------------


def claimer(url: str, ready: Barrier, go: Event, release: Event, out: Connection) -> None:
    """One contending worker's claim loop, in its own process: claim, commit at once, until empty."""
    from overnight.ids import new_lease_token
    from overnight.store.records import ShardResult
    from overnight.store.sql import SqlStore

    store = SqlStore(url)
    with store.db.read() as conn:
        conn.exec_driver_sql("SELECT 1")  # the pool's connection is open before the start
    ready.wait()
    go.wait()
    started, cpu = time.perf_counter(), time.process_time()
    claims: list[tuple[float, float, float]] = []  # (start, claim seconds, commit seconds)
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    while len(errors) < 50 and sum(errors.values()) < 1000:
        t0 = time.perf_counter()
        token = new_lease_token()
        try:
            shard = store.queue.claim_shard(None, LEASE_SECONDS, token)
        except Exception as exc:  # recorded with its message, then claim again
            errors[f"claim: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"] += 1
            continue
        t1 = time.perf_counter()
        if shard is None:
            break
        for _attempt in range(5):
            try:
                outcome = store.queue.commit_shard(shard.shard_id, token, BATCH, ShardResult(""), int(time.time()))
                break
            except Exception as exc:
                errors[f"commit: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"] += 1
        else:
            outcome = "commit_failed"
        outcomes[outcome] += 1
        claims.append((t0, t1 - t0, time.perf_counter() - t1))
    ended = time.perf_counter()
    out.send({"started": started, "ended": ended, "cpu_s": time.process_time() - cpu, "claims": claims,
              "outcomes": dict(outcomes), "errors": dict(errors)})
    out.close()
    # Connected until the parent has read PostgreSQL's CPU: a backend that is exiting (a zombie not
    # yet reaped) shows no CPU time in /proc, and its time reaches the postmaster only once reaped.
    release.wait(60)
    store.close()


def claim_run(url: str, claimers: int, shards: int, pg: PostgresServer | None) -> dict[str, Any]:
    # fork, not spawn: a child starts in milliseconds instead of importing everything again (the
    # start is not timed either way, but 18 spawns a round cost a loaded machine minutes).
    ctx = multiprocessing.get_context("fork")
    ready, go, release = ctx.Barrier(claimers + 1), ctx.Event(), ctx.Event()
    pipes, procs = [], []
    for _ in range(claimers):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=claimer, args=(url, ready, go, release, writer), daemon=True)
        proc.start()
        writer.close()
        pipes.append(reader)
        procs.append(proc)
    ready.wait(120)
    pg_before = tree_ticks(pg.proc.pid) if pg and pg.proc else 0  # type: ignore[union-attr]
    machine_before = machine_busy_ticks()
    go.set()
    reports = [pipe.recv() for pipe in pipes]
    pg_after = tree_ticks(pg.proc.pid) if pg and pg.proc else 0  # type: ignore[union-attr]
    machine_after = machine_busy_ticks()
    release.set()
    for proc in procs:
        proc.join(30)
    wall = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    samples = sorted(c for r in reports for c in r["claims"])
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in reports:
        outcomes.update(r["outcomes"])
        errors.update(r["errors"])
    claim_ms = [c[1] * 1000 for c in samples]
    commit_ms = [c[2] * 1000 for c in samples]
    tenth = max(1, len(samples) // 10)
    done = len(samples)
    pg_cpu = (pg_after - pg_before) / TICK
    clients_cpu = sum(r["cpu_s"] for r in reports)
    machine_cpu = (machine_after - machine_before) / TICK
    return {
        "claimed": done,
        "complete": done == shards and outcomes.get("committed", 0) == shards - 1 and outcomes.get("batch_ready") == 1,
        "wall_s": round(wall, 4),
        "claims_per_s": round(done / wall, 1),
        "claim_ms": {"p50": round(percentile(claim_ms, 0.5), 3), "p99": round(percentile(claim_ms, 0.99), 3),
                     "max": round(max(claim_ms), 3)},
        "commit_ms": {"p50": round(percentile(commit_ms, 0.5), 3), "p99": round(percentile(commit_ms, 0.99), 3),
                      "max": round(max(commit_ms), 3)},
        # p50 claim latency in each tenth of the run, in claim order: the queue empties as it goes.
        "claim_ms_p50_by_tenth": [round(percentile(claim_ms[i:i + tenth], 0.5), 3)
                                  for i in range(0, tenth * 10, tenth) if claim_ms[i:i + tenth]],
        "outcomes": dict(outcomes),
        "errors": dict(errors),
        "cpu_s": {"postgres": round(pg_cpu, 3), "claimers": round(clients_cpu, 3), "machine": round(machine_cpu, 3),
                  "other": round(max(0.0, machine_cpu - pg_cpu - clients_cpu), 3)},
        "postgres_cpu_ms_per_shard": round(pg_cpu / done * 1000, 4) if pg else None,
        "claimers_cpu_ms_per_shard": round(clients_cpu / done * 1000, 4),
    }


# -- probes (in this process, one claimer) --------------------------------------------------


def probe_pending(url: str, pg: PostgresServer) -> dict[str, Any]:
    """200 claims + commits on a queue of N pending shards: the claim's cost against queue length."""
    from overnight.ids import new_lease_token
    from overnight.store.records import ShardResult
    from overnight.store.sql import SqlStore

    store = SqlStore(url)
    try:
        store.queue.claim_shard(None, LEASE_SECONDS, "warm")  # the pool's connection, compiled statements
        claim_ms = []
        before = tree_ticks(pg.proc.pid)  # type: ignore[union-attr]
        began = time.perf_counter()
        for _ in range(PROBE_CLAIMS):
            token = new_lease_token()
            t0 = time.perf_counter()
            shard = store.queue.claim_shard(None, LEASE_SECONDS, token)
            claim_ms.append((time.perf_counter() - t0) * 1000)
            assert shard is not None
            store.queue.commit_shard(shard.shard_id, token, BATCH, ShardResult(""), int(time.time()))
        wall = time.perf_counter() - began
        pg_cpu = (tree_ticks(pg.proc.pid) - before) / TICK  # type: ignore[union-attr]
    finally:
        store.close()
    return {"claims_per_s": round(PROBE_CLAIMS / wall, 1), "claim_ms_p50": round(median(claim_ms), 3),
            "postgres_cpu_ms_per_shard": round(pg_cpu / PROBE_CLAIMS * 1000, 4)}


def probe_heartbeat(url: str, pg: PostgresServer) -> dict[str, Any]:
    """A worker's heartbeat, as its loop runs it once a second: membership.standing, then
    heartbeat_shards over the 8 leases it holds."""
    from overnight.ids import new_lease_token
    from overnight.store.records import ShardProgress
    from overnight.store.sql import SqlStore

    store = SqlStore(url)
    try:
        held = []
        for _ in range(HEARTBEAT_SHARDS):
            token = new_lease_token()
            shard = store.queue.claim_shard(None, LEASE_SECONDS, token)
            assert shard is not None
            held.append(ShardProgress(shard.shard_id, token, completed=1))
        worker = new_lease_token()
        store.membership.join(worker)
        store.membership.standing(worker, 15.0)
        store.queue.heartbeat_shards(held, LEASE_SECONDS)
        before = tree_ticks(pg.proc.pid)  # type: ignore[union-attr]
        began = time.perf_counter()
        for _ in range(HEARTBEATS):
            store.membership.standing(worker, 15.0)
            lost, stopped = store.queue.heartbeat_shards(held, LEASE_SECONDS)
            assert not lost and not stopped
        wall = time.perf_counter() - began
        pg_cpu = (tree_ticks(pg.proc.pid) - before) / TICK  # type: ignore[union-attr]
    finally:
        store.close()
    return {"ms_per_heartbeat": round(wall / HEARTBEATS * 1000, 3),
            "postgres_cpu_ms_per_heartbeat": round(pg_cpu / HEARTBEATS * 1000, 4)}


# -- the estimate ---------------------------------------------------------------------------


def estimate(summary: dict[str, Any], shards: int, cores: int, tiers_worker_rate: float | None) -> dict[str, Any]:
    """What one PostgreSQL like this one (these `cores`, to itself) could serve, from its measured
    CPU per shard and per heartbeat."""
    pg_arms = {int(k.removeprefix("pg-K")): v for k, v in summary.items() if k.startswith("pg-K")}
    # Many workers contend: the cost per shard at the most claimers measured is the basis; the
    # uncontended cost (one claimer) is the optimistic bound.
    most, fewest = max(pg_arms), min(pg_arms)
    per_shard_ms = pg_arms[most]["postgres_cpu_ms_per_shard"]["median"]
    uncontended_ms = pg_arms[fewest]["postgres_cpu_ms_per_shard"]["median"]
    probes = {int(k.removeprefix("probe-")): v for k, v in summary.items() if k.startswith("probe-")}
    hb_ms = summary["heartbeat"]["postgres_cpu_ms_per_heartbeat"]["median"]
    lines_per_shard = 1000

    def capacity(cpu_ms: float) -> float:
        return cores * 1000 / cpu_ms  # shards/s if the database's CPU were the only limit

    scenarios = {}
    rates = {"fake upstream (bench_tiers, per worker)": tiers_worker_rate, "1,000 lines/s per worker": 1000.0,
             "100 lines/s per worker (64 in flight, ~0.6 s a line)": 100.0}
    for label, rate in rates.items():
        if not rate:
            continue
        # Each worker: rate/1000 shards/s, plus one heartbeat a second.
        per_worker_cpu_ms = rate / lines_per_shard * per_shard_ms + hb_ms
        workers = cores * 1000 / per_worker_cpu_ms
        scenarios[label] = {"lines_per_s_per_worker": round(rate), "workers": int(workers),
                            "lines_per_s": int(workers * rate)}
    best = max(pg_arms, key=lambda k: pg_arms[k]["claims_per_s"]["median"])
    return {
        "assumptions": [
            f"one PostgreSQL with {cores} cores to itself (this machine's size), CPU-bound: the measured "
            "PostgreSQL CPU per shard (claim + commit) and per heartbeat, nothing else (no API traffic: "
            "uploads, polls, listing; no validation or finalize statements)",
            f"{lines_per_shard} lines per shard (overnight's default for an upstream)",
            f"a queue like the measured one: {shards} pending shards drained to none (the claim reads and "
            "sorts every pending shard, so its cost grows with the queue: see the by_pending figures)",
            "fsync, synchronous_commit and full_page_writes are off on the test server: a durable server "
            "adds a WAL flush per commit (claim and commit are two transactions a shard), bounded by the disk",
            "one heartbeat a second per worker, holding 8 shards",
            "shards of one batch commit one at a time (each commit locks the batch row): one batch's "
            "ceiling is 1 / the commit's lock hold time, below; many batches commit in parallel",
        ],
        "postgres_cpu_ms_per_shard": per_shard_ms,
        "postgres_cpu_ms_per_shard_from": f"pg-K{most} (contended; the basis of the capacity and workers below)",
        "postgres_cpu_ms_per_shard_uncontended": uncontended_ms,
        "postgres_cpu_ms_per_shard_uncontended_from": f"pg-K{fewest}",
        "postgres_cpu_ms_per_shard_by_pending": {n: v["postgres_cpu_ms_per_shard"]["median"]
                                                 for n, v in sorted(probes.items())},
        "postgres_cpu_ms_per_heartbeat": hb_ms,
        "measured_claims_per_s_on_this_machine": {"arm": f"pg-K{best}",
                                                  "claims_per_s": pg_arms[best]["claims_per_s"]["median"]},
        "capacity_shards_per_s": round(capacity(per_shard_ms)),
        "capacity_lines_per_s": round(capacity(per_shard_ms) * lines_per_shard),
        "capacity_lines_per_s_uncontended": round(capacity(uncontended_ms) * lines_per_shard),
        "capacity_by_pending_lines_per_s_uncontended": {n: round(capacity(v["postgres_cpu_ms_per_shard"]["median"])
                                                     * lines_per_shard) for n, v in sorted(probes.items())},
        "one_batch_commit_ceiling_shards_per_s": round(1000 / summary["pg-K1"]["commit_ms"]["p50"]["median"])
        if "pg-K1" in summary else None,
        "workers": scenarios,
    }


def tiers_worker_rate() -> float | None:
    """Lines/s of one worker on the fake upstream, from bench_tiers' result if there is one."""
    path = RESULTS / "tiers.json"
    try:
        return float(json.loads(path.read_text())["summary"]["pg-1w"]["lines_per_s"]["median"])
    except (OSError, KeyError, ValueError):
        return None


# -- main -----------------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for arm, results in runs.items():
        entry: dict[str, Any] = {}
        for key, value in results[0].items():
            if key == "round":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[key] = spread([r[key] for r in results], 4)
            elif isinstance(value, list) and all(len(r[key]) == len(value) for r in results):
                entry[key] = [median([r[key][i] for r in results]) for i in range(len(value))]
            elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()) \
                    and key not in ("outcomes", "errors"):
                entry[key] = {k: spread([r[key][k] for r in results], 4) for k in value}
        if "errors" in results[0]:
            errors: Counter[str] = Counter()
            for r in results:
                errors.update(r["errors"])
            entry["errors"] = dict(errors)
            entry["all_complete"] = all(r["complete"] for r in results)
        summary[arm] = entry
    base = summary.get("pg-K1")
    if base:
        for arm, entry in summary.items():
            if arm.startswith(("pg-K", "sqlite-K")) and arm != "pg-K1":
                per_round = [a["claims_per_s"] / b["claims_per_s"] for a, b in zip(runs[arm], runs["pg-K1"],
                                                                                  strict=True)]
                entry["vs_pg_K1"] = spread(per_round)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--claimers", default="1,2,4,8", help="K for PostgreSQL")
    parser.add_argument("--sqlite-claimers", default="1,2", help="K for SQLite ('' for none)")
    parser.add_argument("--probe-pending", default="1000,5000,20000", help="queue lengths of the probe")
    args = parser.parse_args()
    pg_k = [int(k) for k in args.claimers.split(",")]
    sqlite_k = [int(k) for k in args.sqlite_claimers.split(",") if k]
    pending = [int(n) for n in args.probe_pending.split(",") if n]
    arms = ([f"pg-K{k}" for k in pg_k] + [f"sqlite-K{k}" for k in sqlite_k] + [f"probe-{n}" for n in pending]
            + ["heartbeat"])
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    order_log = []
    git = git_state()  # before any result file is written
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="overnight-claims-") as tmp, PostgresServer.start() as pg:
        dbs = Databases(pg, Path(tmp))
        for size in sorted({args.shards, *pending}):
            dbs.template(size)
        if sqlite_k:
            dbs.sqlite_template(args.shards)
        plan_name, plan_url = dbs.pg_copy(args.shards)
        plan = explain_claim(plan_url)
        pg.drop_database(plan_name)
        print("\n".join(plan), file=sys.stderr)
        for r in range(args.rounds):
            order = arms[r % len(arms):] + arms[: r % len(arms)]
            order_log.append(order)
            for arm in order:
                if arm.startswith("sqlite-K"):
                    result = claim_run(dbs.sqlite_copy(args.shards), int(arm.removeprefix("sqlite-K")), args.shards,
                                       None)
                else:
                    size = int(arm.removeprefix("probe-")) if arm.startswith("probe-") else args.shards
                    name, url = dbs.pg_copy(size)
                    if arm.startswith("pg-K"):
                        result = claim_run(url, int(arm.removeprefix("pg-K")), args.shards, pg)
                    elif arm.startswith("probe-"):
                        result = probe_pending(url, pg)
                    else:
                        result = probe_heartbeat(url, pg)
                    pg.drop_database(name)
                result["round"] = r + 1
                runs[arm].append(result)
                shown = {k: v for k, v in result.items() if k not in ("claim_ms_p50_by_tenth", "outcomes", "round")}
                print(f"round {r + 1} {arm:11} {json.dumps(shown)}", file=sys.stderr)
            # What is measured so far survives a run that is stopped (the end writes the whole file).
            save("claims", {"git": git, "arguments": vars(args), "partial_after_round": r + 1, "runs": runs})
    summary = summarize(runs)
    cores = os.cpu_count() or 1
    est = estimate(summary, args.shards, cores, tiers_worker_rate())
    print()
    print(f"{args.shards} one-line shards, one batch; median [min-max] over {args.rounds} rounds")
    print(f"{'arm':11}{'claims/s':>24}{'claim p50 ms':>14}{'claim p99 ms':>14}{'commit p50':>12}"
          f"{'pg cpu ms/shard':>17}  errors")
    for arm in arms:
        s = summary[arm]
        if "claimed" not in s:
            continue
        rate = s["claims_per_s"]
        pg_ms = s.get("postgres_cpu_ms_per_shard")
        pg_text = f"{pg_ms['median']:.3f}" if isinstance(pg_ms, dict) else "-"
        rate_text = f"{rate['median']:,.0f} [{rate['min']:,.0f}-{rate['max']:,.0f}]"
        print(f"{arm:11}{rate_text:>24}{s['claim_ms']['p50']['median']:14.2f}{s['claim_ms']['p99']['median']:14.2f}"
              f"{s['commit_ms']['p50']['median']:12.2f}{pg_text:>17}  {sum(s['errors'].values())}")
    for arm in arms:
        if arm.startswith("probe-") or arm == "heartbeat":
            print(f"{arm:11} " + ", ".join(f"{k} {v['median']}" for k, v in summary[arm].items()
                                           if isinstance(v, dict) and "median" in v and k != "round"))
    print(json.dumps(est, indent=2))
    result = {
        "git": git,
        "arguments": vars(args),
        "claimers": "processes (multiprocessing fork), each with its own SqlStore and pool",
        "arms": arms,
        "order": order_log,
        "claim_plan": plan,
        "summary": summary,
        "estimate": est,
        "runs": runs,
        "elapsed_s": round(time.perf_counter() - began, 1),
    }
    print(f"wrote {save('claims', result)}")


if __name__ == "__main__":
    main()
