"""What a compiled training step holds in memory, read from XLA's own accounting of the program
(no step runs): the update copies none of the donated state, and remat shrinks the step's
temporary memory with the layer loop unrolled too (bench/memory_probe.py has the SmolLM2 sizes)."""
import re

import jax
import numpy as np

from batches import micro, sft_rows
from pdpo_jax import memory, sharding
from pdpo_jax.config import OptimizerConfig
from pdpo_jax.models import ModelConfig
from pdpo_jax.train import optim, state as st
from pdpo_jax.train.steps import make_sft_step


def _compiled_sft_step(cfg: ModelConfig, B: int, T: int, prompt: int):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params = st.init_params(cfg, mesh, seed=0)
    tx, lr = optim.make_optimizer(OptimizerConfig(lr=1e-3, warmup_ratio=0.0), 10)
    state, state_sh = st.create_state(params, tx, mesh)
    rows = sft_rows(np.random.default_rng(0), cfg.vocab_size, [(prompt, T - prompt)] * B, T=T)
    step = st.jit_sft_step(make_sft_step(graphdef, tx, lr, window=T - prompt), state_sh, mesh)
    return step.lower(state, st.shard_batch(micro(rows), mesh)).compile(), state


def _copied_arguments(hlo: str) -> list[tuple[str, str]]:
    """(name, shape) of every entry parameter the optimized program copies."""
    entry = hlo[hlo.index("\nENTRY"):]
    params = set(re.findall(r"%(\S+) = \S+ parameter\(\d+\)", entry))
    return [(arg, shape) for shape, arg in re.findall(r"= (\S+?)\{[^}]*\} copy\(%(\S+?)\)", entry)
            if arg in params]


def test_the_update_copies_none_of_the_donated_state():
    """A step that skips a non-finite update must still read the old params and moments after
    writing the new ones into their (donated) buffers, unless the skip is a branch: a
    per-leaf `where(finite, new, old)` made XLA copy every leaf of the state at entry."""
    cfg = ModelConfig(arch="llama", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=64, norm_eps=1e-5, max_positions=64)
    compiled, state = _compiled_sft_step(cfg, B=4, T=16, prompt=8)
    arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert len(arrays) > 10  # params, mu and nu of every matrix: what the copies would be of
    copied = [(arg, shape) for arg, shape in _copied_arguments(compiled.as_text())
              if not shape.endswith("[]")]  # a scalar (the step counter) may be copied
    assert copied == []


def test_remat_shrinks_the_step_with_the_layer_loop_unrolled():
    """Rematerialised layers keep less than stored ones, with `unroll_layers` too: unrolled,
    XLA:CPU put every layer's recomputation before the backward, all live at once, and
    `remat: full` kept as much as no remat. Long rows in a small model, so activations
    dominate the temp (measured: 26 MB with remat, 67 MB without; ~1:1 before the fix)."""
    cfg = ModelConfig(arch="llama", vocab_size=512, d_model=64, num_layers=6, num_heads=4,
                      num_kv_heads=2, head_dim=16, mlp_dim=256, norm_eps=1e-5, max_positions=256,
                      unroll_layers=True)
    stored = _compiled_sft_step(cfg, B=16, T=128, prompt=100)[0].memory_analysis()
    rematted = _compiled_sft_step(cfg.replace(remat="full"), B=16, T=128,
                                  prompt=100)[0].memory_analysis()
    # what remat drops, per the planner's table (itself checked against the saved residuals)
    dropped = cfg.num_layers * (memory.layer_activation_bytes(cfg, 16, 128, "none")
                                - memory.layer_activation_bytes(cfg, 16, 128, "full"))
    assert rematted.temp_size_in_bytes < stored.temp_size_in_bytes - dropped / 2
