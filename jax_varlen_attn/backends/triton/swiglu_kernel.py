"""The Triton kernel of `jax_varlen_attn.nn.partials.silu_mul`: silu(gate) * up, summing split-K
partials as it reads them.

    x [rows, 2 * INTER] (gate | up), or f32 [PARTS, rows, 2 * INTER] partials --> [rows, INTER]

One program per (row, BLOCK columns). The math and its roundings are those of
`jax_varlen_attn.nn.partials.silu_mul_xla`.
"""

from __future__ import annotations

import os

import jax
import triton
import triton.language as tl

from jax_varlen_attn.backends.triton.call import LAUNCH_ENV, launch
from jax_varlen_attn.spec import next_pow2

# Columns a program: 8 a thread on 4 warps (enough programs for a few rows: 4 x 6144 -> 24).
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _half(x_ptr, offs, ok, part_stride, PARTS: tl.constexpr, BLOCK: tl.constexpr):
  """One half of a row (BLOCK columns at offs): the partials' f32 sum if PARTS > 0, else as stored."""
  if PARTS > 0:
    total = tl.zeros([BLOCK], tl.float32)
    for p in tl.static_range(PARTS):
      total += tl.load(x_ptr + p * part_stride + offs, mask=ok, other=0.0)
    return total
  return tl.load(x_ptr + offs, mask=ok, other=0.0)


@triton.jit
def silu_mul_kernel(
    x_ptr,  # [rows, 2 * INTER] (gate | up); PARTS > 0: f32 [PARTS, rows, 2 * INTER] partials
    y_ptr,  # output [rows, INTER]: silu(gate) * up
    INTER: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr,
):
  dtype = y_ptr.dtype.element_ty
  row = tl.program_id(0).to(tl.int64)
  cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
  ok = cols < INTER
  part_stride = tl.num_programs(0).to(tl.int64) * (2 * INTER)
  # Both halves rounded to the output dtype first, as the matmul's output would be.
  gate = _half(x_ptr, row * (2 * INTER) + cols, ok, part_stride, PARTS, BLOCK).to(dtype).to(tl.float32)
  up = _half(x_ptr, row * (2 * INTER) + INTER + cols, ok, part_stride, PARTS, BLOCK).to(dtype).to(tl.float32)
  y = gate / (1.0 + tl.exp(-gate)) * up
  tl.store(y_ptr + row * INTER + cols, y.to(dtype), mask=ok)


def silu_mul(x, dtype):
  """The Triton launch: x [T, 2 I] or f32 partials [S, T, 2 I] (validated by `silu_mul`) -> [T, I]."""
  parts = x.shape[0] if x.ndim == 3 else 0
  rows, width = x.shape[-2:]
  inter = width // 2
  block = min(BLOCK, max(16, next_pow2(inter)))
  # XLA's Triton call (unless $JAX_VARLEN_ATTN_LAUNCH says), as add_rms_norm: inside XLA's command
  # buffers.
  route = None if os.environ.get(LAUNCH_ENV) else "xla"
  (y,) = launch(silu_mul_kernel, dict(x_ptr=x), [jax.ShapeDtypeStruct((rows, inter), dtype)],
                (rows, triton.cdiv(inter, block)), NUM_WARPS, 1,
                dict(INTER=inter, BLOCK=block, PARTS=parts), route=route)
  return y
