"""The Triton kernel of `jax_varlen_attn.nn.add_rms_norm`: a residual add and the RMSNorm after it
in one launch.

    x [T, hidden], residual [T, hidden] --> residual + x           (rounded to the dtype)
                                        --> RMSNorm(residual + x)  (f32 inside, rounded)

One program per row; the row is one tile. XLA emits this as three kernels (the add, the sum of
squares, the scaling): a decode step of a few rows is bound by its launches, not its bytes. The
math and its roundings are those of `jax_varlen_attn.nn.norm.add_rms_norm_xla`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jax_varlen_attn.backends.triton.call import LAUNCH_ENV, launch
from jax_varlen_attn.spec import next_pow2

# Widest row one program holds as one tile (f32: 64 registers a thread on 8 warps).
MAX_HIDDEN = 16384


@triton.jit
def add_rms_norm_kernel(
    x_ptr,  # [num_rows, HIDDEN]
    residual_ptr,  # [num_rows, HIDDEN] (HAS_RESIDUAL; else a placeholder, never read)
    scale_ptr,  # [HIDDEN]: RMSNorm's scale
    y_ptr,  # output [num_rows, HIDDEN]: RMSNorm(x + residual)
    sum_ptr,  # output [num_rows, HIDDEN]: x + residual (HAS_RESIDUAL; else a placeholder, never written)
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EPS: tl.constexpr,
):
  dtype = y_ptr.dtype.element_ty
  cols = tl.arange(0, BLOCK)
  in_row = cols < HIDDEN
  offs = tl.program_id(0).to(tl.int64) * HIDDEN + cols
  x = tl.load(x_ptr + offs, mask=in_row, other=0.0)
  w = tl.load(scale_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
  if HAS_RESIDUAL:
    r = tl.load(residual_ptr + offs, mask=in_row, other=0.0)
    x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)  # the sum the model carries, rounded
    tl.store(sum_ptr + offs, x, mask=in_row)
  xf = x.to(tl.float32)
  mean_sq = tl.sum(xf * xf, 0) / HIDDEN
  tl.store(y_ptr + offs, (xf * (tl.rsqrt(mean_sq + EPS) * w)).to(dtype), mask=in_row)


def add_rms_norm(x, residual, scale, eps: float):
  """The Triton launch: returns (y, x + residual), or (y, x) where residual is None.

  x [T, hidden] and residual (same shape and dtype) validated by `jax_varlen_attn.nn.add_rms_norm`;
  hidden <= MAX_HIDDEN (the caller takes the jnp form past it).
  """
  num_rows, hidden = x.shape
  block = max(16, next_pow2(hidden))
  # 16 elements a thread: a 2048-wide row on 4 warps; never more than 8 warps (one row's tile).
  num_warps = max(1, min(8, block // 512))
  has_residual = residual is not None
  unused = jnp.zeros((1,), x.dtype)
  inputs = dict(x_ptr=x, residual_ptr=residual if has_residual else unused, scale_ptr=scale)
  outputs = [jax.ShapeDtypeStruct(x.shape, x.dtype),
             jax.ShapeDtypeStruct(x.shape if has_residual else (1,), x.dtype)]
  # XLA's Triton call at every size (unless $JAX_VARLEN_ATTN_LAUNCH says): the call stays inside
  # XLA's command buffers, which jax-triton's legacy call splits (measured slower: NOTES.md).
  route = None if os.environ.get(LAUNCH_ENV) else "xla"
  y, total = launch(add_rms_norm_kernel, inputs, outputs, (num_rows,), num_warps, 1,
                    dict(HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=has_residual, EPS=float(eps)),
                    route=route)
  return y, (total if has_residual else x)
