"""Files: records plus bytes. Uploads arrive as a stream the API layer feeds into `blob_writer`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from overnight import constants as C
from overnight.batches.errors import InvalidRequest, NotFound
from overnight.batches.ports import FileCatalog
from overnight.batches.request_line import RequestLineError, loads_line
from overnight.batches.upload_check import CheckedUpload, UploadChecks, UploadValidator
from overnight.files.layout import file_key
from overnight.files.port import FileStore
from overnight.ids import new_file_id
from overnight.store.records import FileRecord

# The shallow upload check reads at most this much of the file's first line.
HEAD_BYTES = 1024 * 1024


class FileService:
    def __init__(self, catalog: FileCatalog, files: FileStore, clock: Callable[[], float] = time.time,
                 upload_checks: UploadChecks | None = None) -> None:
        self.catalog = catalog
        self.files = files
        self.clock = clock
        self.upload_checks = upload_checks  # None: uploads are not validated as they arrive

    def upload_validator(self) -> UploadValidator | None:
        """What an upload's bytes are fed to as they arrive, when batch inputs are validated on upload."""
        return self.upload_checks.validator() if self.upload_checks is not None else None

    def now(self) -> int:
        return int(self.clock())

    @staticmethod
    def storage_key(file_id: str) -> str:
        return file_key(file_id)

    def register_upload(
        self,
        owner: str,
        file_id: str,
        filename: str,
        purpose: str,
        size: int,
        head: bytes,
        expires_after: tuple[str, int] | None,
        checked: CheckedUpload | None = None,
    ) -> FileRecord:
        """Record an upload whose bytes are already stored under `storage_key(file_id)`."""
        record = self.new_record(owner, file_id, filename, purpose, size, head, expires_after, checked)
        self.catalog.insert_file(record)
        return record

    def new_record(
        self,
        owner: str,
        file_id: str,
        filename: str,
        purpose: str,
        size: int,
        head: bytes,
        expires_after: tuple[str, int] | None,
        checked: CheckedUpload | None = None,
    ) -> FileRecord:
        """Check an upload whose bytes are stored under `storage_key(file_id)` and make its record
        (not yet in the catalog); an upload that fails the checks is deleted and InvalidRequest raised.
        `checked`: what validation on upload found, kept with a batch input."""
        key = self.storage_key(file_id)
        try:
            check_upload_params(purpose, expires_after)
            if purpose == "batch":
                check_jsonl_head(head, size)
        except InvalidRequest:
            self.files.delete(key)
            raise
        now = self.now()
        if expires_after is not None:
            expires_at: int | None = now + expires_after[1]
        elif purpose == "batch":
            expires_at = now + C.BATCH_FILE_DEFAULT_TTL
        else:
            expires_at = None
        upload_check = checked.to_json() if checked is not None and purpose == "batch" else None
        return FileRecord(file_id, owner, purpose, clean_filename(filename), size, now, expires_at, key, upload_check)

    def new_upload_id(self) -> str:
        return new_file_id()

    def get(self, owner: str | None, file_id: str) -> FileRecord:
        record = self.catalog.get_file(owner, file_id, self.now())
        if record is None:
            raise NotFound(f"No such File object: {file_id}", param="id")
        return record

    def list(
        self, owner: str | None, purpose: str | None, after: str | None, limit: int, order: str
    ) -> tuple[list[FileRecord], bool]:
        if not 1 <= limit <= 10_000:
            raise InvalidRequest("limit must be between 1 and 10000.", param="limit", code="invalid_value")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be 'asc' or 'desc'.", param="order", code="invalid_value")
        page = self.catalog.list_files(owner, purpose, after, limit, order, self.now())
        if page is None:
            raise InvalidRequest(f"No file with id '{after}' to list after.", param="after", code="invalid_value")
        return page

    def delete(self, owner: str | None, file_id: str) -> None:
        if not self.catalog.delete_file(owner, file_id, self.now()):
            raise NotFound(f"No such File object: {file_id}", param="id")

    def content(self, owner: str | None, file_id: str) -> tuple[FileRecord, Iterator[bytes]]:
        record = self.get(owner, file_id)
        return record, self.files.iter_chunks(record.storage_key)


def check_upload_params(purpose: str, expires_after: tuple[str, int] | None) -> None:
    if purpose not in C.UPLOAD_PURPOSES:
        allowed = ", ".join(sorted(C.UPLOAD_PURPOSES))
        raise InvalidRequest(
            f"Invalid value for 'purpose': '{purpose}'. Supported values are: {allowed}.",
            param="purpose",
            code="invalid_value",
        )
    if expires_after is None:
        return
    anchor, seconds = expires_after
    if anchor != "created_at":
        raise InvalidRequest(
            "expires_after[anchor] must be 'created_at'.", param="expires_after.anchor", code="invalid_value"
        )
    if not C.FILE_EXPIRY_MIN_SECONDS <= seconds <= C.FILE_EXPIRY_MAX_SECONDS:
        raise InvalidRequest(
            f"expires_after[seconds] must be between {C.FILE_EXPIRY_MIN_SECONDS} and {C.FILE_EXPIRY_MAX_SECONDS}.",
            param="expires_after.seconds",
            code="invalid_value",
        )


def check_jsonl_head(head: bytes, size: int) -> None:
    """The shallow check OpenAI does at upload: empty files and a first line that is not a JSON
    object are refused; deeper problems are reported per line when a batch validates the file."""
    bad = InvalidRequest(
        "Invalid file format for Batch API. Must be .jsonl: one JSON request object per line.", param="file"
    )
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if size == 0 or not text:
        raise bad
    end = text.find(b"\n")
    if end < 0 and size > len(head):
        return  # the first line is longer than we looked at; batch validation will judge it
    first = text if end < 0 else text[:end]
    try:
        parsed = loads_line(first)
    except RequestLineError:
        raise bad from None
    if not isinstance(parsed, dict):
        raise bad


def clean_filename(name: str) -> str:
    """Keep the base name only, without control characters (it is echoed back to clients)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable())[:255]
    return cleaned or "upload"
