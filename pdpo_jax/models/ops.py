"""Matmuls, a norm scale and SwiGLU with hand-written backward passes, and the fp32 logits.

Why custom VJPs: on XLA:CPU a bf16 matmul runs natively only as bf16 x bf16 -> fp32, and
autodiff of a bf16 einsum yields matmuls XLA upcasts to fp32; the weight gradient that autodiff
leaves in fp32 is in a transposed form the fast GEMM library does not take. The backward passes
here spell out each product in the layout the kernels want (docs/architecture.md, docs/performance.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

def _accumulation(x):
    """fp32 accumulation for low-precision operands; None keeps an fp32 einsum as it is."""
    return None if x.dtype == jnp.float32 else jnp.float32


def dense(spec: str, x, w):
    """`einsum(spec, x, w)` in x's dtype, accumulated in fp32 (a projection: x activations, w weights).

    Why a custom VJP (XLA:CPU; docs/architecture.md): a bf16 matmul runs natively (YNNPACK)
    only as bf16 x bf16 -> fp32, while autodiff of a bf16 einsum yields
    bf16-output and fp32 x bf16 matmuls that XLA upcasts to fp32; and in fp32 autodiff leaves
    the weight gradient xᵀ·g in a transposed form YNNPACK does not take (XLA's generic dot,
    slower). The backward below spells out dx = g·wᵀ and dw = xᵀ·g, with the cotangent
    cast to the compute dtype (as torch autocast does). fp32 numbers are unchanged. The output
    is named "dense" so that remat="dots_saveable" keeps it, as it keeps a plain matmul's.
    """
    return checkpoint_name(_matmul(spec, None, x, w), "dense")


def after_cotangent(x, g):
    """x, made to depend on the cotangent g: x + 0·g (x itself, NaN where g is not finite; XLA
    does not fold 0·g). A backward that rebuilds an array from saved inputs reads them through
    this, so each layer's rebuild runs when the backward reaches that layer. Without it XLA:CPU
    schedules every layer's rebuild ahead of the backward, all live at once, and an
    optimization barrier does not survive the unrolled layer loop."""
    return x + 0 * g


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, SwiGLU's activation, in the inputs' dtype. The backward keeps gate and
    up alone and rebuilds sigmoid(gate) in fp32 from them; autodiff kept two more [T, F]
    arrays per layer (silu(gate) and sigmoid(gate); SmolLM2-135M SFT step: ~260 MiB of its
    peak, `bench/memory_probe.py`). Gradients in fp32, cast to the inputs' dtype."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(saved, g):
    gate, up = saved
    gate32, up32, g32 = (a.astype(jnp.float32) for a in (gate, up, g))
    sig = jax.nn.sigmoid(after_cotangent(gate32, g32))
    d_up = g32 * gate32 * sig
    d_gate = g32 * up32 * sig * (1 + gate32 * (1 - sig))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def unembed(h_BTD, w_VD):
    """fp32 logits h·Wᵀ [B, T, V]; the backward matmuls run in h's dtype (see `dense`)."""
    return _matmul("BTD,VD->BTV", jnp.float32, h_BTD, w_VD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _matmul(spec: str, out_dtype, x, w):
    """einsum(spec, x, w) accumulated in fp32, returned in out_dtype (None: x's dtype)."""
    return _einsum_flat(spec, x, w, _accumulation(x)).astype(out_dtype or x.dtype)


def _einsum_flat(spec: str, x, w, accumulation):
    """einsum(spec, x, w), with several contracting axes that end x and begin w, in the same
    order (the output projection's "BTNH,NHD->BTD"), merged into one: a plain matmul. Given the
    two axes, XLA:CPU transposed the weight at every call of the decode loop. The reshapes stay inside `_matmul`, so its residuals are still the
    weights themselves (a layer scan forwards them instead of saving copies)."""
    (xs, ws), out = spec.split("->")[0].split(","), spec.split("->")[1]
    contracted = "".join(c for c in xs if c in ws and c not in out)
    n = len(contracted)
    if n < 2 or not (xs.endswith(contracted) and ws.startswith(contracted)):
        return jnp.einsum(spec, x, w, preferred_element_type=accumulation)
    merged = next(c for c in "ZYXWVUQPOM" if c not in spec)
    return jnp.einsum(f"{xs[:-n]}{merged},{merged}{ws[n:]}->{out}",
                      x.reshape(x.shape[:-n] + (-1,)), w.reshape((-1,) + w.shape[n:]),
                      preferred_element_type=accumulation)


def _matmul_fwd(spec, out_dtype, x, w):
    return _matmul(spec, out_dtype, x, w), (x, w)


def _matmul_bwd(spec, out_dtype, res, g):
    x, w = res
    (xs, ws), out = spec.split("->")[0].split(","), spec.split("->")[1]
    g = g.astype(x.dtype)
    acc = _accumulation(x)
    dx = jnp.einsum(f"{out},{ws}->{xs}", g, w, preferred_element_type=acc).astype(x.dtype)
    dw = jnp.einsum(f"{xs},{out}->{ws}", x, g, preferred_element_type=acc).astype(w.dtype)
    return dx, dw



_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def scale(x_BTD, w_D):
    """x · w broadcast over [B, T] (a norm's learned scale), with the weight gradient
    Σ_BT g·x written as a matrix-vector product: XLA:CPU lowers the plain reduction over two
    axes of a large activation to a slow tree of reduce-windows inside a training step."""
    return x_BTD * w_D.astype(x_BTD.dtype)[None, None]


def _scale_fwd(x_BTD, w_D):
    return scale(x_BTD, w_D), (x_BTD, w_D)


def _scale_bwd(res, g_BTD):
    x_BTD, w_D = res
    gx = (g_BTD * x_BTD).reshape(-1, x_BTD.shape[-1])
    ones = jnp.ones(gx.shape[:1], gx.dtype)
    dw = jnp.einsum("N,ND->D", ones, gx, preferred_element_type=jnp.float32)
    return (g_BTD * w_D.astype(g_BTD.dtype)[None, None]).astype(x_BTD.dtype), dw.astype(w_D.dtype)



scale.defvjp(_scale_fwd, _scale_bwd)


def logits_from_hidden(h_BTD, unembed_VD):
    """fp32 logits: the last matmul accumulates in fp32 whatever the compute dtype."""
    return unembed(h_BTD, unembed_VD.astype(h_BTD.dtype))

