"""Rotary position embedding (HF's "rotate_half" convention)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

def rope_table(positions_BT, head_dim: int, theta: float):
    """(cos, sin) [B, T, H] in fp32, computed once per forward and shared by every layer (the
    transcendentals, fused into each layer's q and k instead, cost more than the rotation)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None]
    angles = jnp.concatenate([angles, angles], axis=-1)
    # Passing cos/sin through an (exact, fp32) identity matmul makes XLA materialise them: a
    # matmul result is never re-fused, while plain cos/sin were fused back into, and recomputed
    # by, every q/k consumer (each layer, forward and backward, once per head).
    eye = jnp.eye(head_dim, dtype=jnp.float32)
    return (jnp.einsum("BTH,HG->BTG", jnp.cos(angles), eye, precision="highest"),
            jnp.einsum("BTH,HG->BTG", jnp.sin(angles), eye, precision="highest"))


def rope(x_BTNH, table):
    """Rotates the first and second halves of the head dim by position-dependent angles."""
    cos_BTH, sin_BTH = table
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos_BTH[:, :, None] + rotated * sin_BTH[:, :, None]).astype(x_BTNH.dtype)

