"""Block sizes and launch options of the Pallas kernel."""

from __future__ import annotations

import dataclasses
from typing import Optional

from jax_varlen_attn.backends import tile_rules
from jax_varlen_attn.backends.config_checks import check_int_range, check_launch_options, check_pow2
from jax_varlen_attn.spec import AttentionSpec, next_pow2

_MAX_BLOCK_Q = 1024
KERNELS = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiles and launch options of the Pallas kernel; None fields are chosen from the shapes.

  block_q: query tokens of one sequence per program. The program's tile has
    block_m = max(16, next_pow2(block_q * group)) rows (query token x the q heads sharing one kv
    head), so any positive block_q works; rows past block_q * group are padding.
  block_k: keys per step of the inner loop (a power of two >= 16: Triton's tensor and dot sizes).
  num_warps, num_stages: Triton launch options (GPU only; interpret mode ignores them).
  kernel: which kernel runs on a CUDA GPU: "triton" (kernel.py through Pallas's Triton lowering)
    or "mosaic" (`mosaic.py`: a Hopper kernel in Mosaic GPU; a call it does not cover raises
    ValueError saying why); None: "mosaic" where `mosaic.preferred` says so, else "triton".
    Off the GPU both run kernel.py in interpret mode. The block sizes above are kernel.py's.
  """

  block_q: Optional[int] = None
  block_k: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  kernel: Optional[str] = None

  def __post_init__(self):
    if self.kernel is not None and self.kernel not in KERNELS:
      raise ValueError(f"Config.kernel must be one of {KERNELS} or None, got {self.kernel!r}")
    check_int_range("block_q", self.block_q, 1, _MAX_BLOCK_Q)
    check_pow2("block_k", self.block_k, 16)  # Triton's tensor and dot sizes
    check_launch_options(self.num_warps, self.num_stages)

  @classmethod
  def get_default(cls, spec: AttentionSpec) -> "Config":
    return cls().resolved(spec)

  def resolved(self, spec: AttentionSpec) -> "Config":
    """This config with every None field chosen from the static shapes (never from lengths)."""
    group = spec.group_size
    block_q = self.block_q
    if block_q is None:
      # The shared row rule; rows are paid for anyway, so let block_q fill them (block_m // group):
      # a bigger block_q also shrinks the grid bound cdiv(total_q, block_q) + batch.
      block_m = tile_rules.rows_for_queries(spec.mean_queries_per_sequence, group,
                                            tile_rules.max_rows(spec.head_dim, group))
      block_q = max(1, block_m // group)
    # 64 keys a step keeps a K / V tile at 16 KB (fp16, head_dim 128); halve it for wider heads so
    # two stages of K and V still fit in shared memory.
    block_k = self.block_k or (64 if spec.head_dim <= 128 else 32)
    block_m = self.block_m_for(block_q, group)
    # One 16-row MMA slab per warp: 8 warps for 128-row tiles, 4 below. (The Triton kernel measured
    # 4 faster at 128 rows; not measured on this lowering: NOTES.md "Tile rules".)
    num_warps = self.num_warps or (8 if block_m >= 128 else 4)
    num_stages = self.num_stages or tile_rules.num_stages(block_m, spec.head_dim)
    return dataclasses.replace(self, block_q=block_q, block_k=block_k, num_warps=num_warps,
                               num_stages=num_stages)

  @staticmethod
  def block_m_for(block_q: int, group: int) -> int:
    """Rows of a program's tile: block_q tokens x group heads, rounded up to a power of two
    (Triton tensor shapes) and to at least 16 (the minimum M of tl.dot)."""
    return max(tile_rules.MIN_ROWS, next_pow2(block_q * group))
