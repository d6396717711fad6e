"""Routing by model name: exact names first, then globs in order, aliases, endpoint defaults."""

from __future__ import annotations

import os

import pytest

from overnight.engines.port import EngineRequest, EngineResponse
from overnight.engines.router import ROUTE_CACHE_ENTRIES, Route, Router


class NamedEngine:
    def __init__(self, name: str, models: list[str] | None = None) -> None:
        self.name = name
        self.max_in_flight = 1
        self.shard_lines = 10
        self.owned_by = f"owner-{name}"
        self._models = models or []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, request: EngineRequest) -> EngineResponse:
        return EngineResponse(200, {"engine": self.name})

    def served_models(self) -> list[str]:
        return self._models


def test_exact_beats_glob_and_globs_keep_their_order() -> None:
    a, b, c = NamedEngine("a"), NamedEngine("b"), NamedEngine("c")
    router = Router([Route("gpt-*", a), Route("*", b), Route("gpt-4o", c)])
    assert router.resolve("gpt-4o", "/v1/chat/completions").engine is c  # type: ignore[union-attr]
    assert router.resolve("gpt-3.5", "/v1/chat/completions").engine is a  # type: ignore[union-attr]
    assert router.resolve("llama", "/v1/chat/completions").engine is b  # type: ignore[union-attr]


def test_aliases_and_endpoint_defaults() -> None:
    local, embed = NamedEngine("local", ["SmolLM2"]), NamedEngine("embed", ["MiniLM"])
    router = Router([], aliases={"gpt-4o-mini": "SmolLM2"},
                    defaults={"/v1/chat/completions": local, "/v1/embeddings": embed})
    resolved = router.resolve("gpt-4o-mini", "/v1/chat/completions")
    assert resolved is not None and resolved.engine is local and resolved.model == "SmolLM2"
    assert router.resolve("text-embedding-3-small", "/v1/embeddings").engine is embed  # type: ignore[union-attr]
    assert Router([Route("x", local)]).resolve("y", "/v1/chat/completions") is None
    assert router.models() == {"MiniLM": "owner-embed", "SmolLM2": "owner-local", "gpt-4o-mini": "overnight"}


def test_route_limited_to_endpoints() -> None:
    embed = NamedEngine("embed")
    router = Router([Route("MiniLM", embed, frozenset({"/v1/embeddings"}))])
    assert router.resolve("MiniLM", "/v1/chat/completions") is None
    assert router.resolve("MiniLM", "/v1/embeddings") is not None


def test_the_routing_cache_is_bounded_whatever_the_input() -> None:
    router = Router([Route("gpt-*", NamedEngine("a"))], defaults={"/v1/chat/completions": NamedEngine("d")})
    for i in range(ROUTE_CACHE_ENTRIES * 3):
        assert router.resolve(f"model-{i}", "/v1/chat/completions") is not None
    assert len(router._cache) == ROUTE_CACHE_ENTRIES
    # the newest decisions are the ones kept, and evicted ones are simply resolved again
    assert ("model-0", "/v1/chat/completions") not in router._cache
    resolved = router.resolve("gpt-4", "/v1/chat/completions")
    assert resolved is not None and resolved.engine.name == "a"


def test_llama_threads_default_to_this_process_share_of_the_cpus_it_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker process took os.cpu_count() threads: the host's cores in a container limited
    to 2 CPUs, and with 2 workers on 2 cores, 4 spinning compute threads."""
    from overnight.wiring.engines import compute_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert compute_threads(1) == 4
    assert compute_threads(2) == 2
    assert compute_threads(8) == 1
    assert compute_threads(0) == 4  # the worker in the API process
