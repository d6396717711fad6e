"""How many KV slots the memory holds: the default's 3 GB on a smaller machine got the worker
killed by the kernel at every start, with nothing in the log to say why."""

from __future__ import annotations

from pathlib import Path

from overnight.engines.llama.kv_budget import KV_SHARE, available_memory_bytes, slots_that_fit

SLOT = 2048 * 23040  # 2,048 cells of SmolLM2's 23,040 bytes


def test_slots_shrink_to_what_the_available_memory_holds_never_below_one() -> None:
    assert slots_that_fit(64, 2048, 23040, available=10 * 1024**3) == 64  # 3 GB of KV in 7.5 GB: all
    assert slots_that_fit(64, 2048, 23040, available=int(10 * SLOT / KV_SHARE) + 1) == 10
    assert slots_that_fit(64, 2048, 23040, available=int(10 * SLOT / KV_SHARE) - 1) == 9
    assert slots_that_fit(64, 2048, 23040, available=1024) == 1  # not even one: one (llama.cpp decides)
    assert slots_that_fit(64, 2048, 23040, available=None) == 64  # not Linux: as configured


def test_available_memory_is_the_kernels_memavailable(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:    2000000 kB\n")
    assert available_memory_bytes(meminfo) == 2_000_000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")  # a kernel before 3.14
    assert available_memory_bytes(meminfo) is None
    assert available_memory_bytes(tmp_path / "missing") is None
    assert (available_memory_bytes() or 1) > 0  # this machine's
