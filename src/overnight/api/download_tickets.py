"""Download tickets: a short-lived URL that reads one file's content without an Authorization
header, so that a browser saves a file of any size straight to disk. (A page can send the header
only through fetch(), which must hold the whole file in the tab before it can be saved.)

A ticket is `<key id>.<expires>.<mac>`: the key id is the first 16 hex digits of the issuing key's
sha256, `mac` an HMAC-SHA256 keyed by that whole digest over the file id and the expiry. The server
keeps the digests and the key's holder can compute its own, so no one else can make a ticket, and
no secret beyond the keys needs to be shared between API processes. A ticket opens only its file,
only until it expires (`TICKET_SECONDS` at most, whoever made it), and only while its key is valid:
revoking the key revokes its tickets. It is a bearer credential for that minute, like an S3
presigned URL; the server keeps no access log that would record it."""

from __future__ import annotations

import hashlib
import hmac

TICKET_SECONDS = 60
_KEY_ID_CHARS = 16


def make_ticket(key_hash: str, file_id: str, expires: int) -> str:
    return f"{key_hash[:_KEY_ID_CHARS]}.{expires}.{_mac(key_hash, file_id, expires)}"


def ticket_key(ticket: str, file_id: str, key_hashes: list[str], now: int) -> str | None:
    """The key hash that issued `ticket` for `file_id`, if it is well formed, unexpired, no
    further ahead than any ticket this server issues, and its mac checks; otherwise None."""
    if not ticket.isascii():
        return None
    key_id, _, rest = ticket.partition(".")
    expires_text, _, mac = rest.partition(".")
    if len(key_id) != _KEY_ID_CHARS or not expires_text.isascii() or not expires_text.isdigit():
        return None
    if len(expires_text) > 12:  # a year in the 5th millennium at most; keeps int() cheap
        return None
    expires = int(expires_text)
    if not now <= expires <= now + TICKET_SECONDS:
        return None
    found = None
    for key_hash in key_hashes:  # constant time in which key matched, as for keys themselves
        if hmac.compare_digest(key_hash[:_KEY_ID_CHARS], key_id) and hmac.compare_digest(
            _mac(key_hash, file_id, expires), mac
        ):
            found = key_hash
    return found


def _mac(key_hash: str, file_id: str, expires: int) -> str:
    message = f"overnight file download\n{file_id}\n{expires}".encode()
    return hmac.new(bytes.fromhex(key_hash), message, hashlib.sha256).hexdigest()
