"""A residual add and the RMSNorm that follows it, as one call (the pre-norm block's seam).

    y, residual = add_rms_norm(h, residual, scale, eps=1e-6)    # residual += h; y = RMSNorm(residual)

A pre-norm decoder runs `x = x + sublayer(...)` and then normalizes x for the next sublayer. XLA emits
that as three kernels (the add, the sum of squares, the scaling); on the Triton backend this is one
(`backends/triton/norm_kernel.py`), which a decode step of a few rows, bound by its launches, feels.
Elsewhere it is the jnp form `add_rms_norm_xla`, which defines the semantics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_varlen_attn import cache
from jax_varlen_attn.nn.qkv import rms_norm
from jax_varlen_attn.validation import FLOAT_DTYPES, array_arg

_DTYPES_DESC = "float16, bfloat16 or float32"


def add_rms_norm(x, residual, scale, *, eps: float = 1e-6, backend: str = "auto"):
  """Adds x to the residual stream and RMSNorms the sum; returns (y, new_residual).

  Example (a decode step's 4 rows of hidden 2048)::

      h = jnp.ones((4, 2048), jnp.bfloat16)           # a sublayer's output
      residual = jnp.zeros((4, 2048), jnp.bfloat16)   # the stream before it
      y, residual = add_rms_norm(h, residual, jnp.ones(2048, jnp.bfloat16), eps=1e-6)

  Semantics (`add_rms_norm_xla`): s = x + residual, rounded to x's dtype (as `x + residual` in jnp);
  y = s * (rsqrt(mean(s^2) + eps) * scale), computed in f32 and rounded to x's dtype, which is
  `flax.nnx.RMSNorm(s)` (and `jax_varlen_attn.nn.rms_norm`). residual None: s = x (a plain RMSNorm,
  e.g. the first layer's, whose input is the embedding).

  Args (T rows):
    x: [T, hidden], float16 / bfloat16 / float32.
    residual: [T, hidden] in x's dtype, or None.
    scale: [hidden] RMSNorm scale (any float dtype; used in f32).
    eps: RMSNorm's epsilon (>= 0).
    backend: "auto" (the Triton kernel on a CUDA GPU where triton runs, else jnp), "triton"
      (raises where it cannot run; Triton's interpreter on a CPU with TRITON_INTERPRET=1), "xla" or
      "pallas" (the jnp form).

  Returns:
    (y [T, hidden], s [T, hidden]), both in x's dtype.
  """
  x = array_arg("x", x, rank=2, dtypes=FLOAT_DTYPES, dtype_desc=_DTYPES_DESC)
  if residual is not None:
    residual = array_arg("residual", residual, rank=2)
    if tuple(residual.shape) != tuple(x.shape):
      raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if jnp.dtype(residual.dtype) != jnp.dtype(x.dtype):
      raise TypeError(f"residual must have x's dtype {jnp.dtype(x.dtype).name}, got "
                      f"{jnp.dtype(residual.dtype).name}")
  scale = array_arg("scale", scale, rank=1)
  if scale.shape[0] != x.shape[1]:
    raise ValueError(f"scale must be [hidden={x.shape[1]}] (axis 1 of x), got {tuple(scale.shape)}")
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    raise TypeError(f"scale must be a float array, got {jnp.dtype(scale.dtype).name}")
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
    raise ValueError(f"eps must be a number >= 0, got {eps!r}")
  return _run(cache._select(backend), float(eps), x, residual, scale)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(backend_name: str, eps: float, x, residual, scale):
  if backend_name == "triton" and x.shape[0]:
    from jax_varlen_attn.backends.triton import norm_kernel  # imports triton: only when asked

    if x.shape[1] <= norm_kernel.MAX_HIDDEN:
      return norm_kernel.add_rms_norm(x, residual, scale, eps)
  return add_rms_norm_xla(x, residual, scale, eps)


def add_rms_norm_xla(x, residual, scale, eps: float):
  """The jnp form (the semantics): s = x + residual (or x), y = rms_norm(s); returns (y, s)."""
  s = x if residual is None else x + residual
  return rms_norm(s, scale, eps), s
