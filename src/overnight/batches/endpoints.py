"""What the Batch API needs to know about each endpoint a line may target: the body fields it
cannot do without, its name in messages, and the model name a line is routed by."""

from __future__ import annotations

from typing import Any

from overnight import constants as C

# Fields each endpoint's body cannot do without (besides `model`, see `model_required`).
REQUIRED_BODY_FIELDS: dict[str, tuple[str, ...]] = {
    C.RESPONSES: ("input",),
    C.CHAT_COMPLETIONS: ("messages",),
    C.COMPLETIONS: ("prompt",),
    C.EMBEDDINGS: ("input",),
    C.MODERATIONS: ("input",),
}

# As OpenAI names the endpoints in its messages ("Chat Completions: Streaming is not supported ...").
ENDPOINT_LABELS: dict[str, str] = {
    C.RESPONSES: "Responses",
    C.CHAT_COMPLETIONS: "Chat Completions",
    C.COMPLETIONS: "Completions",
    C.EMBEDDINGS: "Embeddings",
    C.MODERATIONS: "Moderations",
}

# OpenAI's moderations endpoint takes `model` as optional and answers with this model when it is
# left out; so does the SDK's `client.moderations.create(input=...)`, which sends no model. Such a
# line is routed as if it named this model, and its body still goes upstream without one (the
# upstream applies its own default), unless an alias for this name says which model to use.
DEFAULT_MODELS: dict[str, str] = {C.MODERATIONS: "omni-moderation-latest"}


def model_required(endpoint: str) -> bool:
    return endpoint not in DEFAULT_MODELS


def routing_model(endpoint: str, body: dict[str, Any]) -> str:
    """The model name a line is routed by: its `model`, or the endpoint's default when it has none."""
    model = body.get("model")
    if model is None:
        return DEFAULT_MODELS.get(endpoint, "")
    return model if isinstance(model, str) else ""
