"""Varlen paged attention in plain jax.numpy: the readable statement of the semantics.

Blockwise: an outer loop over chunks of `block_q` query rows of every sequence, an inner loop over
`block_k` keys, with an online softmax, so memory stays bounded by the block sizes (a 32k-token
sequence never builds a 32k x 32k score matrix). Both loops run only as far as the longest sequence
in the batch (their trip counts are data, not shapes: no recompile when lengths change).

The cache is read in place: the k / v buffers are viewed as rows of head_dim elements (a reshape,
which XLA makes a bitcast) and each step gathers only the rows of the pages it needs.

An fp8 cache (or q) is dequantized literally, as the contract states it: float32(element) *
descale[sequence, kv head], per element, before the products. Sinks (s_aux) start each row's
running max at s_aux[h] and its running sum at exp(s_aux[h] - s_aux[h]) = 1: the sink is one more
term of the denominator, with no value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_varlen_attn.backends.xla.config import Config
from jax_varlen_attn.spec import AttentionArrays, AttentionSpec

_NEG_INF = float("-inf")


def _cdiv(a, b):
  return (a + b - 1) // b


def online_softmax_step(m, l, acc, s, v):
  """One step of the online softmax over a tile of scores.

  m, l: f32[..., BQ] running max and sum; acc: f32[..., BQ, D]; s: f32[..., BQ, BK] masked scores
  (-inf where not allowed); v: f32[B, BK, Hk, D] values for the tile (zero where masked).
  """
  m_new = jnp.maximum(m, s.max(-1))
  m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)  # a row with nothing allowed yet stays at 0
  p = jnp.exp(s - m_safe[..., None])
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + p.sum(-1)
  acc = alpha[..., None] * acc + jnp.einsum("bhgqk,bkhd->bhgqd", p, v,
                                            precision=jax.lax.Precision.HIGHEST)
  return m_new, l, acc


def _kv_rows(spec: AttentionSpec, arrays: AttentionArrays, key_pos):
  """Row indices of keys `key_pos` (i32[BK]) of every sequence: (k_rows, v_rows) i32[B, BK, Hk]."""
  heads = jnp.arange(spec.num_kv_heads, dtype=jnp.int32)
  if not spec.paged:
    starts = arrays.kv_index[:-1]  # cu_seqlens_k
    token = jnp.clip(starts[:, None] + key_pos[None, :], 0, max(spec.total_k - 1, 0))
    rows = token[..., None] * spec.num_kv_heads + heads
    return rows, rows
  layout = spec.layout
  st = layout.strides_in_rows()
  block = jnp.clip(key_pos // layout.block_size, 0, spec.max_blocks - 1)
  page = jnp.clip(arrays.kv_index[:, block], 0, layout.num_pages - 1)  # never outside the buffer
  base = page * st["page"] + (key_pos % layout.block_size)[None, :] * st["token"]
  if layout.stacked:
    base = base + jnp.clip(arrays.layer, 0, layout.num_layers - 1) * st["layer"]
  rows = base[..., None] + heads * st["head"]
  return rows + st["k_offset"], rows + st["v_offset"]


def _sink_init(spec: AttentionSpec, arrays: AttentionArrays, BQ: int):
  """(m, l) f32[B, Hk, G, BQ]: the running max and sum every row starts from.

  Without sinks m = -inf, l = 0. With sinks m = s_aux[h] and l = exp(s_aux[h] - m) = 1, so the sink
  joins the denominator once and contributes no value; a -inf sink is none (l = 0).
  """
  B, Hk, G = spec.batch, spec.num_kv_heads, spec.group_size
  shape = (B, Hk, G, BQ)
  if arrays.s_aux is None:
    return jnp.full(shape, _NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32)
  sink = jnp.broadcast_to(arrays.s_aux.astype(jnp.float32).reshape(1, Hk, G, 1), shape)
  return sink, jnp.where(sink == _NEG_INF, 0.0, 1.0)


def attention(spec: AttentionSpec, arrays: AttentionArrays, config: Config):
  """Returns (out [T, H, D] in spec.out_dtype, lse f32[H, T] or None)."""
  B, H, Hk, D, G = spec.batch, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.group_size
  T, BQ, BK = spec.total_q, config.block_q, config.block_k
  f32 = jnp.float32

  # Sequence bounds clamped into [0, T]: garbage cu_seqlens_q can neither index outside q nor make
  # the loops below run past T rows (never a hang).
  cu_q = jnp.clip(arrays.cu_seqlens_q, 0, T)
  q_start = cu_q[:-1]
  len_q = jnp.maximum(cu_q[1:] - q_start, 0)  # [B]
  capacity = spec.max_blocks * spec.layout.block_size if spec.paged else spec.total_k
  len_k = jnp.clip(arrays.seqlens_k, 0, capacity)  # [B]
  k_rows_all = arrays.k.reshape(-1, D)
  v_rows_all = arrays.v.reshape(-1, D)
  slopes = None if arrays.alibi is None else arrays.alibi.astype(f32).reshape(B, Hk, G, 1, 1)
  # f32[B, Hk] each, or None where that tensor is not fp8.
  q_desc, k_desc, v_desc = arrays.q_descale, arrays.k_descale, arrays.v_descale

  num_q_chunks = _cdiv(jnp.max(len_q), BQ)
  num_k_blocks = jnp.minimum(_cdiv(jnp.max(len_k), BK), _cdiv(capacity, BK))

  def q_chunk(c, carry):
    out, lse = carry
    qi = c * BQ + jnp.arange(BQ, dtype=jnp.int32)  # [BQ] query index within its sequence
    q_valid = qi[None, :] < len_q[:, None]  # [B, BQ]
    q_rows = jnp.where(q_valid, q_start[:, None] + qi[None, :], T)  # T: out of range, dropped
    qc = arrays.q[jnp.minimum(q_rows, T - 1)].astype(f32).reshape(B, BQ, Hk, G, D)
    if q_desc is not None:  # an fp8 q: float(element) * q_descale[b, kv head]
      qc = qc * q_desc[:, None, :, None, None]
    qc = qc * spec.scale
    # Bottom-right alignment: query i of a sequence sits at key position i + len_k - len_q.
    diag = qi[None, :] + (len_k - len_q)[:, None]  # [B, BQ]

    def k_block(n, state):
      m, l, acc = state
      key_pos = n * BK + jnp.arange(BK, dtype=jnp.int32)  # [BK]
      k_idx, v_idx = _kv_rows(spec, arrays, key_pos)
      k_valid = key_pos[None, :] < len_k[:, None]  # [B, BK]
      kt = k_rows_all[k_idx].astype(f32)  # [B, BK, Hk, D]
      vt = v_rows_all[v_idx].astype(f32)
      if k_desc is not None:  # an fp8 cache: float(element) * descale[b, kv head]
        kt = kt * k_desc[:, None, :, None]
        vt = vt * v_desc[:, None, :, None]
      # Masked keys may be poison (the unused tail of a last page): zero them so 0 * NaN never occurs.
      vt = jnp.where(k_valid[..., None, None], vt, 0.0)
      s = jnp.einsum("bqhgd,bkhd->bhgqk", qc, kt, precision=jax.lax.Precision.HIGHEST)
      if spec.softcap > 0:
        s = spec.softcap * jnp.tanh(s / spec.softcap)
      rel = diag[:, :, None] - key_pos[None, None, :]  # [B, BQ, BK] = (i + sk - sq) - j
      if slopes is not None:
        s = s - slopes * jnp.abs(rel).astype(f32)[:, None, None]
      allowed = k_valid[:, None, :] & q_valid[:, :, None]
      if spec.causal:
        allowed &= rel >= 0
      if spec.window_left >= 0:
        allowed &= rel <= spec.window_left
      if spec.window_right >= 0:
        allowed &= rel >= -spec.window_right
      s = jnp.where(allowed[:, None, None], s, _NEG_INF)
      return online_softmax_step(m, l, acc, s, vt)

    init = _sink_init(spec, arrays, BQ) + (jnp.zeros((B, Hk, G, BQ, D), f32),)
    m, l, acc = jax.lax.fori_loop(0, num_k_blocks, k_block, init)
    seen = l > 0
    o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    o = o.transpose(0, 3, 1, 2, 4).reshape(B * BQ, H, D)  # [B*BQ, H, D]
    out = out.at[q_rows.reshape(-1)].set(o.astype(out.dtype), mode="drop")
    if lse is not None:
      row_lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
      lse = lse.at[q_rows.reshape(-1)].set(row_lse.transpose(0, 3, 1, 2).reshape(B * BQ, H),
                                           mode="drop")
    return out, lse

  out = jnp.zeros((T, H, D), spec.out_dtype)  # padding rows stay zero
  lse = jnp.full((T, H), jnp.inf, f32) if spec.return_lse else None
  out, lse = jax.lax.fori_loop(0, num_q_chunks, q_chunk, (out, lse))
  return out, None if lse is None else lse.T
