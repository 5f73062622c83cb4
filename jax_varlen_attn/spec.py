"""The static description of one attention call, shared by every backend.

`api` validates the caller's arguments and builds an `AttentionSpec`; backends read only this object
and the normalized arrays (see `AttentionArrays`). Everything here is static (hashable): it is part of
the `jax.jit` compile key, so it holds shapes and options, never lengths.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax

from jax_varlen_attn.layout import KVCacheLayout

# The fp8 formats a KV cache (and q) may have: an element is dequantized as float(element) * descale.
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
# The output dtype when q itself is fp8 (FlashAttention 3's choice, so vLLM's fp8 path ports as is):
# bf16 holds every dequantized product's range, fp16 could overflow past 65504.
FP8_Q_OUT_DTYPE = "bfloat16"


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  total_q: int  # rows of q (padding rows past cu_seqlens_q[-1] included)
  num_heads: int
  num_kv_heads: int
  head_dim: int
  batch: int
  # paged: `layout` describes the cache and `max_blocks` is block_table's width.
  # non-paged: layout is None and k / v are [total_k, Hk, D] rows addressed through cu_seqlens_k.
  layout: Optional[KVCacheLayout]
  max_blocks: int  # paged only (0 otherwise)
  total_k: int  # non-paged only (0 otherwise)
  max_seqlen_q: int  # static upper bound of any sequence's query count
  max_seqlen_k: int  # static upper bound of any sequence's key count
  scale: float
  causal: bool
  window_left: int  # -1: unbounded
  window_right: int  # -1: unbounded; 0 under causal
  softcap: float  # 0: off
  has_alibi: bool
  return_lse: bool
  dtype: str  # dtype of q (the output's too, unless q is fp8: see out_dtype)
  # An fp8 cache's dtype (one of FP8_DTYPES), dequantized with k / v descales; None: the cache has
  # q's dtype and no descale applies.
  kv_dtype: Optional[str] = None
  has_sinks: bool = False  # s_aux: a per-head logit in every row's softmax denominator

  @property
  def kv_fp8(self) -> bool:
    return self.kv_dtype is not None

  @property
  def q_fp8(self) -> bool:
    return self.dtype in FP8_DTYPES

  @property
  def out_dtype(self) -> str:
    """The output's dtype: q's, or FP8_Q_OUT_DTYPE for an fp8 q."""
    return FP8_Q_OUT_DTYPE if self.q_fp8 else self.dtype

  @property
  def paged(self) -> bool:
    return self.layout is not None

  @property
  def group_size(self) -> int:
    """q heads per kv head (GQA ratio)."""
    return self.num_heads // self.num_kv_heads

  @property
  def mean_queries_per_sequence(self) -> int:
    """ceil(total_q / batch), at most max_seqlen_q, at least 1: 1 for a decode batch.

    Backends size query tiles by it, so a decode batch does not pad every sequence to a
    prefill-sized tile (it is static: shapes only, never lengths).
    """
    return max(1, min(-(-self.total_q // self.batch), self.max_seqlen_q))

  def query_programs(self, block_q: int) -> int:
    """Programs along the query axis of a (query block, kv head) grid: a static bound, no host sync.

    Sequence b gets programs [cu_q[b] // block_q + b, cu_q[b+1] // block_q + b + 1), at least
    ceil(len_b / block_q) of them; the padding rows after the last sequence need
    ceil((total_q - cu_q[-1]) / block_q) more. Summed, that is at most cdiv(total_q, block_q) + batch.
    """
    return -(-self.total_q // block_q) + self.batch


def next_pow2(n: int) -> int:
  """Smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(0, int(n) - 1).bit_length()


class AttentionArrays(NamedTuple):
  """The arrays of one call, normalized by `api` (shapes use AttentionSpec's names).

  q:            [total_q, H, D]
  k, v:         paged: the caller's cache buffers as passed (v is k when V lives in k's buffer);
                non-paged: [total_k, Hk, D]
  cu_seqlens_q: i32[batch + 1]
  seqlens_k:    i32[batch]  keys of each sequence (seqused_k, else diff of cu_seqlens_k)
  kv_index:     paged: block_table i32[batch, max_blocks]; non-paged: cu_seqlens_k i32[batch + 1]
  alibi:        f32[batch, H] or None
  layer:        i32[] or None (stacked caches)
  q_descale:    f32[batch, Hk] or None: q's dequantization scales (an fp8 q only)
  k_descale, v_descale: f32[batch, Hk] or None: the cache's dequantization scales (an fp8 cache
                only; ones where the caller passed none)
  s_aux:        f32[H] or None: attention sinks
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  cu_seqlens_q: jax.Array
  seqlens_k: jax.Array
  kv_index: jax.Array
  alibi: Optional[jax.Array]
  layer: Optional[jax.Array]
  q_descale: Optional[jax.Array] = None
  k_descale: Optional[jax.Array] = None
  v_descale: Optional[jax.Array] = None
  s_aux: Optional[jax.Array] = None
