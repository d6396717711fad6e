"""Streaming multipart upload: the file part (`file` on /v1/files, `data` on an upload's parts) goes straight into the file store in 1 MiB writes
(no spooling to a temp file first, no whole file in memory); small fields are kept as text."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from overnight.batches.errors import InvalidRequest, PayloadTooLarge
from overnight.batches.file_service import HEAD_BYTES
from overnight.files.port import BlobWriter, FileStore

_FLUSH_BYTES = 1024 * 1024
_MAX_FIELD_BYTES = 64 * 1024
_MAX_FIELDS = 32


@dataclass(slots=True)
class ReceivedUpload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0
    head: bytes = b""


class _PartCollector:
    """python-multipart callbacks; file bytes are queued and written by the async loop."""

    def __init__(self, max_bytes: int, file_field: str, too_large: str) -> None:
        self.max_bytes = max_bytes
        self.file_field = file_field
        self.too_large = too_large
        self.upload = ReceivedUpload()
        self.to_write: list[bytes] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._field = bytearray()
        self._head = bytearray()
        self.ended = False  # the closing boundary arrived (python-multipart's finalize() checks nothing)

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._is_file = b"", "", False
        self._field.clear()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == self.file_field:
            if self.upload.filename is not None:
                raise InvalidRequest(f"Send exactly one '{self.file_field}' part.", param=self.file_field)
            self._is_file = True
            self.upload.filename = options.get(b"filename", b"upload").decode("utf-8", "replace")
        elif len(self.upload.fields) >= _MAX_FIELDS:
            raise InvalidRequest("Too many form fields.")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            chunk = data[start:end]
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                raise PayloadTooLarge(self.too_large, param=self.file_field)
            if len(self._head) < HEAD_BYTES:
                self._head += chunk[: HEAD_BYTES - len(self._head)]
            self.to_write.append(chunk)
        else:
            self._field += data[start:end]
            if len(self._field) > _MAX_FIELD_BYTES:
                raise InvalidRequest(f"The form field '{self._name}' is too long.", param=self._name)

    def on_part_end(self) -> None:
        if self._is_file:
            self.upload.head = bytes(self._head)
        elif self._name:
            self.upload.fields[self._name] = self._field.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.ended = True

    def pop_chunks(self) -> bytes:
        data = b"".join(self.to_write)
        self.to_write.clear()
        return data


async def receive_upload(
    request: Request, files: FileStore, key: str, max_bytes: int, file_field: str = "file",
    too_large: str | None = None, inspect: Callable[[bytes], None] | None = None,
) -> ReceivedUpload:
    """Parse the multipart body, storing the `file_field` part under `key` (atomically, at the end);
    a part over `max_bytes` is refused with 413 and the message `too_large`. `inspect` sees the
    part's bytes in order as they are written (on the writing thread, off the event loop)."""
    content_type = request.headers.get("content-type", "")
    media, params = parse_options_header(content_type)
    if media != b"multipart/form-data" or b"boundary" not in params:
        expected = "a 'file' part and a 'purpose' field" if file_field == "file" else f"a '{file_field}' part"
        raise InvalidRequest(f"Uploads must be sent as multipart/form-data with {expected}.", param=file_field)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 1024 * 1024:
        raise PayloadTooLarge(f"The request body is larger than {max_bytes:,} bytes, the most this server accepts.")
    if too_large is None:
        too_large = (f"The file is larger than {max_bytes:,} bytes, the most this server accepts. "
                     "Split it into several files.")
    collector = _PartCollector(max_bytes, file_field, too_large)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": collector.on_part_begin,
            "on_part_data": collector.on_part_data,
            "on_part_end": collector.on_part_end,
            "on_header_field": collector.on_header_field,
            "on_header_value": collector.on_header_value,
            "on_header_end": collector.on_header_end,
            "on_headers_finished": collector.on_headers_finished,
            "on_end": collector.on_end,
        },
    )
    context = files.writer(key)
    writer = await asyncio.to_thread(context.__enter__)
    buffered = 0
    received = 0
    body_limit = max_bytes + 1024 * 1024  # the file and the form around it, as the declared length above
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:  # a chunked body declares no length: bytes after the closing
                # boundary and repeated fields were parsed (and dropped) without end
                raise PayloadTooLarge(f"The request body is larger than {max_bytes:,} bytes, the most this "
                                      "server accepts.")
            parser.write(chunk)
            buffered = sum(len(c) for c in collector.to_write)
            if buffered >= _FLUSH_BYTES:
                await asyncio.to_thread(_write, writer, collector.pop_chunks(), inspect)
        parser.finalize()
        if not collector.ended:  # a body cut off mid-part must not be stored as the whole file
            raise InvalidRequest("The multipart/form-data body ended before its closing boundary (the upload "
                                 "was cut off). Send the file again.", param=file_field)
        if collector.to_write:
            await asyncio.to_thread(_write, writer, collector.pop_chunks(), inspect)
    except BaseException:
        await asyncio.to_thread(context.__exit__, *sys.exc_info())
        raise
    await asyncio.to_thread(context.__exit__, None, None, None)
    if collector.upload.filename is None:
        await asyncio.to_thread(files.delete, key)
        raise InvalidRequest(f"Missing required parameter: '{file_field}'.", param=file_field,
                             code="missing_required_parameter")
    return collector.upload


def _write(writer: BlobWriter, data: bytes, inspect: Callable[[bytes], None] | None) -> None:
    writer.write(data)
    if inspect is not None:
        inspect(data)
