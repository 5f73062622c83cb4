"""Weight prefetch into L2 from a small kernel: the HBM reads of the next matmul, started early.

    prefetch_l2(ptr, NBYTES, LANES)     # in any @triton.jit kernel; its grid shares the work

A decode step of a few rows runs a chain of short kernels (norms, RoPE + cache write, attention)
between its matmuls. Those kernels are bound by latency, not bytes, and the launch gaps between
kernels read nothing at all, so HBM idles for much of a step (benchmarks/NOTES.md, "weight
prefetch"). `prefetch_l2` lets such a kernel start streaming the next matmul's weight into L2 with
`cp.async.bulk.prefetch.L2` (sm_90+): one instruction a chunk, no registers held, nothing waited
on; the copies run on after the kernel exits, and the matmul that follows finds its weight in L2 or
already on the way. A hint only: values never change, whatever is or is not prefetched.

The launchers decide NBYTES (0: the helper compiles to nothing) and pass 0 under Triton's
interpreter (no inline PTX there) and on GPUs before sm_90.
"""

from __future__ import annotations

import jax.numpy as jnp
import triton
import triton.language as tl

from jax_varlen_attn.backends import triton_interpreting
from jax_varlen_attn.backends.triton.call import compute_capability

# Bytes one prefetch instruction asks for: 16 KiB keeps ~1000 instructions a 16 MB weight, a few a
# lane for the smallest grids (4 programs of 128 threads).
CHUNK = tl.constexpr(16384)


@triton.jit
def prefetch_l2(ptr, NBYTES: tl.constexpr, LANES: tl.constexpr):
  """Asks L2 for bytes [0, NBYTES) from `ptr` (16-byte aligned), shared by every program of the grid
  (axes 0 and 1), LANES chunks a program at a time. NBYTES 0: nothing."""
  if NBYTES > 0:
    N_CHUNKS: tl.constexpr = (NBYTES + CHUNK - 1) // CHUNK
    programs = tl.num_programs(0) * tl.num_programs(1)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    base = ptr.to(tl.pointer_type(tl.int8))
    for first in range(pid * LANES, N_CHUNKS, programs * LANES):
      chunk = first + tl.arange(0, LANES)
      start = chunk.to(tl.int64) * CHUNK
      # Bytes of each lane's chunk (a multiple of 16; 0 past the end: the instruction is skipped).
      size = tl.where(chunk < N_CHUNKS, tl.minimum(NBYTES - start, CHUNK), 0).to(tl.int32)
      tl.inline_asm_elementwise(
          "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
          "=r,l,r", [base + start, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_bytes(array, limit: int | None = None) -> int:
  """NBYTES for `prefetch_l2` over `array` (None: 0): its size rounded down to 16 bytes and capped at
  `limit`; 0 where the helper cannot run (Triton's interpreter, GPUs before sm_90)."""
  if array is None or triton_interpreting():
    return 0
  if compute_capability() < 90:
    return 0
  nbytes = int(array.size) * jnp.dtype(array.dtype).itemsize
  if limit is not None:
    nbytes = min(nbytes, int(limit))
  return nbytes // 16 * 16
