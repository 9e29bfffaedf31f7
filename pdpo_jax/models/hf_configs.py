"""HF `config.json` ⇄ ModelConfig, strict on the way in.

A config attribute that changes the function the checkpoint computes, and that we do not
implement, is refused by name (rather than loading weights into the wrong function).
"""
from __future__ import annotations

from typing import Any

from pdpo_jax.errors import UserError
from pdpo_jax.models.config import ModelConfig

_REQUIRED = object()
LLAMA_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
ENCODER_TYPES = ("bert", "roberta")  # ported with their sequence-classification head only
SUPPORTED = ("gpt2", *LLAMA_TYPES, *ENCODER_TYPES)
CLASSIFIERS = {mt: f"{name}ForSequenceClassification" for mt, name in (
    ("gpt2", "GPT2"), ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"),
    ("bert", "Bert"), ("roberta", "Roberta"))}


def _get(hf: dict, key: str, source: str, default: Any = _REQUIRED):
    value = hf.get(key, default)
    if value is _REQUIRED or (value is None and default is _REQUIRED):
        raise UserError(f"{source}: required key {key!r} is missing")
    return value


def _refuse(source: str, key: str, value, fix: str):
    raise UserError(f"{source}: {key}={value!r} is not implemented by pdpo_jax; {fix}")


def _rope_theta(hf: dict, source: str) -> float:
    """RoPE theta from transformers 5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for key, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind != "default":
            _refuse(source, f"{key}.rope_type", kind,
                    "only plain RoPE ('default') is ported; use a checkpoint without RoPE scaling")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _eos(hf: dict):
    eos = hf.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else eos


def _labels(hf: dict, source: str) -> tuple[str, ...]:
    """The label of each output index of a `…ForSequenceClassification` config (from
    `id2label`, else `num_labels` generic names); () for any other architecture."""
    if not any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
        return ()
    id2label = hf.get("id2label")
    if not id2label:
        return tuple(f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2))))
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, ValueError):
        raise UserError(f"{source}: id2label={id2label!r} must map label ids 0..C-1 to names") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"{source}: id2label ids {sorted(by_id)} must be 0..{len(by_id) - 1}")
    return tuple(by_id[i] for i in range(len(by_id)))


def _bert_from_hf(hf: dict, source: str) -> ModelConfig:
    mt = hf["model_type"]
    labels = _labels(hf, source)
    if not labels:
        _refuse(source, "architectures", hf.get("architectures"),
                f"only {CLASSIFIERS[mt]} is ported (no MLM or pre-training heads)")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        _refuse(source, "hidden_act", act, "only GELU MLPs (exact or tanh) are ported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        _refuse(source, "position_embedding_type", hf["position_embedding_type"],
                "only absolute learned positions are ported")
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            _refuse(source, key, hf[key], f"only the bidirectional encoder is ported; set {key} false")
    d, n = _get(hf, "hidden_size", source), _get(hf, "num_attention_heads", source)
    pad = hf.get("pad_token_id", 1 if mt == "roberta" else 0)
    return ModelConfig(
        arch="bert", hf_model_type=mt, vocab_size=_get(hf, "vocab_size", source), d_model=d,
        num_layers=_get(hf, "num_hidden_layers", source), num_heads=n, num_kv_heads=n,
        head_dim=d // n, mlp_dim=_get(hf, "intermediate_size", source),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        max_positions=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        # RoBERTa numbers real tokens from padding_idx + 1 (fairseq's make_positions)
        position_offset=pad + 1 if mt == "roberta" else 0, hidden_act=act, labels=labels,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_eos(hf), pad_token_id=pad,
    )


def _llama_from_hf(hf: dict, source: str) -> ModelConfig:
    mt = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(source, "hidden_act", hf["hidden_act"], "only SwiGLU with silu is ported")
    for key in ("attention_bias", "mlp_bias"):
        if mt == "llama" and hf.get(key):
            _refuse(source, key, hf[key], "only Llama without projection biases is ported")
    if mt == "qwen2" and hf.get("use_sliding_window"):
        _refuse(source, "use_sliding_window", True,
                "Qwen2's per-layer sliding window is not ported; set it to false")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if mt != "mistral" and layer_types != {"full_attention"}:
        _refuse(source, "layer_types", sorted(layer_types), "only full attention in every layer is ported")
    d, n = _get(hf, "hidden_size", source), _get(hf, "num_attention_heads", source)
    return ModelConfig(
        arch="llama", hf_model_type=mt,
        vocab_size=_get(hf, "vocab_size", source), d_model=d,
        num_layers=_get(hf, "num_hidden_layers", source), num_heads=n,
        num_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=hf.get("head_dim") or d // n,
        mlp_dim=_get(hf, "intermediate_size", source),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_positions=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=_rope_theta(hf, source),
        qkv_bias=(mt == "qwen2"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window") if mt == "mistral" else None, labels=_labels(hf, source),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_eos(hf), pad_token_id=hf.get("pad_token_id"),
    )


def _gpt2_from_hf(hf: dict, source: str) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        _refuse(source, "activation_function", act, "only gelu_new (tanh approximation) is ported")
    checks = (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
              ("add_cross_attention", False))
    for key, ok in checks:
        if hf.get(key, ok) != ok:
            _refuse(source, key, hf[key], f"only GPT-2 with {key}={ok} is ported")
    d, n = _get(hf, "n_embd", source), _get(hf, "n_head", source)
    return ModelConfig(
        arch="gpt2", hf_model_type="gpt2",
        vocab_size=_get(hf, "vocab_size", source), d_model=d,
        num_layers=_get(hf, "n_layer", source), num_heads=n, num_kv_heads=n, head_dim=d // n,
        mlp_dim=hf.get("n_inner") or 4 * d, norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        max_positions=_get(hf, "n_positions", source), tie_embeddings=True, labels=_labels(hf, source),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_eos(hf), pad_token_id=hf.get("pad_token_id"),
    )


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a parsed HF config.json; `source` names the file in error messages."""
    if "quantization_config" in hf:
        _refuse(source, "quantization_config", hf["quantization_config"].get("quant_method"),
                "de-quantize the checkpoint to float weights first")
    mt = hf.get("model_type")
    if mt == "gpt2":
        return _gpt2_from_hf(hf, source)
    if mt in LLAMA_TYPES:
        return _llama_from_hf(hf, source)
    if mt in ENCODER_TYPES:
        return _bert_from_hf(hf, source)
    raise UserError(f"{source}: model_type={mt!r} is not supported; pdpo_jax ports {list(SUPPORTED)}")


def _token_ids(cfg: ModelConfig) -> dict:
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}


def _head(cfg: ModelConfig, causal_lm: str) -> dict:
    """`architectures` (and a classifier's id2label/label2id) of the exported config."""
    if not cfg.labels:
        return {"architectures": [causal_lm]}
    mt = "gpt2" if cfg.arch == "gpt2" else cfg.hf_model_type
    return {"architectures": [CLASSIFIERS[mt]],
            "id2label": {str(i): name for i, name in enumerate(cfg.labels)},
            "label2id": {name: i for i, name in enumerate(cfg.labels)}}


def _bert_to_hf(cfg: ModelConfig, common: dict) -> dict:
    mt = cfg.hf_model_type
    if mt not in ENCODER_TYPES or not cfg.labels:
        raise ValueError(f"an encoder exports as a sequence classifier of hf_model_type "
                         f"{ENCODER_TYPES}; got {mt!r} with labels {cfg.labels}")
    if mt == "roberta" and cfg.position_offset != (cfg.pad_token_id or 0) + 1:
        raise ValueError(f"RoBERTa positions start at pad_token_id + 1 = {(cfg.pad_token_id or 0) + 1}, "
                         f"not position_offset={cfg.position_offset}")
    return {**common, **_head(cfg, ""), "model_type": mt, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.mlp_dim, "hidden_act": cfg.hidden_act,
            "max_position_embeddings": cfg.max_positions, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps}


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json for transformers 5, with `rope_theta`/`torch_dtype` too for 4.x readers."""
    common = {"transformers_version": _transformers_version(), "dtype": dtype,
              "torch_dtype": dtype, "vocab_size": cfg.vocab_size, "use_cache": True,
              "tie_word_embeddings": cfg.tie_embeddings, **_token_ids(cfg)}
    if cfg.arch == "bert":
        return _bert_to_hf(cfg, common)
    if cfg.arch == "gpt2":
        return {**common, **_head(cfg, "GPT2LMHeadModel"), "model_type": "gpt2",
                "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
                "n_inner": cfg.mlp_dim, "n_positions": cfg.max_positions,
                "n_ctx": cfg.max_positions, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0}
    mt = cfg.hf_model_type
    if mt not in LLAMA_TYPES:
        raise ValueError(f"hf_model_type={mt!r} cannot be exported; choose one of {sorted(LLAMA_TYPES)}")
    if cfg.qkv_bias != (mt == "qwen2"):
        raise ValueError(f"qkv_bias={cfg.qkv_bias} has no HF {mt} equivalent; set hf_model_type "
                         "'qwen2' for q/k/v biases")
    if cfg.sliding_window is not None and mt != "mistral":
        raise ValueError(f"sliding_window={cfg.sliding_window} exports only as hf_model_type 'mistral'")
    out = {**common, **_head(cfg, LLAMA_TYPES[mt]), "model_type": mt,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "attention_dropout": 0.0}
    if mt == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if mt == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if mt == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None,
                   layer_types=["full_attention"] * cfg.num_layers)
    return out


def generation_config(cfg: ModelConfig) -> dict:
    return {"transformers_version": _transformers_version(), **_token_ids(cfg)}


def _transformers_version() -> str:
    """Installed transformers version, read without importing it (seconds and ~100 MB)."""
    from importlib.metadata import version
    return version("transformers")
