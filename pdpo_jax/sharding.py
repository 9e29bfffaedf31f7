"""Logical axis names → mesh axes: one short ordered rules table, and the helpers that apply it.

Every parameter names its axes (`embed`, `vocab`, `heads`, …); sharding is a lookup in this
table, so a model file never mentions a mesh. A name missing from the table is an error.
The mesh has at most three axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded), `tensor` (Megatron-style tensor parallel).
"""
from __future__ import annotations

from typing import Sequence

import functools
import logging

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch's rows are spread over
log = logging.getLogger(__name__)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)

# Training: parameters are FSDP-sharded on `embed` and tensor-parallel on the head/mlp/vocab axes.
TRAIN_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("qkv", None),
    ("positions", None),
    ("norm", None),
    ("bias", None),
    ("labels", None),  # a sequence classifier's classes (3 for NLI): too few to split
    ("types", None),   # token-type (segment) embeddings of BERT-style encoders
)

# Sampling: no optimizer state to spread, and gathering `embed` every decode step is waste,
# so weights are only tensor-parallel; the batch is spread over data and fsdp.
SAMPLING_RULES = tuple((name, None if name == "embed" else axes) for name, axes in TRAIN_RULES)


def mesh_sizes(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 filled in from `num_devices`."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: sizes must be positive, "
                         "at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not divide by the fixed mesh axes ({known})")
        sizes[sizes.index(-1)] = num_devices // known
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the devices left over."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} must equal the "
                         f"{len(devices)} devices; set mesh.data/fsdp/tensor")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, *,
                    rules=TRAIN_RULES, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for a tensor whose axes carry `names`.

    A mesh axis is used at most once per tensor (first come, first served), and size-1 mesh
    axes are dropped. With `shape` and `mesh`, a dimension that does not divide its mesh axes
    (GPT-2's vocab of 50,257, 3 kv heads on tensor=2) is replicated instead, with a warning:
    padding it would change the model that is exported.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to the rules "
                             f"table (known: {sorted(table)})")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        if shape is not None and mesh is not None and axes:
            n = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[i] % n:
                _warn_once(f"axis {name!r} of size {shape[i]} does not divide mesh axes {axes} "
                           f"(size {n}); it is replicated")
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def variable_names(variable) -> tuple[str, ...]:
    names = variable.get_metadata().get("out_sharding")
    if names is None:
        raise ValueError(f"parameter of shape {variable.shape} carries no logical axis names")
    return tuple(names)


def tree_shardings(tree, mesh: Mesh, rules=TRAIN_RULES):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments, an abstract
    nnx.State): each Variable by its logical axis names, any other leaf (step counters)
    replicated."""
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def one(x):
        if is_var(x):
            return NamedSharding(mesh, logical_to_spec(variable_names(x), x.shape, rules=rules,
                                                       mesh=mesh))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, tree, is_leaf=is_var)


def batch_divisor(mesh: Mesh | None) -> int:
    """How many ways a batch's rows are split (data x fsdp); 1 without a mesh."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def row_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
    """Rows over the batch axes for an array of `ndim` dims whose row axis comes after
    `leading` unsharded axes (a micro-batch axis, say)."""
    spec = (None,) * leading + (BATCH_AXES,) + (None,) * (ndim - leading - 1)
    return NamedSharding(mesh, PartitionSpec(*spec))
