"""Garbage-collector settings for long-running processes."""

import gc


def freeze_startup_objects() -> None:
    """Move everything built at startup (modules, the store, the engines) out of the cyclic GC's
    reach: it lives as long as the process, and full collections would rescan it every few thousand
    lines. Measured on 150k lines through one worker: full collections took 0.43 s, 40 ms each,
    and 0.06 s after this."""
    gc.collect()
    gc.freeze()

