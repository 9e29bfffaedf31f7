"""Tiny random Hugging Face models built offline with torch: the independent reference for ports."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=97, hidden=32, layers=2, heads=4, mlp=64, positions=64)


def tiny_hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    t = TINY
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=t["vocab_size"], n_embd=t["hidden"], n_layer=t["layers"], n_head=t["heads"],
            n_positions=t["positions"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=1)
    else:
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[family]
        kv = {"llama": t["heads"], "mistral": 2, "qwen2": 2}[family]
        cfg = cls(vocab_size=t["vocab_size"], hidden_size=t["hidden"], intermediate_size=t["mlp"],
                  num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                  num_key_value_heads=kv, max_position_embeddings=t["positions"],
                  rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A random HF causal LM whose every parameter (norms and biases too) is non-trivial."""
    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """HF logits with positions counted from each row's first real token (left padding)."""
    tokens_t = torch.as_tensor(tokens, dtype=torch.long)
    if attention_mask is None:
        attention_mask = np.ones_like(tokens)
    mask_t = torch.as_tensor(attention_mask, dtype=torch.long)
    positions = torch.clamp(mask_t.cumsum(-1) - 1, min=0)
    with torch.no_grad():
        out = model(input_ids=tokens_t, attention_mask=mask_t, position_ids=positions)
    return out.logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int], pad_id: int = 0):
    """tokens [B, T], mask [B, T], positions [B, T] for rows of the given lengths, left-padded."""
    T = max(lengths)
    tokens = np.full((len(lengths), T), pad_id, np.int32)
    mask = np.zeros((len(lengths), T), bool)
    for b, n in enumerate(lengths):
        tokens[b, T - n:] = rng.integers(2, vocab, n)
        mask[b, T - n:] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


@contextlib.contextmanager
def one_torch_thread():
    """Under `pytest -n 2` on 2 cores, torch's 2-thread OpenMP pool fights the other worker
    and spins (SmolLM2 generate: ~30 s instead of ~3 s); one thread per worker is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hf_greedy(hf, prompts, max_new, pad_id, eos_id):
    """HF greedy decoding of left-padded prompts; tokens [B, max_new] and raw logits per step."""
    from pdpo_jax.data.batches import left_pad
    tokens, mask = left_pad(prompts, pad_id)
    with torch.no_grad(), one_torch_thread():
        out = hf.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          max_new_tokens=max_new, do_sample=False, pad_token_id=pad_id,
                          eos_token_id=eos_id, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, tokens.shape[1]:].numpy()
    logits = torch.stack(out.logits, dim=1).float()  # [B, steps, V], before any processor
    chosen = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(new)[..., None])[..., 0]
    width = max_new - new.shape[1]  # HF stops early once every row has hit EOS
    return np.pad(new, ((0, 0), (0, width)), constant_values=pad_id), np.pad(chosen.numpy(),
                                                                              ((0, 0), (0, width)))


NLI_LABELS = ("entailment", "neutral", "contradiction")


def tiny_hf_classifier(family: str, seed: int = 0, **overrides):
    """A random HF `…ForSequenceClassification` (3 NLI labels) with non-trivial parameters:
    BERT, RoBERTa (pad 1, positions from 2, one token type) or a decoder family (pad 0)."""
    t = TINY
    labels = dict(id2label=dict(enumerate(NLI_LABELS)), label2id={n: i for i, n in enumerate(NLI_LABELS)})
    if family in ("bert", "roberta"):
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        extra = dict(type_vocab_size=2, pad_token_id=0) if family == "bert" else \
            dict(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        positions = t["positions"] + (2 if family == "roberta" else 0)
        cfg = cls(vocab_size=t["vocab_size"], hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                  num_attention_heads=t["heads"], intermediate_size=t["mlp"],
                  max_position_embeddings=positions, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, **extra, **labels)
    else:
        cfg = tiny_hf_config(family)
        cfg.pad_token_id = 0
        for key, value in labels.items():
            setattr(cfg, key, value)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def right_padded_pairs(rng: np.random.Generator, vocab: int, lengths: list[int], pad_id: int,
                       low: int = 3):
    """tokens, mask, positions, token types [B, T] for rows of the given lengths, right-padded;
    a row's second half is segment 1. Real tokens are drawn from [low, vocab) (never the pad)."""
    T = max(lengths)
    tokens = np.full((len(lengths), T), pad_id, np.int32)
    mask = np.zeros((len(lengths), T), bool)
    types = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(low, vocab, n)
        mask[b, :n] = True
        types[b, n // 2:n] = 1
    positions = np.where(mask, np.arange(T)[None, :], 0).astype(np.int32)
    return tokens, mask, positions, types
