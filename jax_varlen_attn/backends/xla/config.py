"""Block sizes of the XLA backend."""

from __future__ import annotations

import dataclasses

from jax_varlen_attn.spec import AttentionSpec, next_pow2


@dataclasses.dataclass(frozen=True)
class Config:
  """block_q query rows of every sequence and block_k keys are processed per step.

  Memory per step is about batch * block_q * num_heads * block_k scores, whatever the lengths.
  """

  block_q: int = 64
  block_k: int = 128

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Config.{name} must be a positive int, got {value!r}")

  def resolved(self, spec: AttentionSpec) -> "Config":
    """Every field is set already (the backends' common interface)."""
    return self

  @classmethod
  def get_default(cls, spec: AttentionSpec) -> "Config":
    # Every step covers block_q rows of *every* sequence, so size it by the mean query count per
    # sequence (1 for decode batches) rather than the longest: a decode batch then computes no
    # padded rows, and a lone long prefill still takes at most 64 rows a step.
    block_q = min(64, next_pow2(spec.mean_queries_per_sequence))
    # Keys per step: a few pages (whole pages keep gathers aligned), 128 tokens when it divides.
    page = spec.layout.block_size if spec.paged else 1
    block_k = max(page, 128 // page * page) if page <= 128 else page
    return cls(block_q=block_q, block_k=block_k)
