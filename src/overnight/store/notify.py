"""Wake-ups across machines: on PostgreSQL, creating or cancelling a batch sends a NOTIFY, and
each worker LISTENs, so an idle worker on another machine starts a new batch, and stops a
cancelled one's shards, without waiting for its next poll or heartbeat. The payload says which
(C.CHANGE_CREATED or C.CHANGE_CANCELLED). Polling stays as the fallback (a lost
connection, SQLite, where one machine's processes are woken through a pipe instead).

The notification is sent inside the transaction that changes the batch, so PostgreSQL delivers it
only once that commits."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from overnight import constants as C

log = logging.getLogger("overnight.store")

CHANNEL = "overnight_batches"
_NOTIFY = text(f"SELECT pg_notify('{CHANNEL}', :change)")
_RECONNECT_SECONDS = 1.0


def notify_batches_changed(conn: Connection, change: str) -> None:
    """Queue a wake-up for listening workers (sent when `conn`'s transaction commits)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_NOTIFY, {"change": change})


class BatchChangeListener:
    """LISTENs on its own connection in a daemon thread and calls `on_change(change)` (which must
    be thread-safe) for each notification, reconnecting after a failure."""

    def __init__(self, url: str, on_change: Callable[[str], None]) -> None:
        # psycopg takes the URL without SQLAlchemy's driver suffix.
        self._conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="overnight-listen", daemon=True)
        self.listening = threading.Event()  # set while a LISTEN is in place (tests wait on it)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    # Anything may have happened while we were not listening: a cancel too.
                    self._on_change(C.CHANGE_CANCELLED)
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=0.5, stop_after=1):
                            self._on_change(notice.payload)
            except Exception as exc:  # the database restarted, the network dropped: listen again
                log.warning("LISTEN %s failed (%s); polling until it is back", CHANNEL, type(exc).__name__)
            self.listening.clear()
            self._stop.wait(_RECONNECT_SECONDS)
