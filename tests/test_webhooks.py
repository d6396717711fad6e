"""Batch webhooks end to end: a real receiver process on 127.0.0.1 records what `overnight serve`
POSTs; every event is checked with the official SDK's `client.webhooks.unwrap(body, headers,
secret=...)`, exactly as a user's receiver would check it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import (
    API_KEY,
    OTHER_KEY,
    chat_line,
    free_port,
    run_batch,
    serve_refused,
    until,
    upload,
    wait_http,
    wait_status,
    wait_terminal,
)

pytestmark = pytest.mark.both_tiers  # the outbox lives in the store: SQLite and PostgreSQL

ALICE_SECRET = "whsec_" + base64.b64encode(b"alice's webhook signing key 0001").decode()
BOB_SECRET = "whsec_" + base64.b64encode(b"bob's webhook signing key 000002").decode()


class Receiver:
    """`overnight.testing.webhook_receiver` as a subprocess; `hits()` is what it has recorded."""

    def __init__(self, workdir: Path, fail_first: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.record = workdir / f"hooks-{self.port}.jsonl"
        self.log = workdir / f"receiver-{self.port}.log"
        self.fail_first = fail_first
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Receiver:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "overnight.testing.webhook_receiver", "--port", str(self.port),
             "--record", str(self.record), "--fail-first", str(self.fail_first)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )
        wait_http(f"http://127.0.0.1:{self.port}/health", self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def hits(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def events(self, secret: str) -> list[Any]:
        """Every acknowledged POST, verified and parsed by the SDK (raises on a bad signature)."""
        sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
        return [sdk.webhooks.unwrap(hit["body"], hit["headers"], secret=secret)
                for hit in self.hits() if hit["status"] == 200]


@pytest.fixture
def receivers(tmp_path: Path) -> Any:
    started: list[Receiver] = []

    def make(fail_first: int = 0, start: bool = True) -> Receiver:
        receiver = Receiver(tmp_path, fail_first)
        started.append(receiver.start() if start else receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


def webhook_config(path: Path, alice_url: str, bob_url: str, *, events: str = "") -> Path:
    """Alice's and Bob's endpoints; retries after 0.3 s so a test sees several attempts."""
    path.write_text(f"""
[webhook_delivery]
retry_delays = [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
poll_seconds = 0.1
timeout_seconds = 2

[[webhooks]]
api_key = "{API_KEY}"
url = "{alice_url}"
secret = "{ALICE_SECRET}"
{events}

[[webhooks]]
api_key = "{OTHER_KEY}"
url = "{bob_url}"
secret = "{BOB_SECRET}"
""")
    return path


def one_event(receiver: Receiver, secret: str, timeout: float = 30.0) -> Any:
    until(lambda: any(hit["status"] == 200 for hit in receiver.hits()), timeout=timeout)
    events = receiver.events(secret)
    assert len(events) == 1, events
    return events[0]


def test_completed_batch_is_signed_and_only_its_owner_hears(make_server: Any, receivers: Any, tmp_path: Path) -> None:
    alice_hooks, bob_hooks = receivers(), receivers()
    srv = make_server("--config", str(webhook_config(tmp_path / "hooks.toml", alice_hooks.url, bob_hooks.url)))
    alice, bob = srv.client(), srv.client(OTHER_KEY)
    alice_batch = run_batch(alice, [chat_line(i) for i in range(3)])
    bob_batch = run_batch(bob, [chat_line(i) for i in range(2)])
    assert alice_batch.status == bob_batch.status == "completed"

    event = one_event(alice_hooks, ALICE_SECRET)
    assert event.type == "batch.completed" and event.object == "event"
    assert event.data.id == alice_batch.id and event.id.startswith("evt_")
    assert abs(event.created_at - alice_batch.completed_at) <= 1
    hit = alice_hooks.hits()[0]
    assert hit["headers"]["webhook-id"] == event.id
    assert hit["headers"]["content-type"] == "application/json"
    assert abs(int(hit["headers"]["webhook-timestamp"]) - time.time()) < 60
    assert json.loads(hit["body"]) == {"id": event.id, "object": "event", "created_at": event.created_at,
                                       "type": "batch.completed", "data": {"id": alice_batch.id}}
    with pytest.raises(openai.InvalidWebhookSignatureError):  # Bob's secret does not verify Alice's events
        alice_hooks.events(BOB_SECRET)

    # Each owner's endpoint hears of its own batches and never of the other's.
    bob_event = one_event(bob_hooks, BOB_SECRET)
    assert bob_event.data.id == bob_batch.id and bob_event.type == "batch.completed"
    time.sleep(1.0)  # time for a stray delivery to arrive, were there one
    assert [h["headers"]["webhook-id"] for h in alice_hooks.hits()] == [event.id]
    assert [h["headers"]["webhook-id"] for h in bob_hooks.hits()] == [bob_event.id]


def test_failed_batch_to_an_endpoint_that_wants_only_failures(
    make_server: Any, receivers: Any, tmp_path: Path
) -> None:
    alice_hooks, bob_hooks = receivers(), receivers()
    config = webhook_config(tmp_path / "hooks.toml", alice_hooks.url, bob_hooks.url, events='events = ["batch.failed"]')
    srv = make_server("--config", str(config))
    client = srv.client()
    assert run_batch(client, [chat_line(0)]).status == "completed"  # not an event this endpoint wants
    batch = run_batch(client, [chat_line(0), "{not json", chat_line(2)])
    assert batch.status == "failed"
    event = one_event(alice_hooks, ALICE_SECRET)
    assert event.type == "batch.failed" and event.data.id == batch.id
    assert bob_hooks.hits() == []


def test_bad_webhook_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'[[webhooks]]\napi_key = "{API_KEY}"\nurl = "http://127.0.0.1:9/h"\nsecret = "whsec_not base64!"\n')
    stderr = serve_refused("--data-dir", str(tmp_path / "data"), "--no-embedded", "--config", str(config))
    assert "[[webhooks]] #1" in stderr and "base64" in stderr
    config.write_text('[[webhooks]]\nurl = "http://127.0.0.1:9/h"\nsecret = "whsec_AAAA"\n')
    stderr = serve_refused("--data-dir", str(tmp_path / "data"), "--no-embedded", "--config", str(config))
    assert "api_key" in stderr


def test_cancelled_batch(make_server: Any, receivers: Any, tmp_path: Path) -> None:
    alice_hooks, bob_hooks = receivers(), receivers()
    srv = make_server("--config", str(webhook_config(tmp_path / "hooks.toml", alice_hooks.url, bob_hooks.url)),
                      "--shard-lines", "5", "--max-shards", "1")
    client = srv.client()
    file_id = upload(client, [chat_line(i, x_fault="slow:100") for i in range(100)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_status(client, batch.id, {"in_progress"})
    client.batches.cancel(batch.id)
    assert wait_terminal(client, batch.id).status == "cancelled"
    event = one_event(alice_hooks, ALICE_SECRET)
    assert event.type == "batch.cancelled" and event.data.id == batch.id


def test_expired_batch(make_server: Any, receivers: Any, tmp_path: Path) -> None:
    alice_hooks, bob_hooks = receivers(), receivers()
    srv = make_server("--config", str(webhook_config(tmp_path / "hooks.toml", alice_hooks.url, bob_hooks.url)),
                      "--completion-window-seconds", "2", "--shard-lines", "5", "--max-shards", "1")
    client = srv.client()
    file_id = upload(client, [chat_line(i, x_fault="slow:100") for i in range(200)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_terminal(client, batch.id, timeout=60).status == "expired"
    event = one_event(alice_hooks, ALICE_SECRET)
    assert event.type == "batch.expired" and event.data.id == batch.id


def test_retried_until_acknowledged(make_server: Any, receivers: Any, tmp_path: Path) -> None:
    alice_hooks, bob_hooks = receivers(fail_first=2), receivers()
    srv = make_server("--config", str(webhook_config(tmp_path / "hooks.toml", alice_hooks.url, bob_hooks.url)))
    batch = run_batch(srv.client(), [chat_line(0)])
    event = one_event(alice_hooks, ALICE_SECRET)
    assert event.type == "batch.completed" and event.data.id == batch.id
    time.sleep(1.5)  # several retry delays: an acknowledged event is not sent again
    hits = alice_hooks.hits()
    assert [h["status"] for h in hits] == [500, 500, 200]
    assert {h["headers"]["webhook-id"] for h in hits} == {event.id}  # one event, three attempts
    assert {h["body"] for h in hits} == {hits[0]["body"]}  # the same bytes every time


def test_event_survives_sigkill_before_delivery(make_server: Any, receivers: Any, tmp_path: Path) -> None:
    alice_hooks, bob_hooks = receivers(start=False), receivers()  # Alice's receiver is down for now
    srv = make_server("--config", str(webhook_config(tmp_path / "hooks.toml", alice_hooks.url, bob_hooks.url)))
    batch = run_batch(srv.client(), [chat_line(i) for i in range(3)])
    assert batch.status == "completed"
    srv.kill()  # SIGKILL right after the terminal state: nothing was delivered (the receiver is down)
    assert alice_hooks.hits() == []
    alice_hooks.start()
    srv.start()  # same data directory / database, same config
    event = one_event(alice_hooks, ALICE_SECRET)
    assert event.type == "batch.completed" and event.data.id == batch.id
