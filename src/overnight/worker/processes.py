"""Worker processes beside the API process. `overnight serve` runs its worker in a child process by
default: the API's event loop then stays free for requests (measured p99 of GET /v1/batches/{id}
while a batch ran: 72 ms with the worker in the same process), and the worker gets a core of its own.

Children die with the parent (PR_SET_PDEATHSIG on Linux, and a parent-pid watch elsewhere), so a
SIGKILLed server leaves no worker behind; their leases expire and the next start takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

from overnight import constants as C
from overnight.files.owned_dirs import abandoned, hold_ownership
from overnight.runtime import exit_now, freeze_startup_objects, run_on_fastest_loop
from overnight.settings import Settings

log = logging.getLogger("overnight.workers")

_PR_SET_PDEATHSIG = 1
# What a worker that only feeds HTTP upstreams adds to its niceness unless `[worker] nice` says.
FEEDER_NICE = 10
# What the parent writes down a worker's wake pipe: which C.CHANGE_* happened.
_CREATED = b"!"
_STARTED = b"+"
_CANCELLED = b"x"
_MESSAGES = {C.CHANGE_CREATED: _CREATED, C.CHANGE_STARTED: _STARTED, C.CHANGE_CANCELLED: _CANCELLED}
# A cancel first: it also brings the heartbeat forward, which tells running shards to stop.
_WAKE_ORDER = (C.CHANGE_CANCELLED, C.CHANGE_CREATED, C.CHANGE_STARTED)


def wake_message(change: str) -> bytes:
    """The byte the parent writes down a worker's wake pipe for a C.CHANGE_* (unknown: created)."""
    return _MESSAGES.get(change, _CREATED)


def changes_in(messages: set[bytes]) -> list[str]:
    """The C.CHANGE_* kinds a worker read from its wake pipe (each once), in the order to wake for."""
    return [change for change in _WAKE_ORDER if _MESSAGES[change] in messages]
RELAY_DIR_PREFIX = "overnight-relay-"


# A worker that dies within this long of its start is crash-looping (a model that does not load,
# an engine that fails at start): each restart waits twice as long as the one before, from 2 s to
# 5 minutes, instead of reloading the model every 2 s for ever.
_STABLE_SECONDS = 60.0
_FIRST_RESTART_DELAY = 2.0
_MAX_RESTART_DELAY = 300.0
# A worker that exited 0 was asked to stop. Usually the server is stopping too (a Ctrl-C reaches the
# whole process group; systemd signals every process of the service): its signal handler tells the
# supervisor at once (`server_stopping`), and this wait covers a signal that reached the worker a
# moment earlier. Restarted at once, the worker loaded its engines and claimed shards only to be stopped.
# A worker stopped alone (`kill PID`) is replaced after it: never replacing it left the server
# without that worker, or any, for good.
STOPPED_ALONE_DELAY = 10.0


def restart_delay(exitcode: int | None, lived: float, previous: float) -> float:
    """How long to wait before replacing a worker that exited after `lived` seconds (`previous`:
    the wait before its own start)."""
    if exitcode == 0:
        return STOPPED_ALONE_DELAY
    if lived >= _STABLE_SECONDS:
        return 0.0
    return min(max(2 * previous, _FIRST_RESTART_DELAY), _MAX_RESTART_DELAY)


@dataclass(slots=True)
class _Child:
    process: BaseProcess
    wake: Connection  # the parent's end: a byte says "new work"
    ready: Event  # set by the child once it can claim work
    index: int  # which relay socket is its (a restarted worker takes over the socket of the one it replaces)
    started: float = 0.0  # time.monotonic() at its start
    delay: float = 0.0  # how long its start waited after the worker it replaces died
    restart_at: float | None = None  # when it is replaced, once it has died


class WorkerProcesses:
    """Starts, watches (restarts a crashed one) and stops `count` worker processes; `notify()`
    wakes them when a batch is created or cancelled, so they need not wait for their next poll."""

    def __init__(self, settings: Settings, count: int) -> None:
        worker_niceness(settings)  # a bad `[worker] nice` stops the server here, not in each child
        self.settings = settings
        self.count = count
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Child] = []
        self._stopping = False
        # The workers' sockets for online requests (online/relay.py), in a directory of this user's
        # only (mkdtemp makes it 0700) and with a short path (a socket path has ~100 bytes at most).
        # A SIGKILLed server cannot remove its directory, the next start does: the directory holds a
        # lock file this process keeps locked while it lives (remove_stale_relay_dirs).
        remove_stale_relay_dirs()
        self._relay_dir = tempfile.mkdtemp(prefix=f"{RELAY_DIR_PREFIX}{os.getpid()}-")
        self._relay_lock = hold_ownership(self._relay_dir)
        self.relay_paths = [os.path.join(self._relay_dir, f"worker-{i}.sock") for i in range(count)]

    def start(self) -> None:
        for i in range(self.count):
            self._workers.append(self._spawn(i))

    def _spawn(self, index: int, delay: float = 0.0) -> _Child:
        reader, writer = self._context.Pipe(duplex=False)
        # A worker that does not read (stuck loading a model, stopped) must not block `notify`,
        # which runs on the API's request threads: a full pipe drops the byte instead (the bytes
        # already in it wake the worker). A one-byte message is one atomic write.
        os.set_blocking(writer.fileno(), False)
        ready = self._context.Event()
        process = self._context.Process(
            target=worker_main, args=(self.settings, reader, os.getpid(), ready, self.relay_paths[index]),
            name="overnight-worker", daemon=True,
        )
        process.start()
        reader.close()
        return _Child(process, writer, ready, index, started=time.monotonic(), delay=delay)

    def server_stopping(self) -> None:
        """A stop signal reached the server (called from its signal handler): the workers got it
        too, and one that exits now is not replaced, however long the server takes to finish the
        requests in flight."""
        self._stopping = True

    def ready(self) -> bool:
        """Whether every worker process has started (its engines loaded) and can claim work: until
        then /health answers 503, so whoever waits for it does not time the workers' start-up, and
        again while a dead one waits for its restart (its `ready` event stays set)."""
        return all(child.ready.is_set() and child.process.is_alive() for child in self._workers)

    def notify(self, change: str) -> None:
        message = wake_message(change)
        for child in self._workers:
            with contextlib.suppress(OSError, ValueError):  # BlockingIOError: its pipe is full
                child.wake.send_bytes(message)

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart a worker that died (a crash in an engine, the OOM killer) until `stop`."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
            for i, child in enumerate(self._workers):
                if child.process.is_alive() or self._stopping or stop.is_set():
                    continue
                now = time.monotonic()
                if child.restart_at is None:
                    delay = restart_delay(child.process.exitcode, now - child.started, child.delay)
                    if child.process.exitcode == 0:
                        log.warning("worker process %s stopped (exit 0) while the server runs; starting another "
                                    "in %.0f s unless the server stops", child.process.pid, delay)
                    else:
                        log.error("worker process %s exited with %s; starting another%s", child.process.pid,
                                  child.process.exitcode, f" in {delay:.0f} s" if delay else "")
                        child.delay = delay  # a crash loop's backoff grows from it
                    child.restart_at = now + delay
                if now >= child.restart_at:
                    child.wake.close()
                    self._forget(child)
                    self._workers[i] = self._spawn(child.index, child.delay)

    def stop(self, timeout: float = 20.0) -> None:
        self._stopping = True
        for child in self._workers:
            if child.process.is_alive():
                child.process.terminate()  # SIGTERM: the worker stops claiming and lets in-flight work go
        for child in self._workers:
            child.process.join(timeout)
            if child.process.is_alive():
                child.process.kill()
                child.process.join(5)
            child.wake.close()
            self._forget(child)
        self._workers.clear()
        shutil.rmtree(self._relay_dir, ignore_errors=True)
        if self._relay_lock >= 0:
            os.close(self._relay_lock)
            self._relay_lock = -1

    def _forget(self, child: _Child) -> None:
        """Drop a gone worker's live gauges from the metrics (its counters stay counted)."""
        if child.process.pid is not None and self.settings.metrics_dir is not None:
            from overnight.observability.metrics import forget_process

            forget_process(child.process.pid, self.settings.metrics_dir)


def remove_stale_relay_dirs(parent: str | None = None) -> list[str]:
    """Remove the relay directories (under `parent`, the temporary directory by default) that this
    user's servers left when they were killed: those no process owns (files/owned_dirs.py).
    Returns what was removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            if not entry.name.startswith(RELAY_DIR_PREFIX):
                continue
            with contextlib.suppress(OSError):
                if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                if abandoned(entry.path, entry.name.removeprefix(RELAY_DIR_PREFIX).partition("-")[0]):
                    shutil.rmtree(entry.path)
                    removed.append(entry.path)
    return removed


def worker_main(settings: Settings, wake: Connection, parent_pid: int, ready: Event | None = None,
                relay_path: str | None = None) -> None:
    """Entry point of a worker process (a top-level function, so `spawn` can import it)."""
    _die_with_parent()
    from overnight.observability.logs import configure_logging

    configure_logging(settings.log_format, process="worker")
    yield_cpu(settings)
    run_on_fastest_loop(run_worker(settings, wake, parent_pid, ready, relay_path=relay_path))
    exit_now(0)


def worker_niceness(settings: Settings) -> int:
    """What a worker process adds to its niceness (`[worker] nice`, checked)."""
    nice = settings.worker.nice
    if nice is None:
        return 0 if settings.embedded.enabled else FEEDER_NICE
    if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
        from overnight.wiring.core import ConfigurationError

        raise ConfigurationError(f"[worker] nice = {nice!r}: use a whole number from 0 to 19")
    return nice


def yield_cpu(settings: Settings) -> int:
    """Add `worker_niceness` to this process's niceness; call it before the worker starts threads
    (they inherit it: on Linux niceness is per thread). Returns the niceness now."""
    return os.nice(worker_niceness(settings))


async def run_worker(
    settings: Settings, wake: Connection | None = None, parent_pid: int | None = None, ready: Event | None = None,
    metrics_address: tuple[str, int] | None = None, relay_path: str | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT (or until the parent process is gone). `metrics_address`:
    serve this worker's metrics there (a worker on its own machine; under `serve`, the API does).
    `relay_path`: answer the API process's online requests at this socket, on this worker's engines."""
    from overnight.wiring import build_core, build_router, build_worker

    core = build_core(settings)  # no authenticator, rate limiter or API services in a worker
    router = build_router(settings)
    worker = build_worker(core, router)
    exporter = None
    if metrics_address is not None:
        from overnight.observability.exporter import MetricsExporter

        exporter = MetricsExporter(*metrics_address, settings.metrics_dir, core.store.gauges.queued_lines_by_model,
                                   core.store.gauges.open_batches_by_status)
        exporter.start()
    for engine in router.engines():
        await engine.start()
    relay = None
    if relay_path is not None:
        from overnight.online import OnlineService, RelayServer

        relay = RelayServer(OnlineService(router), relay_path)
        await relay.start()
    freeze_startup_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def drain() -> None:
        assert wake is not None
        messages = set()
        try:
            while wake.poll():
                messages.add(wake.recv_bytes())
        except (EOFError, OSError):  # the parent is gone
            loop.remove_reader(wake.fileno())
            stop.set()
            return
        for change in changes_in(messages):
            worker.wake(change)

    if wake is not None:
        loop.add_reader(wake.fileno(), drain)

    async def watch_parent() -> None:
        while parent_pid is None or os.getppid() == parent_pid:
            await asyncio.sleep(1.0)
        stop.set()

    watcher = asyncio.create_task(watch_parent())
    if ready is not None:
        ready.set()
    try:
        await worker.run(stop)
    finally:
        watcher.cancel()
        if relay is not None:
            await relay.close()
        for engine in router.engines():
            await engine.close()
        if exporter is not None:
            exporter.stop()
        core.close()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

