"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them, from tiny random
HF models (hf_reference.py): the inputs of the GGUF import tests. The reference those tests
compare against is transformers loading the same file (`gguf_file=`), not our reader.

What llama.cpp's converter does and this mirrors: metadata under `{arch}.*` and
`tokenizer.ggml.*`; tensor names from gguf-py's own `TensorNameMap`; Llama's q/k projection rows
permuted for its interleaved RoPE (`LlamaModel.permute`); GPT-2's Conv1D weights transposed
and its head written as a copy of the embedding; 1-D tensors kept F32, matrices in the file type.
"""
from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
        "gpt2": gguf.MODEL_ARCH.GPT2}
# Where a K-quant block keeps its fp16 scales (bytes), so random blocks get sane magnitudes.
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                 "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tiny_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE: 3 control tokens, then single
    byte-level characters, then a few merged pairs."""
    tokens, types = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [3, 3, 3]
    merges = ["h e", "l l", "Ġ w", "o r"]
    ascii_ = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    singles = (["Ġ", "Ċ"] + [c for c in ascii_ if c.isalnum()]
               + [c for c in ascii_ if not c.isalnum()])
    need = size - len(tokens) - len(merges)
    tokens += singles[:need] + [m.replace(" ", "") for m in merges]
    types += [1] * (len(tokens) - len(types))
    assert len(tokens) == size and all(t in tokens for m in merges for t in m.split())
    return tokens, types, merges


def random_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a tensor [rows, cols] of a type gguf-py cannot quantise to (the K-quants,
    IQ*); a K-quant's fp16 scales are set to small values so the weights come out ~0.1."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.float16(0.002 if qtype != Q.Q6_K else 0.001)
    for at in _K_SCALES.get(qtype, ()):
        raw[..., at:at + 2] = np.frombuffer(scale.tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def _metadata(w: gguf.GGUFWriter, cfg, family: str, qtype) -> None:
    if family == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        head_dim = getattr(cfg, "head_dim", None)
        if head_dim is not None:  # as the converter does when config.json names it
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if family == "llama":
            w.add_vocab_size(cfg.vocab_size)
            w.add_rope_dimension_count(head_dim)
    w.add_file_type(int(qtype) if qtype in (Q.F32, Q.F16) else 7)


def _tokenizer(w: gguf.GGUFWriter, size: int, pre: str) -> None:
    tokens, types, merges = tiny_vocab(size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def _add(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype, rng) -> None:
    if data.ndim == 1 or qtype == Q.F32:
        w.add_tensor(name, data.astype(np.float32))
    elif qtype == Q.F16:
        w.add_tensor(name, data.astype(np.float16))
    elif qtype in (Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):  # gguf-py quantises these
        w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        w.add_tensor(name, random_blocks(*data.shape, qtype, rng), raw_dtype=qtype)


def hf_tensors(hf_model) -> dict[str, np.ndarray]:
    """The HF model's tensors as llama.cpp's converter sees them: a tied head is not saved."""
    skip = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
    out = {k: v.float().numpy() for k, v in hf_model.state_dict().items() if not k.endswith(skip)}
    if hf_model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def write_gguf(hf_model, path, qtype=Q.F32, *, types: dict[str, object] | None = None,
               pre: str = "smollm", arch: str | None = None, extra: dict | None = None,
               drop: tuple[str, ...] = (), seed: int = 0):
    """Writes `hf_model` as a GGUF file at `path`: matrices in `qtype` (or per GGUF tensor name
    in `types`), the tiny tokenizer, `extra` metadata ({key: value}) added last, the GGUF
    tensors named in `drop` left out."""
    types = types or {}
    cfg, rng = hf_model.config, np.random.default_rng(seed)
    family = cfg.model_type
    w = gguf.GGUFWriter(path, arch or gguf.MODEL_ARCH_NAMES[ARCH[family]])
    w.add_name(f"tiny-{family}")
    _metadata(w, cfg, family, qtype)
    _tokenizer(w, cfg.vocab_size, pre)
    for key, value in (extra or {}).items():
        getattr(w, {str: "add_string", int: "add_uint32", float: "add_float32",
                    bool: "add_bool"}[type(value)])(key, value)
    layers = cfg.n_layer if family == "gpt2" else cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(ARCH[family], layers)
    for hf_name, data in hf_tensors(hf_model).items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if family == "llama" and base.endswith("q_proj"):
            data = permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        if family == "llama" and base.endswith("k_proj"):
            data = permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        if family == "gpt2" and suffix == "weight" and base.endswith(("c_attn", "c_proj", "c_fc")):
            data = data.T
        if name not in drop:
            _add(w, name, data, types.get(name, qtype), rng)
        if family == "gpt2" and name == "token_embd.weight":
            _add(w, "output.weight", data, types.get("output.weight", types.get(name, qtype)), rng)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
