"""Hand-built training batches (right-padded [prompt | response | pad]) for step tests."""
import numpy as np


def sft_rows(rng, vocab, specs, T):
    """specs: [(prompt_len, response_len)] → dict of [B, T] arrays in the SFT batch layout."""
    B = len(specs)
    tokens = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), bool)
    loss = np.zeros((B, T), bool)
    for b, (p, r) in enumerate(specs):
        tokens[b, :p + r] = rng.integers(2, vocab, p + r)
        mask[b, :p + r] = True
        loss[b, p:p + r] = True
    positions = np.where(mask, np.arange(T)[None, :], 0).astype(np.int32)
    return {"tokens": tokens, "positions": positions, "attention_mask": mask, "loss_mask": loss}


def pair_rows(rng, vocab, specs, T):
    """specs: [(prompt_len, chosen_len, rejected_len)] → a preference batch sharing prompts."""
    chosen = sft_rows(rng, vocab, [(p, c) for p, c, _ in specs], T)
    rejected = sft_rows(rng, vocab, [(p, r) for p, _, r in specs], T)
    for b, (p, _, _) in enumerate(specs):
        rejected["tokens"][b, :p] = chosen["tokens"][b, :p]
    return {**{"chosen_" + k: v for k, v in chosen.items()},
            **{"rejected_" + k: v for k, v in rejected.items()}}


def micro(batch, A=1):
    """[B, ...] → [A, B/A, ...] micro-batches."""
    return {k: v.reshape(A, v.shape[0] // A, *v.shape[1:]) for k, v in batch.items()}
