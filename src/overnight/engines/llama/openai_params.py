"""OpenAI request bodies -> what the scheduler runs: prompt tokens, sampling, stop strings, max tokens.

Runs on the event loop before a request is queued: it is cheap, and a bad line is answered at once
(a `BadRequest`, i.e. an HTTP 400 in OpenAI's words) instead of after waiting for a slot. Chat messages
are rendered with the model's chat template (or the one configured), or, for a GGUF without one, with
a plain 'Role: content' fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from overnight.engines import responses_api
from overnight.engines.errors import BadRequest
from overnight.engines.llama.native import Native
from overnight.engines.llama.sampling import Sampling
from overnight.engines.port import EngineRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"  # answered as a chat request (see responses_api)
ENDPOINTS = (CHAT, COMPLETIONS, RESPONSES)

# OpenAI's default for the legacy completions endpoint; chat defaults to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_UNSUPPORTED_TRUTHY = {
    "logprobs": "logprobs are not supported by the embedded engine.",
    "top_logprobs": "top_logprobs are not supported by the embedded engine.",
    "echo": "echo is not supported by the embedded engine.",
    "suffix": "suffix is not supported by the embedded engine.",
    "tools": "tools are not supported by the embedded engine.",
    "functions": "functions are not supported by the embedded engine.",
    "logit_bias": "logit_bias is not supported by the embedded engine.",
    "stream": "streaming is not supported in a batch.",
}


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be a number between {lo} and {hi}.", name)
    return float(value)


def parse_sampling(body: dict[str, Any]) -> Sampling:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer.", "seed")
    return Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )


def check_unsupported(body: dict[str, Any], chat: bool = True) -> None:
    """Refuse what the engine would otherwise ignore where OpenAI would honour or refuse it."""
    if body.get("n") not in (None, 1):
        raise BadRequest("The embedded engine supports only n=1; send one line per completion.", "n")
    best_of = body.get("best_of", 1)
    if best_of not in (None, 1):
        raise BadRequest("The embedded engine supports only best_of=1.", "best_of")
    for name, message in _UNSUPPORTED_TRUTHY.items():
        if body.get(name):
            raise BadRequest(message, name)
    if not chat and body.get("logprobs") is not None:  # 0 asks for the chosen tokens' logprobs
        raise BadRequest(_UNSUPPORTED_TRUTHY["logprobs"], "logprobs")
    modalities = body.get("modalities")
    if body.get("audio") is not None or (modalities is not None and modalities != ["text"]):
        raise BadRequest("Audio output is not supported by the embedded engine's model; it writes text only.",
                          "audio" if body.get("audio") is not None else "modalities")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise BadRequest(f"Invalid value for '{name}': '{name}' is only allowed when 'tools' are specified.",
                              name)
    if body.get("stream_options") is not None and not body.get("stream"):
        raise BadRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          "stream_options")
    response_format = body.get("response_format")
    if response_format and not (isinstance(response_format, dict) and response_format.get("type") == "text"):
        raise BadRequest("Only response_format {'type': 'text'} is supported by the embedded engine.",
                          "response_format")


def parse_stops(body: dict[str, Any]) -> tuple[bytes, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadRequest("'stop' must be a string or a list of strings.", "stop")
    return tuple(s.encode("utf-8") for s in items if s)


def requested_max_tokens(body: dict[str, Any], chat: bool) -> int | None:
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return None if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer.", name)
    return value


def _message_text(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest("The embedded engine accepts only text content parts.",
                                  f"messages.[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest("Message content must be a string or a list of text parts.", f"messages.[{index}].content")


def normalize_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list.", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("Each message must be an object with a 'role'.", f"messages.[{i}]")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": _message_text(message, i)})
    return out


def fallback_chat_prompt(messages: list[dict[str, str]]) -> str:
    """For a GGUF without a chat template: 'Role: content' turns, one per line, ending with
    'Assistant:'. Generation also stops at a new 'User:' turn (see FALLBACK_STOPS)."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


FALLBACK_STOPS = (b"\nUser:", b"\nSystem:")


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the scheduler needs of one request."""

    prompt: list[int]
    sampling: Sampling
    stops: tuple[bytes, ...]  # UTF-8: the scheduler matches them on generated bytes
    max_new: int


def parse_request(native: Native, formatter: Jinja2ChatFormatter | None, request: EngineRequest) -> ParsedRequest:
    """A chat, completions or Responses request, mapped for the scheduler; raises BadRequest."""
    body = request.body
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", None)
    if request.endpoint != RESPONSES:
        return parse_body(native, formatter, body, request.endpoint == CHAT)
    # A Responses request runs as the chat request it maps onto; the chat side's complaints
    # then name the Responses parameter (`input`, not `messages`).
    try:
        chat_body = responses_api.to_chat_body(body)
        if body.get("truncation") == "auto":
            return _fit_by_dropping_oldest_inputs(native, formatter, body, chat_body)
        return parse_body(native, formatter, chat_body, True, noun="input")
    except responses_api.UnsupportedRequest as exc:
        raise BadRequest(str(exc), exc.param, exc.code) from None
    except BadRequest as exc:
        param = responses_api.RESPONSES_PARAMS.get(exc.param or "", exc.param)
        raise BadRequest(str(exc), param, exc.code) from None


def _fit_by_dropping_oldest_inputs(native: Native, formatter: Jinja2ChatFormatter | None, body: dict[str, Any],
                                   chat_body: dict[str, Any]) -> ParsedRequest:
    """Responses `truncation: "auto"`: the request without the fewest oldest input items that makes
    it fit the context window (prompt + max_output_tokens); the newest item is never dropped, so a
    request that does not fit even then is refused as with "disabled". A binary search: each try
    renders and tokenizes the conversation, and fewer items never make a longer prompt."""
    try:
        return parse_body(native, formatter, chat_body, True, noun="input")
    except BadRequest as exc:
        if exc.code != "context_length_exceeded":
            raise
        refusal = exc
    last = responses_api.droppable_inputs(chat_body, body)

    def without(dropped: int) -> ParsedRequest | None:
        """Without the `dropped` oldest items, or None: still too long. A template that rejects the
        conversation so cut (many want it to open with a user turn, then alternate) gets one more
        item dropped."""
        for k in (dropped, dropped + 1) if dropped < last else (dropped,):
            try:
                return parse_body(native, formatter, responses_api.without_oldest_inputs(chat_body, body, k),
                                  True, noun="input")
            except BadRequest as exc:
                if exc.code == "context_length_exceeded":
                    return None
                if exc.param != "messages" or k == last:  # not the template's rejection, or nothing left to try
                    raise
        return None

    fits: ParsedRequest | None = None
    lo, hi = 1, last
    while lo <= hi:
        dropped = (lo + hi) // 2
        parsed = without(dropped)
        if parsed is None:
            lo = dropped + 1
        else:
            fits, hi = parsed, dropped - 1
    if fits is None:
        raise refusal
    return fits


def parse_body(native: Native, formatter: Jinja2ChatFormatter | None, body: dict[str, Any], chat: bool,
               noun: str | None = None) -> ParsedRequest:
    """A chat (`chat`) or completions body. `noun`: what the prompt is called in messages (default:
    messages or prompt)."""
    check_unsupported(body, chat)
    sampling = parse_sampling(body)
    stops = parse_stops(body)
    if chat:
        prompt, extra_stops = chat_prompt(native, formatter, body)
        stops += extra_stops
    else:
        prompt = completion_prompt(native, body)
    max_new = max_new_tokens(native, body, chat, len(prompt), noun or ("messages" if chat else "prompt"))
    return ParsedRequest(prompt=prompt, sampling=sampling, stops=stops, max_new=max_new)


def chat_prompt(native: Native, formatter: Jinja2ChatFormatter | None,
                body: dict[str, Any]) -> tuple[list[int], tuple[bytes, ...]]:
    """The rendered, tokenized messages and the stop strings the rendering implies."""
    messages = normalize_messages(body)
    if formatter is None:
        return native.tokenize(fallback_chat_prompt(messages), True, False), FALLBACK_STOPS
    specials = native.special_texts
    if specials is not None and any(specials.search(m["content"]) for m in messages):
        return _prompt_keeping_content_as_text(native, formatter, messages), ()
    # The template writes any BOS itself (llama-cpp-python: added_special=True).
    return native.tokenize(_render(formatter, messages), False, True), ()


def _render(formatter: Jinja2ChatFormatter, messages: list[dict[str, str]]) -> str:
    try:
        return str(formatter(messages=messages).prompt)  # type: ignore[arg-type]
    except Exception as exc:  # the template's raise_exception(), or a template/message mismatch
        raise BadRequest(f"The chat template rejected these messages: {exc}", "messages") from exc


# Stand-ins for message contents while the template renders: private-use characters no template writes.
_HOLE = re.compile("\ue000(\\d+)\ue001")


def _prompt_keeping_content_as_text(native: Native, formatter: Jinja2ChatFormatter,
                                    messages: list[dict[str, str]]) -> list[int]:
    """A prompt whose messages contain a special token's text (`<|im_end|>` in a scraped chat log):
    the template's own markers are special tokens, the contents' are plain text, as OpenAI reads a
    message. (Tokenized whole, a user message could end its turn and write a system turn.)"""
    holes = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    parts = _HOLE.split(_render(formatter, holes))  # template, index, template, index, ..., template
    if len(parts) != 2 * len(messages) + 1 or [int(p) for p in parts[1::2]] != list(range(len(messages))):
        # A template that reads or rewrites the content itself: render the real text instead.
        return native.tokenize(_render(formatter, messages), False, True)
    tokens = []
    for i, part in enumerate(parts):
        if i % 2:
            tokens += native.tokenize(messages[int(part)]["content"], False, False)
        elif part:
            tokens += native.tokenize(part, False, True)
    return tokens


def completion_prompt(native: Native, body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        tokens = native.tokenize(prompt, True, True)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < native.n_vocab for t in prompt):
        tokens = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise BadRequest("The embedded engine takes one prompt per line; send one line per prompt.", "prompt")
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids.", "prompt")
    if not tokens:
        bos = llama_cpp.llama_vocab_bos(native.vocab)
        if bos < 0:
            raise BadRequest("The prompt is empty.", "prompt")
        tokens = [bos]
    return tokens


def max_new_tokens(native: Native, body: dict[str, Any], chat: bool, n_prompt: int, noun: str) -> int:
    """The completion budget: as requested, or (chat without a limit) the rest of the window."""
    requested = requested_max_tokens(body, chat)
    window = native.window
    if requested is None:  # OpenAI chat default: up to the context length
        requested = int(window - n_prompt)
        if requested >= 1:
            return requested
    if requested < 1 or n_prompt + requested > window:
        raise BadRequest(
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{n_prompt + max(requested, 1)} tokens ({n_prompt} in the {noun}, "
            f"{max(requested, 1)} in the completion). Please reduce the length of the "
            f"{noun} or completion.",
            noun, code="context_length_exceeded")
    return requested
