"""The architecture of one decoder LM (`ModelConfig`), the shape legend the package names arrays
by, and `param`: a parameter carrying its logical axis names.

Shape legend (used in names across the package):
  B batch, T time (new tokens), S cache/key length, L layers, D model width, N query heads,
  K kv heads, H head dim, F mlp width, V vocab, P max learned positions, Y token types,
  C classes (labels of a sequence classifier).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from flax import nnx

SHAPE_LEGEND = {
    "B": "batch", "T": "time (new tokens)", "S": "cache / key length", "L": "layers",
    "D": "model width", "N": "query heads", "K": "kv heads", "H": "head dim",
    "F": "mlp width", "V": "vocab", "P": "max learned positions", "Y": "token types",
    "C": "classes (labels of a sequence classifier)",
}


RematPolicy = Literal["none", "full", "dots_saveable"]



@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one transformer; `arch` picks the module family: 'gpt2' or 'llama'
    (decoder LMs) or 'bert' (bidirectional encoders: BERT, RoBERTa).

    `hf_model_type` remembers which HF flavour it came from ('gpt2', 'llama', 'mistral',
    'qwen2', 'bert', 'roberta') so that export writes the same `model_type` back.
    With `labels` the model is a sequence classifier (HF `…ForSequenceClassification`): a
    head maps one pooled hidden state to len(labels) logits (`model.classify`) and decoders
    carry no LM head.
    """
    arch: Literal["gpt2", "llama", "bert"]
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norm_eps: float
    max_positions: int
    hf_model_type: str = "llama"
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Compute dtype (activations, matmuls), parameter dtype (master weights). Logits are fp32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: RematPolicy = "none"
    # Unroll the layer scan of the no-cache forward (training, scoring): faster on XLA:CPU (no
    # stacked per-layer residual buffers); compile time grows with depth. With a KV cache the
    # layers always run as a Python loop, each reading its own cache arrays (`run_layers`).
    unroll_layers: bool = False
    # jax.nn.dot_product_attention implementation: None lets JAX pick (xla on CPU/TPU).
    attn_implementation: Literal["xla", "cudnn"] | None = None
    # Encoders ('bert'): token-type (segment) embeddings, learned positions shifted by
    # `position_offset` (RoBERTa counts from pad_token_id + 1), the MLP's activation (HF name).
    type_vocab_size: int = 0
    position_offset: int = 0
    hidden_act: str = "gelu"
    # Sequence classifiers: the label of each output index (HF id2label); empty: an LM.
    labels: tuple[str, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.remat not in ("none", "full", "dots_saveable"):
            raise ValueError(f"remat={self.remat!r}; choose 'none', 'full' or 'dots_saveable'")

    @property
    def causal(self) -> bool:
        """Decoders attend to earlier positions only; encoders to every real token."""
        return self.arch != "bert"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


def param(init: Callable, key: jax.Array, shape: tuple[int, ...], dtype, names: tuple[str, ...]):
    """A parameter carrying its logical axis names (sharding is a rules table over these)."""
    if len(names) != len(shape):
        raise ValueError(f"axis names {names} do not match shape {shape}")
    return nnx.Param(init(key, shape, dtype), out_sharding=names, eager_sharding=False)

