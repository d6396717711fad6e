"""overnight: a self-hosted, OpenAI-compatible Batch API."""

__version__ = "0.1.0"

__all__ = ["__version__"]
