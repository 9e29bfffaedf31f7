"""A GGUF file's tokenizer as a transformers tokenizer, from its `tokenizer.ggml.*` metadata:
vocabulary, merges, token types, special token ids, and `tokenizer.chat_template`.

transformers can build one too (`AutoTokenizer.from_pretrained(folder, gguf_file=…)`), but its
GGUF reader imports torch, which this project needs only for tests. A byte-level BPE file
(`tokenizer.ggml.model = gpt2`: GPT-2, SmolLM2, Qwen2, Llama 3) is rebuilt here with
`tokenizers`; its pre-tokenizer, which a GGUF names (`tokenizer.ggml.pre`) but does not store,
is the one of the HF tokenizer the file was converted from, the split llama.cpp's
llama-vocab.cpp also applies for that name. Other names and other tokenizer models
(SentencePiece `llama`, …) are refused by name.
"""
from __future__ import annotations

import os

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from pdpo_jax.errors import UserError
from pdpo_jax.models.gguf_file import metadata, open_gguf, resolve_gguf

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (1 is normal)

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool = True):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    _byte_level(use_regex=False)])


def _gpt2():  # GPT-2's own split
    return _byte_level(), None


def _digits():  # GPT-2's split after every digit is cut off alone (StarCoder, SmolLM2)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    _byte_level()]), None


def _qwen2():
    return _split_then_bytes(_QWEN2_SPLIT), normalizers.NFC()


def _llama3():
    return _split_then_bytes(_LLAMA3_SPLIT), None


# tokenizer.ggml.pre → (pre-tokenizer, normalizer) of the HF tokenizers llama.cpp gives that name
PRE_TOKENIZERS = {"gpt-2": _gpt2, "smollm": _digits, "starcoder": _digits, "refact": _digits,
                  "qwen2": _qwen2, "llama-bpe": _llama3}


def _bpe(meta: dict, source: str) -> Tokenizer:
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(f"{source}: tokenizer.ggml.model={kind!r} is not implemented by "
                        "pdpo_jax (only byte-level BPE, 'gpt2'); load the tokenizer from the "
                        "model's Hugging Face repository instead (convert with --no-tokenizer)")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{source}: tokenizer.ggml.pre={pre!r} is not implemented by pdpo_jax "
                        f"(known: {sorted(PRE_TOKENIZERS)}); load the tokenizer from the "
                        "model's Hugging Face repository instead (convert with --no-tokenizer)")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer, normalizer = PRE_TOKENIZERS[pre]()
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # llama.cpp matches control and user-defined tokens whole, before any splitting.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return tok


def tokenizer_from_gguf(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer of the GGUF at `path` (a .gguf file or a folder holding one): ids as the
    model's own HF tokenizer gives them, its special tokens, BOS/EOS flags and chat template."""
    file = resolve_gguf(path)
    return build_tokenizer(metadata(open_gguf(file)), str(file))


def build_tokenizer(meta: dict, source: str) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer a GGUF's metadata (`gguf_file.metadata`) describes; `source` names the
    file in errors."""
    if "tokenizer.ggml.tokens" not in meta:
        raise UserError(f"{source}: no tokenizer.ggml.tokens; the file carries no tokenizer "
                        "(convert with --no-tokenizer)")
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    arch = meta.get("general.architecture")
    max_len = meta.get(f"{arch}.context_length")
    kwargs = {"bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
              "pad_token": token("padding"),
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    if max_len:
        kwargs["model_max_length"] = int(max_len)
    if "tokenizer.chat_template" in meta:
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe(meta, source), **kwargs)
