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


def test_truncation_auto_with_a_template_that_wants_alternating_turns_drops_one_more_item() -> None:
    """Mistral's template (as llama-cpp-python ships it) refuses a conversation that opens with an
    assistant turn: dropping an odd number of items from a user-first conversation was a 400 from
    the template, not a truncated answer."""
    import time
    from types import SimpleNamespace

    from llama_cpp.llama_chat_format import MISTRAL_INSTRUCT_CHAT_TEMPLATE, Jinja2ChatFormatter

    from overnight.engines.llama.openai_params import parse_request
    from overnight.engines.port import EngineRequest

    # A word is a token: a user turn renders as 11, an assistant turn as 9. The window (with 16
    # tokens of answer) fits the newest two items, not three.
    native = SimpleNamespace(tokenize=lambda text, add_bos, special: text.split(), special_texts=None, window=40)
    formatter = Jinja2ChatFormatter(template=MISTRAL_INSTRUCT_CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn{i} " + "word " * 8} for i in range(7)]
    body = {"model": "m", "input": turns, "max_output_tokens": 16, "truncation": "auto"}
    parsed = parse_request(native, formatter, EngineRequest("/v1/responses", body, time.time() + 60))  # type: ignore[arg-type]
    # The newest two would fit but open with an assistant turn: the newest item goes alone.
    assert parsed.prompt[:2] == ["<s>[INST]", "turn6"] and "turn5" not in parsed.prompt, parsed.prompt
