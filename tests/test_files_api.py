"""/v1/files through the official SDK against a real server."""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import ADMIN_KEY, API_KEY, OTHER_KEY, Server, chat_line, jsonl, raw_request, until, upload
from overnight.files.layout import file_key

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3

FILE_KEYS = {"id", "object", "bytes", "created_at", "expires_at", "filename", "purpose", "status", "status_details"}


def test_upload_retrieve_content_delete(client: openai.OpenAI, server: Server) -> None:
    data = jsonl([chat_line(i) for i in range(3)])
    created = client.files.create(file=("batchinput.jsonl", data), purpose="batch")
    assert created.object == "file"
    assert created.status == "processed"
    assert created.bytes == len(data)
    assert created.filename == "batchinput.jsonl"
    assert created.purpose == "batch"
    # batch files expire after 30 days by default
    assert created.expires_at == created.created_at + 30 * 24 * 3600

    status, headers, body = raw_request(
        "GET", f"{server.base_url}/files/{created.id}", {"Authorization": f"Bearer {API_KEY}"}
    )
    assert status == 200 and set(json.loads(body)) == FILE_KEYS
    assert headers["x-request-id"].startswith("req_")

    assert client.files.retrieve(created.id).id == created.id
    assert client.files.content(created.id).read() == data
    with client.files.with_streaming_response.content(created.id) as resp:
        assert b"".join(resp.iter_bytes(chunk_size=7)) == data

    deleted = client.files.delete(created.id)
    assert deleted.deleted is True and deleted.id == created.id
    with pytest.raises(openai.NotFoundError) as exc:
        client.files.retrieve(created.id)
    assert exc.value.body["param"] == "id"
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(created.id)


def test_expires_after_is_honoured(client: openai.OpenAI) -> None:
    created = client.files.create(
        file=("x.jsonl", jsonl([chat_line(1)])),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert created.expires_at == created.created_at + 3600
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(
            file=("x.jsonl", jsonl([chat_line(1)])), purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 10},
        )
    assert exc.value.body["param"] == "expires_after.seconds"


def test_other_purposes_do_not_expire_and_skip_jsonl_check(client: openai.OpenAI) -> None:
    created = client.files.create(file=("notes.txt", b"not json at all"), purpose="user_data")
    assert created.expires_at is None
    assert client.files.content(created.id).read() == b"not json at all"


@pytest.mark.parametrize(
    "content",
    [b"", b"\n\n", b"{malformed json\n", b"[1, 2, 3]\n", b"hello world"],
    ids=["empty", "blank", "malformed", "array", "text"],
)
def test_batch_upload_that_is_not_jsonl_is_refused(client: openai.OpenAI, content: bytes) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("bad.jsonl", content), purpose="batch")
    assert "jsonl" in exc.value.message.lower()
    assert exc.value.response.headers["x-should-retry"] == "false"


def test_good_first_line_then_garbage_passes_upload(client: openai.OpenAI) -> None:
    created = client.files.create(file=("x.jsonl", jsonl([chat_line(1)]) + b"{garbage\n"), purpose="batch")
    assert created.status == "processed"


def test_invalid_purpose_and_missing_fields(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="nonsense")  # type: ignore[arg-type]
    assert exc.value.body["param"] == "purpose"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, _, body = raw_request("POST", f"{server.base_url}/files", {**auth, "Content-Type": "application/json"},
                                  b"{}")
    assert status == 400 and "multipart" in json.loads(body)["error"]["message"]
    boundary = "XyZ"
    no_file = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
               f"--{boundary}--\r\n").encode()
    status, _, body = raw_request("POST", f"{server.base_url}/files",
                                  {**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"}, no_file)
    assert status == 400 and json.loads(body)["error"]["param"] == "file"


def test_a_refused_upload_stores_nothing(client: openai.OpenAI, server: Server) -> None:
    """A body cut off before its closing boundary is not a whole file (it was stored and served as
    one), and a field refused after the bytes arrived leaves no bytes behind (they were left to the
    orphan sweep)."""
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "multipart/form-data; boundary=XyZ"}
    stored_before = set(server.file_store().list_keys("files/", time.time() + 60))
    cut = (b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
           b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'
           b"first half of the file, then the body ends")
    status, _, body = raw_request("POST", f"{server.base_url}/files", auth, cut)
    assert status == 400 and "closing boundary" in json.loads(body)["error"]["message"]
    bad_expiry = (b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
                  b'--XyZ\r\nContent-Disposition: form-data; name="expires_after[anchor]"\r\n\r\ncreated_at\r\n'
                  b'--XyZ\r\nContent-Disposition: form-data; name="expires_after[seconds]"\r\n\r\n1h\r\n'
                  b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'
                  + b"x" * 1000 + b"\r\n--XyZ--\r\n")
    status, _, body = raw_request("POST", f"{server.base_url}/files", auth, bad_expiry)
    assert status == 400 and json.loads(body)["error"]["param"] == "expires_after.seconds"
    assert set(server.file_store().list_keys("files/", time.time() + 60)) == stored_before
    whole = bad_expiry.replace(b"1h", b"7200")  # the same body, well-formed, is stored
    status, _, body = raw_request("POST", f"{server.base_url}/files", auth, whole)
    assert status == 200 and client.files.content(json.loads(body)["id"]).content == b"x" * 1000


def test_filename_is_sanitised(client: openai.OpenAI, server: Server) -> None:
    # The SDK percent-encodes control characters; the path part is dropped either way.
    created = client.files.create(file=("../../etc/pa\x00ss\nwd.jsonl", jsonl([chat_line(1)])), purpose="batch")
    assert created.filename == "pa%00ss%0Awd.jsonl"
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"..\\..\\x\ty.jsonl\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + jsonl([chat_line(1)]) + f"\r\n--{boundary}--\r\n".encode()
    status, _, raw = raw_request(
        "POST", f"{server.base_url}/files",
        {"Authorization": f"Bearer {API_KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"}, body,
    )
    assert status == 200, raw
    assert json.loads(raw)["filename"] == "xy.jsonl"


def test_list_pagination_order_and_purpose(server: Server) -> None:
    # A fresh owner's view: the admin-free second key sees only its own files.
    client = server.client("sk-test-bob")
    before = {f.id for f in client.files.list()}
    ids = [client.files.create(file=(f"f{i}.jsonl", jsonl([chat_line(i)])), purpose="batch").id for i in range(5)]
    other = client.files.create(file=("u.txt", b"x"), purpose="user_data").id
    listed = [f.id for f in client.files.list(purpose="batch", limit=2) if f.id not in before]
    assert listed == list(reversed(ids))  # newest first, auto-paginated two at a time
    page = client.files.list(purpose="batch", limit=2, order="asc", after=ids[1])
    assert [f.id for f in page.data] == ids[2:4] and page.has_more
    assert other in {f.id for f in client.files.list(purpose="user_data")}
    assert other not in {f.id for f in client.files.list(purpose="batch")}
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.list(after="file-doesnotexist")
    assert exc.value.body["param"] == "after"
    with pytest.raises(openai.BadRequestError):
        client.files.list(limit=0)


def test_paging_through_files_while_deleting_them_survives_housekeeping(make_server: Any) -> None:
    """`for f in client.files.list(limit=2): client.files.delete(f.id)` asks for each next page
    after a file it has just deleted. Housekeeping (at start, then every minute) removed that file's
    row with its bytes, and the next page was a 400 (`after` unknown). Now the bytes go and the row
    stays a day as the cursor."""
    srv = make_server()
    client = srv.client()
    ids = [client.files.create(file=(f"f{i}.jsonl", jsonl([chat_line(i)])), purpose="batch").id for i in range(5)]
    first = client.files.list(purpose="batch", limit=2, order="asc")
    assert [f.id for f in first.data] == ids[:2]
    for f in first.data:
        client.files.delete(f.id)
    srv.stop()
    srv.start()  # housekeeping runs as the worker starts
    store = srv.file_store()
    until(lambda: not any(store.exists(file_key(i)) for i in ids[:2]), timeout=20)  # the bytes went
    page = client.files.list(purpose="batch", limit=2, order="asc", after=ids[1])
    assert [f.id for f in page.data] == ids[2:4] and page.has_more
    assert [f.id for f in client.files.list(purpose="batch", order="asc")] == ids[2:]
    assert all(store.exists(file_key(i)) for i in ids[2:])


def test_oversized_upload_is_413(make_server: Any, tmp_path: Path) -> None:
    config = tmp_path / "small.toml"
    config.write_text("[limits]\nmax_file_bytes = 4096\n")
    client = make_server("--config", str(config)).client()
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=("big.jsonl", jsonl([chat_line(i) for i in range(200)])), purpose="batch")
    assert exc.value.status_code == 413
    assert exc.value.body["type"] == "invalid_request_error"
    assert [f.id for f in client.files.list()] == []  # nothing half-written became a file


def test_content_download_is_not_json_typed(client: openai.OpenAI, server: Server) -> None:
    file_id = upload(client, [chat_line(1)])
    status, headers, _ = raw_request(
        "GET", f"{server.base_url}/files/{file_id}/content", {"Authorization": f"Bearer {API_KEY}"}
    )
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"



def _check_download(client: openai.OpenAI, server: Server, file_id: str, data: bytes, name: str,
                    fallback: str) -> None:
    assert client.files.retrieve(file_id).filename == name
    assert client.files.content(file_id).read() == data
    status, headers, body = raw_request(
        "GET", f"{server.base_url}/files/{file_id}/content", {"Authorization": f"Bearer {API_KEY}"}
    )
    assert status == 200 and body == data
    # RFC 6266: an ASCII fallback in a quoted-string, and the exact name in filename* (RFC 5987)
    plain, _, extended = headers["content-disposition"].partition("; filename*=UTF-8''")
    assert plain == f'attachment; filename="{fallback}"'
    assert extended.isascii() and " " not in extended and '"' not in extended
    assert urllib.parse.unquote(extended, errors="strict") == name


@pytest.mark.parametrize(
    ("name", "fallback"),
    [
        ("日本語.jsonl", "___.jsonl"),
        ("emoji🙂.jsonl", "emoji_.jsonl"),
        ("café.jsonl", "cafe.jsonl"),
        ("semi;colon, 100%.jsonl", "semi;colon, 100%.jsonl"),
    ],
)
def test_download_of_a_non_latin1_filename(client: openai.OpenAI, server: Server, name: str, fallback: str) -> None:
    data = jsonl([chat_line(1)])
    file_id = client.files.create(file=(name, data), purpose="batch").id
    _check_download(client, server, file_id, data, name, fallback)


def test_download_of_a_filename_with_quotes(client: openai.OpenAI, server: Server) -> None:
    # The SDK percent-encodes '"' in the multipart filename, so this upload is written by hand.
    data = jsonl([chat_line(1)])
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"say \\\"hi\\\" ü.jsonl\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, _, raw = raw_request(
        "POST", f"{server.base_url}/files",
        {"Authorization": f"Bearer {API_KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"}, body,
    )
    assert status == 200, raw
    _check_download(client, server, json.loads(raw)["id"], data, 'say "hi" ü.jsonl', 'say \\"hi\\" u.jsonl')


def test_a_download_link_reads_one_file_without_the_key(client: openai.OpenAI, server: Server) -> None:
    """The dashboard's downloads: a link the browser fetches without an Authorization header, so
    the file streams to disk instead of into the tab's memory."""
    data = jsonl([chat_line(i) for i in range(3)])
    file_id = client.files.create(file=("out.jsonl", data), purpose="batch").id
    other_id = upload(client, [chat_line(9)])
    origin = server.base_url.removesuffix("/v1")

    def link(key: str, target: str) -> tuple[int, dict[str, Any]]:
        status, _, body = raw_request(
            "POST", f"{server.base_url}/files/{target}/download_link", {"Authorization": f"Bearer {key}"}
        )
        return status, json.loads(body)

    status, made = link(API_KEY, file_id)
    assert status == 200 and made["object"] == "file.download_link" and made["file_id"] == file_id
    assert 0 < made["expires_at"] - time.time() <= 61
    status, headers, body = raw_request("GET", origin + made["url"])
    assert status == 200 and body == data
    assert headers["content-disposition"].startswith('attachment; filename="out.jsonl"')

    # The link opens only its file; a changed or garbled ticket opens nothing (401, throttled as bad keys)
    ticket = urllib.parse.parse_qs(urllib.parse.urlsplit(made["url"]).query)["ticket"][0]
    for path in (
        f"/v1/files/{other_id}/content?ticket={ticket}",
        f"/v1/files/{file_id}/content?ticket={ticket[:-1]}{'0' if ticket[-1] != '0' else '1'}",
        f"/v1/files/{file_id}/content?ticket=x",
        f"/v1/files/{file_id}/content?ticket=%C3%A9",
    ):
        status, _, body = raw_request("GET", origin + path)
        assert status == 401, path
        assert json.loads(body)["error"]["code"] == "invalid_download_ticket"
    # ... and the key is still required without one
    assert raw_request("GET", f"{origin}/v1/files/{file_id}/content")[0] == 401

    # Another tenant gets no link to it (404, as for any object out of reach); an admin does
    assert link(OTHER_KEY, file_id)[0] == 404
    status, made = link(ADMIN_KEY, file_id)
    assert status == 200 and raw_request("GET", origin + made["url"])[2] == data
