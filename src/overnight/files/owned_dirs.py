"""Directories that belong to one running process (a server's relay sockets, its metrics files),
removed by the next start once that process is gone, however it ended.

Ownership is a lock file the owner keeps flock'ed while it lives: the kernel drops the lock when
the process dies, SIGKILL included. A flock is seen across PID namespaces and, on NFS, across
machines, so servers in containers sharing one /tmp, or on several hosts sharing one data
directory, keep each other's live directories (a pid in the name says nothing there)."""

from __future__ import annotations

import contextlib
import fcntl
import os

OWNER_LOCK = "owner.lock"


def hold_ownership(directory: str) -> int:
    """Lock `directory`'s lock file for as long as the returned descriptor stays open. Locked under
    a temporary name, then renamed: a sweep never sees the lock file unlocked while its owner lives."""
    partial = os.path.join(directory, f".{OWNER_LOCK}")
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(partial, os.path.join(directory, OWNER_LOCK))
    return fd


def abandoned(directory: str, pid: str) -> bool:
    """Whether no process owns `directory`. One without a lock file (made by an earlier version, or
    by its owner between creating it and locking it) goes by `pid`: kept while a process with that
    pid runs here."""
    try:
        fd = os.open(os.path.join(directory, OWNER_LOCK), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return pid.isdigit() and not running(int(pid))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its owner holds the lock: alive
    finally:
        os.close(fd)  # (closing also drops a lock just taken: the removal follows at once)
    return True


def running(pid: int) -> bool:
    with contextlib.suppress(PermissionError):  # it exists, under another user
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
    return True
