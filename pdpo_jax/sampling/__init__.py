"""Jitted KV-cache sampling: greedy, temperature, top-k, top-p (by rejection), n samples per prompt.

    out = generate(model, [[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=32, top_p=0.9))
    out.tokens   # int32 [B*n, max_new_tokens]; out.lengths, out.finish_reason, out.logprobs
"""
from pdpo_jax.sampling.filters import (argmax_first, draw_from, filter_logits, sample_tokens,
                                       top_k_mask, top_p_mask)
from pdpo_jax.sampling.sampler import (DecodeWeights, SampleOutput, Sampler, SamplerState,
                                       SamplingConfig, SamplingLoop, generate, left_pad)

__all__ = ["DecodeWeights", "SampleOutput", "Sampler", "SamplerState", "SamplingConfig", "SamplingLoop",
           "generate", "left_pad", "argmax_first", "draw_from", "filter_logits",
           "sample_tokens", "top_k_mask", "top_p_mask"]
