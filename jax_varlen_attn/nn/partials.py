"""Split-K partial products, and the SwiGLU gate that sums them: a decode step's matmuls without
reduction kernels of their own.

    parts = partials(x, w, splits=2)              # f32 [2, T, N]: x [T, K] @ w [K, N] over 2 K ranges
    h = silu_mul(partials(x, w_gate_up, 2), jnp.bfloat16)      # [T, N / 2]: silu(gate) * up
    y, residual = add_rms_norm(partials(h, w_down, 2), residual, scale)   # the sum inside the norm

A matmul of a few rows (a decode step) cannot fill the GPU over its output columns alone, so XLA
splits its K dimension and adds a kernel that sums the f32 partials. Where the next op is ours
(`silu_mul`, `jax_varlen_attn.nn.add_rms_norm`), that op can sum them as it reads its input, and a
layer launches fewer kernels (benchmarks/NOTES.md, "split-K partials").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_varlen_attn import cache
from jax_varlen_attn.validation import FLOAT_DTYPES, array_arg

_DTYPES_DESC = "float16, bfloat16 or float32"


def partials(x, w, splits: int):
  """f32 [splits, T, N]: x [T, K] @ w [K, N] over `splits` equal, contiguous ranges of K, unsummed
  (one batched matmul with f32 accumulation; the reshapes are free on row-major x and w).

  Example::

      parts = partials(jnp.ones((4, 2048), jnp.bfloat16), jnp.ones((2048, 6144), jnp.bfloat16), 2)
      parts.shape                  # (2, 4, 6144); parts.sum(0) == x @ w, up to summation order
  """
  x = array_arg("x", x, rank=2, dtypes=FLOAT_DTYPES, dtype_desc=_DTYPES_DESC)
  w = array_arg("w", w, rank=2, dtypes=FLOAT_DTYPES, dtype_desc=_DTYPES_DESC)
  if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
    raise ValueError(f"splits must be an int >= 1, got {splits!r}")
  (t, k), n = x.shape, w.shape[1]
  if w.shape[0] != k:
    raise ValueError(f"w must be [K={k}, N] (K = axis 1 of x), got {tuple(w.shape)}")
  if k % splits:
    raise ValueError(f"splits={splits} must divide K={k}")
  xs = x.reshape(t, splits, k // splits)
  ws = w.reshape(splits, k // splits, n)
  return jax.lax.dot_general(xs, ws, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)


def silu_mul(x, dtype=None, *, backend: str = "auto"):
  """SwiGLU's gate: silu(gate) * up of x = [gate | up], in one kernel on a GPU.

  Example (a decode step's 4 rows, intermediate size 6144)::

      gate_up = jnp.ones((4, 2 * 6144), jnp.bfloat16)     # x @ [W_gate | W_up]
      h = silu_mul(gate_up)                              # [4, 6144] bfloat16

  Args:
    x: [T, 2 * I], float16 / bfloat16 / float32, columns gate | up; or float32 [S, T, 2 * I]
      split-K partials of it (`partials`), summed first.
    dtype: the output dtype (and, for partials, the dtype their sum is rounded to first, as a matmul
      rounds its output); None: x's dtype (required for partials).
    backend: "auto" (the Triton kernel on a CUDA GPU where triton runs, else jnp), "triton" (raises
      where it cannot run), "xla" or "pallas" (the jnp form).

  Semantics (`silu_mul_xla`): g, u = x's halves (rounded to dtype); silu(g) * u in f32, rounded to
  dtype once.

  Returns:
    [T, I] in dtype.
  """
  x = array_arg("x", x, dtypes=FLOAT_DTYPES, dtype_desc=_DTYPES_DESC)
  if x.ndim not in (2, 3):
    raise ValueError(f"x must have rank 2 ([T, 2 * I]) or 3 (partials [S, T, 2 * I]), got shape {tuple(x.shape)}")
  if x.ndim == 3 and jnp.dtype(x.dtype) != jnp.float32:
    raise TypeError(f"x as split-K partials [S, T, 2 * I] must be float32, got {jnp.dtype(x.dtype).name}")
  if x.shape[-1] % 2:
    raise ValueError(f"x's last axis must be even (gate | up), got {x.shape[-1]}")
  if dtype is None:
    if x.ndim == 3:
      raise ValueError("dtype is required for partials (the dtype their sum is rounded to)")
    dtype = x.dtype
  dtype = jnp.dtype(dtype)
  if dtype not in FLOAT_DTYPES:
    raise TypeError(f"dtype must be {_DTYPES_DESC}, got {dtype.name}")
  return _run(cache._select(backend), dtype.name, x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(backend_name: str, dtype: str, x):
  if backend_name == "triton" and x.shape[-2]:
    from jax_varlen_attn.backends.triton import swiglu_kernel  # imports triton: only when asked

    return swiglu_kernel.silu_mul(x, jnp.dtype(dtype))
  return silu_mul_xla(x, jnp.dtype(dtype))


def silu_mul_xla(x, dtype):
  """The jnp form (the semantics): [T, I] = silu(gate) * up in f32, from halves rounded to dtype."""
  if x.ndim == 3:
    x = jnp.sum(x, axis=0)
  gate, up = jnp.split(x.astype(dtype).astype(jnp.float32), 2, axis=-1)
  return (jax.nn.silu(gate) * up).astype(dtype)
