"""Local-directory adapter: write to a temp file, fsync, rename; a crash leaves only temp files.
Directories are made 0700 and files 0600 whatever the umask (see `private`)."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from overnight.files.port import CHUNK_SIZE, StorageFullError, stream_copy
from overnight.files.private import create_private, fsync_path, make_private_dirs


class _LocalWriter:
    def __init__(self, fh: object) -> None:
        self._fh = fh
        self.bytes_written = 0

    def write(self, data: bytes | memoryview) -> None:
        self._fh.write(data)  # type: ignore[attr-defined]
        self.bytes_written += len(data)


class LocalFileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._tmp = root / "tmp"
        make_private_dirs(self._blobs)
        make_private_dirs(self._tmp)
        # Temp files of a crashed writer are left to abort_stale_uploads (by age): the API process
        # may be writing an upload here while a worker process (re)starts.

    def _path(self, key: str) -> Path:
        if ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"invalid storage key {key!r}")
        return self._blobs / key

    @contextmanager
    def writer(self, key: str) -> Iterator[_LocalWriter]:
        final = self._path(key)
        tmp = self._tmp / f"{secrets.token_hex(8)}.part"
        try:
            with os.fdopen(create_private(tmp), "wb", buffering=CHUNK_SIZE) as fh:
                writer = _LocalWriter(fh)
                yield writer
                fh.flush()
                os.fsync(fh.fileno())
            self._publish(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(exc.errno, "no space left in the data directory") from exc
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename a finished temp file into place."""
        _place(tmp, final, os.replace)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with open(self._path(key), "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        with open(self._path(key), "rb") as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def copy(self, source: str, key: str) -> None:
        """A hard link: the objects are never rewritten, so two names can share the bytes. The
        source's modification time is renewed first, so the new name is never an hour-old orphan
        to housekeeping before the row naming it commits."""
        src = self._path(source)
        os.utime(src)
        try:
            _place(src, self._path(key), os.link)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno not in _NO_LINKS:
                raise
            stream_copy(self, source, key)  # a file system without hard links

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Then its directory, if that was its last object (results/<batch_id>/ after finalize),
        # and any parent left empty; the key's first segment (files/, results/) stays.
        namespace = self._blobs / key.split("/", 1)[0]
        directory = path.parent
        while directory != namespace and namespace in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (a writer got in first), or gone already
                return
            directory = directory.parent

    def remove_empty_dirs(self, older_than: float) -> int:
        """Remove empty directories below the namespaces (left by versions whose `delete` kept
        them) last changed before `older_than`: one a writer has just made is left alone, and one
        it reuses is covered by its retry in `_publish`."""
        removed = 0
        for dirpath, _, _ in os.walk(self._blobs, topdown=False):
            directory = Path(dirpath)
            if len(directory.relative_to(self._blobs).parts) < 2:
                continue
            try:
                if directory.stat().st_mtime < older_than:
                    directory.rmdir()
                    removed += 1
            except OSError:  # not empty, or gone already
                continue
        return removed

    def list_keys(self, prefix: str, older_than: float) -> Iterator[str]:
        base = self._path(prefix) if prefix else self._blobs
        if not base.exists():
            return
        # os.walk, not rglob: a directory or file that goes away meanwhile (a batch finishing, a
        # delete) is skipped, not an error that ends the whole listing. It reads one directory's
        # names at a time: memory stays bounded by the largest directory.
        for dirpath, _, names in os.walk(base):
            for name in names:
                path = Path(dirpath, name)
                try:
                    modified = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if modified < older_than:
                    yield path.relative_to(self._blobs).as_posix()


    def abort_stale_uploads(self, older_than: float) -> int:
        """Remove temp files last written before `older_than`: writers that died (a killed worker
        process) before they could remove their own."""
        removed = 0
        for path in self._tmp.iterdir():
            try:
                if path.stat().st_mtime < older_than:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # published or removed meanwhile
                continue
        return removed


# What `link` raises on a file system that has no hard links (or not between these directories).
_NO_LINKS = (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.EMLINK)


def _place(source: Path, final: Path, put: Callable[[Path, Path], None]) -> None:
    """`put(source, final)` (a rename or a link) into a directory made for it, then make that
    durable. `delete` removes a directory with its last object, so the directory made here can
    vanish before the `put`: make it again, once (a second loss in a row would need another object
    deleted from an empty directory)."""
    for attempt in (1, 2):
        try:
            make_private_dirs(final.parent)
            put(source, final)
            break
        except FileNotFoundError:
            if attempt == 2 or not source.exists():
                raise
    fsync_path(final.parent)
