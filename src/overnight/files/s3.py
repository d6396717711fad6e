"""S3-compatible object storage adapter (AWS S3, SeaweedFS, MinIO, Ceph RGW, R2...), on boto3
(bench/bench_s3_clients.py: the only client measured that has every call this needs in its public
API; its extra cost per request is client CPU, a few per shard).

* writer: bounded memory. Up to one part (8 MiB by default, at least the 5 MiB S3 minimum) is
  buffered; a blob that fits in one part is one PUT, a larger one a multipart upload whose parts are
  sent as they fill. Any exception inside the block aborts the upload: nothing half-written is ever
  published. Every write is conditional (`If-None-Match: *`): a key is never silently overwritten
  (every key overnight writes is new: a fresh file id, a results key per attempt); 412 raises
  `ObjectExistsError`, unless it is our own write landing twice (a retry after a lost response:
  the stored ETag is ours). Servers that answer 501 to the condition get unconditional writes.
* reads: a ranged GET; iter_chunks streams a GET and, if the connection breaks, resumes at the byte
  it reached with a ranged GET pinned to the same ETag (never two versions spliced).
* transient failures (connection refused or reset, timeouts, 5xx, SlowDown) are retried with backoff
  for `retry_seconds`: a storage restart of a few seconds is ridden out, not turned into failed work.
* keys: every key is prefixed with `prefix`; the layout below it (files/..., results/...) is the
  callers'.

Nothing here logs or raises with credentials in it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from overnight.files.layout import PREFIXES
from overnight.files.port import CHUNK_SIZE, StorageFullError, StorageUnavailableError, stream_copy

log = logging.getLogger("overnight.files")

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last (EntityTooSmall otherwise)
DEFAULT_PART_SIZE = 8 * MiB
MAX_PARTS = 10_000
MAX_PART_SIZE = 5 * 1024 * MiB  # S3's maximum part size
_MAX_RESUMES = 20  # a read that breaks more often than this fails
_T = TypeVar("_T")
# Retried; still failing when the retry window ends, an outage (S3UnavailableError). A 409
# ConditionalRequestConflict is a conditional write racing our own retry of it: AWS says retry.
_TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                              "ThrottlingException", "RequestTimeTooSkewed", "ConditionalRequestConflict",
                              "503", "500", "502", "504", "429"})
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
# A full store or a quota (MinIO's 507 and bucket quota, Ceph RGW's QuotaExceeded): the
# StorageFullError a full disk raises on the local store.
_FULL_CODES = frozenset({"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded", "StorageFull"})
_AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                         "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"})
_NETWORK_ERRORS: tuple[type[Exception], ...] = (
    bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError, bx.ConnectTimeoutError,
    bx.ResponseStreamingError, bx.IncompleteReadError,
)


class S3StorageError(OSError):
    """Object storage refused or could not do an operation; the message says what to fix."""


class S3UnavailableError(S3StorageError, StorageUnavailableError):
    """The endpoint did not answer (or kept failing) for the whole retry window."""


class S3AccessError(S3StorageError, PermissionError):
    """Wrong credentials, or credentials without permission on the bucket."""


class S3BucketMissingError(S3StorageError):
    """The bucket does not exist."""


class S3FullError(S3StorageError, StorageFullError):
    """The store is full, or the bucket's quota is used up."""


class ObjectExistsError(S3StorageError, FileExistsError):
    """A conditional write found the key taken: nothing was written."""


class _S3Writer:
    def __init__(self, store: S3FileStore, key: str) -> None:
        self._store = store
        self._key = key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.bytes_written = 0

    def write(self, data: bytes | memoryview) -> None:
        self.bytes_written += len(data)
        view = memoryview(data)
        while view:
            size = self._part_size()
            if len(self._buffer) >= size:  # full, and more follows: a multipart upload
                self._send_part(self._buffer)
                self._buffer = bytearray()
                continue
            room = size - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]

    def _part_size(self) -> int:
        """The next part's size: the store's, doubled after each tenth of MAX_PARTS parts (S3 takes
        parts of different sizes), so an object of any size fits in MAX_PARTS parts (8 MiB parts
        alone stop at 78 GiB); the buffer grows with the object only past 8 GB."""
        doublings = len(self._parts) // max(1, MAX_PARTS // 10)
        return int(min(self._store.part_size << doublings, MAX_PART_SIZE))

    def _send_part(self, data: bytearray) -> None:
        """Send a part; a bytearray goes out as it is (botocore copies a `bytes` body)."""
        store = self._store
        if self._upload_id is None:
            self._upload_id = store._call("start an upload", self._key, lambda: str(store.client.create_multipart_upload(
                Bucket=store.bucket, Key=self._key)["UploadId"]))
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise S3StorageError(errno.EFBIG, f"{self._key}: more than {MAX_PARTS} parts (S3's limit)")
        upload_id = self._upload_id
        etag = store._call("upload a part", self._key, lambda: str(store.client.upload_part(
            Bucket=store.bucket, Key=self._key, UploadId=upload_id, PartNumber=number, Body=data)["ETag"]))
        self._parts.append({"PartNumber": number, "ETag": etag})

    def publish(self) -> None:
        if self._upload_id is None:
            self._store._put_new(self._key, self._buffer)
        else:
            if self._buffer:
                self._send_part(self._buffer)
            self._buffer = bytearray()
            self._store._complete_new(self._key, self._upload_id, self._parts)
            self._upload_id = None

    def abort(self) -> None:
        """Best effort: an upload left open here is aborted later by `abort_stale_uploads`."""
        self._buffer = bytearray()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            self._store.client.abort_multipart_upload(Bucket=self._store.bucket, Key=self._key, UploadId=upload_id)
        except Exception as exc:
            log.warning("could not abort the upload of %s (%s); the janitor will", self._key, type(exc).__name__)


class S3FileStore:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        conditional_writes: bool = True,
        retry_seconds: float = 30.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_connections: int = 32,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 bucket name is required")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (the S3 minimum part size)")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.part_size = part_size
        self.conditional_writes = conditional_writes
        self.retry_seconds = retry_seconds
        config = Config(
            region_name=region or "us-east-1",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_connections,
            retries={"mode": "standard", "total_max_attempts": 1},  # we retry, within `retry_seconds`
            # Checksums only where the API requires them: S3-compatible servers differ on the newer
            # flexible-checksum headers, and TCP plus the ETag check what these would.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            aws_session_token=session_token, config=config,
        )

    def __repr__(self) -> str:
        return f"S3FileStore({self.describe()})"

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    # -- the port ---------------------------------------------------------------------------

    @contextmanager
    def writer(self, key: str) -> Iterator[_S3Writer]:
        writer = _S3Writer(self, self._key(key))
        try:
            yield writer
            writer.publish()
        except BaseException:
            writer.abort()
            raise

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        full = self._key(key)

        def get() -> bytes:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=full,
                                                  Range=f"bytes={offset}-{offset + length - 1}")
            except bx.ClientError as exc:
                if _status(exc) == 416:  # at or past the end, as a file read there gives b""
                    return b""
                raise
            with contextlib.closing(response["Body"]) as body:
                return bytes(body.read())

        return self._call("read", full, get)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        full = self._key(key)
        response = self._call("read", full, lambda: self.client.get_object(Bucket=self.bucket, Key=full))
        size, etag, position = int(response["ContentLength"]), str(response["ETag"]), 0
        body = response["Body"]
        resumes = 0
        try:
            while position < size:
                want = min(chunk_size, size - position)
                pieces: list[bytes] = []
                have = 0
                while have < want:  # a short read (the stream broke) is topped up after resuming
                    try:
                        piece = bytes(body.read(want - have))
                        if not piece:
                            raise bx.IncompleteReadError(actual_bytes=position + have, expected_bytes=size)
                    except _NETWORK_ERRORS as exc:
                        resumes += 1
                        if resumes > _MAX_RESUMES:
                            raise self._translate(exc, "read", full, f" (the stream broke {resumes} times)") from None
                        # Resume where the stream broke, from the same version of the object.
                        log.warning("reading %s broke at byte %d of %d (%s); resuming", full, position + have, size,
                                    type(exc).__name__)
                        body.close()
                        body = self._call("read", full, partial(self._get_rest, full, position + have, etag))
                        continue
                    pieces.append(piece)
                    have += len(piece)
                position += have
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
        finally:
            body.close()

    def _get_rest(self, key: str, start: int, etag: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-", IfMatch=etag)["Body"]
        except bx.ClientError as exc:
            if _status(exc) == 412:
                raise S3StorageError(errno.ESTALE, f"{key} was replaced while being read") from None
            if _status(exc) == 404:  # not "no such object": part of it was read already
                raise S3StorageError(errno.ESTALE, f"{key} was deleted while being read") from None
            raise

    def exists(self, key: str) -> bool:
        full = self._key(key)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=full)
            except bx.ClientError as exc:
                if _status(exc) != 404:
                    raise
                # A HEAD answer has no body to say NoSuchBucket: a missing bucket must not read
                # as a missing object (validation would fail the batch as "file deleted").
                try:
                    self.client.head_bucket(Bucket=self.bucket)
                except bx.ClientError as missing:
                    if _status(missing) == 404:
                        raise self._translate(missing, "look up", "") from None
                    raise
                return False
            return True

        return self._call("look up", full, head)

    def copy(self, source: str, key: str) -> None:
        # Streamed through the writer, so the copy gets its conditional, retried publish. (A
        # server-side CopyObject would move no bytes here; not measured yet.)
        stream_copy(self, source, key)

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._call("delete", full, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def remove_empty_dirs(self, older_than: float) -> int:
        return 0  # keys only: there are no directories to leave behind

    def list_keys(self, prefix: str, older_than: float) -> Iterator[str]:
        full_prefix = self.prefix + prefix
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                args["ContinuationToken"] = token
            page = self._call("list", full_prefix, partial(self.client.list_objects_v2, **args))
            for item in page.get("Contents", ()):
                if item["LastModified"].timestamp() < older_than:
                    yield str(item["Key"])[len(self.prefix):]
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    def abort_stale_uploads(self, older_than: float) -> int:
        """Abort multipart uploads of ours (under the prefix, in overnight's namespaces: a bucket
        without a prefix may hold others' uploads) started before `older_than` (their writer died
        before it could abort them); returns how many. Their parts are otherwise kept, and billed,
        for ever."""
        return sum(self._abort_stale_uploads(self.prefix + namespace, older_than) for namespace in PREFIXES)

    def _abort_stale_uploads(self, prefix: str, older_than: float) -> int:
        aborted = 0
        markers: dict[str, str] = {}
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, **markers}
            page = self._call("list uploads", prefix, partial(self.client.list_multipart_uploads, **args))
            for upload in page.get("Uploads", ()):
                key, upload_id = str(upload["Key"]), str(upload["UploadId"])
                if upload["Initiated"].timestamp() < older_than and self._idle_since(key, upload_id, older_than):
                    try:
                        self._call("abort an upload", key, partial(self.client.abort_multipart_upload,
                                                                   Bucket=self.bucket, Key=key, UploadId=upload_id))
                    except FileNotFoundError:  # NoSuchUpload: finished or aborted meanwhile
                        continue
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            markers = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}

    def _idle_since(self, key: str, upload_id: str, older_than: float) -> bool:
        """Whether no part of the upload was written since `older_than` (a slow upload that is
        still going, a large file from a slow client, is left alone)."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id}
        while True:
            try:
                page = self._call("list parts", key, partial(self.client.list_parts, **args))
            except FileNotFoundError:  # finished or aborted meanwhile
                return False
            if any(part["LastModified"].timestamp() >= older_than for part in page.get("Parts", ())):
                return False
            if not page.get("IsTruncated"):
                return True
            args["PartNumberMarker"] = page["NextPartNumberMarker"]

    # -- set-up -----------------------------------------------------------------------------

    def check(self, timeout: float = 10.0) -> None:
        """Fail now, with what to fix, if the bucket cannot be used (missing, credentials wrong,
        endpoint unreachable): one HEAD of the bucket, retried for at most `timeout` seconds."""
        self._call("open", "", lambda: self.client.head_bucket(Bucket=self.bucket), window=timeout)

    # -- internals --------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid storage key {key!r}")
        return self.prefix + key

    def _put_new(self, key: str, data: bytearray) -> None:
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()

        def put() -> None:
            if self.conditional_writes:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            else:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

        self._conditional("write", key, put, md5)

    def _complete_new(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        try:  # S3's multipart ETag: the MD5 of the parts' MD5s, then "-" and their number
            digests = b"".join(bytes.fromhex(str(part["ETag"]).strip('"')) for part in parts)
            expected = f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"
        except ValueError:  # a server whose part ETags are not MD5s: a 412 is then always refused
            expected = ""

        def complete() -> None:
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id,
                                    "MultipartUpload": {"Parts": parts}}
            if self.conditional_writes:
                args["IfNoneMatch"] = "*"
            self.client.complete_multipart_upload(**args)

        try:
            self._conditional("write", key, complete, expected)
        except FileNotFoundError:
            # NoSuchUpload: a completion whose answer was lost, then retried; ours if the ETag is.
            if self._etag(key) != expected:
                raise

    def _conditional(self, action: str, key: str, fn: Callable[[], None], etag: str) -> None:
        """Run a conditional write: on 412, succeed if the stored object is this very write (a retry
        after a lost answer), else refuse; on 501 (no conditional writes here), write without."""
        try:
            self._call(action, key, fn)
        except ObjectExistsError:
            if self._etag(key) != etag:
                raise
        except S3StorageError as exc:
            if not (self.conditional_writes and exc.errno == errno.ENOSYS):
                raise
            log.warning("%s does not support conditional writes (If-None-Match); writing without them, "
                        "so an existing object could be overwritten", self.describe())
            self.conditional_writes = False
            self._call(action, key, fn)

    def _etag(self, key: str) -> str | None:
        try:
            head = self._call("look up", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except FileNotFoundError:
            return None
        return str(head["ETag"]).strip('"')

    def _call(self, action: str, key: str, fn: Callable[[], _T], window: float | None = None) -> _T:
        """`fn()`, retried on transient failures for `window` (default `retry_seconds`) seconds;
        other failures become errors that say what to fix."""
        started = time.monotonic()
        deadline = started + (self.retry_seconds if window is None else window)
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except (bx.ClientError, bx.BotoCoreError) as exc:
                if not _transient(exc) or time.monotonic() + delay > deadline:
                    tries = f" (tried {attempt} times in {time.monotonic() - started:.0f} s)" if attempt > 1 else ""
                    raise self._translate(exc, action, key, tries) from None
                if attempt == 1:
                    log.warning("object storage %s: cannot %s %s (%s); retrying for up to %.0f s",
                                self.describe(), action, key or "the bucket", _summary(exc),
                                deadline - time.monotonic())
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    def _translate(self, exc: Exception, action: str, key: str, tries: str = "") -> OSError:
        where = self.describe()
        what = f"cannot {action} {key or 'the bucket'} in {where}"
        if isinstance(exc, bx.NoCredentialsError):
            return S3AccessError(errno.EACCES, f"{what}: no credentials. Give access_key and secret_key in "
                                 "--storage-url, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if not isinstance(exc, bx.ClientError) and not _transient(exc):
            return S3StorageError(errno.EIO, f"{what}: {_summary(exc)}")
        if not isinstance(exc, bx.ClientError):
            return S3UnavailableError(errno.EHOSTUNREACH, f"{what}: the endpoint does not answer{tries}: "
                                      f"{_summary(exc)}. Check that the server runs and that the endpoint "
                                      "(in --storage-url, or AWS_ENDPOINT_URL) is right")
        code, status = _code(exc), _status(exc)
        if code == "NoSuchBucket" or (status == 404 and not key):
            return S3BucketMissingError(errno.ENOENT, f"{what}: the bucket {self.bucket!r} does not exist. "
                                        "Create it, or fix the bucket name in --storage-url")
        if code in ("NoSuchKey", "NoSuchUpload") or status == 404:
            return FileNotFoundError(errno.ENOENT, f"{what}: no such object ({code})", key)
        if code in _FULL_CODES or status == 507:
            return S3FullError(errno.ENOSPC, f"{what}: the store is full or the bucket's quota is used up ({code}, "
                               f"HTTP {status}). Free space or raise the quota")
        if code in _AUTH_CODES or status == 403:
            return S3AccessError(errno.EACCES, f"{what}: access denied ({code}). Check the access key and secret "
                                 "key (access_key/secret_key in --storage-url, or AWS_ACCESS_KEY_ID/"
                                 "AWS_SECRET_ACCESS_KEY) and that they may read and write this bucket")
        if status == 412 or code == "PreconditionFailed":
            return ObjectExistsError(errno.EEXIST, f"{what}: an object already has this key; it was not "
                                     "overwritten", key)
        if status == 501 or code == "NotImplemented":
            return S3StorageError(errno.ENOSYS, f"{what}: not supported by this server ({code})")
        if _transient(exc):  # the retry window ran out on a server that kept failing: an outage
            return S3UnavailableError(errno.EAGAIN, f"{what}: the server kept failing{tries}: {code} (HTTP {status}): "
                                      f"{_message(exc)}")
        return S3StorageError(errno.EIO, f"{what}: {code} (HTTP {status}){tries}: {_message(exc)}")


def _code(exc: bx.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: bx.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _message(exc: bx.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", ""))[:300]


def _transient(exc: Exception) -> bool:
    if isinstance(exc, bx.ClientError):
        return _code(exc) in _TRANSIENT_CODES or _status(exc) in _TRANSIENT_STATUSES
    return isinstance(exc, _NETWORK_ERRORS) or (
        isinstance(exc, bx.HTTPClientError) and not isinstance(exc, bx.SSLError))


def _summary(exc: Exception) -> str:
    if isinstance(exc, bx.ClientError):
        return f"{_code(exc)}, HTTP {_status(exc)}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"
