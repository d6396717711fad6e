"""The Responses API on a chat engine: request bodies mapped onto chat, answers that the SDK's
`Response` model parses."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.responses import Response

from overnight.engines.responses_api import (
    ChatAnswer,
    UnsupportedRequest,
    droppable_inputs,
    response_object,
    to_chat_body,
    without_oldest_inputs,
)


def test_string_input_instructions_and_sampling_map_onto_chat() -> None:
    body = {"model": "m", "input": "Hi there", "instructions": "Be brief.", "max_output_tokens": 16,
            "temperature": 0, "top_p": 0.5, "metadata": {"k": "v"}, "store": True, "user": "u"}
    assert to_chat_body(body) == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        "max_completion_tokens": 16, "temperature": 0, "top_p": 0.5,
    }


def test_message_lists_with_text_parts_and_history() -> None:
    body = {"model": "m", "input": [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "input_text", "text": "Name "}, {"type": "input_text", "text": "two"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "One, two."}]},
        {"type": "message", "role": "user", "content": "More."},
    ]}
    assert to_chat_body(body)["messages"] == [
        {"role": "system", "content": "Rules."}, {"role": "user", "content": "Name two"},
        {"role": "assistant", "content": "One, two."}, {"role": "user", "content": "More."},
    ]


@pytest.mark.parametrize(("changes", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream": True}, "stream"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"truncation": "middle"}, "truncation"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 15}, "max_output_tokens"),  # OpenAI's minimum is 16
    ({"stop": ["x"]}, "stop"),  # chat parameters a Responses request does not have: OpenAI refuses them
    ({"seed": 7}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"max_tokens": 20}, "max_tokens"),
    ({"max_output_token": 20}, "max_output_token"),  # a typo ran without any limit
    ({"reasoning": "high"}, "reasoning"),  # not an object: passed the checks inside one
    ({"text": "json"}, "text"),
    ({"include": "reasoning.encrypted_content"}, "include"),
    ({"instructions": ["x"]}, "instructions"),
    ({"input": []}, "input"),
    ({"input": 3}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"},
                                             {"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[1]"),
])
def test_what_a_chat_template_cannot_express_is_refused_naming_the_parameter(
    changes: dict[str, Any], param: str
) -> None:
    with pytest.raises(UnsupportedRequest) as info:
        to_chat_body({"model": "m", "input": "x", **changes})
    assert info.value.param == param and str(info.value)


def test_settings_that_ask_for_nothing_more_are_accepted() -> None:
    body = {"model": "m", "input": "x", "tools": [], "tool_choice": "auto", "reasoning": {"effort": None},
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "parallel_tool_calls": True,
            # fields of items this engine never makes: OpenAI answers, and so does it (they were refused)
            "include": ["reasoning.encrypted_content", "message.input_image.image_url"],
            "service_tier": "flex", "safety_identifier": "u1", "prompt_cache_key": "k"}
    assert to_chat_body(body)["messages"] == [{"role": "user", "content": "x"}]


def test_the_requests_settings_and_arrival_are_echoed() -> None:
    """tool_choice "none" came back "auto", parallel_tool_calls false came back true, service_tier
    and text.verbosity were dropped, and created_at was the finish time."""
    body = {"input": "x", "tool_choice": "none", "parallel_tool_calls": False, "service_tier": "flex",
            "text": {"format": {"type": "text"}, "verbosity": "low"}}
    raw = response_object(ChatAnswer("Blue.", "stop", 1, 1, 0), body, "m", created_at=1000)
    response = Response.model_validate(raw)
    assert response.tool_choice == "none" and response.parallel_tool_calls is False
    assert response.service_tier == "flex" and response.text is not None and response.text.verbosity == "low"
    assert response.created_at == 1000 and raw["completed_at"] >= 1000


def test_a_completed_answer_parses_as_the_sdks_response() -> None:
    body = {"model": "gpt-4.1-mini", "input": "x", "instructions": "Be brief.", "temperature": 0,
            "metadata": {"k": "v"}}
    raw = response_object(ChatAnswer("Blue.", "stop", 12, 3, 4), body, "SmolLM2")
    response = Response.model_validate(raw)
    assert response.output_text == "Blue." and response.status == "completed"
    assert response.id.startswith("resp_") and response.output[0].id.startswith("msg_")  # type: ignore[union-attr]
    assert response.model == "SmolLM2" and response.instructions == "Be brief." and response.temperature == 0
    assert response.incomplete_details is None and response.metadata == {"k": "v"}
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (12, 3, 15)
    assert response.usage.input_tokens_details.cached_tokens == 4
    assert response.usage.output_tokens_details.reasoning_tokens == 0


def test_an_answer_cut_by_max_output_tokens_is_incomplete() -> None:
    raw = response_object(ChatAnswer("One, two", "length", 5, 8, 0), {"max_output_tokens": 8}, "m")
    response = Response.model_validate(raw)
    assert response.status == "incomplete" and response.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 8 and response.output_text == "One, two"


def test_truncation_auto_drops_the_oldest_input_items_never_the_instructions_or_the_newest() -> None:
    body = {"model": "m", "instructions": "Be brief.", "truncation": "auto",
            "input": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                      {"role": "user", "content": "three"}]}
    chat = to_chat_body(body)
    assert droppable_inputs(chat, body) == 2
    assert [m["content"] for m in without_oldest_inputs(chat, body, 2)["messages"]] == ["Be brief.", "three"]
    no_instructions = {**body, "instructions": None}
    chat = to_chat_body(no_instructions)
    assert [m["content"] for m in without_oldest_inputs(chat, no_instructions, 1)["messages"]] == ["two", "three"]
    assert droppable_inputs(to_chat_body({"model": "m", "input": "x"}), {"input": "x"}) == 0
    echoed = Response.model_validate(response_object(ChatAnswer("ok", "stop", 1, 1, 0), body, "m"))
    assert echoed.truncation == "auto"
