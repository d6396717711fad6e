"""Worker processes report when they can claim work, so /health waits for them."""

from __future__ import annotations

from pathlib import Path

from conftest import until
from overnight.settings import EmbeddedSettings, Settings
from overnight.worker.processes import WorkerProcesses


def test_a_worker_process_reports_ready_once_started_and_stops_cleanly(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", embedded=EmbeddedSettings(enabled=False))
    workers = WorkerProcesses(settings, 1)
    workers.start()
    processes = [child.process for child in workers._workers]
    try:
        assert not workers.ready()  # a spawned interpreter takes far longer than this to import
        until(workers.ready, timeout=60)
    finally:
        workers.stop()
    assert [process.exitcode for process in processes] == [0]  # SIGTERM: a graceful stop
