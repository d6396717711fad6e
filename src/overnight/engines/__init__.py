"""Where a request is executed: the engine port, the OpenAI-compatible upstream, the embedded
engines, and the router that maps a line's `body.model` to one of them."""

from overnight.engines.port import Engine, EngineRequest, EngineResponse
from overnight.engines.router import Resolved, Route, Router

__all__ = ["Engine", "EngineRequest", "EngineResponse", "Resolved", "Route", "Router"]
