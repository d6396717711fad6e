"""How many sequence slots' KV cache this machine's memory holds.

llama.cpp allocates the whole KV cache when the context is created and clears it, touching every
page: on a machine with less free memory than the defaults ask for (64 slots of 2,048 cells, ~3 GB
for SmolLM2) the kernel's OOM killer ended the worker, which was restarted into the same death,
with nothing in the log to say why. The engine keeps each slot's cells (the longest request that
fits is the same) and takes fewer slots instead, saying so.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# The part of the memory available at start that the KV cache may take: the rest is for the model's
# weights (mapped from the file, but resident while decoding), the other engines, the Python process.
KV_SHARE = 0.75


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's estimate of the memory available to a new allocation without swapping
    (MemAvailable), or None where it does not say (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def slots_that_fit(n_seq_max: int, cells_per_slot: int, cell_bytes: int, available: int | None) -> int:
    """How many of `n_seq_max` slots of `cells_per_slot` KV cells (`cell_bytes` each) fit in
    KV_SHARE of `available` bytes: at least one (which may still not fit: llama.cpp then fails, or
    the kernel ends the process, as before)."""
    if available is None or cell_bytes <= 0 or cells_per_slot <= 0:
        return n_seq_max
    fit = int(available * KV_SHARE) // (cells_per_slot * cell_bytes)
    return max(1, min(n_seq_max, fit))
