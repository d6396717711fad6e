"""The native sampler chain a request's sampling parameters build (no model needed)."""

from __future__ import annotations

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
                                      frequency_penalty=0), 8)
        seeds.append(llama_cpp.llama_sampler_get_seed(chain))
        llama_cpp.llama_sampler_free(chain)
    assert seeds[0] == seeds[1] != llama_cpp.LLAMA_DEFAULT_SEED
