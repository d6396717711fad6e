"""Where prometheus-client's multiprocess files go. Apart from metrics.py on purpose: the CLI
calls this before anything imports prometheus_client, which reads the directory at import."""

from __future__ import annotations

import shutil
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir(data_dir: Path) -> Path:
    """`DATA_DIR/metrics`, emptied: values of processes from an earlier run must not add to ours."""
    path = data_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
