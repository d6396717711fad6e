"""Where prometheus-client's multiprocess files go. Apart from metrics.py on purpose: the CLI
calls this before anything imports prometheus_client, which reads the directory at import."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from overnight.files.private import make_private_dirs

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir(data_dir: Path, pid: int | None = None) -> Path:
    """`DATA_DIR/metrics/PID` for this server (its worker processes write there too), new and
    empty. Directories of servers that are gone are removed: their values must not add to ours.
    Per server, not one shared directory, because servers may share a data directory (an API-only
    replica beside another): one starting must not wipe the files another is writing."""
    pid = os.getpid() if pid is None else pid
    root = data_dir / "metrics"
    make_private_dirs(root)  # 0700 whatever the umask (they name models and volumes)
    for old in root.iterdir():
        if not old.name.isdigit() or int(old.name) == pid or not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / str(pid)
    path.mkdir(mode=0o700)
    return path


def _alive(pid: int) -> bool:
    with contextlib.suppress(PermissionError):  # it exists, under another user
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
    return True
