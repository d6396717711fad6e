"""The web dashboard (/ui) in a real browser: Debian's chromium driven by Playwright, against a
real `overnight serve` and the fake upstream (slow lines, so progress visibly moves). Screenshots
go to each test's tmp dir; with OVERNIGHT_DOCS_SCREENSHOT=1 the batch list is also written to
docs/dashboard.png (the README's picture)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    ADMIN_KEY,
    API_KEY,
    OTHER_KEY,
    Server,
    chat_line,
    jsonl,
    raw_request,
    until,
    upload,
    wait_terminal,
)
from overnight.api.auth import hash_key, owner_of

pytestmark = pytest.mark.both_tiers  # the dashboard reads the store and the file bytes: both tiers

CHROMIUM = "/usr/bin/chromium"
# Headless, and nothing that reaches the network or updates itself.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
POLL_S = 2.0  # the dashboard's refresh period


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `./dev test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page_for(browser: Any) -> Iterator[Any]:
    """`page_for(server, key, width=..., height=...)`: a fresh browser context (so a fresh
    sessionStorage) on the dashboard, signed in with `key` by keyboard."""
    contexts: list[Any] = []
    errors: list[str] = []

    def open_page(server: Server, key: str, width: int = 1280, height: int = 800) -> Any:
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"http://127.0.0.1:{server.port}/ui")
        # the key field has focus on arrival; Enter submits
        page.wait_for_function("() => document.activeElement?.id === 'api-key'")
        page.keyboard.type(key)
        page.keyboard.press("Enter")
        page.get_by_role("navigation", name="Sections").wait_for()
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, f"errors in the page: {errors}"


def progress_of(page: Any, batch_id: str) -> tuple[int, int]:
    bar = page.locator(f'tr[data-batch="{batch_id}"] [role="progressbar"]')
    return int(bar.get_attribute("aria-valuenow")), int(bar.get_attribute("aria-valuemax"))


def status_of(page: Any, batch_id: str) -> str:
    return str(page.locator(f'tr[data-batch="{batch_id}"] .badge').inner_text()).strip().lower()


def test_dashboard_uploads_creates_watches_cancels_and_downloads(make_server: Any, page_for: Any,
                                                                  tmp_path: Path) -> None:
    # One shard of 5 lines at a time, 0.5 s a line: 80 lines take ~8 s, several 2-second polls.
    server = make_server("--shard-lines", "5", "--max-shards", "1")
    client = server.client(API_KEY)
    lines = [chat_line(i, x_fault="400" if i % 10 == 3 else "slow:500") for i in range(80)]
    page = page_for(server, API_KEY)

    # -- Files: one upload through the file input, one dropped on the drop zone
    page.get_by_role("link", name="Files").click()
    page.set_input_files("#upload-input", files=[
        {"name": "slow.jsonl", "mimeType": "application/jsonl", "buffer": jsonl(lines)}])
    page.locator('tr:has-text("slow.jsonl")').wait_for()
    dropped = jsonl(lines[:10])
    transfer = page.evaluate_handle(
        "text => { const t = new DataTransfer(); t.items.add(new File([text], 'dropped.jsonl')); return t; }",
        dropped.decode())
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    page.locator('tr:has-text("dropped.jsonl")').wait_for()
    by_name = {f.filename: f for f in client.files.list()}
    assert by_name["slow.jsonl"].purpose == "batch"
    assert client.files.content(by_name["dropped.jsonl"].id).read() == dropped
    page.screenshot(path=str(tmp_path / "files.png"))

    # -- Batches: create two from the form
    page.get_by_role("link", name="Batches").click()
    page.locator("details.card summary").click()
    input_id = by_name["slow.jsonl"].id
    page.locator(f'#create-file option[value="{input_id}"]').wait_for(state="attached")
    ids = []
    for description in ("watched", "to cancel"):
        page.select_option("#create-file", by_name["slow.jsonl"].id)
        page.select_option("#create-endpoint", "/v1/chat/completions")
        page.fill("#create-description", description)
        page.get_by_role("button", name="Create batch").click()
        page.locator(f'tr:has-text("{description}")').wait_for()
    for batch in client.batches.list():
        assert batch.input_file_id == by_name["slow.jsonl"].id and batch.completion_window == "24h"
        ids.append(batch.id)
    to_cancel, watched = ids[0], ids[1]  # newest first
    assert client.batches.retrieve(watched).metadata == {"description": "watched"}

    # -- cancel one from its row, while it runs
    page.get_by_role("button", name=f"Cancel {to_cancel}").click()
    page.wait_for_function(
        "id => document.querySelector(`tr[data-batch=\"${id}\"] .badge`)?.textContent.trim() === 'cancelled'",
        arg=to_cancel, timeout=30_000)
    assert client.batches.retrieve(to_cancel).status == "cancelled"

    # -- watch the other's bar move without reloading the page
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while status_of(page, watched) != "completed":
        assert time.monotonic() < deadline, f"never completed; progress seen {seen}"
        done, total = progress_of(page, watched)
        assert total == 80
        if not seen or done != seen[-1]:
            seen.append(done)
            if len(seen) == 3:
                page.screenshot(path=str(tmp_path / "batches-running.png"))
        time.sleep(0.2)
    middle = [v for v in seen if 0 < v < 80]
    assert len(middle) >= 2, f"the bar did not visibly move: {seen}"
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    rate = page.locator(f'tr[data-batch="{watched}"] td[data-label="Rate"]').inner_text()
    assert re.fullmatch(r"[\d.]+/s", rate), rate
    assert progress_of(page, watched) == (80, 80)

    # -- download the output through the row's button: the same bytes the SDK reads
    done = wait_terminal(client, watched)
    with page.expect_download() as info:
        page.get_by_role("button", name=f"Output: download {watched}_output.jsonl").click()
    saved = tmp_path / "downloaded.jsonl"
    info.value.save_as(saved)
    assert saved.read_bytes() == client.files.content(done.output_file_id).read()
    # ... by a link the browser streams to disk, not a blob the tab had to hold whole first
    assert f"/v1/files/{done.output_file_id}/content?ticket=" in info.value.url, info.value.url
    assert info.value.suggested_filename == f"{watched}_output.jsonl"

    # -- the batch page: timeline, errors grouped by code, results joined to their input
    page.get_by_role("link", name=watched).click()
    page.locator("#results-h").wait_for()
    timeline = page.locator(".timeline").inner_text()
    for step in ("created", "in progress", "finalizing", "completed"):
        assert step in timeline
    group = page.locator('.groups > li[data-code="invalid_value"]')
    assert "\u00d7 8" in group.inner_text()  # the code's count: "invalid_value x 8"
    first = page.locator("table.results tbody tr").first
    assert first.locator("td").nth(0).inner_text() == "req-0"
    assert "question 0" in first.locator("td").nth(2).inner_text()
    answer = json.loads(client.files.content(done.output_file_id).text.splitlines()[0])
    assert first.locator("td").nth(3).inner_text() == answer["response"]["body"]["choices"][0]["message"]["content"]
    assert page.locator("table.results tbody tr").count() == 80
    page.screenshot(path=str(tmp_path / "batch.png"), full_page=True)

    # -- delete a file from the Files page (a confirm dialog first)
    page.get_by_role("link", name="Files").click()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete dropped.jsonl").click()
    page.locator('tr:has-text("dropped.jsonl")').wait_for(state="detached")
    assert "dropped.jsonl" not in {f.filename for f in client.files.list()}


def test_admin_sees_every_tenants_batches_with_their_owner(server: Server, page_for: Any, tmp_path: Path) -> None:
    alice, bob = server.client(API_KEY), server.client(OTHER_KEY)
    alice_file = upload(alice, [chat_line(i) for i in range(5)])
    batch = alice.batches.create(input_file_id=alice_file, endpoint="/v1/chat/completions", completion_window="24h")
    bob_batch = bob.batches.create(input_file_id=upload(bob, [chat_line(1)]), endpoint="/v1/chat/completions",
                                   completion_window="24h")
    wait_terminal(alice, batch.id)

    page = page_for(server, ADMIN_KEY)
    row = page.locator(f'tr[data-batch="{batch.id}"]')
    row.wait_for()
    assert row.locator("td.owner").inner_text() == owner_of(hash_key(API_KEY))
    assert page.locator(f'tr[data-batch="{bob_batch.id}"] td.owner').inner_text() == owner_of(hash_key(OTHER_KEY))
    assert page.locator(".who").inner_text().strip().lower() == "admin"
    # the server page: the upstream's limiter, the route, and the worker heartbeating
    page.get_by_role("link", name="Server").click()
    page.locator("#t-workers").wait_for()
    workers = page.locator('section[aria-labelledby="t-workers"]')
    workers.locator(".badge", has_text="live").first.wait_for()
    routes = page.locator('section[aria-labelledby="t-routes"]').inner_text()
    assert "*" in routes
    assert "/ 64" in page.locator('section[aria-labelledby="t-engines"]').inner_text()
    page.screenshot(path=str(tmp_path / "server.png"), full_page=True)

    # a tenant sees its own batches only, without owners or the server's insides
    tenant = page_for(server, OTHER_KEY)
    tenant.locator(f'tr[data-batch="{bob_batch.id}"]').wait_for()
    assert tenant.locator(f'tr[data-batch="{batch.id}"]').count() == 0
    assert tenant.locator("td.owner").count() == 0
    tenant.get_by_role("link", name="Models").click()
    tenant.locator("h1", has_text="Models").wait_for()
    assert tenant.locator("#t-workers").count() == 0


def test_an_admin_is_offered_only_its_own_files_to_batch_and_delete(server: Server, page_for: Any) -> None:
    """An admin lists every tenant's files, but creates batches from and deletes its own only: the
    form offered others' files (a 404 on create) and every row a Delete button (a 404 each)."""
    alice_file = upload(server.client(API_KEY), [chat_line(1)])
    own_file = upload(server.client(ADMIN_KEY), [chat_line(2)])
    page = page_for(server, ADMIN_KEY)
    page.locator("details.card summary").click()
    page.locator(f'#create-file option[value="{own_file}"]').wait_for(state="attached")
    assert page.locator(f'#create-file option[value="{alice_file}"]').count() == 0
    page.get_by_role("link", name="Files").click()
    page.locator(f'tr[data-file="{alice_file}"]').wait_for()
    assert page.locator(f'tr[data-file="{alice_file}"] button', has_text="Delete").count() == 0
    assert page.locator(f'tr[data-file="{own_file}"] button', has_text="Delete").count() == 1


def test_a_batch_page_whose_results_cannot_be_read_says_so_and_a_hidden_tab_polls_nothing(
        server: Server, page_for: Any) -> None:
    """A failed read of the result files left 'Reading the result files...' forever (never read
    again); a tab nobody looks at polled the API every 2 s, against its key's rate limit."""
    client = server.client(API_KEY)
    batch = client.batches.create(input_file_id=upload(client, [chat_line(1)]), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_terminal(client, batch.id)
    assert done.output_file_id is not None
    client.files.delete(done.output_file_id)
    page = page_for(server, API_KEY)
    page.evaluate(f"location.hash = '#/batches/{batch.id}'")
    page.locator("p.error", has_text="Could not read the result files").wait_for()
    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url) if "/v1/batches" in request.url else None)
    page.evaluate("Object.defineProperty(document, 'hidden', {value: true, configurable: true}); "
                  "document.dispatchEvent(new Event('visibilitychange'))")
    page.wait_for_timeout(2500)  # a tick in flight may still finish (events arrive while Playwright waits)
    polls.clear()
    page.wait_for_timeout(4500)  # two polling intervals
    assert polls == []
    page.evaluate("Object.defineProperty(document, 'hidden', {value: false, configurable: true}); "
                  "document.dispatchEvent(new Event('visibilitychange'))")
    page.wait_for_timeout(1000)
    assert polls  # shown again: polled at once


def test_a_malformed_address_or_a_failing_server_page_does_not_break_the_dashboard(
        server: Server, page_for: Any) -> None:
    """'#/batches/%' threw in the router and froze the page; a non-403 error from the admin page
    at sign-in refused a good key, and any error at a reload (a restart, a 429) erased it."""
    page = page_for(server, API_KEY)
    page.get_by_role("link", name="Files").click()
    page.locator("h1", has_text="Files").wait_for()
    page.evaluate("location.hash = '#/batches/%'")
    page.locator("h1", has_text="Batches").wait_for()
    page.route("**/v1/admin/server", lambda route: route.fulfill(status=500, body="{}"))
    page.route("**/v1/models", lambda route: route.fulfill(status=502, body="{}"))
    page.reload()
    page.locator("#signin-error", has_text="Could not reach the server").wait_for()
    page.unroute("**/v1/models")
    page.reload()  # the key was kept: no sign-in needed
    page.get_by_role("navigation", name="Sections").wait_for()
    assert page.evaluate("sessionStorage.length") >= 1


def test_dashboard_fits_a_phone(make_server: Any, page_for: Any, tmp_path: Path) -> None:
    server = make_server()
    client = server.client(API_KEY)
    lines = [chat_line(i, x_fault="slow:400") for i in range(40)]
    for _ in range(3):
        client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"description": "nightly eval"})
    page = page_for(server, API_KEY, width=390, height=844)
    page.locator("tr[data-batch]").nth(2).wait_for()
    page.wait_for_timeout(POLL_S * 1000 + 500)  # a second poll: rates and ETAs filled in
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # rows are cards: each cell labelled by its column
    label = page.evaluate("getComputedStyle(document.querySelector('td[data-label=Status]'), '::before').content")
    assert label == '"Status"'
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)


def test_dashboard_files_are_served_with_a_strict_policy(server: Server) -> None:
    status, headers, _ = raw_request("GET", f"http://127.0.0.1:{server.port}/ui")
    assert status == 200  # urllib follows the redirect to /ui/
    status, headers, body = raw_request("GET", f"http://127.0.0.1:{server.port}/ui/")
    assert status == 200 and b'<script type="module" src="app.js">' in body
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, _ = raw_request("GET", f"http://127.0.0.1:{server.port}/ui/batches.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert raw_request("GET", f"http://127.0.0.1:{server.port}/ui/nope.js")[0] == 404


def test_admin_server_route_and_owner_field(server: Server) -> None:
    base = f"http://127.0.0.1:{server.port}/v1"
    alice = server.client(API_KEY)
    file_id = upload(alice, [chat_line(i, x_fault="slow:500") for i in range(400)])
    batch = alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")

    def get(path: str, key: str) -> tuple[int, Any]:
        status, _, body = raw_request("GET", base + path, {"Authorization": f"Bearer {key}"})
        return status, json.loads(body)

    status, body = get("/admin/server", OTHER_KEY)
    assert status == 403
    assert body["error"]["code"] == "insufficient_permissions"
    assert body["error"]["message"].startswith("You have insufficient permissions for this operation")
    status, overview = get("/admin/server", ADMIN_KEY)
    assert status == 200 and overview["object"] == "server"
    assert overview["owner"] == owner_of(hash_key(ADMIN_KEY))  # which files and batches are its own
    assert overview["routes"][0]["pattern"] == "*"
    assert overview["engines"][0]["concurrency"]["maximum"] == 64
    assert overview["workers"] and overview["workers"][0]["seen_seconds_ago"] < 15

    def queued() -> bool:  # the model is known from the first committed shard on
        rows = {q["model"]: q for q in get("/admin/server", ADMIN_KEY)[1]["queue"]}
        return "gpt-4o-mini" in rows and rows["gpt-4o-mini"]["batches"] >= 1 and 0 < rows["gpt-4o-mini"][
            "waiting_requests"] < 400 * rows["gpt-4o-mini"]["batches"]

    until(queued, timeout=30, interval=0.1)
    # the owner field: for admin callers only; tenants get OpenAI's object unchanged
    assert "owner" not in get(f"/batches/{batch.id}", API_KEY)[1]
    assert get(f"/batches/{batch.id}", ADMIN_KEY)[1]["owner"] == owner_of(hash_key(API_KEY))
    assert get(f"/files/{file_id}", ADMIN_KEY)[1]["owner"] == owner_of(hash_key(API_KEY))
    assert "owner" not in get(f"/files/{file_id}", API_KEY)[1]
    openapi = json.loads(raw_request("GET", f"http://127.0.0.1:{server.port}/openapi.json")[2])
    assert "403" in openapi["paths"]["/v1/admin/server"]["get"]["responses"]
    alice.batches.cancel(batch.id)


def test_docs_screenshot(make_server: Any, page_for: Any, tmp_path: Path) -> None:
    """The README's picture: a few batches mid-run. Written to docs/ only when asked."""
    server = make_server("--shard-lines", "5", "--max-shards", "1")
    client = server.client(API_KEY)
    specs = [("nightly eval", 20, "slow:100"), ("support-ticket triage", 200, "slow:400"),
             ("summaries, 2k prompts", 200, "slow:600")]
    for description, count, fault in specs:
        lines = [chat_line(i, x_fault=("400" if i % 17 == 5 else fault)) for i in range(count)]
        client.batches.create(input_file_id=upload(client, lines, f"{description}.jsonl"),
                              endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"description": description})
    page = page_for(server, API_KEY, width=1200, height=560)
    page.locator("tr[data-batch]").nth(2).wait_for()
    # one batch done, the others running with a measured rate and ETA
    page.wait_for_function(
        "() => [...document.querySelectorAll('tr[data-batch]')].filter(tr => tr.querySelector('td[data-label=ETA]')"
        ".textContent.endsWith('s')).length >= 2 && document.querySelector('.badge.s-completed')", timeout=40_000)
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("OVERNIGHT_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_batches_page_through_the_after_cursor_and_filter_by_status(make_server: Any, page_for: Any) -> None:
    server = make_server()
    client = server.client(API_KEY)
    # a line for another endpoint: the batch fails validation, and runs nothing
    good, bad = upload(client, [chat_line(1)]), upload(client, [{**chat_line(2), "url": "/v1/embeddings"}])
    failed = []
    for i in range(120):
        batch = client.batches.create(input_file_id=bad if i in (3, 77, 110) else good,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        if i in (3, 77, 110):
            failed.append(batch.id)
    newest_first = [b.id for b in client.batches.list(limit=100).data]
    for batch_id in failed:
        wait_terminal(client, batch_id)

    page = page_for(server, API_KEY)
    rows = page.locator("tr[data-batch]")
    # by keyboard: signed in, focus is on the page's content; Tab reaches the filter, then the form
    page.wait_for_function("() => document.activeElement?.id === 'view' && document.getElementById('status-filter')")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "status-filter"
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.tagName") == "SUMMARY"
    page.keyboard.press("Enter")
    page.locator("#create-file").wait_for()
    page.keyboard.press("Enter")  # closed again
    page.locator("#create-file").wait_for(state="hidden")

    def shown() -> list[str]:
        page.locator("tr[data-batch]").first.wait_for()
        return [str(rows.nth(i).get_attribute("data-batch")) for i in range(rows.count())]

    page.locator(f'tr[data-batch="{newest_first[0]}"]').wait_for()
    assert shown() == newest_first[:50]
    older = page.get_by_role("button", name="Older →")
    older.click()
    page.locator(f'tr[data-batch="{newest_first[50]}"]').wait_for()
    assert shown() == newest_first[50:100]
    older.click()
    page.locator("text=Page 3").wait_for()
    assert len(shown()) == 20 and older.is_disabled()
    page.get_by_role("button", name="← Newer").click()
    page.locator(f'tr[data-batch="{newest_first[50]}"]').wait_for()

    # the filter reads on through the list (newest first) and keeps only that status
    page.select_option("#status-filter", "failed")
    page.wait_for_function("n => document.querySelectorAll('tr[data-batch]').length === n", arg=len(failed))
    assert shown() == list(reversed(failed))
    assert {s.strip().lower() for s in page.locator("tr[data-batch] .badge").all_inner_texts()} == {"failed"}
    assert "of 120 looked at" in page.locator(".pager").inner_text()
