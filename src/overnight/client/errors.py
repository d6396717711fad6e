"""The client's exceptions: one root, so a caller can catch everything this package raises apart
from the SDK's own `openai.OpenAIError`."""

from __future__ import annotations


class ClientError(Exception):
    """Root of the errors raised by `overnight.client` itself."""


class TemplateError(ClientError, ValueError):
    """The request template, or a record rendered through it, cannot make a request body."""


class BatchInputError(ClientError, ValueError):
    """The records or the batch file cannot make a valid batch (a duplicate custom_id, no lines)."""


class WaitTimeout(ClientError, TimeoutError):
    """The batch did not reach a final state within the time the caller allowed."""


class NotFinished(ClientError):
    """The batch has no results to read yet: it has not reached a final state."""
