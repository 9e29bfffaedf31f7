"""Per-device memory plan for a config and mesh, computed before anything is allocated.

    python -m pdpo_jax.memory --config configs/X.yaml [--mesh data=1,fsdp=8,tensor=1]
        [--stage sft|dpo] [--device_memory 16GiB]

Parameters and optimizer state are exact: shapes and dtypes come from `jax.eval_shape` of the
model and of the trainer's own optimizer (no weights), and each tensor's per-device shard from
its logical axis names through `sharding.logical_to_spec` over the mesh's axis sizes (no devices
needed). Gradients and the DPO reference copy follow the parameters' shardings.

Activations are an estimate from a per-token, per-layer table (`_LAYER_TERMS`) of what JAX's
autodiff keeps for the backward pass of one block of this code base, read off
`jax.ad_checkpoint.print_saved_residuals` and checked against it by tests/test_memory.py:
with remat=none what each op's backward keeps (attention keeps q, k and v, not the [N, T, T]
probabilities: `attention.softmax_attention`; SwiGLU its two inputs: `ops.swiglu`), with
remat=full only the block input, with dots_saveable the matmul outputs. Rows are the stage's
micro-batch per device (DPO doubles them: chosen and rejected share a forward), T the bucket
that holds data.max_total_tokens. Under remat one block's residuals are rebuilt at a time and
counted once as transient; so are the [rows, 128, V] fp32 logits the loss builds per chunk.
The table matches the residuals of the traced program; XLA's buffer assignment may fuse or
reuse some of them, so read the total as a planning figure, not a measurement.

The KV cache (sampling pseudo-negatives) is one [B, K, S, H] array per layer for keys and for
values in the compute dtype, with S = prompt bucket + data.max_response_tokens; sampling holds weights under
SAMPLING_RULES (no fsdp), so it gets its own total and verdict. The plan assumes one
process; with several, the negatives stage samples on each host's own devices (a data-only
mesh), so there the rows per device are negatives.batch_size / local devices.

Exit status: 0 when the training step fits, 1 when it does not, 2 for a bad config or flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdpo_jax import sharding as shd
from pdpo_jax.config import Config, ConfigError, load_config
from pdpo_jax.data.batches import bucket_length, round_up
from pdpo_jax.models import ModelConfig, build_model, config_from_hf
from pdpo_jax.models.layers import frozen_forward_params
from pdpo_jax.sampling.sampler import PROMPT_BUCKET
from pdpo_jax.train import optim
from pdpo_jax.train.logprobs import LOGIT_CHUNK

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Mesh axis sizes, standing in for a `jax.sharding.Mesh` where only `.shape` is read."""
    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @classmethod
    def resolve(cls, data: int, fsdp: int, tensor: int, num_devices: int) -> "MeshShape":
        """Sizes with one -1 filled in from `num_devices` (as `sharding.make_mesh` does)."""
        try:
            return cls(*shd.mesh_sizes(data, fsdp, tensor, num_devices))
        except ValueError as e:
            raise ValueError(f"{e}; pass --mesh with every axis, or --num_devices") from None


def parse_mesh(text: str, base: tuple[int, int, int]) -> tuple[int, int, int]:
    """`data=1,fsdp=8,tensor=1` (any subset) over the `base` sizes."""
    sizes = dict(zip(shd.MESH_AXES, base))
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key not in sizes or not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"--mesh item {item!r}: expected AXIS=SIZE with AXIS one of "
                             f"{list(shd.MESH_AXES)}, e.g. data=1,fsdp=8,tensor=1")
        sizes[key] = int(value)
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def parse_bytes(text: str) -> int:
    """'16GiB', '80GB', '512MiB', '1e9' → bytes."""
    m = re.fullmatch(r"\s*([\d.eE+]+)\s*([KMGT]i?B|B)?\s*", text)
    if not m:
        raise ValueError(f"--device_memory {text!r}: expected e.g. 16GiB, 80GB or 1e10")
    unit = m.group(2) or "B"
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def shard_bytes(shape, dtype, spec, mesh: MeshShape) -> int:
    """Bytes of the largest per-device shard of a tensor laid out by PartitionSpec `spec`."""
    spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    n = 1
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n *= -(-dim // math.prod(mesh.shape[a] for a in axes))
    return n * jnp.dtype(dtype).itemsize


def tree_bytes(tree, mesh: MeshShape, rules=shd.TRAIN_RULES) -> int:
    """Per-device bytes of an abstract pytree of nnx Variables (sharded by their logical axis
    names) and plain arrays (replicated)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(leaf, nnx.Variable):
            spec = shd.logical_to_spec(shd.variable_names(leaf), leaf.shape, rules=rules, mesh=mesh)
            total += shard_bytes(leaf.shape, leaf.dtype, spec, mesh)
        else:
            total += shard_bytes(np.shape(leaf), leaf.dtype, (), mesh)
    return total


def model_config(cfg: Config, stage: str = "sft") -> ModelConfig:
    """The ModelConfig a run trains `stage` ('sft' or 'dpo') with (its gradient checkpointing)."""
    m = cfg.model
    if m.architecture is not None:
        hf = m.architecture
    elif m.checkpoint and (pathlib.Path(m.checkpoint) / "config.json").is_file():
        hf = json.loads((pathlib.Path(m.checkpoint) / "config.json").read_text())
    else:
        raise ValueError("the plan needs the model's shape: set model.architecture or point "
                         "model.checkpoint at a folder with config.json")
    return config_from_hf(hf, source="model.architecture").replace(**m.runtime(getattr(cfg, stage)))


# Bytes kept per token per layer for the backward pass: (compute-dtype elements, fp32 elements)
# as functions of the model config and T; measured from jax's saved residuals of one block.
_LAYER_TERMS = {
    ("llama", "none"): lambda c, T: (4 * c.d_model + 3 * c.mlp_dim + 2 * _qh(c) + 2 * _kh(c),
                                     2 * c.d_model + 4),
    ("llama", "full"): lambda c, T: (c.d_model, 0),
    ("llama", "dots_saveable"): lambda c, T: (2 * c.d_model + 2 * c.mlp_dim + _qh(c) + 2 * _kh(c), 0),
    ("gpt2", "none"): lambda c, T: (2 * c.d_model + 6 * c.mlp_dim + 4 * _qh(c),
                                    6 * c.d_model + 4),
    ("gpt2", "full"): lambda c, T: (c.d_model, 0),
    ("gpt2", "dots_saveable"): lambda c, T: (2 * c.d_model + c.mlp_dim + 3 * _qh(c), 0),
}


def _qh(c) -> int:
    return c.num_heads * c.head_dim


def _kh(c) -> int:
    return c.num_kv_heads * c.head_dim


def _per_device(n: int, tensor: int) -> int:
    """An axis of size n on one device: split over `tensor` when it divides, else whole (as
    `sharding.logical_to_spec` replicates a dimension the mesh axis does not divide)."""
    return n // tensor if n % tensor == 0 else n


def layer_activation_bytes(c: ModelConfig, rows: int, T: int, remat: str, tensor: int = 1) -> int:
    """Bytes one layer keeps for backward for `rows` sequences of T tokens: the per-token table,
    plus (remat=none, compute dtype ≠ param dtype) the layer's weights cast to the compute
    dtype. With tensor parallelism the head and mlp terms split over `tensor` (when it divides
    them); D-sized terms do not."""
    shard = types.SimpleNamespace(
        d_model=c.d_model, head_dim=c.head_dim, num_heads=_per_device(c.num_heads, tensor),
        num_kv_heads=_per_device(c.num_kv_heads, tensor), mlp_dim=_per_device(c.mlp_dim, tensor))
    compute, fp32 = _LAYER_TERMS[(c.arch, remat)](shard, T)
    casts = 0
    if remat == "none" and c.compute_dtype != c.params_dtype:
        s, D = shard, c.d_model
        weights = (D * (2 * _qh(s) + 2 * _kh(s)) + 3 * D * s.mlp_dim
                   if c.arch == "llama" else 4 * D * _qh(s) + 2 * D * s.mlp_dim)
        casts = weights * c.compute_dtype.itemsize
    return rows * T * (compute * c.compute_dtype.itemsize + fp32 * 4) + casts


def _once_activation_bytes(c: ModelConfig, rows: int, T: int, remat: str) -> int:
    """Saved once, not per layer: the attention mask (one bool [T, T] per row), the RoPE
    cos/sin tables (llama; fp32 [rows, T, head_dim], with their rotated copies without remat),
    and a few [rows, T, D] buffers: the embedding output (llama: in the compute dtype), final
    norm, the loss's gather, and GPT-2's learned positions (fp32)."""
    D = c.d_model
    if c.arch == "llama":
        buffers = rows * T * D * (2 * 4 + c.compute_dtype.itemsize)
        rope = (4 if remat == "none" else 2) * rows * T * c.head_dim * 4
    else:
        buffers, rope = 4 * rows * T * D * 4, 0
    return rows * T * T + rope + buffers


@dataclasses.dataclass
class Plan:
    """Per-device bytes by item (name → (bytes, how)); `train` and `sampling` are separate
    phases (they never share memory), each with a total and a verdict."""
    mesh: MeshShape
    stage: str
    device_memory: int
    memory_source: str
    train: dict[str, tuple[int, str]]
    sampling: dict[str, tuple[int, str]]
    per_layer: dict[str, int]  # activation bytes of one layer by remat policy
    notes: list[str]

    def total(self, phase: str) -> int:
        return sum(b for b, _ in getattr(self, phase).values())

    def fits(self, phase: str) -> bool:
        return self.total(phase) <= self.device_memory


def plan(cfg: Config, mesh: MeshShape, stage: str, device_memory: int,
         memory_source: str = "--device_memory") -> Plan:
    """Per-device bytes of the `stage` ('sft' or 'dpo') training step and of sampling."""
    if stage not in ("sft", "dpo"):
        raise ValueError(f"--stage {stage!r}: choose sft or dpo")
    c = model_config(cfg, stage)
    section = cfg.sft if stage == "sft" else cfg.dpo
    batch_shards = mesh.data * mesh.fsdp
    if section.batch_size % batch_shards:
        raise ValueError(f"{stage}.batch_size={section.batch_size} must be divisible by "
                         f"data*fsdp = {batch_shards}; set {stage}.batch_size or the mesh")
    _, params = nnx.split(nnx.eval_shape(lambda: build_model(c)))
    layouts = (True, False) if cfg.data.packing == "auto" else (bool(cfg.data.packing),)
    options = [_train_bytes(cfg, c, params, mesh, stage, packed) for packed in layouts]
    train, per_layer, notes = max(options, key=lambda o: sum(b for b, _ in o[0].values()))
    if len(options) > 1:
        notes.append("data.packing: auto — the larger of packed rows and padded buckets (the "
                     "stage picks one from its data)")
    T = bucket_length(min(cfg.data.max_total_tokens, max(cfg.data.buckets)), cfg.data.buckets)
    if T < cfg.data.max_total_tokens:
        notes.append(f"data.max_total_tokens={cfg.data.max_total_tokens} exceeds the largest "
                     f"bucket {T}; longer rows cannot be batched")
    return Plan(mesh, stage, device_memory, memory_source, train, _sampling_bytes(cfg, c, params, mesh),
                per_layer, notes)


def _train_bytes(cfg: Config, c: ModelConfig, params, mesh: MeshShape, stage: str,
                 packed: bool):
    """({entry: (bytes, note)} of one training step, activation bytes per layer by remat policy,
    notes)."""
    section = cfg.sft if stage == "sft" else cfg.dpo
    pairs = section.batch_size // (mesh.data * mesh.fsdp)
    window = cfg.data.max_response_tokens
    T = bucket_length(min(cfg.data.max_total_tokens, max(cfg.data.buckets)), cfg.data.buckets)
    rows, row_T, scored = (pairs * 2 if stage == "dpo" else pairs), T, window
    if stage == "dpo" and cfg.dpo.share_prompt:  # one row per pair: [prompt | chosen | rejected]
        rows, row_T, scored = pairs, T + window, 2 * window
    if packed:  # at most one packed row per example, each pack_length long
        row_T = cfg.data.packed_row_length(stage == "dpo")
        rows, scored = pairs, min(row_T, (2 if stage == "dpo" else 1) * window)
    chunk = min(LOGIT_CHUNK, scored)
    tx, _ = optim.make_optimizer(section.optimizer, total_steps=1)
    param_b = tree_bytes(params, mesh)
    per_layer = {r: layer_activation_bytes(c, rows, row_T, r, mesh.tensor) for r in
                 ("none", "full", "dots_saveable")}
    saved = per_layer[c.remat] * c.num_layers + _once_activation_bytes(c, rows, row_T, c.remat)
    logits = rows * chunk * _per_device(c.vocab_size, mesh.tensor) * 4 * 2
    pdt = c.params_dtype.name
    train = {
        "parameters": (param_b, f"{pdt}, TRAIN_RULES shards"),
        "optimizer state": (tree_bytes(jax.eval_shape(tx.init, params), mesh),
                            f"AdamW mu+nu ({pdt}, like the params, which are the master copy)"),
        "gradients": (param_b * (2 if section.grad_accum > 1 else 1),
                      "sharded like params" + (" (+ accumulator: grad_accum > 1)"
                                               if section.grad_accum > 1 else "")),
    }
    notes = []
    if stage == "dpo" and cfg.dpo.precompute_ref:
        notes.append("dpo.precompute_ref: the reference log-probs are scored once before "
                     "training, so the step holds no reference copy")
    elif stage == "dpo":
        frozen = jax.eval_shape(lambda: frozen_forward_params(build_model(c)))
        train["reference parameters"] = (
            tree_bytes(frozen, mesh), "frozen copy, sharded like params"
            + (f", matrices in {c.dtype}" if c.compute_dtype != c.params_dtype else ""))
    train["activations"] = (saved, f"remat={c.remat}: {c.num_layers} layers x {rows} rows x "
                                   f"T={row_T} (estimate)")
    train["transient"] = (logits + (per_layer["none"] if c.remat != "none" else 0),
                          f"logits [{rows}, {chunk}, V] fp32 x2"
                          + (" + one layer rebuilt" if c.remat != "none" else ""))
    return train, per_layer, notes


def _sampling_bytes(cfg: Config, c: ModelConfig, params, mesh: MeshShape) -> dict:
    """{entry: (bytes, note)} of the negatives stage's sampler."""
    neg, window = cfg.negatives, cfg.data.max_response_tokens
    prompt = round_up(cfg.data.max_total_tokens - window, PROMPT_BUCKET)
    S = prompt + window
    brows = -(-neg.batch_size // (mesh.data * mesh.fsdp))
    kv_heads = _per_device(c.num_kv_heads, mesh.tensor)
    kv = 2 * c.num_layers * brows * S * kv_heads * c.head_dim * c.compute_dtype.itemsize
    as_compute = lambda b: b * c.compute_dtype.itemsize // c.params_dtype.itemsize  # noqa: E731
    head_b = _per_device(c.vocab_size, mesh.tensor) * c.d_model * c.compute_dtype.itemsize
    return {
        # The negatives stage loads the weights in the compute dtype (no fp32 master copy),
        # straight into the decode layout: the sampler adds only the head's [D, V] copy.
        "parameters": (as_compute(tree_bytes(params, mesh, shd.SAMPLING_RULES)),
                       f"{c.dtype}, layers unstacked, SAMPLING_RULES (tensor-parallel only)"),
        "decode LM head": (head_b, "the LM head as [D, V] (sampling.decode.DecodeWeights)"),
        "kv cache": (kv, f"2 x {c.num_layers} layers x {brows} rows x S={S} "
                         f"({prompt} prompt + {window} new) x {kv_heads} kv heads x "
                         f"{c.head_dim} ({c.dtype})"),
        "logits": (brows * c.vocab_size * 4 * 2, "[rows, V] fp32 per decode step, x2"),
    }


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_plan(p: Plan, title: str) -> str:
    out = [f"{title}: stage {p.stage}, mesh data={p.mesh.data} fsdp={p.mesh.fsdp} "
           f"tensor={p.mesh.tensor} ({p.mesh.size} devices); per-device bytes"]
    for phase, label in (("train", f"{p.stage} training step"), ("sampling", "sampling (negatives)")):
        out.append(f"\n  {label}")
        for name, (b, how) in getattr(p, phase).items():
            out.append(f"    {name:<22}{human(b):>12}   {how}")
        verdict = "fits" if p.fits(phase) else "does NOT fit"
        out.append(f"    {'total':<22}{human(p.total(phase)):>12}   {verdict} in "
                   f"{human(p.device_memory)} ({p.memory_source})")
    out.append("\n  activations of one layer by remat policy: " + ", ".join(
        f"{k}={human(v)}" for k, v in p.per_layer.items()))
    out += [f"  note: {n}" for n in p.notes]
    return "\n".join(out)


def _backend_memory() -> tuple[int | None, str]:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - no usable backend: fall back to the flag's default
        stats = {}
    limit = stats.get("bytes_limit")
    return (int(limit), f"{jax.devices()[0].device_kind} bytes_limit") if limit else (None, "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdpo_jax.memory",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as for the trainer")
    ap.add_argument("--mesh", default="", help="e.g. data=1,fsdp=8,tensor=1 (default: the "
                                               "config's mesh section)")
    ap.add_argument("--num_devices", type=int, default=None,
                    help="fills a -1 mesh axis (default: this machine's device count)")
    ap.add_argument("--stage", default=None, choices=("sft", "dpo"),
                    help="default: dpo if run.stages has it, else sft")
    ap.add_argument("--device_memory", default=None,
                    help="per-device memory, e.g. 16GiB (default: the backend's limit, "
                         "else 16GiB)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, tuple(args.overrides))
        sizes = parse_mesh(args.mesh, (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
        mesh = MeshShape.resolve(*sizes, num_devices=args.num_devices or jax.device_count())
        if args.device_memory:
            memory, source = parse_bytes(args.device_memory), "--device_memory"
        else:
            memory, source = _backend_memory()
            if memory is None:
                memory, source = 16 * GiB, "default; set --device_memory"
        stage = args.stage or ("sft" if "sft" in cfg.run.stages and "dpo" not in cfg.run.stages
                                else "dpo")
        p = plan(cfg, mesh, stage, memory, source)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(p, args.config))
    return 0 if p.fits("train") else 1


if __name__ == "__main__":
    sys.exit(main())
