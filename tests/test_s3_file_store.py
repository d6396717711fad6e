"""What only the S3 adapter has to get right, on a real server (SeaweedFS on 127.0.0.1): aborted
uploads leave nothing, conditional writes never overwrite, errors say what to fix, abandoned
uploads are cleaned up, keys live under the prefix. Inspection goes through the store's own boto3
client, straight to the server."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from conftest import free_port, s3_file_store, serve_refused
from overnight.files.port import StorageFullError, StorageUnavailableError
from overnight.files.s3 import (
    ObjectExistsError,
    S3AccessError,
    S3BucketMissingError,
    S3FileStore,
    S3UnavailableError,
)
from overnight.testing.seaweedfs import SeaweedFS

MiB = 1024 * 1024
PART = 5 * MiB


def open_uploads(store: S3FileStore) -> list[dict[str, Any]]:
    return list(store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", []))


def raw_keys(store: S3FileStore) -> list[str]:
    page = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(item["Key"] for item in page.get("Contents", []))


def test_an_exception_mid_upload_leaves_no_object_and_no_open_upload(seaweedfs: SeaweedFS) -> None:
    store = s3_file_store(seaweedfs, part_size=PART)
    with pytest.raises(ValueError, match="bad line"), store.writer("files/f") as out:
        for _ in range(11):
            out.write(b"x" * MiB)
        assert open_uploads(store), "two parts are out: a multipart upload is open"
        raise ValueError("bad line")
    assert not store.exists("files/f")
    assert open_uploads(store) == []
    assert raw_keys(store) == []


def test_one_part_is_one_put_and_more_is_a_multipart_upload(seaweedfs: SeaweedFS) -> None:
    store = s3_file_store(seaweedfs, part_size=PART)
    for key, size in (("files/small", 1000), ("files/one-part", PART), ("files/three-parts", 2 * PART + 1)):
        with store.writer(key) as out:
            for start in range(0, size, MiB):
                out.write(b"y" * min(MiB, size - start))
        head = store.client.head_object(Bucket=store.bucket, Key=store.prefix + key)
        assert head["ContentLength"] == size
        etag = head["ETag"].strip('"')
        assert etag.endswith("-3") if key == "files/three-parts" else "-" not in etag, (key, etag)


def test_a_conditional_write_never_overwrites(seaweedfs: SeaweedFS) -> None:
    store = s3_file_store(seaweedfs, part_size=PART)
    with store.writer("results/b/0000000.1.jsonl") as out:
        out.write(b"first\n")
    with pytest.raises(ObjectExistsError, match="already has this key") as caught, \
            store.writer("results/b/0000000.1.jsonl") as out:
        out.write(b"second\n")
    assert isinstance(caught.value, FileExistsError)
    # The same for a multipart upload: refused at completion, and the upload aborted.
    with pytest.raises(ObjectExistsError), store.writer("results/b/0000000.1.jsonl") as out:
        out.write(b"z" * (2 * PART))
    assert b"".join(store.iter_chunks("results/b/0000000.1.jsonl")) == b"first\n"
    assert open_uploads(store) == []


def test_our_own_write_landing_twice_is_not_a_conflict(seaweedfs: SeaweedFS) -> None:
    """A write whose answer was lost is sent again and meets 412: the stored ETag tells whether the
    object is that very write (success) or someone else's (refused)."""
    store = s3_file_store(seaweedfs, part_size=PART)
    store._put_new(store.prefix + "files/p", bytearray(b"payload"))
    store._put_new(store.prefix + "files/p", bytearray(b"payload"))  # the retry: fine
    with pytest.raises(ObjectExistsError):
        store._put_new(store.prefix + "files/p", bytearray(b"other payload"))

    key = store.prefix + "files/m"
    parts = []
    upload_id = store.client.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
    for number, data in ((1, b"a" * PART), (2, b"tail")):
        etag = store.client.upload_part(Bucket=store.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                        Body=data)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    store._complete_new(key, upload_id, parts)
    store._complete_new(key, upload_id, parts)  # the retry: fine
    other = store.client.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
    etag = store.client.upload_part(Bucket=store.bucket, Key=key, UploadId=other, PartNumber=1, Body=b"b")["ETag"]
    with pytest.raises(ObjectExistsError):
        store._complete_new(key, other, [{"PartNumber": 1, "ETag": etag}])
    store.client.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=other)
    expected = hashlib.md5(b"a" * PART + b"tail").hexdigest()
    assert hashlib.md5(b"".join(store.iter_chunks("files/m"))).hexdigest() == expected


def test_bad_credentials_say_what_to_fix(seaweedfs: SeaweedFS) -> None:
    secret = "wrong-" + seaweedfs.secret_key[:10]
    store = S3FileStore(seaweedfs.bucket, "p", seaweedfs.endpoint_url, seaweedfs.region, seaweedfs.access_key, secret)
    with pytest.raises(S3AccessError, match="AWS_SECRET_ACCESS_KEY") as caught:
        store.check()
    assert secret not in str(caught.value)
    for operation in (lambda: store.read_range("files/x", 0, 10), lambda: store.delete("files/x"),
                      lambda: list(store.list_keys("files/", time.time()))):
        with pytest.raises(PermissionError, match="access denied"):
            operation()
    with pytest.raises(PermissionError), store.writer("files/x") as out:
        out.write(b"data")


def test_a_missing_bucket_says_so(seaweedfs: SeaweedFS) -> None:
    store = S3FileStore("no-such-bucket", "", seaweedfs.endpoint_url, seaweedfs.region, seaweedfs.access_key,
                        seaweedfs.secret_key)
    with pytest.raises(S3BucketMissingError, match=r"bucket 'no-such-bucket' does not exist\. Create it"):
        store.check()
    with pytest.raises(S3BucketMissingError), store.writer("files/x") as out:
        out.write(b"data")


def test_a_missing_bucket_is_not_a_missing_object(seaweedfs: SeaweedFS) -> None:
    """A HEAD answer has no body to say NoSuchBucket: `exists` said False, and validation failed
    every batch as "deleted or expired" instead of saying the bucket is gone."""
    store = S3FileStore("no-such-bucket", "", seaweedfs.endpoint_url, seaweedfs.region, seaweedfs.access_key,
                        seaweedfs.secret_key)
    with pytest.raises(S3BucketMissingError, match="does not exist"):
        store.exists("files/x")
    assert s3_file_store(seaweedfs).exists("files/never-written") is False


# (method, headers) -> (status, S3 error code or "", body, Content-Length to declare or None)
Answer = Callable[[str, dict[str, str]], tuple[int, str, bytes, int | None]]


@contextmanager
def s3_endpoint(answer: Answer) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that answers as `answer` says: a proxy failing, a MinIO that is
    full, a body cut off, an object deleted between two reads; what SeaweedFS cannot be made to do
    on demand. An error code becomes S3's XML error body."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            status, code, body, declared = answer(self.command, dict(self.headers))
            if code:
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f'<Message>as the test says</Message></Error>').encode()
            if self.command == "HEAD":
                body = b""
            self.send_response(status)
            self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
            self.send_header("Content-Length", str(declared if declared is not None else len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True  # a declared length not sent is a broken stream

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def endpoint_store(endpoint: str) -> S3FileStore:
    return S3FileStore("b", "", endpoint, "us-east-1", "k", "s", retry_seconds=0.5, connect_timeout=0.5)


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError"), (502, ""), (429, "")])
def test_a_server_that_keeps_failing_is_an_outage(status: int, code: str) -> None:
    """5xx and throttling past the retry window were a plain error: a shard whose results could
    not be written was failed (and after twice, given up) instead of handed back for later."""
    with s3_endpoint(lambda method, headers: (status, code, b"down", None)) as endpoint:
        store = endpoint_store(endpoint)
        with pytest.raises(StorageUnavailableError, match="kept failing"):
            store.read_range("files/x", 0, 10)
        with pytest.raises(StorageUnavailableError), store.writer("files/y") as out:
            out.write(b"data")


@pytest.mark.parametrize("status,code", [(507, "XMinioStorageFull"), (403, "QuotaExceeded"),
                                         (400, "XMinioAdminBucketQuotaExceeded")])
def test_a_full_store_or_quota_is_storage_full(status: int, code: str) -> None:
    """MinIO's 507 and quota, Ceph's QuotaExceeded: what a full disk is on the local store (an
    upload answered 507, a shard handed back), not an I/O error (500) or bad credentials."""
    with s3_endpoint(lambda method, headers: (status, code, b"", None)) as endpoint, \
            pytest.raises(StorageFullError, match="full or the bucket's quota"), \
            endpoint_store(endpoint).writer("files/y") as out:
        out.write(b"data")


def test_a_conditional_write_racing_its_own_retry_is_retried() -> None:
    """409 ConditionalRequestConflict (a PUT that timed out still landing as it is retried): AWS
    says retry; it was taken for "another object has this key" and the write refused."""
    puts: list[str] = []

    def answer(method: str, headers: dict[str, str]) -> tuple[int, str, bytes, int | None]:
        if method == "PUT":
            puts.append(method)
            return (409, "ConditionalRequestConflict", b"", None) if len(puts) == 1 else (200, "", b"", None)
        return 404, "NoSuchKey", b"", None

    with s3_endpoint(answer) as endpoint, endpoint_store(endpoint).writer("files/y") as out:
        out.write(b"data")
    assert len(puts) == 2


def test_an_object_deleted_while_read_fails_the_read() -> None:
    """A read that broke and resumed on an object deleted meanwhile said "no such object", which
    live results take to mean "finalized before we started" and begin again: lines sent twice."""
    ranges: list[str | None] = []

    def answer(method: str, headers: dict[str, str]) -> tuple[int, str, bytes, int | None]:
        ranges.append(headers.get("Range"))
        if len(ranges) == 1:
            return 200, "", b"x" * 40, 100  # 100 bytes promised, 40 sent: the stream breaks
        return 404, "NoSuchKey", b"", None  # and the resumed read finds the object deleted

    with s3_endpoint(answer) as endpoint, pytest.raises(OSError, match="deleted while being read") as caught:
        list(endpoint_store(endpoint).iter_chunks("files/x"))
    assert not isinstance(caught.value, FileNotFoundError)
    assert ranges == [None, "bytes=40-"]


def test_an_unreachable_endpoint_says_so_after_retrying() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens
    store = S3FileStore("b", "", endpoint, "us-east-1", "k", "s", retry_seconds=1.0, connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(S3UnavailableError, match=f"{endpoint}.*does not answer") as caught:
        store.check(timeout=1.0)
    assert isinstance(caught.value, ConnectionError)
    with pytest.raises(S3UnavailableError, match="tried"):
        store.read_range("files/x", 0, 1)
    assert time.monotonic() - started < 6


def test_parts_grow_so_an_object_of_any_size_fits_the_part_limit(seaweedfs: SeaweedFS,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 takes at most 10,000 parts: at a fixed 8 MiB, an output file over 78 GiB could never be
    written (finalize failed at part 10,001, again on every retry). Parts double in size after each
    tenth of the limit; with a limit of 3, parts of 5, 10 and 20 MiB hold 30 MiB."""
    monkeypatch.setattr("overnight.files.s3.MAX_PARTS", 3)
    store = s3_file_store(seaweedfs, part_size=PART)
    block = bytes(range(256)) * 4096  # 1 MiB
    with store.writer("files/big") as out:
        for _ in range(30):
            out.write(block)
    head = store.client.head_object(Bucket=store.bucket, Key=store.prefix + "files/big")
    assert head["ContentLength"] == 30 * MiB and head["ETag"].strip('"').endswith("-3")
    assert b"".join(store.iter_chunks("files/big")) == block * 30


def test_abandoned_uploads_are_aborted_under_the_prefix_only(seaweedfs: SeaweedFS) -> None:
    store = s3_file_store(seaweedfs, part_size=PART)
    neighbour = s3_file_store(seaweedfs, part_size=PART)
    for s in (store, neighbour):
        upload_id = s.client.create_multipart_upload(Bucket=s.bucket, Key=s.prefix + "files/crashed")["UploadId"]
        s.client.upload_part(Bucket=s.bucket, Key=s.prefix + "files/crashed", UploadId=upload_id, PartNumber=1,
                             Body=b"p" * PART)
    assert store.abort_stale_uploads(time.time() - 3600) == 0  # started just now
    assert len(open_uploads(store)) == 1
    assert store.abort_stale_uploads(time.time() + 5) == 1
    assert open_uploads(store) == []
    assert len(open_uploads(neighbour)) == 1  # another prefix: not ours to touch
    assert neighbour.abort_stale_uploads(time.time() + 5) == 1
    # Without a prefix, only overnight's namespaces are ours: another application's upload in the
    # same bucket is left alone (all the bucket's stale uploads were aborted).
    foreign = store.client.create_multipart_upload(Bucket=store.bucket, Key="other-app/x")["UploadId"]
    bare = s3_file_store(seaweedfs, prefix="")
    try:
        assert bare.abort_stale_uploads(time.time() + 5) == 0
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix="other-app/").get("Uploads", [])
        assert [u["UploadId"] for u in uploads] == [foreign]
    finally:
        store.client.abort_multipart_upload(Bucket=store.bucket, Key="other-app/x", UploadId=foreign)


def test_keys_live_under_the_prefix(seaweedfs: SeaweedFS) -> None:
    tenant_a = s3_file_store(seaweedfs, prefix="tenant-a/overnight/")
    tenant_b = s3_file_store(seaweedfs, prefix="tenant-b")
    with tenant_a.writer("files/file-1") as out:
        out.write(b"a")
    assert raw_keys(tenant_a) == ["tenant-a/overnight/files/file-1"]
    assert list(tenant_a.list_keys("files/", time.time() + 2)) == ["files/file-1"]
    assert not tenant_b.exists("files/file-1")
    assert list(tenant_b.list_keys("files/", time.time() + 2)) == []
    with pytest.raises(ValueError, match="invalid storage key"):
        tenant_a.exists("../tenant-b/files/x")
    tenant_a.delete("files/file-1")


def test_list_keys_pages_through_many_objects(seaweedfs: SeaweedFS) -> None:
    store = s3_file_store(seaweedfs)
    for i in range(1005):  # over one ListObjectsV2 page (1000)
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}results/b/{i:07d}.1.jsonl", Body=b"")
    keys = list(store.list_keys("results/", time.time() + 2))
    assert len(keys) == 1005 and keys[0] == "results/b/0000000.1.jsonl"


def test_serve_refuses_a_bucket_it_cannot_use(seaweedfs: SeaweedFS, tmp_path: Any) -> None:
    missing = seaweedfs.storage_url("p").replace(f"s3://{seaweedfs.bucket}/", "s3://not-there/")
    message = serve_refused("--data-dir", str(tmp_path / "d1"), "--no-embedded", "--storage-url", missing)
    assert "bucket 'not-there' does not exist" in message
    wrong = seaweedfs.storage_url("p", credentials=False) + f"&access_key={seaweedfs.access_key}&secret_key=nope123"
    message = serve_refused("--data-dir", str(tmp_path / "d2"), "--no-embedded", "--storage-url", wrong)
    assert "access denied" in message and "nope123" not in message
    message = serve_refused("--data-dir", str(tmp_path / "d3"), "--no-embedded", "--storage-url", "s3://b?endpont=x")
    assert "unknown storage URL parameter 'endpont'" in message
