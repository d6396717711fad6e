"""Throughput against batch size: overnight end to end and the raw aiohttp ceiling, for growing
batches against the same fast upstream, in one run. Then draws docs/performance.svg from this and
the memory benchmark's result (bench/results/memory.json, if present).

    ./dev bench bench_sizes [--sizes 1000,5000,20000,50000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_orchestration import overnight_run, raw_client, run_on_fastest_loop
from harness import RESULTS, machine, overnight_process, save, upstream_process, write_chat_batch

SVG = Path(__file__).parent.parent / "docs" / "performance.svg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,20000,50000")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="overnight-sizes-") as tmp:
        workdir = Path(tmp)
        with upstream_process(workdir) as upstream_url, \
                overnight_process(workdir, upstream_url) as (base_url, _proc):
            # Warm up first: the worker process is still starting when /health first answers, and
            # connections and the adaptive limiter start cold; the smallest size would pay for it.
            warm = write_chat_batch(workdir / "warm-up.jsonl", 2000)
            run_on_fastest_loop(raw_client(upstream_url, 2000))
            overnight_run(base_url, warm, 2000)
            for size in sizes:
                path = write_chat_batch(workdir / f"in-{size}.jsonl", size)
                raw = run_on_fastest_loop(raw_client(upstream_url, size))
                ours = overnight_run(base_url, path, size)["lines_per_s"]
                rows.append({"lines": size, "overnight_lines_per_s": round(ours), "raw_lines_per_s": round(raw)})
                print(f"{size:>7,} lines: overnight {ours:8,.0f} lines/s, raw aiohttp {raw:8,.0f} lines/s "
                      f"({ours / raw:.2f})")
    print(f"wrote {save('sizes', {'rows': rows})}")
    memory_file = RESULTS / "memory.json"
    memory = json.loads(memory_file.read_text())["rows"] if memory_file.exists() else []
    SVG.parent.mkdir(exist_ok=True)
    SVG.write_text(draw(rows, memory))
    print(f"wrote {SVG}")


def _panel(x0: int, title: str, xs: list[float], series: list[tuple[str, str, list[float]]], xlabel: str,
           ylabel: str, xticks: list[str], ymax_at_least: float = 0.0) -> str:
    """A small log-x line chart: 360 x 220 at (x0, 0)."""
    import math

    w, h, left, top = 300, 160, 60, 30
    ymax = max(ymax_at_least, max(max(v) for _, _, v in series)) * 1.15 or 1
    lx = [math.log10(x) for x in xs]
    lo, hi = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1

    def px(x: float) -> float:
        return x0 + left + (math.log10(x) - lo) / (hi - lo) * w

    def py(y: float) -> float:
        return top + h - y / ymax * h

    parts = [f'<text x="{x0 + left + w / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>',
             f'<line x1="{x0 + left}" y1="{top + h}" x2="{x0 + left + w}" y2="{top + h}" stroke="#333"/>',
             f'<line x1="{x0 + left}" y1="{top}" x2="{x0 + left}" y2="{top + h}" stroke="#333"/>',
             f'<text x="{x0 + left + w / 2}" y="{top + h + 34}" text-anchor="middle">{xlabel}</text>',
             f'<text x="{x0 + 14}" y="{top + h / 2}" text-anchor="middle" '
             f'transform="rotate(-90 {x0 + 14} {top + h / 2})">{ylabel}</text>']
    for x, label in zip(xs, xticks, strict=True):
        parts.append(f'<text x="{px(x):.1f}" y="{top + h + 16}" text-anchor="middle" font-size="11">{label}</text>')
    for frac in (0.0, 0.5, 1.0):
        y = ymax / 1.15 * frac
        parts.append(f'<text x="{x0 + left - 6}" y="{py(y) + 4:.1f}" text-anchor="end" font-size="11">{y:,.0f}</text>')
    for i, (name, colour, values) in enumerate(series):
        points = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in zip(xs, values, strict=True))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{colour}"/>'
                  for x, v in zip(xs, values, strict=True)]
        parts.append(f'<text x="{x0 + left + 8}" y="{top + 14 + 14 * i}" fill="{colour}" font-size="11">{name}</text>')
    return "\n".join(parts)


def _size(n: float) -> str:
    return f"{n / 2**30:,.0f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def draw(rows: list[dict[str, float]], memory: list[dict[str, float]]) -> str:
    panels = []
    if rows:
        xs = [r["lines"] for r in rows]
        panels.append(_panel(0, "Throughput against batch size", xs, [
            ("raw aiohttp client (ceiling)", "#999", [r["raw_lines_per_s"] for r in rows]),
            ("overnight, end to end", "#1f6feb", [r["overnight_lines_per_s"] for r in rows]),
        ], "lines in the batch", "lines/s", [f"{x:,.0f}" for x in xs]))
    if memory:
        xs = [r["input_bytes"] for r in memory]
        panels.append(_panel(380, "Server memory against input size", xs, [
            ("peak RSS growth over idle (goal: under 200 MB)", "#d1242f", [r["growth_mb"] for r in memory]),
        ], "input file size", "MB", [_size(x) for x in xs], ymax_at_least=200))
    body = "\n".join(panels)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="760" height="240" font-family="sans-serif" '
            f'font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


if __name__ == "__main__":
    main()
