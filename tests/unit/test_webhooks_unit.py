"""Webhook logic on doubles (signing against the official SDK's verifier, the retry policy, which
endpoints an event goes to, what a sender does with each answer), and the outbox on a real SQLite
file and a real PostgreSQL database (events land with the terminal state or not at all; claims
are exclusive and leased; settling is fenced by the lease token)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import random
import time
from collections.abc import Mapping
from typing import Any

import openai
import pytest

from overnight import constants as C
from overnight.batches.webhooks import (
    RetryPolicy,
    WebhookEndpoint,
    WebhookRoutes,
    WebhookSender,
    sign,
    signing_key,
)
from overnight.engines.router import Router
from overnight.files.memory import MemoryFileStore
from overnight.settings import Limits, WorkerSettings
from overnight.store.records import BatchRecord, ClaimedDelivery, DeliveryLease, FileRecord, WebhookEvent
from overnight.store.sql import SqlStore
from overnight.worker.worker import Worker

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
NOW = 1_000_000
SDK = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")


def _endpoint(owner: str = "key_alice", url: str = "http://127.0.0.1:1/a", events: Any = None) -> WebhookEndpoint:
    if events is None:
        return WebhookEndpoint(owner, url, signing_key(SECRET))
    return WebhookEndpoint(owner, url, signing_key(SECRET), frozenset(events))


@pytest.mark.parametrize("secret", [SECRET, "a raw secret, not whsec_"])
def test_signature_verifies_with_the_sdk(secret: str) -> None:
    body = '{"id":"evt_1","object":"event"}'
    timestamp = int(time.time())
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(signing_key(secret), "evt_1", timestamp, body)}
    SDK.webhooks.verify_signature(body, headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.verify_signature(body + " ", headers, secret=secret)


def test_secret_must_be_base64_after_whsec() -> None:
    with pytest.raises(ValueError, match="base64"):
        signing_key("whsec_not base64!")


def test_retry_policy_waits_each_delay_with_jitter_then_gives_up() -> None:
    policy = RetryPolicy((5.0, 30.0, 120.0), jitter=0.2)
    rng = random.Random(7)
    for attempts, base in ((1, 5.0), (2, 30.0), (3, 120.0)):
        delays = [policy.next_delay(attempts, rng) for _ in range(200)]
        assert all(d is not None and 0.8 * base <= d <= 1.2 * base for d in delays)
        assert len(set(delays)) > 100  # jittered, not one fixed value
    assert policy.next_delay(4, rng) is None


def test_routes_send_an_event_to_each_endpoint_of_its_owner_that_wants_it() -> None:
    routes = WebhookRoutes([
        _endpoint("key_alice", "http://127.0.0.1:1/a"),
        _endpoint("key_alice", "http://127.0.0.1:1/only-failures", events={"batch.failed"}),
        _endpoint("key_bob", "http://127.0.0.1:1/b"),
    ])
    events = routes.events_for("key_alice", "batch_x", C.COMPLETED, NOW)
    assert [e.url for e in events] == ["http://127.0.0.1:1/a"]
    failed = routes.events_for("key_alice", "batch_x", C.FAILED, NOW)
    assert sorted(e.url for e in failed) == ["http://127.0.0.1:1/a", "http://127.0.0.1:1/only-failures"]
    assert len({e.event_id for e in failed}) == 1 and len({e.payload for e in failed}) == 1  # one event
    assert json.loads(failed[0].payload) == {"id": failed[0].event_id, "object": "event", "created_at": NOW,
                                             "type": "batch.failed", "data": {"id": "batch_x"}}
    assert routes.events_for("key_carol", "batch_x", C.COMPLETED, NOW) == []
    assert routes.events_for("key_alice", "batch_x", C.IN_PROGRESS, NOW) == []


class MemoryOutbox:
    """Records how the sender settled each delivery."""

    def __init__(self) -> None:
        self.settled: list[tuple[str, int, Any]] = []

    def claim_deliveries(self, limit: int, lease_seconds: float, token: str, now: float | None = None) -> list[Any]:
        return []

    def mark_delivered(self, delivery_id: int, token: str, note: str | None = None) -> bool:
        self.settled.append(("delivered", delivery_id, None))
        return True

    def retry_later(self, delivery_id: int, token: str, delay_seconds: float, error: str) -> bool:
        self.settled.append(("retry", delivery_id, (delay_seconds, error)))
        return True

    def give_up(self, delivery_id: int, token: str, error: str) -> bool:
        self.settled.append(("give_up", delivery_id, error))
        return True

    def prune_settled(self, before: int) -> int:
        return 0


def _sender(answers: list[int | Exception]) -> tuple[WebhookSender, MemoryOutbox, list[dict[str, Any]]]:
    outbox, sent = MemoryOutbox(), []

    def transport(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        sent.append({"url": url, "body": body, "headers": dict(headers)})
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    sender = WebhookSender(outbox, WebhookRoutes([_endpoint()]), RetryPolicy((1.0, 2.0), jitter=0.0), 5.0,
                           transport=transport)
    return sender, outbox, sent


def _claimed(attempts: int, endpoint_id: str | None = None) -> ClaimedDelivery:
    body = '{"id":"evt_9","object":"event","type":"batch.completed","created_at":1,"data":{"id":"batch_x"}}'
    return ClaimedDelivery(1, "evt_9", endpoint_id or _endpoint().id, "http://127.0.0.1:1/a", body, attempts, "tok")


def test_sender_settles_each_answer() -> None:
    sender, outbox, sent = _sender([204, 500, ConnectionRefusedError("refused"), 503])
    assert sender.deliver(_claimed(1))
    SDK.webhooks.unwrap(sent[0]["body"], sent[0]["headers"], secret=SECRET)  # signed as the SDK expects
    assert sent[0]["headers"]["content-type"] == "application/json"
    assert not sender.deliver(_claimed(1))
    assert not sender.deliver(_claimed(2))
    assert not sender.deliver(_claimed(3))  # the policy has two delays: the third failure is the last
    assert outbox.settled == [
        ("delivered", 1, None),
        ("retry", 1, (1.0, "HTTP 500")),
        ("retry", 1, (2.0, "ConnectionRefusedError: refused")),
        ("give_up", 1, "HTTP 503"),
    ]


def test_sender_gives_up_on_an_endpoint_no_longer_configured() -> None:
    sender, outbox, sent = _sender([200])
    assert not sender.deliver(_claimed(1, endpoint_id="we_gone"))
    assert sent == [] and outbox.settled == [("give_up", 1, "endpoint no longer configured")]


class QueuedOutbox(MemoryOutbox):
    """Hands out the deliveries put in `due`, and counts the claims."""

    def __init__(self) -> None:
        super().__init__()
        self.due: list[ClaimedDelivery] = []
        self.claims = 0

    def claim_deliveries(self, limit: int, lease_seconds: float, token: str, now: float | None = None) -> list[Any]:
        self.claims += 1
        claimed, self.due = self.due[:limit], self.due[limit:]
        return claimed


@pytest.mark.parametrize(("answer", "claims_after"), [(204, 1), (500, 2)])
def test_the_sender_loop_looks_again_after_a_failed_attempt_not_a_delivered_one(
    store: SqlStore, answer: int, claims_after: int
) -> None:
    """A batch's end makes the loop claim its deliveries; a delivered attempt needs no second look
    (it cost a claim transaction per batch that found nothing), a failed one does (its retry may be
    due soon)."""
    outbox, sent = QueuedOutbox(), []

    def transport(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        sent.append(url)
        return answer

    sender = WebhookSender(outbox, WebhookRoutes([_endpoint()]), RetryPolicy((60.0,), jitter=0.0), 5.0,
                           transport=transport)
    worker = Worker(store.queue, store.queue, store.housekeeping, MemoryFileStore(), Router([]), WorkerSettings(),
                    Limits(), webhooks=sender, webhook_poll_seconds=3600)
    outbox.due = [_claimed(1)]

    async def scenario() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(worker._webhook_loop(sender, stop))
        for _ in range(200):  # the claim at start, then the attempt in its thread
            await asyncio.sleep(0.01)
            if outbox.settled:
                break
        await asyncio.sleep(0.2)  # time for a second look, if one is coming
        stop.set()
        worker._webhooks_due.set()
        await loop

    asyncio.run(scenario())
    assert sent and outbox.settled
    assert outbox.claims == claims_after


@pytest.mark.parametrize(("left_due", "claims_after"), [(0, 1), (1, 2)])
def test_deliveries_handed_over_by_a_batchs_end_are_sent_without_a_claim(
    store: SqlStore, left_due: int, claims_after: int
) -> None:
    """The transaction that ended a batch leased its events to this worker: the loop sends them
    at once and claims only when some were left due (more events than free slots)."""
    outbox, sent = QueuedOutbox(), []

    def transport(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        sent.append(url)
        return 204

    sender = WebhookSender(outbox, WebhookRoutes([_endpoint()]), RetryPolicy((60.0,), jitter=0.0), 5.0,
                           transport=transport)
    worker = Worker(store.queue, store.queue, store.housekeeping, MemoryFileStore(), Router([]), WorkerSettings(),
                    Limits(), webhooks=sender, webhook_poll_seconds=3600)

    async def scenario() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(worker._webhook_loop(sender, stop))
        for _ in range(100):  # the look at start (deliveries left by a previous run)
            await asyncio.sleep(0.01)
            if outbox.claims:
                break
        lease = worker._delivery_lease("key_alice", C.COMPLETED)
        assert lease is not None and lease.limit == 1  # the batch's events: one endpoint
        assert lease.seconds == sender.lease_seconds  # one attempt: its slot is reserved for it
        lease.claimed.append(_claimed(1))
        lease.left_due = left_due
        worker._send_now(lease)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if outbox.settled:
                break
        await asyncio.sleep(0.2)  # time for a look, if one is coming
        stop.set()
        worker._webhooks_due.set()
        await loop

    asyncio.run(scenario())
    assert sent == ["http://127.0.0.1:1/a"] and outbox.settled == [("delivered", 1, None)]
    assert outbox.claims == claims_after


def test_slots_offered_to_a_batchs_end_are_offered_once_and_not_claimed_into(store: SqlStore) -> None:
    """Batches ending at once: the sender slots offered to one ending transaction (as many as its
    events, as far as slots are free) are not offered to the next until it returns, nor claimed
    into by the loop, so a handed delivery starts at once and a claim's lease (one attempt) covers
    it. Before, every batch ending at once was offered every free slot, and handed deliveries
    queued in the pool behind each other past their lease (sent again by whoever claimed them)."""
    outbox, sent = QueuedOutbox(), []

    def transport(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        sent.append(url)
        return 204

    routes = WebhookRoutes([*(_endpoint("key_alice", f"http://127.0.0.1:1/{x}") for x in "abc"),
                            _endpoint("key_bob", "http://127.0.0.1:1/bob")])
    sender = WebhookSender(outbox, routes, RetryPolicy((60.0,), jitter=0.0), 5.0, transport=transport)
    worker = Worker(store.queue, store.queue, store.housekeeping, MemoryFileStore(), Router([]), WorkerSettings(),
                    Limits(), webhooks=sender, webhook_poll_seconds=3600, webhook_slots=4)
    first = worker._delivery_lease("key_alice", C.COMPLETED)
    assert first is not None and first.limit == 3 and first.seconds == sender.lease_seconds
    bobs = worker._delivery_lease("key_bob", C.COMPLETED)
    assert bobs is not None and bobs.limit == 1  # the slot left
    assert worker._delivery_lease("key_alice", C.COMPLETED) is None  # every slot is offered
    assert worker._delivery_lease("key_carol", C.COMPLETED) is None  # no endpoints: nothing to offer
    worker._withdraw(first)  # its transaction did not end the batch
    second = worker._delivery_lease("key_alice", C.COMPLETED)
    assert second is not None and second.limit == 3
    second.claimed.append(_claimed(1))
    worker._send_now(second)  # it ended the batch: one delivery handed, the rest of the offer back
    third = worker._delivery_lease("key_alice", C.COMPLETED)
    assert third is not None and third.limit == 2  # 4 slots: one handed, one offered to bob's batch
    outbox.due = [_claimed(2)]

    async def scenario() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(worker._webhook_loop(sender, stop))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if outbox.settled:
                break
        await asyncio.sleep(0.1)
        assert outbox.claims == 0 and sent == ["http://127.0.0.1:1/a"]  # no slot free to claim into
        worker._withdraw(third)
        worker._withdraw(bobs)
        worker._look_for_webhooks()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(outbox.settled) == 2:
                break
        stop.set()
        worker._webhooks_due.set()
        await loop

    asyncio.run(scenario())
    assert outbox.claims == 1 and len(sent) == 2 and [s[0] for s in outbox.settled] == ["delivered"] * 2


# -- the outbox in the store -----------------------------------------------------------------



def _batch_finalizing(store: SqlStore) -> str:
    """A batch whose finalize task is claimed with lease token `fin`."""
    store.files.insert_file(FileRecord("file-in", "key_alice", "batch", "in.jsonl", 10, NOW, None, "files/file-in"))
    store.batches.insert_batch(BatchRecord("batch_a", "key_alice", C.CHAT_COMPLETIONS, "file-in", "24h",
                                           C.VALIDATING, NOW, NOW + 86400))
    assert store.queue.claim_batch_task(NOW, 30, "val") is not None
    assert store.batches.request_cancel(None, "batch_a", NOW) is not None
    task = store.queue.claim_batch_task(NOW + 31, 30, "fin")  # after the validation lease
    assert task is not None and task.kind == "finalize"
    return "batch_a"


def _events(batch_id: str, status: str) -> list[WebhookEvent]:
    routes = WebhookRoutes([_endpoint("key_alice", "http://127.0.0.1:1/a"), _endpoint("key_alice", "http://h/b")])
    return routes.events_for("key_alice", batch_id, status, NOW)


def test_events_are_stored_with_the_terminal_state_or_not_at_all(store: SqlStore) -> None:
    batch_id = _batch_finalizing(store)
    events = _events(batch_id, C.CANCELLED)
    assert not store.queue.finish_batch(batch_id, "lost-lease", C.CANCELLED, None, None, 0, 0, NOW, events=events)
    assert store.webhooks.claim_deliveries(10, 30, "c0") == []  # no state change, no event
    assert store.queue.finish_batch(batch_id, "fin", C.CANCELLED, None, None, 0, 0, NOW, events=events)
    claimed = store.webhooks.claim_deliveries(10, 30, "c1")
    assert sorted(d.url for d in claimed) == ["http://127.0.0.1:1/a", "http://h/b"]
    assert {d.event_id for d in claimed} == {events[0].event_id} and {d.attempts for d in claimed} == {1}


def test_failed_validation_stores_its_events(store: SqlStore) -> None:
    store.files.insert_file(FileRecord("file-in", "key_alice", "batch", "in.jsonl", 10, NOW, None, "files/file-in"))
    store.batches.insert_batch(BatchRecord("batch_v", "key_alice", C.CHAT_COMPLETIONS, "file-in", "24h",
                                           C.VALIDATING, NOW, NOW + 86400))
    assert store.queue.claim_batch_task(NOW, 30, "val") is not None
    assert store.queue.fail_batch("batch_v", "val", [], NOW, _events("batch_v", C.FAILED)[:1])
    [claimed] = store.webhooks.claim_deliveries(10, 30, "c1")
    assert json.loads(claimed.payload)["type"] == "batch.failed"


def test_claims_are_leased_and_settling_is_fenced(store: SqlStore) -> None:
    batch_id = _batch_finalizing(store)
    assert store.queue.finish_batch(batch_id, "fin", C.CANCELLED, None, None, 0, 0, NOW,
                                    events=_events(batch_id, C.CANCELLED)[:1])
    [first] = store.webhooks.claim_deliveries(10, 30, "t1")
    assert store.webhooks.claim_deliveries(10, 30, "t2") == []  # held by t1
    # t1 died mid-attempt: once its lease runs out, the delivery is due again (at least once).
    [again] = store.webhooks.claim_deliveries(10, 30, "t3", now=time.time() + 31)
    assert again.id == first.id and again.attempts == 2
    assert not store.webhooks.mark_delivered(first.id, "t1")  # the old holder's answer no longer counts
    assert store.webhooks.retry_later(again.id, "t3", 0.0, "HTTP 500")
    [third] = store.webhooks.claim_deliveries(10, 30, "t4", now=time.time() + 1)
    assert third.attempts == 3
    assert store.webhooks.mark_delivered(third.id, "t4")
    assert store.webhooks.claim_deliveries(10, 30, "t5", now=time.time() + 10_000) == []  # delivered: done


def test_given_up_deliveries_are_never_claimed_again(store: SqlStore) -> None:
    batch_id = _batch_finalizing(store)
    assert store.queue.finish_batch(batch_id, "fin", C.CANCELLED, None, None, 0, 0, NOW,
                                    events=_events(batch_id, C.CANCELLED)[:1])
    [claimed] = store.webhooks.claim_deliveries(10, 30, "t1")
    assert store.webhooks.give_up(claimed.id, "t1", "HTTP 410")
    assert store.webhooks.claim_deliveries(10, 30, "t2", now=time.time() + 10_000) == []


def test_settled_deliveries_are_pruned_pending_ones_kept(store: SqlStore) -> None:
    batch_id = _batch_finalizing(store)
    assert store.queue.finish_batch(batch_id, "fin", C.CANCELLED, None, None, 0, 0, NOW, events=_events(batch_id, C.CANCELLED))
    first, second = store.webhooks.claim_deliveries(10, 30, "t1")
    assert store.webhooks.mark_delivered(first.id, "t1")
    assert store.webhooks.retry_later(second.id, "t1", 0.0, "HTTP 500")
    assert store.webhooks.prune_settled(NOW) == 0  # nothing settled is older than NOW
    assert store.webhooks.prune_settled(NOW + 1) == 1  # the delivered one; the pending one stays
    [left] = store.webhooks.claim_deliveries(10, 30, "t2", now=time.time() + 1)
    assert left.id == second.id


def test_events_leased_with_the_terminal_state_are_not_claimable_until_their_lease_runs_out(store: SqlStore) -> None:
    """A worker with free sender slots takes a batch's events in the transaction that ends it (no
    claim transaction); the rest are due for any sender. Dead holder: due again after the lease."""
    batch_id = _batch_finalizing(store)
    lease = DeliveryLease("held", 30, limit=1)
    assert store.queue.finish_batch(batch_id, "fin", C.CANCELLED, None, None, 0, 0, NOW,
                                    events=_events(batch_id, C.CANCELLED), deliveries=lease)
    [mine] = lease.claimed
    assert lease.left_due == 1 and mine.attempts == 1 and mine.lease_token == "held"
    [other] = store.webhooks.claim_deliveries(10, 30, "t1")  # only the one not leased
    assert other.id != mine.id and other.url != mine.url
    assert store.webhooks.mark_delivered(mine.id, "held")  # settled under the lease it was given
    assert store.webhooks.claim_deliveries(10, 30, "t2", now=time.time() + 31) == [
        dataclasses.replace(other, attempts=2, lease_token="t2")]  # t1 died: its one is due again


def test_a_lost_lease_leases_no_events(store: SqlStore) -> None:
    batch_id = _batch_finalizing(store)
    lease = DeliveryLease("held", 30, limit=8)
    assert not store.queue.finish_batch(batch_id, "lost-lease", C.CANCELLED, None, None, 0, 0, NOW,
                                        events=_events(batch_id, C.CANCELLED), deliveries=lease)
    assert lease.claimed == [] and store.webhooks.claim_deliveries(10, 30, "c0", now=time.time() + 31) == []


def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_timeout() -> None:
    """A socket timeout bounds each read only: a receiver sending its answer a byte at a time held
    the attempt (and a sender slot) for as long as it liked, past the delivery's lease."""
    import socket
    import threading
    import time

    from overnight.batches.webhooks import post_json

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.is_set():
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(bytes([byte]))
                time.sleep(0.05)  # well inside the 1 s socket timeout

    server = threading.Thread(target=drip, daemon=True)
    server.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="did not answer within 1 s"):
            post_json(f"http://127.0.0.1:{listener.getsockname()[1]}/hook", b"{}", {}, 1.0)
        assert time.monotonic() - started < 3
    finally:
        stop.set()
        server.join(5)
        listener.close()
