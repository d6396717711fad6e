"""Where prometheus-client's multiprocess files go. Apart from metrics.py on purpose: the CLI
calls this before anything imports prometheus_client, which reads the directory at import."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from overnight.files.owned_dirs import abandoned, hold_ownership
from overnight.files.private import make_private_dirs

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir(data_dir: Path) -> Path:
    """A new, empty directory under `DATA_DIR/metrics/` for this server (its worker processes write
    there too), owned by this process while it lives (files/owned_dirs.py). Directories nobody
    owns any more are removed: their values must not add to ours. Per server, not one shared
    directory, because servers may share a data directory (an API-only replica beside another,
    workers on other hosts over a shared filesystem): one starting must not wipe the files another
    is writing. Its name is unique, not the pid: two servers in containers share pid 1."""
    root = data_dir / "metrics"
    make_private_dirs(root)  # 0700 whatever the umask (they name models and volumes)
    with os.scandir(root) as entries:
        for old in entries:
            if old.is_dir(follow_symlinks=False) and abandoned(old.path, old.name.partition("-")[0]):
                shutil.rmtree(old.path, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)  # 0700
    global _OWNERSHIP
    _OWNERSHIP = hold_ownership(path)  # held until this process ends
    return Path(path)


_OWNERSHIP = -1
