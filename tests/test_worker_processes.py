"""Worker processes report when they can claim work, so /health waits for them; a killed server's
relay directory does not outlive the next start."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import until
from overnight.settings import EmbeddedSettings, Settings
from overnight.worker.processes import (
    RELAY_DIR_PREFIX,
    RELAY_LOCK,
    WorkerProcesses,
    hold_relay_lock,
    remove_stale_relay_dirs,
)


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


def test_a_killed_servers_relay_directory_is_removed_by_the_next_start(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)  # a process that has exited: as a SIGKILLed server
    stale = tmp_path / f"{RELAY_DIR_PREFIX}{dead_pid}-abc123"
    stale.mkdir()
    (stale / "worker-0.sock").touch()
    live = tmp_path / f"{RELAY_DIR_PREFIX}{os.getpid()}-def456"  # a server that still runs
    live.mkdir()
    other = tmp_path / "overnight-results-xyz"  # not a relay directory
    other.mkdir()
    assert remove_stale_relay_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.is_dir() and other.is_dir()


def test_a_relay_directory_goes_by_its_lock_not_by_the_pid_in_its_name(tmp_path: Path) -> None:
    """A server in another PID namespace (a container sharing /tmp) may carry a pid that is dead, or
    someone else's, here: what counts is whether a live process holds the directory's lock."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    held = tmp_path / f"{RELAY_DIR_PREFIX}{dead_pid}-held"  # its owner runs, under another pid
    held.mkdir()
    released = tmp_path / f"{RELAY_DIR_PREFIX}{os.getpid()}-released"  # its owner was killed
    released.mkdir()
    os.close(hold_relay_lock(str(released)))  # the lock file stays, unlocked, as a SIGKILL leaves it
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from overnight.worker.processes import hold_relay_lock; "
         f"hold_relay_lock({str(held)!r}); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "locked\n"
        assert sorted(p.name for p in held.iterdir()) == [RELAY_LOCK]
        assert remove_stale_relay_dirs(str(tmp_path)) == [str(released)]
        assert held.is_dir() and not released.exists()
    finally:
        owner.kill()
        owner.wait()
    assert remove_stale_relay_dirs(str(tmp_path)) == [str(held)]  # its owner is gone now


def test_worker_processes_sweep_the_temporary_directory_and_remove_their_own_on_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"{RELAY_DIR_PREFIX}999999999-abc123"  # above any pid Linux hands out
    stale.mkdir()
    settings = Settings(data_dir=tmp_path / "data", embedded=EmbeddedSettings(enabled=False))
    workers = WorkerProcesses(settings, 1)
    own = Path(workers.relay_paths[0]).parent
    assert not stale.exists()
    assert own.name.startswith(f"{RELAY_DIR_PREFIX}{os.getpid()}-") and own.is_dir()
    assert remove_stale_relay_dirs(str(tmp_path)) == []  # its own lock keeps it
    workers.stop()
    assert not own.exists()
