"""Hugging Face checkpoints in and out: `from_pretrained` and `save_pretrained`.

Each family is a declarative table of (our parameter path, HF tensor name, how to convert).
Loading reads `config.json`, refuses by name what we do not implement, then fills every
parameter tensor by tensor from memory-mapped safetensors, each straight into its target
sharding when a mesh is given. Saving writes a checkpoint that transformers 5 (and 4.x) loads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pdpo_jax import sharding as shd
from pdpo_jax.errors import UserError
from pdpo_jax.fileio import write_json_atomic
from pdpo_jax.models import hf_configs
from pdpo_jax.models.config import ModelConfig
from pdpo_jax.models.families import build_model
from pdpo_jax.models.layers import unstack_layers
from pdpo_jax.models.safetensors_io import INDEX_FILE, SINGLE_FILE, TensorFiles, write_sharded

config_from_hf = hf_configs.config_from_hf
config_to_hf = hf_configs.config_to_hf

Convert = Callable[[np.ndarray, ModelConfig], np.ndarray]
_same: Convert = lambda w, c: w  # noqa: E731


@dataclasses.dataclass(frozen=True)
class Rule:
    """Our parameter at `ours` is HF tensor `hf` (with `{i}` = layer for stacked parameters)."""
    ours: tuple[str, ...]
    hf: str
    to_ours: Convert = _same
    to_hf: Convert = _same

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf


def _transpose(w, c):
    return w.T


def _llama_table(cfg: ModelConfig) -> list[Rule]:
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    lyr = "model.layers.{i}."
    rules = [
        Rule(("embed_VD",), "model.embed_tokens.weight"),
        Rule(("final_norm_D",), "model.norm.weight"),
        Rule(("layers", "attn_norm_D"), lyr + "input_layernorm.weight"),
        Rule(("layers", "mlp_norm_D"), lyr + "post_attention_layernorm.weight"),
        # torch Linear weights are [out, in]; ours are [in, ...heads].
        Rule(("layers", "attn", "q_DNH"), lyr + "self_attn.q_proj.weight",
             lambda w, c: w.T.reshape(D, N, H), lambda w, c: w.reshape(D, N * H).T),
        Rule(("layers", "attn", "k_DKH"), lyr + "self_attn.k_proj.weight",
             lambda w, c: w.T.reshape(D, K, H), lambda w, c: w.reshape(D, K * H).T),
        Rule(("layers", "attn", "v_DKH"), lyr + "self_attn.v_proj.weight",
             lambda w, c: w.T.reshape(D, K, H), lambda w, c: w.reshape(D, K * H).T),
        Rule(("layers", "attn", "o_NHD"), lyr + "self_attn.o_proj.weight",
             lambda w, c: w.T.reshape(N, H, D), lambda w, c: w.reshape(N * H, D).T),
        Rule(("layers", "mlp", "gate_DF"), lyr + "mlp.gate_proj.weight", _transpose, _transpose),
        Rule(("layers", "mlp", "up_DF"), lyr + "mlp.up_proj.weight", _transpose, _transpose),
        Rule(("layers", "mlp", "down_FD"), lyr + "mlp.down_proj.weight", _transpose, _transpose),
    ]
    if cfg.qkv_bias:
        for name, heads in (("q", N), ("k", K), ("v", K)):
            suffix = "NH" if name == "q" else "KH"
            rules.append(Rule(("layers", "attn", f"{name}_bias_{suffix}"),
                              lyr + f"self_attn.{name}_proj.bias",
                              lambda w, c, n=heads: w.reshape(n, H), lambda w, c: w.reshape(-1)))
    if cfg.labels:
        rules.append(Rule(("score_DC",), "score.weight", _transpose, _transpose))
    elif not cfg.tie_embeddings:
        rules.append(Rule(("lm_head_VD",), "lm_head.weight"))
    return rules


def _gpt2_table(cfg: ModelConfig) -> list[Rule]:
    D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
    lyr = "transformer.h.{i}."
    rules = [
        Rule(("embed_VD",), "transformer.wte.weight"),
        Rule(("pos_embed_PD",), "transformer.wpe.weight"),
        Rule(("ln_f", "scale_D"), "transformer.ln_f.weight"),
        Rule(("ln_f", "bias_D"), "transformer.ln_f.bias"),
        # Conv1D weights are already [in, out]; only the head axes are split out.
        Rule(("layers", "attn", "qkv_D3NH"), lyr + "attn.c_attn.weight",
             lambda w, c: w.reshape(D, 3, N, H), lambda w, c: w.reshape(D, 3 * D)),
        Rule(("layers", "attn", "qkv_bias_3NH"), lyr + "attn.c_attn.bias",
             lambda w, c: w.reshape(3, N, H), lambda w, c: w.reshape(3 * D)),
        Rule(("layers", "attn", "o_NHD"), lyr + "attn.c_proj.weight",
             lambda w, c: w.reshape(N, H, D), lambda w, c: w.reshape(D, D)),
        Rule(("layers", "attn", "o_bias_D"), lyr + "attn.c_proj.bias"),
        Rule(("layers", "mlp", "fc_DF"), lyr + "mlp.c_fc.weight"),
        Rule(("layers", "mlp", "fc_bias_F"), lyr + "mlp.c_fc.bias"),
        Rule(("layers", "mlp", "proj_FD"), lyr + "mlp.c_proj.weight"),
        Rule(("layers", "mlp", "proj_bias_D"), lyr + "mlp.c_proj.bias"),
    ]
    for ln in ("ln_1", "ln_2"):
        rules.append(Rule(("layers", ln, "scale_D"), lyr + f"{ln}.weight"))
        rules.append(Rule(("layers", ln, "bias_D"), lyr + f"{ln}.bias"))
    if cfg.labels:
        rules.append(Rule(("score_DC",), "score.weight", _transpose, _transpose))
    return rules


def _layer_norm(ours: tuple[str, ...], hf: str) -> list[Rule]:
    return [Rule((*ours, "scale_D"), hf + ".weight"), Rule((*ours, "bias_D"), hf + ".bias")]


def _bert_table(cfg: ModelConfig) -> list[Rule]:
    """BertForSequenceClassification / RobertaForSequenceClassification (cfg.hf_model_type)."""
    D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
    base, lyr = cfg.hf_model_type, cfg.hf_model_type + ".encoder.layer.{i}."
    rules = [Rule(("embed_VD",), base + ".embeddings.word_embeddings.weight"),
             Rule(("pos_embed_PD",), base + ".embeddings.position_embeddings.weight"),
             *_layer_norm(("embed_norm",), base + ".embeddings.LayerNorm"),
             *_layer_norm(("layers", "attn_norm"), lyr + "attention.output.LayerNorm"),
             *_layer_norm(("layers", "mlp_norm"), lyr + "output.LayerNorm"),
             Rule(("layers", "attn", "o_NHD"), lyr + "attention.output.dense.weight",
                  lambda w, c: w.T.reshape(N, H, D), lambda w, c: w.reshape(N * H, D).T),
             Rule(("layers", "attn", "o_bias_D"), lyr + "attention.output.dense.bias"),
             Rule(("layers", "mlp", "fc_DF"), lyr + "intermediate.dense.weight", _transpose, _transpose),
             Rule(("layers", "mlp", "fc_bias_F"), lyr + "intermediate.dense.bias"),
             Rule(("layers", "mlp", "proj_FD"), lyr + "output.dense.weight", _transpose, _transpose),
             Rule(("layers", "mlp", "proj_bias_D"), lyr + "output.dense.bias")]
    for ours, hf in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += [Rule(("layers", "attn", f"{ours}_DNH"), lyr + f"attention.self.{hf}.weight",
                       lambda w, c: w.T.reshape(D, N, H), lambda w, c: w.reshape(D, N * H).T),
                  Rule(("layers", "attn", f"{ours}_bias_NH"), lyr + f"attention.self.{hf}.bias",
                       lambda w, c: w.reshape(N, H), lambda w, c: w.reshape(-1))]
    if cfg.type_vocab_size:
        rules.append(Rule(("type_embed_YD",), base + ".embeddings.token_type_embeddings.weight"))
    # One head, two namings: BERT's pooler + classifier, RoBERTa's classifier.dense + out_proj.
    pooler, out = (("bert.pooler.dense", "classifier") if base == "bert"
                   else ("classifier.dense", "classifier.out_proj"))
    if cfg.labels:
        rules += [Rule(("pooler_DD",), pooler + ".weight", _transpose, _transpose),
                  Rule(("pooler_bias_D",), pooler + ".bias"),
                  Rule(("classifier_DC",), out + ".weight", _transpose, _transpose),
                  Rule(("classifier_bias_C",), out + ".bias")]
    return rules


_TABLES = {"llama": _llama_table, "gpt2": _gpt2_table, "bert": _bert_table}


def mapping_table(cfg: ModelConfig) -> dict[tuple[str, ...], Rule]:
    return {rule.ours: rule for rule in _TABLES[cfg.arch](cfg)}


# HF tensors that carry no parameters (buffers) or duplicate a tied one.
def _ignorable(key: str, cfg: ModelConfig) -> bool:
    if key.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias",
                     "embeddings.position_ids")):
        return True
    return cfg.tie_embeddings and key == "lm_head.weight"


# The original OpenAI GPT-2 export names its tensors without the `transformer.` prefix.
_BARE_GPT2 = ("wte.", "wpe.", "h.", "ln_f.")


# --------------------------------------------------------------------------------------------
# Loading


class _Source:
    """HF tensors by name, from safetensors (lazy) or, with explicit opt-in, pytorch_model.bin."""

    config_name = "config.json"  # where the architecture comes from, for error messages

    def __init__(self, folder: pathlib.Path, allow_pickle: bool, arch: str):
        bin_path = folder / "pytorch_model.bin"
        has_st = (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
        if not has_st and bin_path.is_file():
            if not allow_pickle:
                raise UserError(f"{bin_path}: only pytorch_model.bin found; it is a pickle that can "
                                "run code when loaded. Pass allow_pickle=True if you trust it, or "
                                "convert it to safetensors")
            import torch  # a test-only dependency; needed only for this opt-in path
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
            self._arrays = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                            for k, v in state.items()}
            self._files = None
            self.where = str(bin_path)
        else:
            self._files = TensorFiles(folder)
            self._arrays = None
            self.where = str(folder)
        self._alias = {"transformer." + key: key for key in self.keys_raw()
                       if arch == "gpt2" and key.startswith(_BARE_GPT2)}

    def keys_raw(self) -> set[str]:
        return set(self._arrays) if self._arrays is not None else self._files.keys()

    def has(self, key: str) -> bool:
        return self._alias.get(key, key) in self.keys_raw()

    def get(self, key: str) -> np.ndarray:
        key = self._alias.get(key, key)
        return self._arrays[key] if self._arrays is not None else self._files.get(key)

    def file_of(self, key: str) -> str:
        key = self._alias.get(key, key)
        return self.where if self._files is None else str(self._files.file_of(key))

    def canonical_keys(self) -> set[str]:
        back = {v: k for k, v in self._alias.items()}
        return {back.get(k, k) for k in self.keys_raw()}

    def describe(self, key: str) -> str:
        return repr(key)


def _hf_shape(rule: Rule, cfg: ModelConfig, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    return jax.eval_shape(lambda w: rule.to_hf(w, cfg),
                          jax.ShapeDtypeStruct(our_shape, jnp.float32)).shape


def _read_one(src: _Source, key: str, rule: Rule, cfg: ModelConfig, our_shape, dtype) -> np.ndarray:
    if not src.has(key):
        raise UserError(f"{src.where}: tensor {src.describe(key)} is missing; the checkpoint does "
                        f"not match its {src.config_name} ({cfg.hf_model_type}, {cfg.num_layers} "
                        "layers)")
    w = src.get(key)
    want = _hf_shape(rule, cfg, our_shape)
    if tuple(w.shape) != tuple(want):
        raise UserError(f"{src.file_of(key)}: tensor {src.describe(key)} has shape "
                        f"{tuple(w.shape)}, but {src.config_name} implies {tuple(want)}; the "
                        "checkpoint and config disagree")
    return np.asarray(rule.to_ours(w, cfg)).astype(dtype)


def _load_param(src: _Source, rule: Rule, cfg: ModelConfig, shape, dtype, sharding):
    """One parameter, assembled per device shard when sharded (no full host copy per device)."""
    def assemble(index) -> np.ndarray:
        if not rule.layered:
            return _read_one(src, rule.hf, rule, cfg, shape, dtype)[index]
        layers = range(cfg.num_layers)[index[0]]
        rest = tuple(index[1:])
        return np.stack([_read_one(src, rule.hf.format(i=i), rule, cfg, shape[1:], dtype)[rest]
                         for i in layers])

    if sharding is None:
        return jnp.asarray(assemble(tuple(slice(None) for _ in shape)))
    return jax.make_array_from_callback(shape, sharding, assemble)


def _read_config(folder: pathlib.Path) -> dict:
    path = folder / "config.json"
    if folder.suffix == ".gguf" or (not path.is_file() and any(folder.glob("*.gguf"))):
        raise UserError(f"{folder}: holds a GGUF file (llama.cpp's format), not a Hugging Face "
                        "checkpoint; load it with pdpo_jax.models.gguf_io.from_pretrained, or "
                        "convert it once: python -m pdpo_jax.models.gguf_io convert FILE.gguf OUT_DIR")
    if not path.is_file():
        raise UserError(f"{path}: missing; pass a folder that holds a Hugging Face checkpoint "
                        "(config.json + model.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def _unstacked(path: tuple) -> tuple[tuple, int | None]:
    """(the stacked model's path, layer) for a parameter of unstacked layers ('layers', i, ...);
    (path, None) for any other."""
    if len(path) > 1 and path[0] == "layers" and isinstance(path[1], int):
        return path[:1] + path[2:], path[1]
    return path, None


def from_pretrained(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
                    mesh: Mesh | None = None, rules=shd.TRAIN_RULES, remat: str = "none",
                    unroll_layers: bool = False, stack_layers: bool = True,
                    allow_pickle: bool = False):
    """Loads an HF checkpoint folder into our model: a causal LM (GPT2 or Llama family) or a
    `…ForSequenceClassification` of those or of BERT/RoBERTa (`model.classify`).

    dtype: compute dtype; param_dtype: stored weights; mesh: place each parameter straight
    into its sharding (rules: logical axis → mesh axis table); remat, unroll_layers: see
    ModelConfig. stack_layers=False: `model.layers` is one module per layer
    (`layers.unstack_layers`), the layout the sampler decodes with, so that with
    param_dtype = dtype a `Sampler` needs no second copy of the layers.
    (A llama.cpp GGUF file loads with `gguf_io.from_pretrained`, through `load_model`.)
    """
    folder = pathlib.Path(path).expanduser()
    cfg = config_from_hf(_read_config(folder), source=str(folder / "config.json"))
    return load_model(cfg, _Source(folder, allow_pickle, cfg.arch), dtype=dtype,
                      param_dtype=param_dtype, mesh=mesh, rules=rules, remat=remat,
                      unroll_layers=unroll_layers, stack_layers=stack_layers)


def load_model(cfg: ModelConfig, src, *, dtype: str = "float32", param_dtype: str = "float32",
               mesh: Mesh | None = None, rules=shd.TRAIN_RULES, remat: str = "none",
               unroll_layers: bool = False, stack_layers: bool = True):
    """Our model of architecture `cfg` (from `config_from_hf`), its weights from `src`.

    src: HF tensors by name, as `_Source` (a checkpoint folder) and `gguf_io.GGUFSource` (a
    GGUF file) provide them: `has(key)`, `get(key) -> np.ndarray` in HF layout,
    `canonical_keys()` (every tensor it holds), and for error messages `where`,
    `file_of(key)`, `describe(key)`, `config_name`. Other arguments: see `from_pretrained`.
    """
    cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype, remat=remat,
                      unroll_layers=unroll_layers)
    build = (lambda: build_model(cfg)) if stack_layers else (lambda: unstack_layers(build_model(cfg)))
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    table = mapping_table(cfg)
    used: set[str] = set()
    flat = []
    for our_path, var in nnx.to_flat_state(abstract):
        stacked_path, layer = _unstacked(our_path)
        rule = table[stacked_path]
        if layer is not None:  # one layer's own parameter: its one HF tensor
            rule = dataclasses.replace(rule, hf=rule.hf.format(i=layer))
        sharding = None
        if mesh is not None:
            spec = shd.logical_to_spec(shd.variable_names(var), var.shape, rules=rules, mesh=mesh)
            sharding = NamedSharding(mesh, spec)
        value = _load_param(src, rule, cfg, var.shape, jnp.dtype(param_dtype), sharding)
        flat.append((our_path, var.replace(value)))
        used.update([rule.hf.format(i=i) for i in range(cfg.num_layers)] if rule.layered
                    else [rule.hf])
    unexpected = sorted(k for k in src.canonical_keys() - used if not _ignorable(k, cfg))
    if unexpected:
        raise UserError(f"{src.where}: tensors {unexpected[:5]}{'…' if len(unexpected) > 5 else ''} "
                        f"have no place in a {cfg.hf_model_type} model; the checkpoint holds "
                        "parts this port does not implement")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --------------------------------------------------------------------------------------------
# Saving


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def save_pretrained(model, path: str | os.PathLike, *, tokenizer=None, dtype: str | None = None,
                    max_shard_bytes: int = 4 * 2**30) -> pathlib.Path:
    """Writes an HF checkpoint folder: config.json, model.safetensors (sharded with an index
    above `max_shard_bytes`), generation_config.json and, if given, the tokenizer files.

    dtype: tensor dtype on disk (default: the model's param dtype).
    """
    cfg: ModelConfig = model.cfg
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    values, per_layer = _params_by_path(model)
    rules = _TABLES[cfg.arch](cfg)
    groups = []  # one group per parameter: its HF tensors, written together
    for rule in rules:
        shape = (values[rule.ours].shape if rule.ours in values
                 else (cfg.num_layers, *per_layer[rule.ours][0].shape))
        names = [rule.hf.format(i=i) for i in range(cfg.num_layers)] if rule.layered else [rule.hf]
        hf_shape = _hf_shape(rule, cfg, shape[1:] if rule.layered else shape)
        groups.append([(n, hf_shape, dtype) for n in names])

    def produce(g: int):
        rule = rules[g]
        if rule.ours in per_layer:
            parts = [_host(per_layer[rule.ours][i][...]) for i in range(cfg.num_layers)]
        else:
            host = _host(values[rule.ours][...])
            parts = list(host) if rule.layered else [host]
        for (name, _, _), part in zip(groups[g], parts, strict=True):
            yield name, np.asarray(rule.to_hf(part, cfg)).astype(dtype)

    write_sharded(out, groups, produce, max_shard_bytes)
    if not cfg.labels:  # classifiers generate nothing
        write_json_atomic(out / "generation_config.json", hf_configs.generation_config(cfg), indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    write_json_atomic(out / "config.json", config_to_hf(cfg, dtype=str(jnp.dtype(dtype))), indent=2)
    return out


def _params_by_path(model):
    """({path: Variable} of whole parameters, {stacked path: {layer: Variable}} of unstacked
    layers (stack_layers=False))."""
    _, state = nnx.split(model, nnx.Param)
    values, per_layer = {}, {}
    for p, v in nnx.to_flat_state(state):
        stacked_path, layer = _unstacked(p)
        if layer is None:
            values[p] = v
        else:
            per_layer.setdefault(stacked_path, {})[layer] = v
    return values, per_layer
