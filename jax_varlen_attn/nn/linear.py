"""A projection with what surrounds it in a decoder block: RMSNorm before, residual add or SwiGLU after.

    y = fused_linear(x, w, norm_scale=s)            # RMSNorm(x) * s @ w.T         (q|k|v, gate|up)
    x = fused_linear(o, w_o, residual=x)            # x + o @ w_o.T                (o_proj, down)
    h = fused_linear(x, w_gu, norm_scale=s, silu_mul=True)   # silu(g) * u of [g | u] = norm(x) @ w_gu.T

The weight is stored [out_features, in_features] (PyTorch's layout; `TransposedLinear` holds one),
so a program of the Triton kernel streams whole rows of it. On the Triton backend a call of at most
16 token rows (a decode step) is one kernel (`backends/triton/linear_kernel.py`) in place of XLA's
GEMM, its split-K partial sums and the small kernels around it; anywhere else it is the jnp form,
`fused_linear_xla`, which defines the semantics.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jax_varlen_attn import cache
from jax_varlen_attn.nn.qkv import rms_norm
from jax_varlen_attn.validation import array_arg

_FLOAT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def fused_linear(x, w, *, norm_scale=None, eps: float = 1e-6, residual=None, silu_mul: bool = False,
                 backend: str = "auto"):
  """`epilogue(prologue(x) @ w.T)`: one launch for a decode step's projection on the Triton backend.

  Example (a SwiGLU MLP block's second half: 3 tokens, hidden 64, intermediate 128)::

      x = jnp.ones((3, 64), jnp.bfloat16)
      w_gate_up = jnp.full((2 * 128, 64), 0.01, jnp.bfloat16)         # [gate rows | up rows, hidden]
      w_down = jnp.full((64, 128), 0.01, jnp.bfloat16)
      h = fused_linear(x, w_gate_up, norm_scale=jnp.ones(64, jnp.bfloat16), silu_mul=True)  # [3, 128]
      x = fused_linear(h, w_down, residual=x)                                               # [3, 64]

  Semantics (`fused_linear_xla`), every step rounded to x's dtype as a Flax model's modules round:
    x = RMSNorm(x) with scale norm_scale (as `nnx.RMSNorm`: f32, x * (rsqrt(mean(x^2) + eps) * scale))
    y = x @ w.T (f32 accumulation, rounded)
    silu_mul: y = silu(y[:, :N]) * y[:, N:]   (w holds the gate's N rows, then the up projection's N)
    residual: y = residual + y

  Args (T token rows, K input features, N output features):
    x: [T, K] float16, bfloat16 or float32.
    w: [N, K] (or [2N, K] with silu_mul) in x's dtype: the weight stored [out, in].
    norm_scale: [K] or None: RMSNorm x first, with this scale and `eps` (>= 0).
    residual: [T, N] in x's dtype or None: added to the product.
    silu_mul: SwiGLU's gating of the two halves of the product.
    backend: "auto" (Triton on a CUDA GPU, else XLA), "triton", "xla" or "pallas" (the jnp form).
      The Triton kernel takes calls of 1 to 16 rows; larger ones use the jnp form (XLA's GEMMs are
      the faster there).

  Returns:
    [T, N] in x's dtype.
  """
  x = array_arg("x", x, rank=2, dtypes=_FLOAT_DTYPES, dtype_desc="float16, bfloat16 or float32 [T, K]")
  w = array_arg("w", w, rank=2)
  t, k = x.shape
  if jnp.dtype(w.dtype) != jnp.dtype(x.dtype):
    raise TypeError(f"w must be in x's dtype ({jnp.dtype(x.dtype).name}), got {jnp.dtype(w.dtype).name}")
  if w.shape[1] != k:
    raise ValueError(f"w must be [N, K={k}] (stored [out, in]; K = x.shape[1]), got {tuple(w.shape)}")
  if not isinstance(silu_mul, bool):
    raise TypeError(f"silu_mul must be a bool, got {silu_mul!r}")
  if silu_mul and w.shape[0] % 2:
    raise ValueError(f"silu_mul needs w of [2N, K] (gate rows, then up rows), got {w.shape[0]} rows")
  n = w.shape[0] // 2 if silu_mul else w.shape[0]
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
    raise ValueError(f"eps must be a number >= 0, got {eps!r}")
  if norm_scale is not None:
    norm_scale = array_arg("norm_scale", norm_scale, rank=1)
    if norm_scale.shape[0] != k:
      raise ValueError(f"norm_scale must be [K={k}], got {tuple(norm_scale.shape)}")
  if residual is not None:
    residual = array_arg("residual", residual, rank=2)
    if tuple(residual.shape) != (t, n) or jnp.dtype(residual.dtype) != jnp.dtype(x.dtype):
      raise ValueError(f"residual must be [T, N] = [{t}, {n}] in x's dtype, got {tuple(residual.shape)} "
                       f"{jnp.dtype(residual.dtype).name}")
  return _run(cache._select(backend), float(eps), silu_mul, x, w, norm_scale, residual)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(backend_name: str, eps: float, silu_mul: bool, x, w, norm_scale, residual):
  if backend_name == "triton":
    from jax_varlen_attn.backends.triton import linear_kernel  # imports triton: only when asked

    if linear_kernel.fits(x.shape[0]):
      return linear_kernel.fused_linear(x, w, norm_scale, eps, residual, silu_mul)
  return fused_linear_xla(x, w, norm_scale, eps, residual, silu_mul)


def fused_linear_xla(x, w, norm_scale: Optional[jax.Array], eps: float, residual: Optional[jax.Array],
                     silu_mul: bool):
  """The jnp form (the semantics; what XLA fuses on its own for calls the kernel does not take)."""
  if norm_scale is not None:
    x = rms_norm(x, norm_scale, eps)
  y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
  if silu_mul:
    gate, up = jnp.split(y, 2, axis=-1)
    y = jax.nn.silu(gate) * up
  return y if residual is None else residual + y


class TransposedLinear(nnx.Module):
  """A bias-free linear layer whose kernel is stored [out_features, in_features], the layout
  `fused_linear` streams; called with `fused_linear`'s prologue / epilogue options.

  Initialized as `nnx.Linear(in_features, out_features, use_bias=False, kernel_init=...)` with the
  same rngs is (same values, transposed), so the two forms of a model hold the same weights.
  """

  def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, kernel_init,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype).T)
    self.in_features, self.out_features = in_features, out_features
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x, *, norm_scale=None, eps: float = 1e-6, residual=None, silu_mul: bool = False,
               backend: str = "auto"):
    """x [T, in_features] -> [T, out_features] (out_features / 2 with silu_mul), in the module's dtype."""
    cast = lambda a: None if a is None else jnp.asarray(a).astype(self.dtype)  # noqa: E731
    return fused_linear(cast(x), cast(self.kernel[...]), norm_scale=norm_scale, eps=eps, residual=cast(residual),
                        silu_mul=silu_mul, backend=backend)
