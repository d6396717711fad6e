"""What an admin key may do to other tenants' objects: read everything (list, retrieve, download)
and cancel any batch, but delete only its own files and build batches only from its own files."""

from __future__ import annotations

import openai
import pytest

from conftest import (
    ADMIN_KEY,
    API_KEY,
    OTHER_KEY,
    Server,
    chat_line,
    jsonl,
    upload,
    wait_status,
    wait_terminal,
)

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3


def test_admin_reads_every_tenants_files_and_batches(server: Server) -> None:
    alice, bob, admin = server.client(API_KEY), server.client(OTHER_KEY), server.client(ADMIN_KEY)
    alice_data, bob_data = jsonl([chat_line(1)]), jsonl([chat_line(2)])
    alice_file = alice.files.create(file=("a.jsonl", alice_data), purpose="batch").id
    bob_file = bob.files.create(file=("b.jsonl", bob_data), purpose="batch").id
    batch = alice.batches.create(input_file_id=alice_file, endpoint="/v1/chat/completions", completion_window="24h")

    listed = {f.id for f in admin.files.list()}
    assert {alice_file, bob_file} <= listed
    assert admin.files.retrieve(alice_file).filename == "a.jsonl"
    assert admin.files.content(alice_file).read() == alice_data
    assert admin.files.content(bob_file).read() == bob_data
    assert admin.batches.retrieve(batch.id).input_file_id == alice_file
    assert batch.id in {b.id for b in admin.batches.list()}
    done = wait_terminal(alice, batch.id)
    assert admin.files.content(done.output_file_id).read() == alice.files.content(done.output_file_id).read()


def test_admin_cannot_delete_another_tenants_file(server: Server) -> None:
    alice, admin = server.client(API_KEY), server.client(ADMIN_KEY)
    data = jsonl([chat_line(1)])
    file_id = alice.files.create(file=("keep.jsonl", data), purpose="batch").id
    with pytest.raises(openai.NotFoundError) as exc:
        admin.files.delete(file_id)
    # exactly what a tenant gets for a file it cannot see
    assert exc.value.body == {
        "message": f"No such File object: {file_id}", "type": "invalid_request_error", "param": "id", "code": None,
    }
    with pytest.raises(openai.NotFoundError) as tenant_exc:
        server.client(OTHER_KEY).files.delete(file_id)
    assert tenant_exc.value.body == exc.value.body
    # the file stays, for its owner and in the admin's view
    assert alice.files.retrieve(file_id).id == file_id
    assert alice.files.content(file_id).read() == data
    assert file_id in {f.id for f in admin.files.list()}
    # a batch output file is another tenant's too
    batch = alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_terminal(alice, batch.id)
    with pytest.raises(openai.NotFoundError):
        admin.files.delete(done.output_file_id)
    assert alice.files.retrieve(done.output_file_id).id == done.output_file_id
    # its own files an admin deletes as any tenant does
    own = upload(admin, [chat_line(1)])
    assert admin.files.delete(own).deleted is True
    with pytest.raises(openai.NotFoundError):
        admin.files.retrieve(own)


def test_admin_cancels_another_tenants_batch(server: Server) -> None:
    alice, admin = server.client(API_KEY), server.client(ADMIN_KEY)
    file_id = upload(alice, [chat_line(i, x_fault="slow:100") for i in range(300)])
    batch = alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_status(alice, batch.id, {"in_progress"})
    assert admin.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_terminal(alice, batch.id)
    assert done.status == "cancelled"
    # a tenant still cannot cancel someone else's batch
    other = alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        server.client(OTHER_KEY).batches.cancel(other.id)
    admin.batches.cancel(other.id)
    assert wait_terminal(alice, other.id).status == "cancelled"


def test_admin_batches_use_only_its_own_files(server: Server) -> None:
    alice, admin = server.client(API_KEY), server.client(ADMIN_KEY)
    alice_file = upload(alice, [chat_line(1)])
    with pytest.raises(openai.NotFoundError) as exc:
        admin.batches.create(input_file_id=alice_file, endpoint="/v1/chat/completions", completion_window="24h")
    assert exc.value.body["param"] == "input_file_id"
    own = upload(admin, [chat_line(1)])
    batch = admin.batches.create(input_file_id=own, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_terminal(admin, batch.id)
    assert done.status == "completed"
    # the batch and its output are the admin's own, not the tenant's
    with pytest.raises(openai.NotFoundError):
        alice.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(done.output_file_id)
