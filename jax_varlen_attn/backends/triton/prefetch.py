"""Weight prefetch into L2 from a small kernel: the HBM reads of the next matmul, started early.

    prefetch_l2(ptr, NBYTES, LANES, BULK)     # in any @triton.jit kernel; its grid shares the work

A decode step of a few rows runs a chain of short kernels (norms, RoPE + cache write, attention)
between its matmuls. Those kernels are bound by latency, not bytes, and the launch gaps between
kernels read nothing at all, so HBM idles for much of a step (benchmarks/NOTES.md, "weight
prefetch"). `prefetch_l2` lets such a kernel ask L2 for the next matmul's weight: one
`prefetch.global.L2` a 128-byte line (BULK False), or one `cp.async.bulk.prefetch.L2` a CHUNK
(BULK True, sm_90+). No register receives anything and nothing is waited on. A hint only: values
never change, whatever is or is not prefetched.

The launchers decide NBYTES (0: the helper compiles to nothing) and pass 0 under Triton's
interpreter (no inline PTX there) and on GPUs before sm_90, and spread the work over a grid of at
least one program an SM (`grid_programs`).
"""

from __future__ import annotations

import jax.numpy as jnp
import triton
import triton.language as tl

from jax_varlen_attn.backends import device, triton_interpreting
from jax_varlen_attn.backends.triton.call import compute_capability

# Bytes one bulk prefetch asks for; a line for the per-line form.
CHUNK = tl.constexpr(16384)
LINE = tl.constexpr(128)
# Which instruction (`prefetch_l2`'s BULK); the serving benchmark sets it per model (experiment).
MODE = "lines"


@triton.jit
def prefetch_l2(ptr, NBYTES: tl.constexpr, LANES: tl.constexpr, BULK: tl.constexpr):
  """Asks L2 for bytes [0, NBYTES) from `ptr` (16-byte aligned), shared by every program of the grid
  (axes 0 and 1), LANES requests a program at a time. NBYTES 0: nothing."""
  if NBYTES > 0:
    STEP: tl.constexpr = CHUNK if BULK else LINE
    N: tl.constexpr = (NBYTES + STEP - 1) // STEP
    programs = tl.num_programs(0) * tl.num_programs(1)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    base = ptr.to(tl.pointer_type(tl.int8))
    for first in range(pid * LANES, N, programs * LANES):
      i = first + tl.arange(0, LANES)
      start = i.to(tl.int64) * STEP
      if BULK:
        # Bytes of each lane's chunk (a multiple of 16; 0 past the end: the instruction is skipped).
        size = tl.where(i < N, tl.minimum(NBYTES - start, STEP), 0).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [base + start, size], dtype=tl.int32, is_pure=False, pack=1)
      else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [base + start, (i < N).to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_bytes(array, limit: int | None = None) -> int:
  """NBYTES for `prefetch_l2` over `array` (None: 0): its size rounded down to 16 bytes and capped at
  `limit`; 0 where the helper cannot run (Triton's interpreter, GPUs before sm_90)."""
  if array is None or triton_interpreting() or compute_capability() < 90:
    return 0
  nbytes = int(array.size) * jnp.dtype(array.dtype).itemsize
  if limit is not None:
    nbytes = min(nbytes, int(limit))
  return nbytes // 16 * 16


def grid_programs(programs: int, nbytes: int) -> int:
  """Programs a grid of `programs` should launch to prefetch nbytes: one an SM at least, so every
  SM's load path shares the requests (a few programs alone issue them far too slowly: NOTES.md)."""
  return max(programs, device.num_sms()) if nbytes else programs


def bulk() -> bool:
  """prefetch_l2's BULK for the next launch (MODE)."""
  return MODE == "bulk"
