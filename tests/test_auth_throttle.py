"""Failed authentication is throttled per client address: a burst of wrong keys ends in 429 with
`retry-after` (before any key is checked, a correct one included), and the correct key works again
once the window has passed. The throttle's own bounds are unit-tested in unit/test_auth_throttle_unit.py."""

from __future__ import annotations

import json
import time
from typing import Any

from conftest import API_KEY, raw_request


def test_wrong_keys_end_in_429_and_the_right_key_works_after_the_window(make_server: Any) -> None:
    srv = make_server("--auth-failure-burst", "5", "--auth-failures-per-second", "2")
    url = f"{srv.base_url}/files"
    statuses = [raw_request("GET", url, {"Authorization": f"Bearer sk-guess-{i}"})[0] for i in range(40)]
    assert statuses[:5] == [401] * 5
    assert statuses[-10:] == [429] * 10
    assert statuses.count(401) <= 7  # the burst, and what refilled (2/s) while the loop ran
    status, headers, body = raw_request("GET", url, {"Authorization": f"Bearer {API_KEY}"})
    assert status == 429  # refused before the key is looked at: a guesser learns nothing from it
    error = json.loads(body)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "x-should-retry" not in headers
    wait = int(headers["retry-after"])
    assert 1 <= wait <= 2
    time.sleep(wait)  # what retry-after says: after it, the right key is let through
    assert raw_request("GET", url, {"Authorization": f"Bearer {API_KEY}"})[0] == 200
    # Good keys spend nothing: many of them in a row are never throttled.
    assert {raw_request("GET", url, {"Authorization": f"Bearer {API_KEY}"})[0] for _ in range(20)} == {200}

