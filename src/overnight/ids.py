"""Identifiers in OpenAI's observed formats. Per-line ids are derived, not random, so a re-run
of a shard writes byte-identical lines (outputs stay idempotent under at-least-once execution)."""

import secrets
import string

_BASE62 = string.digits + string.ascii_letters


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


def new_file_id() -> str:
    return "file-" + "".join(secrets.choice(_BASE62) for _ in range(24))


def new_upload_id() -> str:
    return "upload_" + secrets.token_hex(12)


def new_part_id() -> str:
    return "part_" + secrets.token_hex(12)


def new_request_id() -> str:
    """`req_<24 hex>`: the x-request-id of one HTTP request, as OpenAI's look."""
    return "req_" + secrets.token_hex(12)


def new_lease_token() -> str:
    return secrets.token_hex(12)


def line_id(batch_id: str, line_index: int) -> str:
    """`batch_req_<batch hex><line index>`: unique per input line, the same on every attempt."""
    return f"{line_id_prefix(batch_id)}{line_index:08x}"


def line_id_prefix(batch_id: str) -> str:
    """What every line id of the batch starts with (hot loops add the index themselves)."""
    return "batch_req_" + batch_id.removeprefix("batch_")


def line_request_id_prefix(batch_id: str) -> str:
    """The same for `response.request_id` of an engine that gives none: `req_<16 hex><index>`."""
    return "req_" + batch_id.removeprefix("batch_")[:16]


def new_event_id() -> str:
    """`evt_<32 hex>`: a webhook event, the same on every delivery attempt (`webhook-id`)."""
    return "evt_" + secrets.token_hex(16)
