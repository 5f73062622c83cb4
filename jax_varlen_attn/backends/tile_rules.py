"""Tile rules the Triton and Pallas kernels share: both run FlashAttention-2 tiles of (query token x
GQA head) rows over a paged cache, so where the reason is the tile's shape it is written once here.
Rules with a backend-specific measurement stay in that backend's config (NOTES.md "Tile rules").
"""

from __future__ import annotations

from jax_varlen_attn.spec import next_pow2

MIN_ROWS = 16  # tl.dot's minimum M


def max_rows(head_dim: int, group: int) -> int:
  """Most rows of a tile: 128 (FlashAttention-2's tile for head_dim <= 128), 64 for wider heads so
  the f32 accumulator [rows, head_dim] fits in registers; never fewer than the whole GQA group
  (one program's M dimension holds it)."""
  return max(128 if head_dim <= 128 else 64, next_pow2(group))


def rows_for_queries(mean_queries: float, group: int, limit: int) -> int:
  """Rows for a program covering `mean_queries` query tokens (the mean per sequence: 1 for decode, so
  a decode batch does not pad every sequence to a prefill tile) x the group, as a power of two in
  [MIN_ROWS, limit]."""
  return min(max(MIN_ROWS, next_pow2(mean_queries * group)), limit)


def num_stages(block_m: int, head_dim: int) -> int:
  """Three stages pipeline the K / V loads of big tiles; two where registers / smem are tight."""
  return 3 if block_m >= 64 and head_dim <= 128 else 2
