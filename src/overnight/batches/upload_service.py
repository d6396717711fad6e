"""Uploads: a file that arrives in parts (each streamed into the file store as it comes) and
becomes a File when completed: the parts are copied, in the order the client lists them, into
one new blob a chunk at a time (never a whole part in memory), checked like any upload through
/v1/files, and then removed. An upload takes parts for an hour; housekeeping removes the parts
of one that ran out (`SqlUploadStore.expire_uploads`)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from overnight import constants as C
from overnight.batches.errors import InvalidRequest, NotFound
from overnight.batches.file_service import HEAD_BYTES, FileService, check_upload_params, clean_filename
from overnight.batches.ports import UploadCatalog
from overnight.batches.upload_check import UploadValidator
from overnight.files.layout import upload_part_key
from overnight.ids import new_part_id, new_upload_id
from overnight.store.records import FileRecord, UploadPartRecord, UploadRecord

log = logging.getLogger("overnight.uploads")


def upload_status(record: UploadRecord, now: int) -> str:
    """A pending upload past its expiry is expired, whether or not housekeeping has been by."""
    if record.status == C.UPLOAD_PENDING and now >= record.expires_at:
        return C.UPLOAD_EXPIRED
    return record.status


class UploadService:
    def __init__(
        self,
        catalog: UploadCatalog,
        file_service: FileService,
        max_file_bytes: int,
        expiry_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.file_service = file_service
        self.files = file_service.files
        self.max_file_bytes = max_file_bytes
        self.expiry_seconds = expiry_seconds
        self.clock = clock

    def now(self) -> int:
        return int(self.clock())

    def create(
        self, owner: str, filename: str, purpose: str, size: int, mime_type: str,
        expires_after: tuple[str, int] | None,
    ) -> UploadRecord:
        check_upload_params(purpose, expires_after)
        for name, text in (("filename", filename), ("mime_type", mime_type)):
            if "\x00" in text:  # PostgreSQL text cannot hold NUL: refuse it on every database alike
                raise InvalidRequest(f"{name} cannot contain NUL characters.", param=name, code="invalid_value")
        if size < 0:
            raise InvalidRequest("bytes must be 0 or more.", param="bytes", code="invalid_value")
        if size > self.max_file_bytes:
            raise InvalidRequest(
                f"bytes is {size:,}, but this server accepts files of at most {self.max_file_bytes:,} bytes.",
                param="bytes",
                code="invalid_value",
            )
        now = self.now()
        record = UploadRecord(
            id=new_upload_id(), owner=owner, filename=clean_filename(filename), purpose=purpose, bytes=size,
            mime_type=mime_type, created_at=now, expires_at=now + self.expiry_seconds, status=C.UPLOAD_PENDING,
            file_expires_after=expires_after[1] if expires_after is not None else None,
        )
        self.catalog.insert_upload(record)
        return record

    def get(self, owner: str, upload_id: str) -> UploadRecord:
        record = self.catalog.get_upload(owner, upload_id)
        if record is None:
            raise NotFound(f"No such Upload object: {upload_id}", param="upload_id")
        return record

    # -- parts ------------------------------------------------------------------------------

    def new_part(self, owner: str, upload_id: str) -> tuple[str, str, int]:
        """Before a part's bytes are received: its id, its storage key and the most bytes it may
        have (64 MB, and no more than keeps the upload's parts within the file size limit)."""
        upload = self._pending(owner, upload_id, "add a part to")
        room = self.max_file_bytes - self.catalog.received_bytes(upload.id)
        if room <= 0:
            raise InvalidRequest(
                f"Upload {upload_id} already holds {self.max_file_bytes:,} bytes of parts, the most a file "
                "on this server can have.",
                param="data",
            )
        part_id = new_part_id()
        return part_id, upload_part_key(upload.id, part_id), min(C.UPLOAD_PART_MAX_BYTES, room)

    def add_part(self, owner: str, upload_id: str, part_id: str, key: str, size: int) -> UploadPartRecord:
        """Record a part whose bytes are stored under `key`; they are deleted if the upload was
        completed, cancelled or expired while they arrived."""
        part = UploadPartRecord(part_id, upload_id, size, self.now(), key)
        try:
            upload, recorded = self.catalog.add_part(owner, part, part.created_at, self.max_file_bytes)
        except BaseException:
            self.files.delete(key)
            raise
        if not recorded:
            self.files.delete(key)
            self._pending(owner, upload_id, "add a part to", upload)
            # Pending, but parts sent at once filled it while this one arrived: its room was taken.
            raise InvalidRequest(
                f"Upload {upload_id} cannot take this part: with it, its parts would hold more than "
                f"{self.max_file_bytes:,} bytes, the most a file on this server can have.",
                param="data",
            )
        return part

    # -- complete and cancel ------------------------------------------------------------------

    def complete(
        self, owner: str, upload_id: str, part_ids: Sequence[str], md5: str | None
    ) -> tuple[UploadRecord, FileRecord]:
        """Assemble the parts, in the order of `part_ids`, into a new File."""
        upload = self._pending(owner, upload_id, "complete")
        parts = self._listed_parts(upload, part_ids)
        total = sum(p.bytes for p in parts)
        if total != upload.bytes:
            raise InvalidRequest(
                f"The parts listed add up to {total:,} bytes, but upload {upload_id} was created with "
                f"bytes={upload.bytes:,}. The bytes uploaded must match the bytes declared.",
                param="part_ids",
            )
        file_id = self.file_service.new_upload_id()
        validator = self.file_service.upload_validator() if upload.purpose == "batch" else None
        head = self._assemble(upload, parts, self.file_service.storage_key(file_id), md5, validator)
        expires_after = ("created_at", upload.file_expires_after) if upload.file_expires_after is not None else None
        record = self.file_service.new_record(
            owner, file_id, upload.filename, upload.purpose, total, head, expires_after,
            validator.result() if validator is not None else None,
        )
        keys = self.catalog.complete_upload(owner, upload.id, record, self.now())
        if keys is None:  # cancelled, completed or expired while it was being assembled
            self.files.delete(record.storage_key)
            self._pending(owner, upload_id, "complete")
            raise self._refusal(upload_id, "complete", C.UPLOAD_EXPIRED)
        self._delete_parts(keys)
        return replace(upload, status=C.UPLOAD_COMPLETED, file_id=record.id), record

    def cancel(self, owner: str, upload_id: str) -> UploadRecord:
        """Cancel a pending upload and remove its parts; cancelling again answers the same."""
        before, keys = self.catalog.cancel_upload(owner, upload_id, self.now())
        if before is None:
            raise NotFound(f"No such Upload object: {upload_id}", param="upload_id")
        if before.status != C.UPLOAD_CANCELLED:
            self._pending(owner, upload_id, "cancel", before)
        self._delete_parts(keys)
        return replace(before, status=C.UPLOAD_CANCELLED)

    def _listed_parts(self, upload: UploadRecord, part_ids: Sequence[str]) -> list[UploadPartRecord]:
        if len(set(part_ids)) != len(part_ids):
            raise InvalidRequest("part_ids lists the same part more than once.", param="part_ids",
                                 code="invalid_value")
        found = {p.id: p for p in self.catalog.parts(upload.id, part_ids)}
        missing = [pid for pid in part_ids if pid not in found]
        if missing:
            raise InvalidRequest(f"No such part on upload {upload.id}: {missing[0]}", param="part_ids",
                                 code="invalid_value")
        return [found[pid] for pid in part_ids]

    def _assemble(self, upload: UploadRecord, parts: list[UploadPartRecord], key: str, md5: str | None,
                  validator: UploadValidator | None) -> bytes:
        """Copy the parts into one blob under `key`, a chunk at a time (each also fed to `validator`);
        the file's first HEAD_BYTES for the upload check. Nothing is published when the MD5 does not match."""
        digest = hashlib.md5(usedforsecurity=False)
        head = bytearray()
        with self.files.writer(key) as writer:
            for part in parts:
                try:
                    for chunk in self.files.iter_chunks(part.storage_key):
                        digest.update(chunk)
                        if len(head) < HEAD_BYTES:
                            head += chunk[: HEAD_BYTES - len(head)]
                        writer.write(chunk)
                        if validator is not None:
                            validator.feed(chunk)
                except FileNotFoundError:
                    # A cancel or another complete committed under us (they delete the parts), or
                    # housekeeping expired the upload: the refusal says which.
                    self._pending(upload.owner, upload.id, "complete")
                    raise self._refusal(upload.id, "complete", C.UPLOAD_EXPIRED) from None
            if md5 is not None and md5.strip().lower() != digest.hexdigest():
                raise InvalidRequest(
                    f"The md5 checksum given ({md5}) does not match the MD5 of the uploaded parts "
                    f"({digest.hexdigest()}).",
                    param="md5",
                    code="invalid_value",
                )
        return bytes(head)

    def _delete_parts(self, keys: list[str]) -> None:
        """After the commit that dropped their rows; an object left here is an orphan housekeeping removes."""
        for key in keys:
            try:
                self.files.delete(key)
            except Exception:
                log.warning("could not delete upload part %s; housekeeping will", key, exc_info=True)

    def _pending(
        self, owner: str, upload_id: str, action: str, upload: UploadRecord | None = None
    ) -> UploadRecord:
        """The upload if it takes `action` now (it is pending and unexpired); else the error that says why."""
        record = upload if upload is not None else self.get(owner, upload_id)
        status = upload_status(record, self.now())
        if status == C.UPLOAD_PENDING:
            return record
        raise self._refusal(upload_id, action, status)

    def _expiry_text(self) -> str:
        hours, rest = divmod(self.expiry_seconds, 3600)
        if rest == 0:
            return "an hour" if hours == 1 else f"{hours} hours"
        return f"{self.expiry_seconds} seconds"

    def _refusal(self, upload_id: str, action: str, status: str) -> InvalidRequest:
        reason = {
            C.UPLOAD_COMPLETED: "it is already completed",
            C.UPLOAD_CANCELLED: "it was cancelled",
            C.UPLOAD_EXPIRED: f"it has expired (an upload must be completed within {self._expiry_text()} "
            "of its creation; create a new upload)",
        }[status]
        return InvalidRequest(f"Cannot {action} upload {upload_id}: {reason}.", param="upload_id")
