"""What the embedded chat engine refuses rather than ignores: parameters OpenAI would honour (or
refuse) that the engine cannot, each a 400 naming the parameter."""

from __future__ import annotations

from typing import Any

import pytest

from overnight.engines.errors import BadRequest
from overnight.engines.llama.openai_params import check_unsupported

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("changes", "param", "chat"), [
    ({"logprobs": 0}, "logprobs", False),  # completions: 0 asks for the chosen tokens' logprobs
    ({"modalities": ["text", "audio"]}, "modalities", True),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", True),
    ({"tool_choice": "required"}, "tool_choice", True),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", True),
    ({"function_call": {"name": "f"}}, "function_call", True),
    ({"stream_options": {"include_usage": True}}, "stream_options", True),
    ({"n": 2}, "n", True),
    ({"logit_bias": {"42": 5}}, "logit_bias", True),
])
def test_what_the_engine_cannot_do_is_refused(changes: dict[str, Any], param: str, chat: bool) -> None:
    with pytest.raises(BadRequest) as refused:
        check_unsupported({**CHAT, **changes}, chat)
    assert refused.value.param == param


@pytest.mark.parametrize("changes", [
    {"logprobs": False}, {"modalities": ["text"]}, {"tool_choice": "none"}, {"tool_choice": "auto"},
    {"response_format": {"type": "text"}}, {"n": 1}, {"stream_options": None},
])
def test_what_changes_nothing_is_accepted(changes: dict[str, Any]) -> None:
    check_unsupported({**CHAT, **changes}, True)
