"""Slow and oversized clients are cut off: headers trickled a byte at a time, a silent connection,
an upload that stalls mid-body (its temp file is removed, no blob is kept), a body the server did not
read, and a megabyte of headers. Normal uploads, slow-but-steady bodies and keep-alive across a
pause still work. Timeouts are set to 1 s here (10 s and 30 s by default)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import API_KEY, Server, Upstream, chat_line, jsonl, server_args, until, upload

TIMEOUT = 1.0  # --header-timeout and --body-idle-timeout of the server below
BOUNDARY = "overnight-test-boundary"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("limits") / "data"
    server = Server(data, server_args(upstream, "--header-timeout", str(TIMEOUT),
                                      "--body-idle-timeout", str(TIMEOUT))).start()
    yield server
    server.stop()


def connect(srv: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def trickle(sock: socket.socket, data: bytes, interval: float = 0.1, give_up: float = 6.0) -> tuple[float, bytes]:
    """Send `data` one byte every `interval` (cycling) until the server answers or closes; return
    the seconds that took and what it sent. Fails if it is still open after `give_up` seconds."""
    start = time.monotonic()
    sock.settimeout(interval)
    i = 0
    while time.monotonic() - start < give_up:
        try:
            sock.sendall(data[i % len(data): i % len(data) + 1])
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start, b""
        i += 1
        try:
            first = sock.recv(65536)
        except TimeoutError:
            continue  # nothing yet: the recv timeout paces the next byte
        except ConnectionResetError:
            return time.monotonic() - start, b""
        return time.monotonic() - start, first + read_to_eof(sock)
    raise AssertionError(f"the server kept a trickling connection open for {give_up}s")


def read_to_eof(sock: socket.socket, limit: float = 5.0) -> bytes:
    """Everything the server sends until it closes; fails if it does not close within `limit`."""
    sock.settimeout(limit)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection within {limit}s") from None
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a content-length body (the connection stays usable)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {buffer!r}"
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    return status, headers, body


def multipart_upload(size: int) -> tuple[bytes, bytes, bytes]:
    """(request head, body up to the file's content, the rest of the body) of a `size`-byte upload."""
    content = jsonl([chat_line(i) for i in range(size // 100 + 1)])[:size]
    before = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
              f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
              "Content-Type: application/jsonl\r\n\r\n").encode()
    after = f"\r\n--{BOUNDARY}--\r\n".encode()
    body = before + content + after
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head, before, content + after


def stored(srv: Server) -> tuple[list[Path], list[Path]]:
    """(temp files, blobs) in the server's file store."""
    tmp = [p for p in (srv.data_dir / "tmp").iterdir()]
    blobs = [p for p in (srv.data_dir / "blobs").rglob("*") if p.is_file()]
    return tmp, blobs


def test_headers_trickled_slowly_are_cut_off(srv: Server) -> None:
    request = f"GET /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n".encode()
    with connect(srv) as sock:
        elapsed, answer = trickle(sock, request + b"X-Pad: " + b"a" * 100)
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 2
    status, headers, body = split_response(answer)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert headers["x-request-id"].startswith("req_")  # refused before the app, still with an id


def test_a_silent_connection_is_closed(srv: Server) -> None:
    with connect(srv) as sock:
        start = time.monotonic()
        assert read_to_eof(sock) == b""  # nothing asked, nothing answered
    assert time.monotonic() - start < TIMEOUT + 2


def test_a_stalled_upload_is_dropped_with_its_temp_file(srv: Server) -> None:
    before_tmp, before_blobs = stored(srv)
    assert before_tmp == []
    head, start_of_body, rest = multipart_upload(50_000)
    with connect(srv) as sock:
        sock.sendall(head + start_of_body + rest[:1000])
        until(lambda: len(stored(srv)[0]) == 1, timeout=5)  # the upload's temp file is being written
        stalled = time.monotonic()
        status, headers, body = split_response(read_to_eof(sock))
    assert TIMEOUT * 0.9 <= time.monotonic() - stalled < TIMEOUT + 3
    assert status == 408 and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert headers["x-request-id"].startswith("req_")
    assert stored(srv) == ([], before_blobs)  # no temp file, no new blob
    assert not [f for f in srv.client().files.list() if f.filename == "in.jsonl"]


def test_a_stalled_json_body_gets_408_not_400(srv: Server) -> None:
    body = json.dumps({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    head = (f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with connect(srv) as sock:
        sock.sendall(head + body[:20].encode())  # FastAPI would call a failed body read a 400
        status, headers, raw = split_response(read_to_eof(sock))
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(raw)["error"]["code"] == "request_timeout"


def test_steady_slow_upload_normal_upload_and_keep_alive_still_work(srv: Server) -> None:
    client = srv.client()
    assert client.files.retrieve(upload(client, [chat_line(i) for i in range(50)])).bytes > 0
    head, start_of_body, rest = multipart_upload(2_000)
    pieces = [rest[i: i + 500] for i in range(0, len(rest), 500)]
    with connect(srv) as sock:
        sock.sendall(head + start_of_body)
        for piece in pieces:  # pauses shorter than the idle timeout, 2 s in all: longer than it
            time.sleep(TIMEOUT / 2)
            sock.sendall(piece)
        status, _, body = read_response(sock)
        assert status == 200, body
        file_id = json.loads(body)["id"]
        # The same connection, idle longer than the header timeout (but not uvicorn's 5 s keep-alive):
        time.sleep(TIMEOUT * 1.5)
        sock.sendall(f"GET /v1/files/{file_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode())
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["bytes"] == 2_000
    assert stored(srv)[0] == []


def test_a_body_the_server_did_not_read_ends_the_connection(srv: Server) -> None:
    head, start_of_body, _ = multipart_upload(100_000)
    wrong = head.replace(API_KEY.encode(), b"sk-wrong-key-123")
    with connect(srv) as sock:
        sock.sendall(wrong + start_of_body)
        status, headers, _ = read_response(sock)  # answered before the body was read
        assert status == 401 and headers["connection"] == "close"
        sock.settimeout(0.2)
        trickle(sock, b"x" * 100, give_up=TIMEOUT + 2)  # the rest, trickled, is not waited for


def test_a_megabyte_of_headers_is_refused_before_the_app(srv: Server) -> None:
    request = (f"GET /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-{'a' * 1024 * 1024}"
               "\r\n\r\n").encode()
    with connect(srv) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused while being sent
            sock.sendall(request)
        answer = read_to_eof(sock)
    if answer:  # the 431 can be lost to the reset that a close with unread input sends
        status, headers, body = split_response(answer)
        assert status == 431 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"


def test_headers_just_over_the_limit_get_431(srv: Server) -> None:
    request = f"GET /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {'b' * 70_000}\r\n".encode()
    with connect(srv) as sock:
        sock.sendall(request)  # no end of headers yet: the server has read all of it when it refuses
        status, headers, body = split_response(read_to_eof(sock))
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert headers["x-request-id"].startswith("req_")
    with connect(srv) as sock:  # and headers under the limit are fine
        sock.sendall(f"GET /v1/files HTTP/1.1\r\nHost: x\r\nX-Big: {'b' * 30_000}\r\n"
                     f"Authorization: Bearer {API_KEY}\r\n\r\n".encode())
        assert read_response(sock)[0] == 200


def test_a_stray_line_break_after_a_request_does_not_hold_the_connection(srv: Server) -> None:
    """uvicorn cancels its keep-alive timer at any byte, and a CRLF starts no request (so no header
    clock): one `\\r\\n` after a request kept the connection open for ever, no key needed."""
    with connect(srv) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.sendall(b"\r\n")
        read_to_eof(sock, limit=TIMEOUT + 3)  # closed by the header clock


def test_a_body_trickled_just_fast_enough_to_never_pause_is_cut_off(srv: Server) -> None:
    """One byte every 0.5 s never paused as long as the idle timeout (1 s here), and a JSON body is
    read before the key is checked: a megabyte at one byte per 29 s held a connection for a year."""
    body = json.dumps({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h",
                       "metadata": {"pad": "x" * 400}})
    head = (f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with connect(srv) as sock:
        sock.sendall(head)
        took, answer = trickle(sock, body.encode(), interval=TIMEOUT / 2, give_up=20)
    status, headers, raw = split_response(answer)
    assert status == 408 and headers["connection"] == "close", answer[:300]
    assert "too slowly" in json.loads(raw)["error"]["message"] and took < 15


def test_a_dropped_upload_is_not_a_server_error(srv: Server) -> None:
    """A client gone mid-body was logged as an unhandled error with its traceback (and counted a
    500): any flaky link filled the error log."""
    head, start_of_body, _ = multipart_upload(100_000)
    with connect(srv) as sock:
        sock.sendall(head + start_of_body + b"x" * 1000)
        time.sleep(0.3)
    until(lambda: "disconnected before its request body ended" in srv.log.read_text(), timeout=10)
    assert "ClientDisconnect" not in srv.log.read_text()


def test_chunked_uploads_are_bounded_and_a_forwarded_address_is_not_believed(tmp_path: Path,
                                                                               upstream: Upstream) -> None:
    """A chunked upload declares no length: bytes after the closing boundary were parsed and
    dropped without end (never a 413). And X-Forwarded-For from any local process was believed:
    a client behind an nginx that passes it on chose its own address and escaped the throttle."""
    config = tmp_path / "small.toml"
    config.write_text("[limits]\nmax_file_bytes = 100000\n")
    server = Server(tmp_path / "data", server_args(upstream, "--config", str(config))).start()
    try:
        head, start_of_body, rest = multipart_upload(1_000)
        head = head.replace(b"Content-Length: ", b"Transfer-Encoding: chunked\r\nX-Old-Length: ")
        with connect(server) as sock:
            sock.sendall(head)
            junk = start_of_body + rest + b"x" * 65536  # after the closing boundary: ignored by the parser
            answer = b""
            for _ in range(40):  # 2.6 MB in all, far past the limit
                try:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(junk), junk))
                except (BrokenPipeError, ConnectionResetError):
                    break
                junk = b"x" * 65536
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                answer = sock.recv(65536)
        assert split_response(answer)[0] == 413, answer[:300]
        statuses = []
        for i in range(25):  # the default burst is 20 failures per address
            with connect(server) as sock:
                sock.sendall(f"GET /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-wrong-{i}\r\n"
                             f"X-Forwarded-For: 203.0.113.{i}\r\n\r\n".encode())
                statuses.append(read_response(sock)[0])
        assert statuses[:20] == [401] * 20 and statuses[-1] == 429
    finally:
        server.stop()


def test_headers_that_end_in_the_read_that_passes_the_limit_get_431(srv: Server) -> None:
    """60 kB of headers in one read, then 10 kB and their end in the next: the count after each
    read was reset by their end, and the headers reached the app (200) past the 64 KiB limit (up
    to one read, 256 KiB, past it)."""
    first = f"GET /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nX-A: {'a' * 60_000}\r\n"
    with connect(srv) as sock:
        sock.sendall(first.encode())
        time.sleep(0.2)  # its own read
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(f"X-B: {'b' * 10_000}\r\n\r\n".encode())
        status, headers, body = split_response(read_to_eof(sock))
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
