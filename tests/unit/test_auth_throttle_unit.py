"""The failed-authentication throttle with a fake clock: failures spend a per-address budget that
refills, the map of addresses stays bounded however many addresses fail, IPv6 counts per /64, 0
turns it off; and over-long keys are refused without being hashed."""

from __future__ import annotations

import pytest

from overnight.api import auth
from overnight.api.auth import MAX_KEY_CHARS, Authenticator, Unauthorized, hash_key, owner_of
from overnight.api.auth_throttle import AuthFailureThrottle, client_key
from overnight.api.rate_limit import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_spend_the_budget_and_it_refills() -> None:
    clock = Clock()
    throttle = AuthFailureThrottle(burst=3, per_second=0.5, max_addresses=100, clock=clock)
    for _ in range(3):
        throttle.check("10.0.0.1")
        throttle.failed("10.0.0.1")
    with pytest.raises(RateLimited) as exc:
        throttle.check("10.0.0.1")
    assert exc.value.headers["retry-after"] == "2"  # one failure back at 0.5/s
    assert exc.value.status_code == 429
    throttle.check("10.0.0.2")  # another address has its own budget
    clock.now += 1.9
    with pytest.raises(RateLimited):
        throttle.check("10.0.0.1")
    clock.now += 0.1
    throttle.check("10.0.0.1")  # exactly one more attempt...
    throttle.failed("10.0.0.1")
    with pytest.raises(RateLimited):
        throttle.check("10.0.0.1")  # ...and it failed too
    clock.now += 3600
    for _ in range(3):  # a long quiet spell refills the burst, no more
        throttle.check("10.0.0.1")
        throttle.failed("10.0.0.1")
    with pytest.raises(RateLimited):
        throttle.check("10.0.0.1")


def test_the_address_map_is_bounded() -> None:
    clock = Clock()
    throttle = AuthFailureThrottle(burst=2, per_second=0.01, max_addresses=50, clock=clock)
    for i in range(20_000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        assert len(throttle) <= 50
    assert len(throttle) == 50
    # The most recent failures are remembered; the oldest addresses were forgotten.
    throttle.failed("10.0.78.31")  # i = 19999: its second failure spends its budget
    with pytest.raises(RateLimited):
        throttle.check("10.0.78.31")
    throttle.check("10.0.0.0")


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    throttle = AuthFailureThrottle(burst=2, per_second=0.01, max_addresses=10, clock=Clock())
    throttle.failed("2001:db8:1:2::1")
    throttle.failed("2001:db8:1:2:ffff::9")  # the same /64
    with pytest.raises(RateLimited):
        throttle.check("2001:db8:1:2::77")
    throttle.check("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("") == ""


def test_zero_turns_it_off() -> None:
    for burst, rate in ((0, 1.0), (20, 0.0)):
        throttle = AuthFailureThrottle(burst=burst, per_second=rate, max_addresses=10, clock=Clock())
        for _ in range(1000):
            throttle.check("10.0.0.1")
            throttle.failed("10.0.0.1")
        assert len(throttle) == 0


def test_an_over_long_key_is_refused_without_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    good = "sk-" + "k" * (MAX_KEY_CHARS - 3)
    authenticator = Authenticator({hash_key(good): (owner_of(hash_key(good)), False)})
    hashed: list[int] = []
    monkeypatch.setattr(auth, "hash_key", lambda key: hashed.append(len(key)) or hash_key(key))
    assert authenticator.authenticate(f"Bearer {good}").owner == owner_of(hash_key(good))
    with pytest.raises(Unauthorized) as exc:
        authenticator.authenticate(f"Bearer {good}x")
    assert exc.value.code == "invalid_api_key"
    assert f"longer than {MAX_KEY_CHARS} characters" in exc.value.message
    assert hashed == [MAX_KEY_CHARS]  # the long one was never hashed
