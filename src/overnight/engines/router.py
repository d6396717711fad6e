"""Maps a line's `body.model` (after aliases) to an engine: exact names first, then globs in the
order configured, then the default engine for the endpoint (unless the fallback is off)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from overnight.engines.port import Engine

# Routing decisions remembered. Model names come from user input, so the cache is bounded (the
# oldest entry goes first); a miss costs a walk over the routes, a few microseconds.
ROUTE_CACHE_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class Route:
    pattern: str  # an exact model name or a glob such as "gpt-*" or "*"
    engine: Engine
    endpoints: frozenset[str] | None = None  # None: every endpoint

    def matches(self, model: str, endpoint: str) -> bool:
        if self.endpoints is not None and endpoint not in self.endpoints:
            return False
        return self.pattern == model or fnmatch.fnmatchcase(model, self.pattern)


@dataclass(frozen=True, slots=True)
class Resolved:
    engine: Engine
    model: str  # the name sent to the engine (an alias resolved)


class Router:
    def __init__(
        self,
        routes: list[Route],
        aliases: dict[str, str] | None = None,
        defaults: dict[str, Engine] | None = None,
    ) -> None:
        self.routes = routes
        self.aliases = dict(aliases or {})
        self.defaults = dict(defaults or {})  # endpoint -> engine for models no route names
        self._cache: dict[tuple[str, str], Resolved | None] = {}

    def resolve(self, model: str, endpoint: str) -> Resolved | None:
        key = (model, endpoint)
        try:
            return self._cache[key]
        except KeyError:
            if len(self._cache) >= ROUTE_CACHE_ENTRIES:
                del self._cache[next(iter(self._cache))]
            resolved = self._cache[key] = self._resolve(model, endpoint)
            return resolved

    def shard_lines(self, model: str, endpoint: str) -> int | None:
        """The shard size of the engine that serves `model` on `endpoint`; None when none does."""
        resolved = self.resolve(model, endpoint)
        return resolved.engine.shard_lines if resolved is not None else None

    def _resolve(self, model: str, endpoint: str) -> Resolved | None:
        target = self.aliases.get(model, model)
        exact = [r for r in self.routes if r.pattern == target and r.matches(target, endpoint)]
        for route in exact or self.routes:
            if route.matches(target, endpoint):
                return Resolved(route.engine, target)
        default = self.defaults.get(endpoint)
        return Resolved(default, target) if default is not None else None

    def engines(self) -> list[Engine]:
        seen: dict[int, Engine] = {}
        for engine in [r.engine for r in self.routes] + list(self.defaults.values()):
            seen.setdefault(id(engine), engine)
        return list(seen.values())

    def models(self) -> dict[str, str]:
        """Concrete model names served (exact routes, engines' own models, aliases) -> owner."""
        owners: dict[str, str] = {}
        for route in self.routes:
            if not any(ch in route.pattern for ch in "*?["):
                owners.setdefault(route.pattern, route.engine.owned_by)
        for engine in self.engines():
            for name in engine.served_models():
                owners[name] = engine.owned_by
        for alias in self.aliases:
            owners.setdefault(alias, "overnight")
        return dict(sorted(owners.items()))
