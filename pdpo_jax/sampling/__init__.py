"""Generation: a jitted KV-cache sampler for static batches (`Sampler`) and a continuous-batching
engine (`Engine`) over the same decode step; greedy, temperature, top-k, top-p (by rejection),
n samples per prompt.

    out = Engine(model, SamplingConfig(max_new_tokens=32, top_p=0.9)).generate([[1, 2, 3], [4, 5]])
    out.tokens   # int32 [B*n, max_new_tokens]; out.lengths, out.finish_reason, out.logprobs
"""
from pdpo_jax.sampling.decode import DecodeWeights
from pdpo_jax.sampling.filters import (RowSampling, argmax_first, draw_from, filter_logits,
                                       sample_rows, sample_tokens, top_k_mask, top_p_mask)
from pdpo_jax.sampling.sampler import (SampleOutput, Sampler, SamplerState, SamplingConfig,
                                       SamplingLoop, generate, left_pad, stop_ids)

__all__ = ["DecodeWeights", "RowSampling", "SampleOutput", "Sampler", "SamplerState",
           "SamplingConfig", "SamplingLoop", "argmax_first", "draw_from", "filter_logits",
           "generate", "left_pad", "sample_rows", "sample_tokens", "stop_ids", "top_k_mask",
           "top_p_mask"]
