"""Block sizes and launch options of the Pallas kernel."""

from __future__ import annotations

import dataclasses
from typing import Optional

from jax_varlen_attn.spec import AttentionSpec, next_pow2

_WARPS = (1, 2, 4, 8, 16)
_MAX_BLOCK_Q = 1024


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiles and launch options of the Pallas kernel; None fields are chosen from the shapes.

  block_q: query tokens of one sequence per program. The program's tile has
    block_m = max(16, next_pow2(block_q * group)) rows (query token x the q heads sharing one kv
    head), so any positive block_q works; rows past block_q * group are padding.
  block_k: keys per step of the inner loop (a power of two >= 16: Triton's tensor and dot sizes).
  num_warps, num_stages: Triton launch options (GPU only; interpret mode ignores them).
  """

  block_q: Optional[int] = None
  block_k: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None

  def __post_init__(self):
    if self.block_q is not None and (not _is_int(self.block_q)
                                     or not 1 <= self.block_q <= _MAX_BLOCK_Q):
      raise ValueError(f"Config.block_q must be an int in [1, {_MAX_BLOCK_Q}] or None, "
                       f"got {self.block_q!r}")
    if self.block_k is not None and (not _is_int(self.block_k) or self.block_k < 16
                                     or self.block_k & (self.block_k - 1)):
      raise ValueError(f"Config.block_k must be a power of two >= 16 or None, got {self.block_k!r}")
    if self.num_warps is not None and (not _is_int(self.num_warps) or self.num_warps not in _WARPS):
      raise ValueError(f"Config.num_warps must be one of {_WARPS} or None, got {self.num_warps!r}")
    if self.num_stages is not None and (not _is_int(self.num_stages) or self.num_stages < 1):
      raise ValueError(f"Config.num_stages must be a positive int or None, got {self.num_stages!r}")

  @classmethod
  def get_default(cls, spec: AttentionSpec) -> "Config":
    return cls().resolved(spec)

  def resolved(self, spec: AttentionSpec) -> "Config":
    """This config with every None field chosen from the static shapes (never from lengths)."""
    group = spec.group_size
    # Rows per tile: at most 128 (FlashAttention-2's tile for head_dim <= 128), 64 for wider heads
    # so the f32 accumulator [rows, head_dim] still fits in registers; never fewer than the whole
    # GQA group (the group is one program's M dimension).
    max_m = max(128 if spec.head_dim <= 128 else 64, next_pow2(group))
    block_q = self.block_q
    if block_q is None:
      # Query tokens a program should cover: the mean per sequence (1 for decode), so a decode batch
      # does not pad every sequence to a prefill-sized tile; the static max_seqlen_q bounds it.
      mean_q = spec.mean_queries_per_sequence
      # tl.dot needs M >= 16: rows are paid for anyway, so let block_q fill them (block_m // group);
      # a bigger block_q also shrinks the grid bound cdiv(total_q, block_q) + batch.
      block_m = min(max(16, next_pow2(mean_q * group)), max_m)
      block_q = max(1, block_m // group)
    # 64 keys a step keeps a K / V tile at 16 KB (fp16, head_dim 128); halve it for wider heads so
    # two stages of K and V still fit in shared memory.
    block_k = self.block_k or (64 if spec.head_dim <= 128 else 32)
    block_m = self.block_m_for(block_q, group)
    # One 16-row MMA slab per warp: 8 warps for 128-row tiles, 4 below.
    num_warps = self.num_warps or (8 if block_m >= 128 else 4)
    # Three stages pipeline the K / V loads of big tiles; two where registers / smem are tight.
    num_stages = self.num_stages or (3 if block_m >= 64 and spec.head_dim <= 128 else 2)
    return dataclasses.replace(self, block_q=block_q, block_k=block_k, num_warps=num_warps,
                               num_stages=num_stages)

  @staticmethod
  def block_m_for(block_q: int, group: int) -> int:
    """Rows of a program's tile: block_q tokens x group heads, rounded up to a power of two
    (Triton tensor shapes) and to at least 16 (the minimum M of tl.dot)."""
    return max(16, next_pow2(block_q * group))
