"""Embedded chat and text completions on llama.cpp, with our own continuous batching.

engine.py is the facade (`LlamaChatEngine`); scheduler.py the decode thread (slots, admission, prefix
sharing, priority, streaming); openai_params.py maps OpenAI bodies onto it; sampling.py and native.py
hold the sampler chain and the llama.cpp handles.
"""

from overnight.engines.llama.engine import LlamaChatEngine

__all__ = ["LlamaChatEngine"]
