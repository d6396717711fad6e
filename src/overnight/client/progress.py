"""A progress bar on stderr while a batch runs (tqdm, imported only when one is shown)."""

from __future__ import annotations

import sys
from typing import Any

from openai.types import Batch


class BatchProgress:
    """Shows done/total lines of a batch. `enabled=None`: only when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self._enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None

    def update(self, batch: Batch) -> None:
        if not self._enabled:
            return
        counts = batch.request_counts
        total = counts.total if counts else 0
        done = counts.completed + counts.failed if counts else 0
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total or None, unit="req", file=sys.stderr, dynamic_ncols=True)
        if total and self._bar.total != total:
            self._bar.total = total
        self._bar.set_description(batch.status, refresh=False)
        self._bar.set_postfix_str(f"{counts.failed if counts else 0} failed", refresh=False)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
