"""A throwaway PostgreSQL server for tests and benchmarks, and fast fresh databases on it.

    with PostgresServer.start() as pg:          # initdb + postgres in a temp dir (0.7-2 s)
        pg.create_database("tmpl")               # empty; migrate it, then use it as a template
        url = pg.create_database("t1", template="tmpl")   # a copy: 50 ms (450 ms on a busy machine)
        pg.empty_database("t1")                  # its rows gone again: 20 ms

The server is Debian's PostgreSQL 15 (`apt-get install postgresql-15`; `./dev test` installs it),
run from its binaries, not as a system service: initdb into a fresh temp dir, `postgres` listening
on 127.0.0.1 on a free port and on a unix socket in that dir, fsync off, trust auth (loopback
only). PostgreSQL refuses to run as root, so under root it runs as the `postgres` system user the
package creates (the temp dir is handed to that user). It is stopped (`pg_ctl stop -m fast`, then
SIGKILL) by `stop()`, at interpreter exit, and, on Linux, by the kernel when the process that
started it dies (a parent-death signal), so a killed test run leaves no server behind.

`PostgresServer.external(url)` uses a server you run instead (OVERNIGHT_TEST_DATABASE_URL in the
tests): its databases are created and dropped through `url`'s user, which needs CREATEDB.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy.engine import URL, make_url

BINDIR = Path(os.environ.get("OVERNIGHT_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
RUN_AS = "postgres"  # the system user of Debian's package; used only when we are root
DRIVER = "postgresql+psycopg"
_DIR_PREFIX = "overnight-pg-"
_START_TIMEOUT = 60.0


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL to start (binaries or the unprivileged user missing)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pdeathsig() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGQUIT (immediate shutdown) the server when its parent
    thread dies, even by SIGKILL. Resolved before the fork: the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigquit = 1, int(signal.SIGQUIT)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigquit)

    return preexec


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresServer:
    """A PostgreSQL server to make databases on: one this process started (`start()`), or one at
    a URL (`external()`). `url(db)` is a SQLAlchemy URL (`postgresql+psycopg://`)."""

    def __init__(self, admin_url: URL, *, base: Path | None = None, proc: subprocess.Popen[bytes] | None = None,
                 run_as: pwd.struct_passwd | None = None) -> None:
        self.admin_url = admin_url  # the maintenance database: CREATE/DROP DATABASE run there
        self.base = base  # the temp dir of a server we started (data/, the socket, the log)
        self.proc = proc
        self.run_as = run_as
        self.created: list[str] = []  # databases made through us, dropped by drop_created()
        self.start_seconds = 0.0
        self.args: list[str] = []  # how `postgres` was started (restart() starts it so again)

    # -- starting and stopping ----------------------------------------------------------------

    @classmethod
    def external(cls, url: str) -> PostgresServer:
        parsed = make_url(url)
        if not parsed.drivername.startswith("postgresql"):
            raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}")
        return cls(parsed.set(drivername=DRIVER))

    @classmethod
    def start(cls, bindir: Path = BINDIR, *, run_as: str = RUN_AS, settings: dict[str, str] | None = None
              ) -> PostgresServer:
        """initdb into a new temp dir and start `postgres` there; returns once it accepts connections."""
        began = time.monotonic()
        for tool in ("initdb", "postgres", "pg_ctl"):
            if not (bindir / tool).is_file():
                raise PostgresUnavailable(
                    f"{bindir / tool} is missing: install Debian's postgresql-15 (./dev test does), "
                    "or point OVERNIGHT_TEST_DATABASE_URL at a server"
                )
        user = None
        if os.geteuid() == 0:  # PostgreSQL refuses root
            try:
                user = pwd.getpwnam(run_as)
            except KeyError:
                raise PostgresUnavailable(f"running as root and there is no {run_as!r} user to run PostgreSQL as") from None
        _sweep_stale_dirs()
        base = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))  # in /tmp (1777): reachable by `user`
        (base / "owner.pid").write_text(str(os.getpid()))
        if user is not None:
            os.chown(base, user.pw_uid, user.pw_gid)
        server: PostgresServer | None = None
        try:
            _run(user, base, [str(bindir / "initdb"), "-D", str(base / "data"), "-U", "postgres",
                              "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            # Only what the settings below open: trust over the socket and 127.0.0.1.
            (base / "data" / "pg_hba.conf").write_text(
                "local all all trust\nhost all all 127.0.0.1/32 trust\n"
            )
            options = {
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(base),
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "300",  # each SqlStore pools up to 30
                "shared_buffers": "64MB",
                **(settings or {}),
            }
            for attempt in range(3):  # the free port can be taken before postgres binds it
                port = _free_port()
                args = [str(bindir / "postgres"), "-D", str(base / "data"), "-p", str(port)]
                args += [a for key, value in options.items() for a in ("-c", f"{key}={value}")]
                proc = _spawn(args, base, user)
                admin = URL.create(DRIVER, username="postgres", host="127.0.0.1", port=port, database="postgres")
                server = cls(admin, base=base, proc=proc, run_as=user)
                server.args = args
                _STARTED.append(server)
                if server._wait_ready(bindir):
                    server.start_seconds = time.monotonic() - began
                    return server
                server.stop(remove=False)
                if attempt == 2:
                    break
            raise PostgresUnavailable(f"postgres did not start; its log:\n{_tail(base / 'postgres.log')}")
        except BaseException:
            if server is not None:
                server.stop(remove=False)
            shutil.rmtree(base, ignore_errors=True)
            raise

    def _wait_ready(self, bindir: Path) -> bool:
        import psycopg

        assert self.proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                psycopg.connect(self.conninfo(), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def stop(self, *, remove: bool = True) -> None:
        """Fast shutdown (`pg_ctl stop -m fast`), SIGKILL if that does not end it; remove the temp dir."""
        if self in _STARTED:
            _STARTED.remove(self)
        if self.proc is not None and self.base is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    _run(self.run_as, self.base, [str(BINDIR / "pg_ctl"), "stop", "-D", str(self.base / "data"),
                                                  "-m", "fast", "-w", "-t", "20"], timeout=30, check=False)
            if self.proc.poll() is None:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if remove and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server (fast shutdown: clients lose their connections) and start it again on the
        same data and port, after `down_seconds`."""
        assert self.base is not None and self.args, "only a server this process started can restart"
        base = self.base
        self.stop(remove=False)
        self.base = base
        time.sleep(down_seconds)
        self.proc = _spawn(self.args, base, self.run_as)
        _STARTED.append(self)
        if not self._wait_ready(BINDIR):
            raise PostgresUnavailable(f"postgres did not restart; its log:\n{_tail(base / 'postgres.log')}")

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------------

    def url(self, database: str) -> str:
        """A SQLAlchemy URL (postgresql+psycopg) for `database`, password included."""
        return self.admin_url.set(database=database).render_as_string(hide_password=False)

    def conninfo(self, database: str | None = None) -> str:
        """The libpq URI of `database` (default: the maintenance database), for psycopg."""
        url = self.admin_url if database is None else self.admin_url.set(database=database)
        return url.set(drivername="postgresql").render_as_string(hide_password=False)

    def execute(self, statements: Sequence[str], database: str | None = None) -> None:
        """Run statements in autocommit (CREATE/DROP DATABASE cannot run in a transaction)."""
        import psycopg

        with psycopg.connect(self.conninfo(database), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.encode())

    def create_database(self, name: str, template: str | None = None) -> str:
        """CREATE DATABASE `name` (a copy of `template`, else empty); returns its URL."""
        import psycopg

        sql = f"CREATE DATABASE {_quote_ident(name)}"
        sql += f" TEMPLATE {_quote_ident(template)}" if template else " TEMPLATE template0"
        for attempt in range(50):
            try:
                self.execute([sql])
                break
            except psycopg.errors.ObjectInUse:
                # "source database is being accessed by other users": a copy in another session
                if attempt == 49:
                    raise
                time.sleep(0.1)
        self.created.append(name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE, closing what is still connected to it (sessions of a leaked pool)."""
        self.execute([f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)"])
        if name in self.created:
            self.created.remove(name)

    def empty_database(self, name: str, keep: Sequence[str] = ("alembic_version",)) -> None:
        """Delete every row of every table but `keep` and restart the id sequences (TRUNCATE: ~20 ms,
        where a fresh copy of a template takes 50-450 ms)."""
        import psycopg

        with psycopg.connect(self.conninfo(name), autocommit=True) as conn:
            conn.execute(b"SET lock_timeout = '10s'")  # a session left in a transaction: fail, not hang
            rows = conn.execute(b"SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()
            tables = [_quote_ident(row[0]) for row in rows if row[0] not in keep]
            if tables:
                conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE".encode())

    def drop_created(self) -> None:
        for name in reversed(list(self.created)):
            with contextlib.suppress(Exception):
                self.drop_database(name)

    @staticmethod
    def unique_name(prefix: str) -> str:
        """A database name unlikely to clash with another run on the same (external) server."""
        return f"{prefix}_{uuid.uuid4().hex[:12]}"


_STARTED: list[PostgresServer] = []


def _spawn(args: list[str], base: Path, user: pwd.struct_passwd | None) -> subprocess.Popen[bytes]:
    with (base / "postgres.log").open("ab") as log:
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base,
            env=_child_env(base), start_new_session=True, preexec_fn=_pdeathsig(), **_as_user(user),
        )


@atexit.register
def _stop_all() -> None:
    for server in list(_STARTED):
        server.stop()


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _child_env(base: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(base), "LC_ALL": "C", "TZ": "UTC"}


def _run(user: pwd.struct_passwd | None, base: Path, args: list[str], *, timeout: float = 120,
         check: bool = True) -> None:
    result = subprocess.run(args, capture_output=True, cwd=base, env=_child_env(base), timeout=timeout,
                            stdin=subprocess.DEVNULL, **_as_user(user))
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")[-3000:]
        raise PostgresUnavailable(f"{' '.join(args)} exited with {result.returncode}:\n{output}")


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


def _sweep_stale_dirs() -> None:
    """Remove the temp dirs of runs that were killed (their server died with them)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
        try:
            pid = int((path / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue
