"""The native sampler chain a request's sampling parameters build (no model needed)."""

from __future__ import annotations

import ctypes

import llama_cpp
import pytest

from overnight.engines.llama.sampling import Sampling, make_sampler


@pytest.mark.parametrize("seed", [-1, 2**32 - 1, 2**64 - 1, 0, 7, 2**40 + 7])
def test_a_requests_seed_is_a_fixed_seed(seed: int) -> None:
    """OpenAI's seed is any integer and the same seed should draw the same. llama.cpp reads its
    32-bit all-ones seed as "pick a random one": -1 (and other seeds ending in 32 one bits) sampled
    with a different random seed each time."""
    seeds = []
    for _ in range(2):
        chain = make_sampler(Sampling(temperature=1.0, top_p=1.0, seed=seed, presence_penalty=0,
                                      frequency_penalty=0), 8, 1000)
        seeds.append(llama_cpp.llama_sampler_get_seed(chain))
        llama_cpp.llama_sampler_free(chain)
    assert seeds[0] == seeds[1] != llama_cpp.LLAMA_DEFAULT_SEED


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, -1.0), (2.0, 2.0)])
def test_penalties_build_a_chain_that_penalises_what_was_drawn(presence: float, frequency: float) -> None:
    """llama.cpp's penalties sampler takes the vocabulary size first: called without it, every
    request with a penalty failed (and with it every line decoding beside it)."""
    chain = make_sampler(Sampling(temperature=0, top_p=1.0, seed=None, presence_penalty=presence,
                                  frequency_penalty=frequency), 8, 4)
    assert chain is not None
    try:
        logits = (ctypes.c_float * 4)(1.0, 3.0, 2.9, 0.0)
        llama_cpp.llama_sampler_accept(chain, 1)  # token 1 was drawn once already
        data = (llama_cpp.llama_token_data * 4)(*(llama_cpp.llama_token_data(i, logits[i], 0.0) for i in range(4)))
        candidates = llama_cpp.llama_token_data_array(data, 4, -1, False)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(candidates))
        penalty = presence + frequency
        drawn = data[candidates.selected].id
        assert drawn == (1 if 3.0 - penalty > 2.9 else 2), (penalty, drawn)
    finally:
        llama_cpp.llama_sampler_free(chain)
