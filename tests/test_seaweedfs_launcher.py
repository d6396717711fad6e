"""The SeaweedFS launcher the S3 tests stand on: loopback only, behaviour the adapter relies on
(conditional writes, the minimum part size, refused credentials), restarts that keep the data, and
no process left behind however its parent ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from overnight.testing.seaweedfs import SeaweedFS

MiB = 1024 * 1024


def client(s3: SeaweedFS, secret: str | None = None) -> Any:
    return boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region, aws_access_key_id=s3.access_key,
                        aws_secret_access_key=secret or s3.secret_key,
                        config=Config(retries={"total_max_attempts": 1}))


def error_of(call: Any, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call(**kwargs)
    response = caught.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def listening_addresses(pid: int) -> set[str]:
    """host:port of every TCP socket `pid` listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                host, port = fields[1].split(":")
                addr = ".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0)) if len(host) == 8 else host
                found.add(f"{addr}:{int(port, 16)}")
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_every_port_is_on_loopback_and_chosen_free(seaweedfs: SeaweedFS) -> None:
    assert seaweedfs.proc is not None
    addresses = listening_addresses(seaweedfs.proc.pid)
    assert len(addresses) >= 8, addresses  # master, volume, filer, s3 (http and grpc each), admin
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses
    assert f"127.0.0.1:{seaweedfs.ports['s3.port']}" in addresses
    assert {int(a.split(":")[1]) for a in addresses} <= set(seaweedfs.ports.values())


def test_the_server_enforces_what_the_adapter_relies_on(seaweedfs: SeaweedFS) -> None:
    s3 = client(seaweedfs)
    bucket, key = seaweedfs.bucket, f"launcher-{time.time_ns()}"
    s3.put_object(Bucket=bucket, Key=key, Body=b"first")
    assert error_of(s3.put_object, Bucket=bucket, Key=key, Body=b"2", IfNoneMatch="*") == (
        412, "PreconditionFailed")
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key + "-mp")["UploadId"]
    parts = [{"PartNumber": n, "ETag": s3.upload_part(
        Bucket=bucket, Key=key + "-mp", UploadId=upload_id, PartNumber=n, Body=b"x" * 1000)["ETag"]} for n in (1, 2)]
    assert error_of(s3.complete_multipart_upload, Bucket=bucket, Key=key + "-mp", UploadId=upload_id,
                    MultipartUpload={"Parts": parts}) == (400, "EntityTooSmall")
    s3.abort_multipart_upload(Bucket=bucket, Key=key + "-mp", UploadId=upload_id)
    bad = client(seaweedfs, secret="not-the-secret")
    status, _ = error_of(bad.get_object, Bucket=bucket, Key=key)
    assert status == 403
    assert error_of(bad.put_object, Bucket=bucket, Key=key + "-x", Body=b"1")[0] == 403
    # A bucket nobody created is not made on the fly by a write.
    assert error_of(s3.put_object, Bucket="never-made", Key="k", Body=b"1") == (404, "NoSuchBucket")


def test_a_restart_keeps_objects_ports_and_credentials(tmp_path: Path) -> None:
    with SeaweedFS(tmp_path / "sw") as s3:
        client(s3).put_object(Bucket=s3.bucket, Key="kept", Body=b"v" * (2 * MiB))
        endpoint = s3.endpoint_url
        s3.stop()
        assert not s3.running
        s3.start()
        assert s3.endpoint_url == endpoint
        body = client(s3).get_object(Bucket=s3.bucket, Key="kept")["Body"].read()
        assert body == b"v" * (2 * MiB)
    assert not s3.running


def _grpc_sockets(s3: SeaweedFS) -> list[Path]:
    """The unix sockets weed makes in /tmp for its gRPC ports."""
    paths = (Path(f"/tmp/seaweedfs-{name.removesuffix('.port.grpc')}-grpc-{port}.sock")
             for name, port in s3.ports.items() if name.endswith(".port.grpc"))
    return [p for p in paths if p.exists()]


def test_two_at_once_do_not_collide() -> None:
    with SeaweedFS() as one, SeaweedFS() as two:
        assert not set(one.ports.values()) & set(two.ports.values())
        assert one.endpoint_url != two.endpoint_url
        assert _grpc_sockets(one) and _grpc_sockets(two)
    assert not one.workdir.exists() and not two.workdir.exists()
    assert _grpc_sockets(one) == [] and _grpc_sockets(two) == []  # weed leaves them; the launcher does not


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_no_server_outlives_its_parent(ending: str, tmp_path: Path) -> None:
    """An interpreter that ends without closing it (atexit), or is killed (PR_SET_PDEATHSIG)."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from overnight.testing.seaweedfs import SeaweedFS
        s3 = SeaweedFS(Path({str(tmp_path / "sw")!r})).start()  # in tmp_path: a killed parent cannot remove it
        print(s3.proc.pid, flush=True)
        print(" ".join(f"{{name}}={{port}}" for name, port in s3.ports.items()), flush=True)
        if {ending!r} == "sigkill":
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    weed_pid = int(child.stdout.readline())
    launched = SeaweedFS(tmp_path / "unused")
    launched.ports = {name: int(port) for name, port in (x.split("=") for x in child.stdout.readline().split())}
    if ending == "sigkill":
        child.send_signal(signal.SIGKILL)
    child.wait(30)
    deadline = time.monotonic() + 10
    while _alive(weed_pid):
        assert time.monotonic() < deadline, f"weed {weed_pid} outlived its parent ({ending})"
        time.sleep(0.05)
    if ending == "exit":
        assert _grpc_sockets(launched) == []  # atexit closed it
    else:
        launched._remove_grpc_sockets()  # nothing could: the launcher was killed


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended; it waits for init to reap it
