"""The data directory is private to the service user: directories 0700, files 0600, whatever the
process umask. It holds the API key hashes, every tenant's metadata, inputs and outputs."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("overnight")

DIR_MODE = 0o700
FILE_MODE = 0o600
_GROUP_OTHER = 0o077

# What overnight keeps in a data directory; only these are tightened, so a data directory that
# also holds someone else's things (a home directory by mistake) does not have them changed.
DATA_DIR_ENTRIES = ("blobs", "tmp", "models", "metrics", "overnight.db", "overnight.db-wal", "overnight.db-shm")


def make_private_dirs(path: Path) -> None:
    """`mkdir -p` whose new directories are all 0700 (`os.makedirs` gives the parents it creates
    the default mode). A directory that already exists is left as it is."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        # FileExistsError: made meanwhile by another process (a file in the way fails later)
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, DIR_MODE)


def create_private(path: Path, exclusive: bool = True) -> int:
    """Open `path` for writing, created 0600, and return the descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
    return os.open(path, flags, FILE_MODE)


def tighten(path: Path) -> int:
    """Strip group and other permissions from `path` and, for a directory, everything under it
    (versions before this one left directories 0755 and files 0644). Symbolic links are neither
    followed nor changed. Returns how many paths were changed."""
    changed = 0
    denied: list[Path] = []
    for item in _walk(path):
        try:
            changed += _strip(item, os.lstat(item))
        except FileNotFoundError:
            continue  # removed meanwhile
        except PermissionError:
            denied.append(item)  # another user's file: say so, and go on
    if denied:
        log.warning("could not make %d paths private to this user (not their owner?), e.g. %s",
                    len(denied), denied[0])
    return changed


def tighten_data_dir(data_dir: Path) -> int:
    """Make an existing data directory (followed if it is a link), and what overnight keeps in it,
    private."""
    try:
        changed = _strip(data_dir, data_dir.stat())
    except PermissionError:
        changed = 0
        log.warning("could not make the data directory %s private to this user (not its owner?)", data_dir)
    for name in DATA_DIR_ENTRIES:
        changed += tighten(data_dir / name)
    if changed:
        log.info("made %d paths in %s private to this user (directories 0700, files 0600)", changed, data_dir)
    return changed


def _strip(path: Path, st: os.stat_result) -> int:
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return 0
    mode = stat.S_IMODE(st.st_mode)
    if not mode & _GROUP_OTHER:
        return 0
    os.chmod(path, mode & ~_GROUP_OTHER)
    return 1


def _walk(path: Path) -> Iterator[Path]:
    if not os.path.lexists(path):
        return
    yield path
    if path.is_symlink() or not path.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(path):  # does not descend into symlinked directories
        for name in (*dirnames, *filenames):
            yield Path(dirpath, name)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (after a rename into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
