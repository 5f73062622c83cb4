"""The Mosaic GPU prefill kernel's work table in one Triton launch.

    table = work_table(cu_seqlens_q, seqlens_k, num_programs=132, rows_per_program=128,
                       window_left=-1, window_right=0, block_kv=128)   # i32[132, 3]

Row p of the table is program p's (sequence, first query row within it) and, in column 2, the
program at rank p of the heaviest-first order (key tiles, most first, ties by program index,
programs without rows last). It equals `mosaic.program_table` with `mosaic.heaviest_first`'s order
beside it (the XLA form, tested against this kernel), which XLA runs as three small kernels: the
table and weights, the ranks (a reduce it will not fuse with the sequence search, itself a
reduce), the inverse permutation. Here one launch computes all of it: each program takes
BLOCK programs, counts how many of all programs weigh more (or as much, earlier), and scatters
itself to its rank (benchmarks/NOTES.md, session 31).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jax_varlen_attn.backends.triton.call import launch

# Programs a Triton program ranks, and how many it compares them with at once: [BLOCK, BLOCK]
# i32 compares on 4 warps are 32 registers a thread.
BLOCK = 64
# Sequences one step of the sequence search compares at once ([BLOCK, BATCH_BLOCK] compares).
BATCH_BLOCK = 32
NUM_WARPS = 4


@triton.jit
def _program_weights(cu_q_ptr, seqk_ptr, prog, BATCH: tl.constexpr, R: tl.constexpr,
                     WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, BLOCK_KV: tl.constexpr,
                     BATCH_BLOCK: tl.constexpr):
  """(seq, q_lo, weight) of programs `prog`: sequence b owns programs from cu_q[b] // R + b on
  (`mosaic.program_table`); weight = the key tiles its rows need (`pallas.kernel.key_ranges`'s
  hi - lo), -1 for a program without rows."""
  count = tl.zeros_like(prog)
  for b0 in range(0, BATCH, BATCH_BLOCK):
    b = b0 + tl.arange(0, BATCH_BLOCK)
    start = tl.load(cu_q_ptr + b, mask=b < BATCH, other=0) // R + b
    below = (start[None, :] <= prog[:, None]) & (b[None, :] < BATCH)
    count += tl.sum(below.to(tl.int32), axis=1)
  seq = tl.minimum(tl.maximum(count - 1, 0), BATCH - 1)
  q_start = tl.load(cu_q_ptr + seq)
  q_len = tl.load(cu_q_ptr + seq + 1) - q_start
  kv_len = tl.load(seqk_ptr + seq)
  q_lo = (prog - (q_start // R + seq)) * R
  r1 = tl.minimum(q_lo + R, q_len) - 1
  off = kv_len - q_len
  if WINDOW_LEFT >= 0:
    key_lo = tl.maximum(q_lo + off - WINDOW_LEFT, 0)
  else:
    key_lo = tl.zeros_like(prog)
  if WINDOW_RIGHT >= 0:
    key_hi = tl.minimum(r1 + off + WINDOW_RIGHT + 1, kv_len)
  else:
    key_hi = kv_len
  lo = key_lo // BLOCK_KV
  hi = tl.where(key_hi > key_lo, tl.maximum((tl.maximum(key_hi, 0) + BLOCK_KV - 1) // BLOCK_KV, lo),
                lo)
  return seq, q_lo, tl.where(q_lo < q_len, hi - lo, -1)


@triton.jit
def work_table_kernel(
    cu_q_ptr,  # i32[BATCH + 1]: cu_seqlens_q
    seqk_ptr,  # i32[BATCH]: keys per sequence
    table_ptr,  # output i32[N, 3]
    BATCH: tl.constexpr, N: tl.constexpr, R: tl.constexpr, WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK: tl.constexpr,
    BATCH_BLOCK: tl.constexpr,
):
  i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  seq_i, q_lo_i, w_i = _program_weights(cu_q_ptr, seqk_ptr, i, BATCH, R, WINDOW_LEFT, WINDOW_RIGHT,
                                        BLOCK_KV, BATCH_BLOCK)
  rank = tl.zeros_like(i)
  for j0 in range(0, N, BLOCK):
    j = j0 + tl.arange(0, BLOCK)
    _, _, w_j = _program_weights(cu_q_ptr, seqk_ptr, j, BATCH, R, WINDOW_LEFT, WINDOW_RIGHT,
                                 BLOCK_KV, BATCH_BLOCK)
    ahead = (w_j[None, :] > w_i[:, None]) | ((w_j[None, :] == w_i[:, None])
                                             & (j[None, :] < i[:, None]))
    rank += tl.sum((ahead & (j[None, :] < N)).to(tl.int32), axis=1)
  live = i < N
  tl.store(table_ptr + i * 3, seq_i, mask=live)
  tl.store(table_ptr + i * 3 + 1, q_lo_i, mask=live)
  tl.store(table_ptr + rank * 3 + 2, i, mask=live)


def work_table(cu_seqlens_q: jax.Array, seqlens_k: jax.Array, num_programs: int,
               rows_per_program: int, window_left: int, window_right: int,
               block_kv: int) -> jax.Array:
  """i32[num_programs, 3]: the Mosaic kernel's work table (module docstring) in one launch.

  cu_seqlens_q i32[batch + 1], seqlens_k i32[batch] (validated by the caller); the window sides
  and tile sizes are static ints (a side of -1 is unbounded).
  """
  batch = cu_seqlens_q.shape[0] - 1
  inputs = dict(cu_q_ptr=cu_seqlens_q.astype(jnp.int32), seqk_ptr=seqlens_k.astype(jnp.int32))
  grid = (-(-num_programs // BLOCK),)
  (table,) = launch(work_table_kernel, inputs, [jax.ShapeDtypeStruct((num_programs, 3), jnp.int32)],
                    grid, NUM_WARPS, 1,
                    dict(BATCH=batch, N=num_programs, R=rows_per_program, WINDOW_LEFT=window_left,
                         WINDOW_RIGHT=window_right, BLOCK_KV=block_kv, BLOCK=BLOCK,
                         BATCH_BLOCK=BATCH_BLOCK),
                    route="xla")
  return table
