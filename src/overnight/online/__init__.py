"""Online requests (chat, completions, embeddings, responses) answered now, on the engines batch
lines run on, ahead of those lines."""

from overnight.online.port import OnlineAnswerer
from overnight.online.relay import RelayClient, RelayServer
from overnight.online.service import ONLINE_ENDPOINTS, OnlineService

__all__ = ["ONLINE_ENDPOINTS", "OnlineAnswerer", "OnlineService", "RelayClient", "RelayServer"]
