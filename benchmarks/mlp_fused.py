"""Experiment (issue 15): the decode step's whole MLP as one Triton kernel (bench_gemv --mlp).

down(silu(x @ Wg) * (x @ Wu)) for a few rows x [M, H] (M <= 16, a batch-1 step's 4), in one launch
instead of XLA's four kernels (gate|up GEMM, silu * up with its split-K sum, down GEMM, down's sum).
Program p owns BI columns of the intermediate I (48 gives 128 programs for I = 6144, one an SM):
it streams its gate and up columns over all of H (phase 1, an f32 [16, BI] pair), forms
h = silu(g) * u in bf16 as the model does, then multiplies
h into its BI rows of Wd (phase 2), which gives a partial of the *whole* [M, H] output. The I / BI
partials are summed afterwards: written as f32 [P, M, H] ("partials", one XLA reduce) or added
into one zeroed f32 [M, H] by atomics ("atomic"). "prefetch" (sm_90) asks L2 for the program's rows
of Wd before phase 1, so the HBM stream does not pause between the phases.

Weights: gate and up laid out per program, `block_gate_up(wg, wu, bi)` -> [P, H, 2 * BI] (program
p's gate columns then its up columns, one contiguous 2 * BI * H run), so phase 1 streams one
contiguous region; Wd [I, H] as the model stores it (program p's rows are contiguous already).

Not in the library: it asked whether one fill and drain over the MLP's 75 MB beats XLA's four
kernels at 4 rows (benchmarks/NOTES.md, "Still open": the largest candidate left for batch 1). On
an H200 it did not (session 41 item 1): the kernel streams at 73-75% of the read ceiling, taking as
long as XLA's four together (22.4 us), and the sum of its partials makes it 0.8-1.5 us slower.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jax_varlen_attn.backends.triton.call import launch

ROWS = 16  # x's rows padded to the MMA's M
PREFETCH_CHUNK = 16384  # bytes a cp.async.bulk.prefetch asks for


@triton.jit
def fused_mlp_kernel(x_ptr, wgu_ptr, wd_ptr, zeros_ptr, out_ptr, M: tl.constexpr, H: tl.constexpr,
                     BLOCK_M: tl.constexpr, BI: tl.constexpr, BI_PAD: tl.constexpr,
                     BK: tl.constexpr, BN: tl.constexpr, ATOMIC: tl.constexpr, PREFETCH: tl.constexpr,
                     CHUNK: tl.constexpr, CHUNKS: tl.constexpr, CHUNKS_PAD: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
  """out: f32[P, M, H] partials (ATOMIC false) or f32[M, H] summed by atomics (out aliases zeros_ptr,
  a zeroed f32[M, H]; unused without ATOMIC)."""
  p = tl.program_id(0)
  offs_m = tl.arange(0, BLOCK_M)
  rows = offs_m < M
  if PREFETCH:  # phase 2's rows of Wd asked into L2 now: one HBM stream, no gap between the phases
    c = tl.arange(0, CHUNKS_PAD)
    start = c.to(tl.int64) * CHUNK
    size = tl.where(c < CHUNKS, CHUNK, 0).to(tl.int32)  # 0: the lane past the last chunk asks nothing
    d_bytes = (wd_ptr + p.to(tl.int64) * BI * H).to(tl.pointer_type(tl.int8))
    tl.inline_asm_elementwise(
        "{ .reg .pred q; setp.ne.u32 q, $2, 0; @q cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [d_bytes + start, size], dtype=tl.int32, is_pure=False, pack=1)
  offs_i = tl.arange(0, BI_PAD)  # BI columns, padded to a power of two (the pad masked: no bytes)
  cols = offs_i < BI
  EVICT: tl.constexpr = "evict_first" if PREFETCH else ""  # gate|up must not push the prefetch out
  g = tl.zeros([BLOCK_M, BI_PAD], tl.float32)
  u = tl.zeros([BLOCK_M, BI_PAD], tl.float32)
  base = wgu_ptr + p.to(tl.int64) * H * 2 * BI
  for k0 in tl.range(0, H, BK, num_stages=NUM_STAGES):
    offs_k = k0 + tl.arange(0, BK)
    x = tl.load(x_ptr + offs_m[:, None] * H + offs_k[None, :], mask=rows[:, None], other=0.0)
    w_at = base + offs_k[:, None] * (2 * BI) + offs_i[None, :]
    if BI == BI_PAD:
      g += tl.dot(x, tl.load(w_at, eviction_policy=EVICT))
      u += tl.dot(x, tl.load(w_at + BI, eviction_policy=EVICT))
    else:
      g += tl.dot(x, tl.load(w_at, mask=cols[None, :], other=0.0, eviction_policy=EVICT))
      u += tl.dot(x, tl.load(w_at + BI, mask=cols[None, :], other=0.0, eviction_policy=EVICT))
  g = g.to(x_ptr.dtype.element_ty).to(tl.float32)
  u = u.to(x_ptr.dtype.element_ty).to(tl.float32)
  h = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty)
  d_rows = wd_ptr + (p * BI + offs_i).to(tl.int64)[:, None] * H
  for n0 in tl.range(0, H, BN, num_stages=NUM_STAGES):
    offs_n = n0 + tl.arange(0, BN)
    if BI == BI_PAD:
      part = tl.dot(h, tl.load(d_rows + offs_n[None, :]))
    else:
      part = tl.dot(h, tl.load(d_rows + offs_n[None, :], mask=cols[:, None], other=0.0))
    at = offs_m[:, None] * H + offs_n[None, :]
    if ATOMIC:
      tl.atomic_add(out_ptr + at, part, mask=rows[:, None], sem="relaxed")
    else:
      tl.store(out_ptr + p.to(tl.int64) * M * H + at, part, mask=rows[:, None])


def block_gate_up(wg, wu, bi: int):
  """wg, wu [H, I] -> [I / bi, H, 2 * bi]: program p's gate columns, then its up columns."""
  h, i = wg.shape
  g = wg.reshape(h, i // bi, bi).transpose(1, 0, 2)
  u = wu.reshape(h, i // bi, bi).transpose(1, 0, 2)
  return jnp.concatenate([g, u], axis=2)


def fused_mlp(x, wgu_blocked, wd, bi: int, bk: int, bn: int, num_warps: int, num_stages: int,
              atomic: bool, prefetch: bool = False):
  """x [M, H] -> [M, H] (x's dtype): the MLP through `fused_mlp_kernel` and the sum of its partials."""
  (m, h), (p, _, _), i = x.shape, wgu_blocked.shape, wd.shape[0]
  if m > ROWS or h % bk or h % bn or i != p * bi:
    raise ValueError(f"x {x.shape}, wgu {wgu_blocked.shape}, wd {wd.shape}: bi={bi} bk={bk} bn={bn}")
  d_bytes = bi * h * wd.dtype.itemsize  # program p's rows of Wd, asked into L2 under PREFETCH
  chunks = -(-d_bytes // PREFETCH_CHUNK)
  if d_bytes % chunks or (d_bytes // chunks) % 16:
    raise ValueError(f"{d_bytes} bytes of Wd a program do not split into {chunks} chunks of 16-byte units")
  consts = dict(M=m, H=h, BLOCK_M=ROWS, BI=bi, BI_PAD=triton.next_power_of_2(bi), BK=bk, BN=bn,
                ATOMIC=atomic, PREFETCH=prefetch, CHUNK=d_bytes // chunks, CHUNKS=chunks,
                CHUNKS_PAD=triton.next_power_of_2(chunks), NUM_STAGES=num_stages)
  if atomic:
    [y] = launch(fused_mlp_kernel, dict(x_ptr=x, wgu_ptr=wgu_blocked, wd_ptr=wd,
                                        zeros_ptr=jnp.zeros((m, h), jnp.float32)),
                 [jax.ShapeDtypeStruct((m, h), jnp.float32)], (p,), num_warps, num_stages, consts,
                 input_output_aliases={"zeros_ptr": 0})
    return y.astype(x.dtype)
  [y] = launch(fused_mlp_kernel, dict(x_ptr=x, wgu_ptr=wgu_blocked, wd_ptr=wd,
                                      zeros_ptr=jnp.zeros((1,), jnp.float32)),
               [jax.ShapeDtypeStruct((p, m, h), jnp.float32)], (p,), num_warps, num_stages, consts)
  return jnp.sum(y, axis=0).astype(x.dtype)
