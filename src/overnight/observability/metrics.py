"""The Prometheus metrics, per process, and the scrape.

Metric objects are built with `registry=None` by whoever uses them (nothing registers at import),
and passed in through constructors. In `overnight serve` the CLI points prometheus-client at a
directory under the data dir before any process imports it (multiprocess mode): every process
writes its values there, and a scrape (`render_metrics`) sums them. Without that directory (unit
tests, `overnight run`) the objects count in memory and nobody reads them.

Hot-path counts are not Prometheus calls: a multiprocess histogram observation costs ~6 us and a
counter ~1.5 us, measurable at 20,000 lines/s. Lines are counted per shard commit, engines count
in plain ints (engines/stats.py) that `WorkerMetrics.publish_engines` adds here every heartbeat.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from overnight.engines.stats import LATENCY_BUCKETS, EmbeddedStats, LatencyCounts, UpstreamStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BATCH_SECONDS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 48 * 3600)
_PHASE_SECONDS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


def forget_process(pid: int, metrics_dir: Path | None) -> None:
    """A worker process ended: drop its live gauges (in flight, allowed), keep its counters."""
    if metrics_dir is not None:
        mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]


class ApiMetrics:
    def __init__(self) -> None:
        self.requests = Counter("overnight_api_requests_total", "API requests by route template, method and status",
                                ["route", "method", "status"], registry=None)
        self.latency = Histogram("overnight_api_request_duration_seconds", "API request latency by route template",
                                 ["route", "method"], registry=None)


class WorkerMetrics:
    """What workers count: lines, batches, phases, shard claims and leases, engines."""

    def __init__(self) -> None:
        self.lines = Counter("overnight_lines_total", "Request lines run, by endpoint and outcome (completed, or "
                             "failed with its error code), counted at shard commits", ["endpoint", "outcome", "code"],
                             registry=None)
        self.batches = Counter("overnight_batches_total", "Batches that reached a terminal state", ["status"],
                               registry=None)
        self.batch_latency = Histogram("overnight_batch_duration_seconds", "Batch end-to-end latency, created to "
                                       "terminal, by terminal state", ["status"], buckets=_BATCH_SECONDS,
                                       registry=None)
        self.validation = Histogram("overnight_validation_duration_seconds", "Time to validate an input file",
                                    buckets=_PHASE_SECONDS, registry=None)
        self.finalize = Histogram("overnight_finalize_duration_seconds", "Time to write a batch's output and "
                                  "error files", buckets=_PHASE_SECONDS, registry=None)
        self.shard_claims = Counter("overnight_shard_claims_total", "Shards claimed", registry=None)
        self.shard_reclaims = Counter("overnight_shard_reclaims_total", "Shards claimed again after an earlier "
                                      "attempt (its lease expired, it was handed back, or it failed)", registry=None)
        self.leases_lost = Counter("overnight_shard_leases_lost_total", "Shard leases found expired and taken over "
                                   "while this worker still ran the shard", registry=None)
        self.engines = EngineMetrics()

    def batch_ended(self, status: str, created_at: int, now: float) -> None:
        self.batches.labels(status).inc()
        self.batch_latency.labels(status).observe(max(0.0, now - created_at))

    def shard_committed(self, endpoint: str, completed: int, failures: Mapping[str, int]) -> None:
        """One call per shard commit (not per line)."""
        if completed:
            self.lines.labels(endpoint, "completed", "").inc(completed)
        for code, count in failures.items():
            self.lines.labels(endpoint, "failed", code).inc(count)

    def publish_engines(self, engines: Iterable[Any], now: float | None = None) -> None:
        self.engines.publish(engines, time.monotonic() if now is None else now)


@dataclass(slots=True)
class _Published:
    """What was last added to Prometheus for one engine, to add only the difference next time."""

    buckets: list[int] = field(default_factory=list)
    total_seconds: float = 0.0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    cached: int = 0
    preempted: int = 0
    at: float = 0.0


class EngineMetrics:
    def __init__(self) -> None:
        self.in_flight = Gauge("overnight_upstream_in_flight", "Requests in flight to the upstream",
                               ["upstream"], multiprocess_mode="livesum", registry=None)
        self.allowed = Gauge("overnight_upstream_concurrency_allowed", "Requests the adaptive limiter allows in "
                             "flight now", ["upstream"], multiprocess_mode="livesum", registry=None)
        self.maximum = Gauge("overnight_upstream_concurrency_max", "The configured ceiling (this process's share)",
                             ["upstream"], multiprocess_mode="livesum", registry=None)
        self.latency = Histogram("overnight_upstream_request_duration_seconds", "Upstream request latency, each "
                                 "attempt", ["upstream"], buckets=LATENCY_BUCKETS, registry=None)
        self.retries = Counter("overnight_upstream_retries_total", "Upstream requests retried", ["upstream"],
                               registry=None)
        self.errors = Counter("overnight_upstream_errors_total", "Failed upstream attempts by kind (http_STATUS, "
                              "timeout, unreachable)", ["upstream", "kind"], registry=None)
        self.tokens = Counter("overnight_embedded_generated_tokens_total", "Tokens generated by an embedded engine",
                              ["engine"], registry=None)
        self.tokens_per_second = Gauge("overnight_embedded_tokens_per_second", "Generation speed since the last "
                                       "heartbeat", ["engine"], multiprocess_mode="livesum", registry=None)
        self.busy_slots = Gauge("overnight_embedded_busy_slots", "Sequences being decoded together (batch "
                                "occupancy)", ["engine"], multiprocess_mode="livesum", registry=None)
        self.slots = Gauge("overnight_embedded_slots", "Sequences an embedded engine can decode together",
                           ["engine"], multiprocess_mode="livesum", registry=None)
        self.cached = Counter("overnight_embedded_cached_prompt_tokens_total", "Prompt tokens reused from the KV "
                              "cache instead of computed", ["engine"], registry=None)
        self.preempted = Counter("overnight_embedded_preempted_sequences_total", "Batch lines that gave their slot "
                                 "to an online request (each resumes where it stopped)", ["engine"], registry=None)
        self._published: dict[int, _Published] = {}

    def publish(self, engines: Iterable[Any], now: float) -> None:
        for engine in engines:
            last = self._published.setdefault(id(engine), _Published(at=now))
            stats = getattr(engine, "stats", None)
            if isinstance(stats, UpstreamStats):
                self._publish_upstream(engine, stats, last)
            elif isinstance(stats, EmbeddedStats):
                self._publish_embedded(engine.name, stats, last, now)
            last.at = now

    def _publish_upstream(self, engine: Any, stats: UpstreamStats, last: _Published) -> None:
        name = engine.name
        limiter = engine.limiter
        self.in_flight.labels(name).set(limiter.in_flight)
        self.allowed.labels(name).set(limiter.allowed)
        self.maximum.labels(name).set(limiter.ceiling)
        _add_latency(self.latency.labels(name), stats.latency, last)
        if stats.retries > last.retries:
            self.retries.labels(name).inc(stats.retries - last.retries)
            last.retries = stats.retries
        for kind, count in list(stats.errors.items()):
            before = last.errors.get(kind, 0)
            if count > before:
                self.errors.labels(name, kind).inc(count - before)
                last.errors[kind] = count

    def _publish_embedded(self, name: str, stats: EmbeddedStats, last: _Published, now: float) -> None:
        tokens, cached = stats.generated_tokens, stats.cached_prompt_tokens
        if tokens > last.tokens:
            self.tokens.labels(name).inc(tokens - last.tokens)
        if now > last.at:
            self.tokens_per_second.labels(name).set((tokens - last.tokens) / (now - last.at))
        if cached > last.cached:
            self.cached.labels(name).inc(cached - last.cached)
        if stats.preempted_sequences > last.preempted:
            self.preempted.labels(name).inc(stats.preempted_sequences - last.preempted)
        self.busy_slots.labels(name).set(stats.busy_slots)
        self.slots.labels(name).set(stats.total_slots)
        last.tokens, last.cached, last.preempted = tokens, cached, stats.preempted_sequences


def _add_latency(child: Histogram, counts: LatencyCounts, last: _Published) -> None:
    """Add the observations made since `last` to a histogram, in one write per bucket that moved.
    prometheus-client has no bulk observe; its child keeps one value per bucket (not cumulative)
    in `_buckets` and the sum in `_sum`, the layout `observe` itself writes."""
    buckets = list(counts.buckets)
    if not last.buckets:
        last.buckets = [0] * len(buckets)
    moved = False
    for i, (now_count, before) in enumerate(zip(buckets, last.buckets, strict=True)):
        if now_count > before:
            child._buckets[i].inc(now_count - before)
            moved = True
    if moved:
        child._sum.inc(counts.total_seconds - last.total_seconds)
    last.buckets, last.total_seconds = buckets, counts.total_seconds


class _StoreGauges(Collector):
    """Gauges read from the database at scrape time, so they are right whatever machine the
    workers run on: queue depth is a fact of the store, not of any process's memory."""

    def __init__(self, queued_lines: Callable[[], Mapping[str, int]],
                 open_batches: Callable[[], Mapping[str, int]]) -> None:
        self.queued_lines = queued_lines
        self.open_batches = open_batches

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily("overnight_queued_lines", "Lines of in-progress batches not run yet, by the "
                                   "batch's model ('unknown' until its first shard commits)", labels=["model"])
        for model, count in sorted(self.queued_lines().items()):
            queued.add_metric([model], count)
        yield queued
        batches = GaugeMetricFamily("overnight_open_batches", "Batches not yet in a terminal state, by state",
                                    labels=["status"])
        for status, count in sorted(self.open_batches().items()):
            batches.add_metric([status], count)
        yield batches


def render_metrics(metrics_dir: Path | None, queued_lines: Callable[[], Mapping[str, int]],
                   open_batches: Callable[[], Mapping[str, int]]) -> bytes:
    """The Prometheus text exposition of every process's values plus the store's gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if metrics_dir is not None:
        MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    registry.register(_StoreGauges(queued_lines, open_batches))
    return generate_latest(registry)
