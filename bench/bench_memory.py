"""Bounded memory: the server's peak RSS over its idle RSS while a file is uploaded, validated,
run and downloaded, for growing input sizes. The curve must be flat.

    ./dev bench bench_memory [--sizes 20M,200M,2G]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai

from harness import git_state, machine, overnight_process, rss_mb, save, upstream_process

UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    return int(float(text[:-1]) * UNITS[text[-1].upper()]) if text[-1].upper() in UNITS else int(text)


def write_input(path: Path, size: int) -> int:
    """Lines of ~2.1 KB (a long user message), so 2 GiB stays under the 1,000,000-request limit."""
    padding = "lorem ipsum dolor sit amet " * 76
    lines = 0
    written = 0
    with path.open("wb") as fh:
        while True:
            line = json.dumps({
                "custom_id": f"r{lines}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": f"{lines} {padding}"}]},
            }).encode() + b"\n"
            if written + len(line) > size:  # stay within the size (2G is exactly the upload limit)
                break
            fh.write(line)
            written += len(line)
            lines += 1
    return lines


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except FileNotFoundError:  # the server exited
                return
            time.sleep(0.05)


def measure(workdir: Path, upstream_url: str, size: int) -> dict[str, Any]:
    path = workdir / f"input-{size}.jsonl"
    lines = write_input(path, size)
    with overnight_process(workdir, upstream_url, "--shard-lines", "1000") as (base_url, proc):
        time.sleep(1.0)
        idle = rss_mb(proc.pid)
        sampler = RssSampler(proc.pid)
        sampler.start()
        client = openai.OpenAI(base_url=base_url, api_key="sk-bench", timeout=3600)
        start = time.perf_counter()
        with path.open("rb") as fh:
            file_id = client.files.create(file=fh, purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed", batch
        received = 0
        with client.files.with_streaming_response.content(batch.output_file_id) as resp:
            for chunk in resp.iter_bytes(1024 * 1024):
                received += len(chunk)
        elapsed = time.perf_counter() - start
        sampler.running = False
        sampler.join()
    path.unlink()
    return {"input_bytes": size, "lines": lines, "idle_rss_mb": round(idle, 1), "peak_rss_mb": round(sampler.peak, 1),
            "growth_mb": round(sampler.peak - idle, 1), "output_bytes": received, "seconds": round(elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20M,200M,2G")
    args = parser.parse_args()
    state = git_state()
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="overnight-mem-") as tmp:
        workdir = Path(tmp)
        with upstream_process(workdir) as (upstream_url, _upstream):
            for size_text in args.sizes.split(","):
                row = measure(workdir, upstream_url, parse_size(size_text))
                rows.append(row)
                print(f"{size_text:>6}: {row['lines']:>9,} lines  idle {row['idle_rss_mb']:6.1f} MB  peak "
                      f"{row['peak_rss_mb']:6.1f} MB  growth {row['growth_mb']:6.1f} MB  ({row['seconds']}s)")
    print(f"wrote {save('memory', {'git': state, 'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
