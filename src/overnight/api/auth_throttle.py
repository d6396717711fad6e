"""Throttling of failed authentication per client address, so keys cannot be guessed at line rate.

A token bucket per address that only failures spend: a client with a good key never notices it,
and one that has spent its budget gets 429 with `retry-after` before its key is even looked at
(a correct key from that address waits too, or the 429 would tell a guesser when it hit). IPv6
addresses are grouped by /64, the block one host usually controls.

The map of addresses is bounded: input from the network must not grow memory without end. When it
is full, the address whose last failure is oldest is forgotten (an address that has refilled its budget
loses nothing by it)."""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

from overnight.api.rate_limit import RateLimited


class AuthFailureThrottle:
    """`burst` failures per address, refilled at `per_second`; `burst` 0 turns it off."""

    def __init__(
        self, burst: int, per_second: float, max_addresses: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = float(burst)
        self.rate = per_second
        self.max_addresses = max(1, max_addresses)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.burst > 0 and self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, address: str) -> None:
        """Raise `RateLimited` while `address` has no failures left to spend."""
        if not self.enabled:
            return
        tokens = self._tokens(client_key(address))
        if tokens < 1.0:
            wait = (1.0 - tokens) / self.rate
            raise RateLimited(
                "Too many requests with a wrong or missing API key from your address. "
                f"Try again in {wait:.1f}s.",
                retry_after=wait,
            )

    def failed(self, address: str) -> None:
        """Spend one failure for `address`."""
        if not self.enabled:
            return
        key = client_key(address)
        tokens = self._tokens(key)
        self._buckets[key] = (tokens - 1.0, self.clock())
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    def _tokens(self, key: str) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.burst
        tokens, at = entry
        return min(self.burst, tokens + (self.clock() - at) * self.rate)


def client_key(address: str) -> str:
    """The unit that is throttled: the address itself, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
