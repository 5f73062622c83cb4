"""Naive paged attention in plain `jax.numpy`: the baseline the serving benchmark compares against.

    out = naive_paged_attention(q, k_cache, v_cache, cu_seqlens_q=cu, seqused_k=used,
                                block_table=table, layer=jnp.int32(3))

What a first JAX port of a serving loop does: every query token gathers its sequence's *whole*
block-table range of keys and values ([T, max_blocks * block_size, Hk, D], a copy), scores all of
them, and masks. Memory and bytes grow with T x max_blocks x block_size; no tiling, no online
softmax. It states the semantics readably and is what `flash_attn_varlen_func` is measured against
inside a model (`ModelConfig(backend="naive")`); for anything else use `flash_attn_varlen_func`.

Covers what the Flax layer needs: NHD caches ([num_blocks, block_size, Hk, D], or layer-stacked
[L, num_blocks, block_size, Hk, D] with `layer`), causal (bottom-right aligned) or not, GQA, the
default or a given softmax scale, an fp8 cache with k / v descales, attention sinks. Padding query
rows (past cu_seqlens_q[-1]) return zeros.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp


def naive_paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *,
                          cu_seqlens_q: jax.Array, seqused_k: jax.Array, block_table: jax.Array,
                          causal: bool = True, softmax_scale: Optional[float] = None,
                          layer: Optional[jax.Array] = None, k_descale: Optional[jax.Array] = None,
                          v_descale: Optional[jax.Array] = None,
                          s_aux: Optional[jax.Array] = None) -> jax.Array:
  """Attention of q [T, H, D] over an NHD paged cache; returns [T, H, D] in q's dtype.

  Args (B = sequences, T = query tokens incl. padding, Hk = kv heads, H = q heads, H % Hk == 0):
    q: [T, H, D].
    k_cache, v_cache: [num_blocks, block_size, Hk, D] or, with `layer`, [L, num_blocks,
      block_size, Hk, D].
    cu_seqlens_q: i32[B + 1], sequence b's queries are rows cu[b]:cu[b + 1].
    seqused_k: i32[B], keys of each sequence (its last query sits at key seqused_k[b] - 1).
    block_table: i32[B, max_blocks], page of each block of keys.
    causal: bottom-right aligned causal mask.
    softmax_scale: default 1 / sqrt(D).
    layer: i32[] selecting the layer of a stacked cache (traced is fine).
    k_descale, v_descale: f32[B, Hk] or f32[] (None: 1.0): an fp8 cache's keys are
      float(element) * k_descale[sequence, kv head], likewise values (flash_attn_varlen_func's rule).
    s_aux: f32[H] sink logits: each joins its head's softmax denominator with no value.
  Returns [T, H, D] in q's dtype (not fp8: the output of an fp8 q is flash_attn_varlen_func's).
  """
  if (k_cache.ndim == 5) != (layer is not None):
    raise ValueError("naive_paged_attention: a 5-D (layer-stacked) cache needs `layer`, a 4-D one "
                     f"must not get it; got k_cache of rank {k_cache.ndim} and layer={layer!r}")
  if layer is not None:
    k_cache, v_cache = k_cache[layer], v_cache[layer]
  num_tokens, num_heads, head_dim = q.shape
  num_blocks, block_size, num_kv_heads, _ = k_cache.shape
  group = num_heads // num_kv_heads
  scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
  max_keys = block_table.shape[1] * block_size

  rows = jnp.arange(num_tokens, dtype=jnp.int32)
  seq = jnp.clip(jnp.searchsorted(cu_seqlens_q, rows, side="right") - 1, 0,
                 block_table.shape[0] - 1)  # [T]
  real = rows < cu_seqlens_q[-1]
  q_len = cu_seqlens_q[seq + 1] - cu_seqlens_q[seq]
  k_len = seqused_k[seq]
  pages = jnp.clip(block_table[seq], 0, num_blocks - 1)  # [T, max_blocks]
  keys = k_cache[pages].reshape(num_tokens, max_keys, num_kv_heads, head_dim).astype(jnp.float32)
  values = v_cache[pages].reshape(num_tokens, max_keys, num_kv_heads, head_dim).astype(jnp.float32)
  if k_descale is not None:  # [B, Hk] or a scalar: each token's sequence's row
    keys = keys * jnp.broadcast_to(k_descale, (block_table.shape[0], num_kv_heads))[seq][:, None, :, None]
  if v_descale is not None:
    values = values * jnp.broadcast_to(v_descale, (block_table.shape[0], num_kv_heads))[seq][:, None, :, None]

  # fp32 inputs get fp32 products (a GPU would otherwise use tf32); half inputs the default.
  precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
  scores = jnp.einsum("tkgd,tskd->tkgs", qg, keys, precision=precision) * scale  # [T, Hk, G, S]
  key_pos = jnp.arange(max_keys, dtype=jnp.int32)[None, :]
  allowed = key_pos < k_len[:, None]  # [T, S]
  if causal:  # query i of a sequence sits at key position k_len - q_len + i
    q_pos = k_len - q_len + (rows - cu_seqlens_q[seq])
    allowed = allowed & (key_pos <= q_pos[:, None])
  allowed = allowed & real[:, None]
  scores = jnp.where(allowed[:, None, None, :], scores, -jnp.inf)
  top = jnp.max(scores, axis=-1, keepdims=True)
  sink = None
  if s_aux is not None:  # one more logit per row, in the denominator only
    sink = jnp.broadcast_to(s_aux.astype(jnp.float32).reshape(1, num_kv_heads, group, 1), top.shape)
    sink = jnp.where(real[:, None, None, None], sink, -jnp.inf)  # padding rows stay zeros
    top = jnp.maximum(top, sink)
  shift = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(scores - shift)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  if sink is not None:
    total = total + jnp.exp(sink - shift)
  weights = weights / jnp.where(total > 0, total, 1.0)  # a row with no key gives zeros
  # Masked keys' values may be anything (unused pages, NaN included): 0 x NaN would leak, so zero them.
  values = jnp.where(allowed[:, :, None, None], values, 0.0)
  out = jnp.einsum("tkgs,tskd->tkgd", weights, values, precision=precision)
  return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
