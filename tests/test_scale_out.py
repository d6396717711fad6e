"""Many machines on one box: API replicas (`overnight serve --no-worker`) and `overnight worker`
processes that share only PostgreSQL and an S3 bucket (SeaweedFS), as they would on separate
machines. Workers are killed, paused past their leases, and the database and the object store go
away mid-batch; every batch still ends with each custom_id exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import Server, Upstream, chat_line, results_by_id, server_args, until, upload
from overnight.testing.postgres import PostgresServer
from overnight.testing.seaweedfs import SeaweedFS

pytestmark = pytest.mark.postgres
TERMINAL = {"completed", "failed", "cancelled", "expired"}


class Cluster:
    """`replicas` API processes and `workers` worker processes on one database and one bucket."""

    def __init__(self, tmp: Path, upstream: Upstream, database_url: str, storage_url: str, replicas: int,
                 workers: int) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.shared = ["--database-url", database_url, "--storage-url", storage_url]
        self.worker_args = [*self.shared, "--upstream", f"*={upstream.base_url}", "--no-embedded",
                            "--lease-seconds", "2", "--shard-lines", "500"]
        self.apis = [Server(tmp / f"api{i}", server_args(upstream, "--no-worker", *self.shared)).start()
                     for i in range(replicas)]
        self.workers: list[subprocess.Popen[bytes]] = []
        for _ in range(workers):
            self.start_worker()
        self._turn = 0

    def start_worker(self) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        log = (self.tmp / f"worker{n}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "overnight", "worker", "--data-dir", str(self.tmp / f"w{n}"),
                                 *self.worker_args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.workers.append(proc)
        return proc

    def worker_log(self, n: int) -> str:
        return (self.tmp / f"worker{n}.log").read_text()

    def client(self) -> openai.OpenAI:
        """The replicas in turn, as a load balancer would hand them out."""
        self._turn += 1
        return self.apis[self._turn % len(self.apis)].client(max_retries=5)

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait(self, batch_id: str, until: Any, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.client().batches.retrieve(batch_id)
            if until(batch):
                return batch
            time.sleep(0.02)
        raise AssertionError(f"batch {batch_id} did not get there in {timeout}s: {batch.status} {batch.request_counts}")

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for api in self.apis:
            api.stop()


@pytest.fixture
def make_cluster(tmp_path: Path, upstream: Upstream) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(database_url: str, storage_url: str, replicas: int = 2, workers: int = 3) -> Cluster:
        cluster = Cluster(tmp_path / f"c{len(made)}", upstream, database_url, storage_url, replicas, workers)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture
def shared_cluster(make_cluster: Any, postgres_server: PostgresServer, seaweedfs: SeaweedFS) -> Cluster:
    name = postgres_server.unique_name("cluster")
    cluster: Cluster = make_cluster(postgres_server.create_database(name), seaweedfs.storage_url(name))
    return cluster


def _every_line_once(client: openai.OpenAI, batch: Any, total: int) -> None:
    outputs, errors = results_by_id(client, batch)
    assert set(outputs) | set(errors) == {f"req-{i}" for i in range(total)}
    assert len(outputs) + len(errors) == total


def test_replicas_behind_a_balancer_show_one_state(shared_cluster: Cluster) -> None:
    cluster = shared_cluster
    file_id = upload(cluster.client(), [chat_line(i) for i in range(300)])
    batch = cluster.client().batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
    assert cluster.client().batches.retrieve(batch.id).id == batch.id  # the other replica knows it at once
    done = cluster.wait(batch.id, lambda b: b.status in TERMINAL)
    assert done.status == "completed" and done.request_counts.completed == 300
    first, second = cluster.apis[0].client(), cluster.apis[1].client()
    assert first.files.content(done.output_file_id).content == second.files.content(done.output_file_id).content
    assert batch.id in {b.id for b in second.batches.list(limit=10)}
    first.files.delete(file_id)
    with pytest.raises(openai.NotFoundError):
        second.files.retrieve(file_id)
    _every_line_once(second, done, 300)


def test_workers_killed_mid_shard_and_mid_finalize_lose_and_duplicate_nothing(shared_cluster: Cluster) -> None:
    cluster = shared_cluster
    total = 20_000
    file_id = upload(cluster.client(), [chat_line(i) for i in range(total)])
    batch = cluster.client().batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
    cluster.wait(batch.id, lambda b: b.request_counts.completed > 0)
    cluster.kill_worker(cluster.workers[0])  # mid-shard: its shards are taken over when the leases run out
    cluster.start_worker()
    finalizing = cluster.wait(batch.id, lambda b: b.status in TERMINAL | {"finalizing"})
    if finalizing.status == "finalizing":  # kill every worker, the finalizing one among them
        for proc in cluster.workers:
            if proc.poll() is None:
                cluster.kill_worker(proc)
        cluster.start_worker()
        cluster.start_worker()
    done = cluster.wait(batch.id, lambda b: b.status in TERMINAL)
    assert finalizing.status == "finalizing", "finalize was not caught in flight"
    assert done.status == "completed" and done.request_counts.completed == total
    _every_line_once(cluster.client(), done, total)


def test_a_postgresql_restart_mid_batch_is_ridden_out(make_cluster: Any, seaweedfs: SeaweedFS) -> None:
    with PostgresServer.start() as postgres:
        cluster = make_cluster(postgres.create_database("overnight"), seaweedfs.storage_url("pg-restart"),
                               replicas=1, workers=2)
        total = 3000
        file_id = upload(cluster.client(), [chat_line(i, x_fault="slow:20") for i in range(total)])
        batch = cluster.client().batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                completion_window="24h")
        cluster.wait(batch.id, lambda b: b.request_counts.completed > 0)
        postgres.restart(down_seconds=2)
        done = cluster.wait(batch.id, lambda b: b.status in TERMINAL, timeout=180)
        assert done.status == "completed" and done.request_counts.completed == total
        _every_line_once(cluster.client(), done, total)


def test_the_object_store_gone_for_10_seconds_is_ridden_out(make_cluster: Any, postgres_server: PostgresServer,
                                                             tmp_path: Path) -> None:
    with SeaweedFS(tmp_path / "s3") as s3:
        name = postgres_server.unique_name("s3down")
        cluster = make_cluster(postgres_server.create_database(name), s3.storage_url(name), replicas=1, workers=2)
        total = 3000
        file_id = upload(cluster.client(), [chat_line(i, x_fault="slow:20") for i in range(total)])
        batch = cluster.client().batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                completion_window="24h")
        cluster.wait(batch.id, lambda b: b.request_counts.completed > 0)
        s3.stop()
        time.sleep(10)
        s3.start()
        done = cluster.wait(batch.id, lambda b: b.status in TERMINAL, timeout=180)
        assert done.status == "completed" and done.request_counts.completed == total
        _every_line_once(cluster.client(), done, total)


def test_a_worker_paused_past_its_lease_cannot_commit(make_cluster: Any, postgres_server: PostgresServer,
                                                      seaweedfs: SeaweedFS, upstream: Upstream) -> None:
    name = postgres_server.unique_name("fence")
    cluster = make_cluster(postgres_server.create_database(name), seaweedfs.storage_url(name), replicas=1, workers=1)
    total = 60
    file_id = upload(cluster.client(), [chat_line(i, x_fault="slow:1500") for i in range(total)])
    sent = upstream.stats()["requests"]
    batch = cluster.client().batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
    # (in_progress at create: validated on upload) the only worker has claimed the shards and sent their lines
    until(lambda: upstream.stats()["requests"] > sent)
    time.sleep(0.5)
    paused = cluster.workers[0]
    paused.send_signal(signal.SIGSTOP)
    try:
        cluster.start_worker()  # takes the shards over once the 2 s leases run out, and commits them
        done = cluster.wait(batch.id, lambda b: b.status in TERMINAL)
    finally:
        paused.send_signal(signal.SIGCONT)
    assert done.status == "completed" and done.request_counts.completed == total
    _every_line_once(cluster.client(), done, total)
    # Resumed, the paused worker finds its leases gone: it commits nothing (fenced by the token).
    deadline = time.monotonic() + 15
    while "not committed" not in (log := cluster.worker_log(0)) and "commit refused" not in log:
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.1)
    assert cluster.client().batches.retrieve(batch.id).request_counts.completed == total


def test_a_cancel_on_one_replica_stops_workers_elsewhere_within_2_seconds(shared_cluster: Cluster,
                                                                          upstream: Upstream) -> None:
    cluster = shared_cluster
    total = 2000
    file_id = upload(cluster.client(), [chat_line(i, x_fault="slow:100") for i in range(total)])
    batch = cluster.client().batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
    cluster.wait(batch.id, lambda b: b.request_counts.completed > 50)
    cluster.apis[1].client().batches.cancel(batch.id)
    cancelled_at = time.monotonic()
    time.sleep(2.0)  # heartbeats (every second) tell the workers; lines already in flight finish
    sent = upstream.stats()["requests"]
    time.sleep(1.0)
    assert upstream.stats()["requests"] == sent, "workers still sent lines 2 s after the cancel"
    done = cluster.wait(batch.id, lambda b: b.status in TERMINAL, timeout=30)
    assert done.status == "cancelled" and time.monotonic() - cancelled_at < 10
    assert 0 < done.request_counts.completed < total
    _every_line_once(cluster.client(), done, total)
