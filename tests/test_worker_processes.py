"""Worker processes report when they can claim work, so /health waits for them; a killed server's
relay directory does not outlive the next start; a worker that only feeds upstreams yields the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import owned_elsewhere, serve_refused, until
from overnight import constants as C
from overnight.files.owned_dirs import OWNER_LOCK, hold_ownership
from overnight.settings import EmbeddedSettings, Settings, WorkerSettings
from overnight.worker import processes as processes_module
from overnight.worker.processes import (
    FEEDER_NICE,
    RELAY_DIR_PREFIX,
    WorkerProcesses,
    changes_in,
    remove_stale_relay_dirs,
    restart_delay,
    wake_message,
    worker_niceness,
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


@contextlib.contextmanager
def one_ready_worker(tmp_path: Path) -> Iterator[WorkerProcesses]:
    """One worker process (no engines), started and ready; stopped afterwards."""
    workers = WorkerProcesses(Settings(data_dir=tmp_path / "data", embedded=EmbeddedSettings(enabled=False)), 1)
    workers.start()
    try:
        until(workers.ready, timeout=60)
        yield workers
    finally:
        workers.stop()


def test_a_dead_worker_process_is_not_ready(tmp_path: Path) -> None:
    """Between a worker's death and its restart (the supervisor looks every 2 s), /health said 200:
    its `ready` event stays set after it dies."""
    with one_ready_worker(tmp_path) as workers:
        process = workers._workers[0].process
        process.kill()
        process.join(10)
        assert not workers.ready()


def test_a_worker_that_exited_0_waits_for_the_server_to_stop_and_is_replaced_if_it_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C reaches the whole process group (systemd signals the whole service): the workers
    stop (exit 0) before the server does, and a supervisor that replaced them at once started new
    ones that loaded their engines and claimed shards only to be stopped. But a worker stopped alone
    (`kill PID`) was never replaced: the server ran without it for good."""
    with one_ready_worker(tmp_path) as workers:
        first = workers._workers[0].process
        first.terminate()
        first.join(30)
        assert first.exitcode == 0

        def supervise_for(seconds: float) -> None:
            async def main() -> None:
                stop = asyncio.Event()
                asyncio.get_running_loop().call_later(seconds, stop.set)
                await workers.supervise(stop)

            asyncio.run(main())

        supervise_for(4.5)  # the server stops within the wait (two of the supervisor's looks)
        assert workers._workers[0].process is first
        monkeypatch.setattr(processes_module, "STOPPED_ALONE_DELAY", 1.0)
        workers._workers[0].restart_at = None
        supervise_for(4.5)  # it does not: the worker is replaced
        assert workers._workers[0].process is not first
        until(workers.ready, timeout=60)


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def test_a_ctrl_c_while_requests_finish_does_not_restart_the_workers(tmp_path: Path) -> None:
    """Ctrl-C reaches the workers (they exit 0 at once) and the server, which lets the requests in
    flight finish before it stops supervising. Past the wait for a worker stopped alone, the
    supervisor started new workers for a server on its way out; the server's signal handler now
    tells it at once."""
    from conftest import free_port, wait_http

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "overnight", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--api-key", "sk-test", "--no-embedded"],
        stdout=(tmp_path / "server.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server, tmp_path / "server.log")
        workers = _children(server.pid)
        # An upload whose body trickles in: uvicorn lets it finish before the server stops.
        upload = socket.create_connection(("127.0.0.1", port))
        upload.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
                       b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
        time.sleep(0.5)
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in its terminal
        deadline = time.monotonic() + processes_module.STOPPED_ALONE_DELAY + 4  # two of the supervisor's looks more
        while time.monotonic() < deadline:
            upload.sendall(b"x" * 16)
            assert _children(server.pid) <= workers, "a worker was started while the server was stopping"
            assert server.poll() is None, "the server stopped before the upload ended: nothing was tested"
            time.sleep(0.5)
        upload.close()
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def test_a_crash_looping_worker_is_restarted_ever_more_slowly() -> None:
    """A worker dying at start (a model that does not load) was restarted every 2 s for ever."""
    delays = [0.0]
    for _ in range(10):
        delay = restart_delay(1, lived=3.0, previous=delays[-1])
        assert delay is not None
        delays.append(delay)
    assert delays[1:5] == [2.0, 4.0, 8.0, 16.0] and delays[-1] == 300.0
    assert restart_delay(-9, lived=3600.0, previous=300.0) == 0.0  # one that ran a while: at once
    assert restart_delay(0, lived=3.0, previous=0.0) == processes_module.STOPPED_ALONE_DELAY  # asked to stop


def test_waking_a_worker_that_does_not_read_never_blocks(tmp_path: Path) -> None:
    """`notify` runs on the API's request threads: once a stuck worker's pipe filled (13,104
    wakes), each batch create or cancel blocked a thread, then every sync route stopped answering."""
    with one_ready_worker(tmp_path) as workers:
        pid = workers._workers[0].process.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it reads nothing from now on
        try:
            sender = threading.Thread(target=lambda: [workers.notify(C.CHANGE_CREATED) for _ in range(30_000)],
                                      daemon=True)
            started = time.monotonic()
            sender.start()
            sender.join(30)
            assert not sender.is_alive(), "notify blocked on a full pipe"
            assert time.monotonic() - started < 30
        finally:
            os.kill(pid, signal.SIGCONT)


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
    os.close(hold_ownership(str(released)))  # the lock file stays, unlocked, as a SIGKILL leaves it
    with owned_elsewhere(held):
        assert sorted(p.name for p in held.iterdir()) == [OWNER_LOCK]
        assert remove_stale_relay_dirs(str(tmp_path)) == [str(released)]
        assert held.is_dir() and not released.exists()
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


def _niceness(pid: int = 0) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)  # on Linux: that process's main thread


@pytest.mark.parametrize(("configured", "added"), [(None, FEEDER_NICE), (0, 0), (3, 3)])
def test_a_worker_process_without_the_embedded_engine_yields_the_cpu_as_configured(
    tmp_path: Path, configured: int | None, added: int
) -> None:
    # A worker that only feeds HTTP upstreams runs below the API and any model server on the box.
    settings = Settings(data_dir=tmp_path / "data", embedded=EmbeddedSettings(enabled=False),
                        worker=WorkerSettings(nice=configured))
    workers = WorkerProcesses(settings, 1)
    workers.start()
    try:
        until(workers.ready, timeout=60)
        assert _niceness(workers._workers[0].process.pid or 0) == min(_niceness() + added, 19)
    finally:
        workers.stop()


def test_a_worker_with_the_embedded_engine_keeps_its_priority_unless_configured() -> None:
    embedded = Settings(embedded=EmbeddedSettings(enabled=True))
    assert worker_niceness(embedded) == 0  # it runs the model: it is the work
    assert worker_niceness(replace(embedded, worker=WorkerSettings(nice=5))) == 5
    assert worker_niceness(Settings(embedded=EmbeddedSettings(enabled=False))) == FEEDER_NICE


def test_a_standalone_worker_yields_the_cpu_too(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "overnight", "worker", "--data-dir", str(tmp_path / "data"),
                             "--no-embedded"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: proc.poll() is not None or _niceness(proc.pid) == min(_niceness() + FEEDER_NICE, 19),
              timeout=60)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(("value", "says"), [
    ("25", "use a whole number from 0 to 19"), ("-1", "use a whole number from 0 to 19"),
    ('"low"', "worker.nice must be a whole number, not 'low'"), ("true", "worker.nice must be a whole number")])
def test_a_bad_worker_niceness_stops_the_server_with_what_to_fix(tmp_path: Path, value: str, says: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"[worker]\nnice = {value}\n")
    stderr = serve_refused("--data-dir", str(tmp_path / "data"), "--no-embedded", "--config", str(config))
    assert "nice" in stderr and says in stderr


def test_every_wake_kind_crosses_the_pipe_as_itself() -> None:
    """What the API process writes down a worker's wake pipe reads back as the same change; several
    at once wake for each once, a cancel first. (A wrong byte would cost a poll interval: a batch
    created in progress woken as `created` claims batch-level work for nothing, one as `started`
    after a cancel would not bring the heartbeat forward.)"""
    kinds = (C.CHANGE_CREATED, C.CHANGE_STARTED, C.CHANGE_CANCELLED)
    assert len({wake_message(kind) for kind in kinds}) == len(kinds)
    for kind in kinds:
        assert changes_in({wake_message(kind)}) == [kind]
    assert changes_in({wake_message(kind) for kind in kinds})[0] == C.CHANGE_CANCELLED
    assert changes_in({wake_message("something new")}) == [C.CHANGE_CREATED]  # an unknown kind: look for all work
