"""Sampling parameters of one request and the native sampler chain that draws its tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int | None
    presence_penalty: float
    frequency_penalty: float

    @property
    def greedy_argmax(self) -> bool:
        """Plain greedy: numpy argmax, no native sampler chain."""
        return self.temperature == 0 and self.presence_penalty == 0 and self.frequency_penalty == 0



def make_sampler(sampling: Sampling, max_new: int, n_vocab: int) -> Any:
    """A native sampler chain, or None for plain greedy (numpy argmax). OpenAI order: penalties
    (over the tokens generated so far: at most `max_new`), temperature, then nucleus (top_p) over
    the tempered distribution, then the seeded draw."""
    if sampling.greedy_argmax:
        return None
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.presence_penalty or sampling.frequency_penalty:
        penalties = llama_cpp.llama_sampler_init_penalties(
            n_vocab, max_new, 1.0, sampling.frequency_penalty, sampling.presence_penalty)
        llama_cpp.llama_sampler_chain_add(chain, penalties)
    if sampling.temperature == 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
    if sampling.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else _native_seed(sampling.seed)
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def _native_seed(seed: int) -> int:
    """OpenAI's seed is any integer; llama.cpp's is 32 bits, and its all-ones value means "draw a
    random seed". A request's seed is always a fixed one: -1 (all ones in 32 bits) samples as 0 does."""
    native = seed & 0xFFFFFFFF
    return 0 if native == llama_cpp.LLAMA_DEFAULT_SEED else native
