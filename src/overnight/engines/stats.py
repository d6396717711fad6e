"""What engines count about themselves, in plain numbers: an engine's hot path adds to an int
(~0.2 us), never to a Prometheus metric (a multiprocess histogram observation costs ~6 us, a
counter ~1.5 us: measurable at 20,000 lines/s). The worker publishes the totals to Prometheus
every heartbeat (observability/metrics.py), as differences since the last publication."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds (seconds) of the upstream latency histogram; the last bucket is +Inf.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(slots=True)
class LatencyCounts:
    """A histogram kept as per-bucket counts (not cumulative) and a sum."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total_seconds: float = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total_seconds += seconds


@dataclass(slots=True)
class UpstreamStats:
    """One upstream's numbers since the process started."""

    latency: LatencyCounts = field(default_factory=LatencyCounts)  # every attempt that got an answer or failed
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # kind ("http_429", "timeout", ...) -> attempts

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass(slots=True)
class EmbeddedStats:
    """An embedded engine's numbers since it started, written by its decode thread (plain int
    additions, which the GIL keeps whole) and read by the worker's heartbeat."""

    generated_tokens: int = 0
    cached_prompt_tokens: int = 0
    busy_slots: int = 0
    aborted_steps: int = 0  # decode calls given up for an online request (redone after its prompt)
    moved_sequences: int = 0  # running sequences moved to another slot to keep generation in one micro-batch
    preempted_sequences: int = 0  # batch lines that gave their slot to an online request (and resumed later)
    total_slots: int = 1
