"""Claims shards and batch-level tasks, runs them through the engines, commits under leases."""

from overnight.worker.shard_runner import ShardRunner, ShardState
from overnight.worker.worker import Worker

__all__ = ["ShardRunner", "ShardState", "Worker"]
