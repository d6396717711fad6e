"""The progress estimate (batches/progress.py) and the engine counters' publication to Prometheus
(observability/metrics.py): logic over plain values, no server."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from overnight.batches.progress import estimate
from overnight.engines.limiter import AdaptiveLimiter
from overnight.engines.stats import UpstreamStats
from overnight.observability.metrics import EngineMetrics
from overnight.observability.paths import prepare_metrics_dir
from overnight.store.records import ShardSpan


def test_throughput_counts_only_the_last_minute_of_each_shard() -> None:
    now = 1000.0
    spans = [
        ShardSpan(started_at=800.0, finished_at=900.0, done=500),  # ended before the window: not counted
        ShardSpan(started_at=945.0, finished_at=955.0, done=200),  # inside the window (940, 1000]: all of it
        ShardSpan(started_at=930.0, finished_at=950.0, done=400),  # half inside: 200
        ShardSpan(started_at=990.0, finished_at=None, done=50),  # running: its heartbeat's count
    ]
    progress = estimate(spans, now, started_at=0.0, remaining=900)
    assert progress.throughput == pytest.approx((200 + 200 + 50) / 60)
    assert progress.eta_seconds == pytest.approx(900 / progress.throughput, abs=0.1)


def test_a_young_batch_is_measured_since_it_started_and_an_idle_one_has_no_eta() -> None:
    young = estimate([ShardSpan(995.0, 999.0, 100)], 1000.0, started_at=990.0, remaining=100)
    assert young.throughput == pytest.approx(10.0) and young.eta_seconds == pytest.approx(10.0)
    idle = estimate([], 1000.0, started_at=0.0, remaining=5)
    assert idle.throughput == 0 and idle.eta_seconds is None


class _FakeUpstream:
    def __init__(self) -> None:
        self.name = "up"
        self.stats = UpstreamStats()
        self.limiter = AdaptiveLimiter(4, 1, 8)


def _samples(metrics: EngineMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    for metric in (metrics.latency, metrics.retries, metrics.errors, metrics.allowed):
        registry.register(metric)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_engine_numbers_are_published_as_differences() -> None:
    metrics, engine = EngineMetrics(), _FakeUpstream()
    for seconds in (0.003, 0.02, 0.02, 7.0):
        engine.stats.latency.observe(seconds)
    engine.stats.retries = 2
    engine.stats.error("http_429")
    metrics.publish([engine], now=1.0)
    metrics.publish([engine], now=2.0)  # nothing new: nothing added twice
    engine.stats.latency.observe(0.02)
    engine.stats.error("http_429")
    metrics.publish([engine], now=3.0)
    got: dict[Any, float] = _samples(metrics)
    assert got[("overnight_upstream_request_duration_seconds_count", (("upstream", "up"),))] == 5
    assert got[("overnight_upstream_request_duration_seconds_bucket", (("le", "0.025"), ("upstream", "up")))] == 4
    assert got[("overnight_upstream_request_duration_seconds_sum", (("upstream", "up"),))] == pytest.approx(7.063)
    assert got[("overnight_upstream_retries_total", (("upstream", "up"),))] == 2
    assert got[("overnight_upstream_errors_total", (("kind", "http_429"), ("upstream", "up")))] == 2
    assert got[("overnight_upstream_concurrency_allowed", (("upstream", "up"),))] == 4


def test_embedded_numbers_are_published_as_differences() -> None:
    from types import SimpleNamespace

    from overnight.engines.stats import EmbeddedStats

    metrics = EngineMetrics()
    engine = SimpleNamespace(name="embedded:smol", stats=EmbeddedStats(total_slots=4))
    engine.stats.generated_tokens, engine.stats.preempted_sequences, engine.stats.busy_slots = 100, 2, 3
    metrics.publish([engine], now=1.0)
    metrics.publish([engine], now=2.0)  # nothing new: nothing added twice
    engine.stats.generated_tokens, engine.stats.preempted_sequences = 150, 3
    metrics.publish([engine], now=3.0)
    registry = CollectorRegistry()
    for metric in (metrics.tokens, metrics.preempted, metrics.busy_slots, metrics.slots):
        registry.register(metric)
    got = {s.name: s.value for family in text_string_to_metric_families(generate_latest(registry).decode())
           for s in family.samples}
    assert got["overnight_embedded_generated_tokens_total"] == 150
    assert got["overnight_embedded_preempted_sequences_total"] == 3
    assert got["overnight_embedded_busy_slots"] == 3 and got["overnight_embedded_slots"] == 4


def test_metrics_dirs_of_servers_that_are_gone_are_removed(tmp_path: Any) -> None:
    """A metrics directory is kept while a process holds its lock, whatever pid its name carries:
    servers on other hosts (a shared data directory) or in containers (pid 1 each) deleted each
    other's live directory, or shared one and wrote the same files."""
    import os
    import subprocess
    import sys

    from conftest import owned_elsewhere
    from overnight.files.owned_dirs import OWNER_LOCK

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (tmp_path / "metrics" / str(dead_pid)).mkdir(parents=True)  # an earlier version's, by pid
    (tmp_path / "metrics" / str(dead_pid) / "counter_1.db").write_bytes(b"x")
    (tmp_path / "metrics" / str(os.getppid())).mkdir()  # an earlier version's, of a live server here
    elsewhere = tmp_path / "metrics" / f"{dead_pid}-on-another-host"  # its pid says nothing here
    elsewhere.mkdir()
    with owned_elsewhere(elsewhere):
        ours = prepare_metrics_dir(tmp_path)
        again = prepare_metrics_dir(tmp_path)  # another server in this pid (a container's pid 1)
        assert ours.parent == tmp_path / "metrics" and ours.name.startswith(f"{os.getpid()}-") and ours != again
        assert [p.name for p in ours.iterdir()] == [OWNER_LOCK]
        assert not (tmp_path / "metrics" / str(dead_pid)).exists()
        assert (tmp_path / "metrics" / str(os.getppid())).exists() and elsewhere.exists()
    prepare_metrics_dir(tmp_path)
    assert not elsewhere.exists()  # its owner is gone now
