"""Shared pieces of the benchmarks: processes on 127.0.0.1, input files, machine info, result files."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
TICK = os.sysconf("SC_CLK_TCK")  # the unit of the CPU times in /proc
SYSTEM_A = "You are a helpful assistant that answers questions about geography."
SYSTEM_B = "Answer in one short sentence. Do not add any explanation."


def machine() -> dict[str, Any]:
    """The machine, with the SIMD extensions llama.cpp's kernels depend on: machines that both report
    "AMD EPYC" ran the same benchmark at 310 and 600 tokens/s, one with AVX-512 and one without."""
    cpu, flags = platform.processor() or "", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first CPU's lines
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpus": os.cpu_count(), "simd": simd}


def chat_request_line(i: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    """A line shaped like an OpenAI batch file: two system messages and a question."""
    return {
        "custom_id": f"request-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM_A},
                {"role": "system", "content": SYSTEM_B},
                {"role": "user", "content": f"What is the capital of country number {i}?"},
            ],
            "max_tokens": 64,
        },
    }


def write_chat_batch(path: Path, lines: int) -> Path:
    with path.open("wb") as fh:
        for i in range(lines):
            fh.write(json.dumps(chat_request_line(i)).encode() + b"\n")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready")


@contextmanager
def process(args: list[str], ready_url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_ready(ready_url)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def upstream_process(workdir: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    args = [sys.executable, "-m", "overnight.testing.upstream_server", "--port", str(port), *extra]
    with process(args, f"http://127.0.0.1:{port}/stats", workdir / "upstream.log") as proc:
        yield f"http://127.0.0.1:{port}/v1", proc


@contextmanager
def overnight_process(workdir: Path, upstream_url: str, *extra: str, key: str = "sk-bench") -> Iterator[Any]:
    port = free_port()
    data = workdir / f"data-{port}"
    args = [sys.executable, "-m", "overnight", "serve", "--port", str(port), "--data-dir", str(data),
            "--upstream", f"*={upstream_url}", "--api-key", key, "--no-embedded", *extra]
    with process(args, f"http://127.0.0.1:{port}/health", workdir / f"overnight-{port}.log") as proc:
        yield f"http://127.0.0.1:{port}/v1", proc


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the server's worker processes)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with suppress(FileNotFoundError):  # the child just exited
                total += rss_mb(int(child))
    return total


# -- CPU accounting from /proc (Linux) ---------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state, 1 the parent)."""
    return _stat_of(f"/proc/{pid}/stat")


def _stat_of(path: str) -> list[str] | None:
    try:
        raw = Path(path).read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def own_ticks(pid: int) -> int:
    fields = _stat(pid)
    return 0 if fields is None else int(fields[11]) + int(fields[12])


def tree_ticks(pid: int) -> int:
    """CPU of a process and all its descendants, the exited ones included (their time is in the
    parent's cutime/cstime once it has waited for them, as the postmaster does)."""
    fields = _stat(pid)
    if fields is None:
        return 0
    total = sum(int(f) for f in fields[11:15])
    return total + sum(tree_ticks(child) for child in children(pid))


def thread_ticks(pid: int, descendants: bool = True) -> dict[int, int]:
    """CPU ticks of each live thread of a process (and its descendants), by thread id: which thread
    is busy (a Python event loop, an HTTP client's I/O thread), not only how busy the process is."""
    ticks = {}
    for tid in _threads(pid):
        fields = _stat_of(f"/proc/{pid}/task/{tid}/stat")
        if fields is not None:
            ticks[tid] = int(fields[11]) + int(fields[12])
    if descendants:
        for child in children(pid):
            ticks |= thread_ticks(child)
    return ticks


def _threads(pid: int) -> list[int]:
    try:
        return [int(entry.name) for entry in os.scandir(f"/proc/{pid}/task")]
    except OSError:
        return []


def busiest_thread_cores(before: dict[int, int], after: dict[int, int], wall: float) -> float:
    """Cores used by the busiest thread between two `thread_ticks` snapshots (1.0: saturated)."""
    used = [ticks - before.get(tid, 0) for tid, ticks in after.items()]
    return round(max(used, default=0) / TICK / wall, 3)


def machine_busy_ticks() -> int:
    """Busy ticks of all CPUs together (/proc/stat: user nice system irq softirq steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[0] + values[1] + values[2] + values[5] + values[6] + values[7]


def cpu_snapshot(groups: dict[str, Callable[[], int]]) -> dict[str, int]:
    return {name: read() for name, read in groups.items()} | {"machine": machine_busy_ticks()}


def cpu_use(before: dict[str, int], after: dict[str, int], wall: float) -> dict[str, dict[str, float]]:
    """CPU seconds and cores (seconds / wall) per group, and `other`: what the rest of the machine used."""
    out = {}
    for name in before:
        seconds = (after[name] - before[name]) / TICK
        out[name] = {"cpu_s": round(seconds, 3), "cores": round(seconds / wall, 3)}
    ours = sum(v["cpu_s"] for k, v in out.items() if k != "machine")
    other = max(0.0, out["machine"]["cpu_s"] - ours)
    out["other"] = {"cpu_s": round(other, 3), "cores": round(other / wall, 3)}
    return out


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    return path


def git_state() -> dict[str, Any]:
    """The commit the benchmark runs on and whether the tree has uncommitted changes (result files
    aside: a benchmark writes its own). Take it at the start of a run."""
    root = Path(__file__).parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False).stdout.strip()

    changed = [line for line in git("status", "--porcelain").splitlines() if "bench/results/" not in line]
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed), "changed": changed}


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    """Median and min-max of a list of samples."""
    return {"median": round(median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
