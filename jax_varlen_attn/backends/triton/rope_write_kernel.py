"""The Triton kernel of `jax_varlen_attn.nn.rope_write_kv`: one launch from a fused q|k|v projection
to attention's inputs.

    qkv [T, (H + 2 Hk) * D] --> q [T, H, D]             (RMSNorm per head, RoPE)
                            --> K rows into the cache   (RMSNorm per head, RoPE)
                            --> V rows into the cache   (as they are)

One program takes BLOCK_T tokens of one head: a q head (programs 0..H-1 of grid axis 1), or a kv
head's K and V rows (H..H+Hk-1). Each head row is read as two halves (x1 | x2, the pairs RoPE
rotates), so the rotation needs no gather. The cache is an input aliased to its output, written
only at the rows the slots name (`write_kernel.cache_rows`, the rule of `write_kv`: slot -1, a slot
outside the cache and a stacked layer out of range write nothing).

In a model's decode step this replaces four small XLA kernels (q / k norms, RoPE, V's slice) and
the `write_kv` launch with one launch: -7% of a decode step's GPU time at batch 1 and 16
(benchmarks/NOTES.md, "rope_write_kv").
The math and its roundings are those of `jax_varlen_attn.nn.qkv.rope_write_kv_xla`: f32 throughout,
the normed head rounded to the compute dtype before RoPE (as `nnx.RMSNorm` then `apply_rope` do).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jax_varlen_attn.backends.triton.call import launch, route_for
from jax_varlen_attn.backends.triton.write_kernel import cache_rows, layout_constexprs, tokens_per_program
from jax_varlen_attn.layout import KVCacheLayout
from jax_varlen_attn.spec import next_pow2


@triton.jit
def _norm_rope(x1, x2, w1, w2, cos, sin, QK_NORM: tl.constexpr, EPS: tl.constexpr,
               HEAD_DIM: tl.constexpr, dtype: tl.constexpr):
  """One head's rows as halves x1 | x2 (f32[BLOCK_T, HALF_PAD], zero past HEAD_DIM / 2): RMSNorm
  with scale w1 | w2 (QK_NORM), rounded to dtype, then rotated by (cos, sin); returns the halves in
  dtype."""
  if QK_NORM:
    mean_sq = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM
    r = tl.rsqrt(mean_sq + EPS)[:, None]
    x1 = (x1 * (r * w1[None, :])).to(dtype).to(tl.float32)
    x2 = (x2 * (r * w2[None, :])).to(dtype).to(tl.float32)
  return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _norm_scale(norm_ptr, offs_h, cols, HALF: tl.constexpr, HALF_PAD: tl.constexpr, QK_NORM: tl.constexpr):
  """The two halves of an RMSNorm scale [HEAD_DIM] as f32 (zeros without QK_NORM: never used)."""
  if QK_NORM:
    w1 = tl.load(norm_ptr + offs_h, mask=cols, other=0.0).to(tl.float32)
    w2 = tl.load(norm_ptr + HALF + offs_h, mask=cols, other=0.0).to(tl.float32)
  else:
    w1 = tl.zeros([HALF_PAD], tl.float32)
    w2 = w1
  return w1, w2


@triton.jit
def rope_write_kv_kernel(
    qkv_ptr,  # [num_tokens, (NUM_HEADS + 2 NUM_KV_HEADS) * HEAD_DIM]: q heads | k heads | v heads
    cos_ptr, sin_ptr,  # f32[num_tokens, HEAD_DIM // 2]: cos / sin of position * theta ** (-2i / HEAD_DIM)
    q_norm_ptr, k_norm_ptr,  # [HEAD_DIM] RMSNorm scales (QK_NORM)
    slot_mapping_ptr,  # i32[num_tokens]
    layer_ptr,  # i32[1] (IS_STACKED)
    k_cache_ptr, v_cache_ptr,  # inputs aliased to k_out_ptr / v_out_ptr (the same memory)
    num_tokens,
    k_out_ptr, v_out_ptr,  # outputs: the caches, written where the slots say (aliased outputs first:
    q_out_ptr,  # output: [num_tokens, NUM_HEADS, HEAD_DIM]       call.launch says why)
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr, QK_NORM: tl.constexpr, EPS: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_PAGES: tl.constexpr, PAGE_STRIDE: tl.constexpr,
    TOKEN_STRIDE: tl.constexpr, HEAD_STRIDE: tl.constexpr, K_OFFSET: tl.constexpr,
    V_OFFSET: tl.constexpr, IS_CONTIGUOUS: tl.constexpr, IS_STACKED: tl.constexpr,
    NUM_LAYERS: tl.constexpr, LAYER_STRIDE: tl.constexpr,
):
  HALF: tl.constexpr = HEAD_DIM // 2
  ROW: tl.constexpr = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
  dtype = q_out_ptr.dtype.element_ty
  head = tl.program_id(1)  # q heads first, then kv heads (K and V)
  offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] token index
  offs_h = tl.arange(0, HALF_PAD)  # [HALF_PAD] index in a half row
  in_batch = offs_t < num_tokens
  cols = offs_h < HALF
  mask = in_batch[:, None] & cols[None, :]
  row = qkv_ptr + offs_t.to(tl.int64)[:, None] * ROW + offs_h[None, :]  # [BLOCK_T, HALF_PAD]
  rot = offs_t.to(tl.int64)[:, None] * HALF + offs_h[None, :]  # [BLOCK_T, HALF_PAD] in cos / sin
  cos = tl.load(cos_ptr + rot, mask=mask, other=0.0)
  sin = tl.load(sin_ptr + rot, mask=mask, other=0.0)
  # Every load is issued before the first store (a store may alias a later load for all Triton
  # knows, so it would wait): a handful of round trips to memory is the whole cost of this kernel.
  if head < NUM_HEADS:
    x1 = tl.load(row + head * HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + head * HEAD_DIM + HALF, mask=mask, other=0.0).to(tl.float32)
    w1, w2 = _norm_scale(q_norm_ptr, offs_h, cols, HALF, HALF_PAD, QK_NORM)
    o1, o2 = _norm_rope(x1, x2, w1, w2, cos, sin, QK_NORM, EPS, HEAD_DIM, dtype)
    q_row = q_out_ptr + (offs_t.to(tl.int64)[:, None] * NUM_HEADS + head) * HEAD_DIM + offs_h[None, :]
    tl.store(q_row, o1, mask=mask)
    tl.store(q_row + HALF, o2, mask=mask)
  else:
    kv_head = head - NUM_HEADS
    dst, ok = cache_rows(slot_mapping_ptr, layer_ptr, offs_t, in_batch, kv_head, BLOCK_T, PAGE_SIZE,
                         NUM_PAGES, PAGE_STRIDE, TOKEN_STRIDE, HEAD_STRIDE, IS_CONTIGUOUS, IS_STACKED,
                         NUM_LAYERS, LAYER_STRIDE)
    k_src = row + head * HEAD_DIM
    x1 = tl.load(k_src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(k_src + HALF, mask=mask, other=0.0).to(tl.float32)
    v_src = row + (NUM_KV_HEADS + head) * HEAD_DIM
    v1 = tl.load(v_src, mask=mask, other=0.0)
    v2 = tl.load(v_src + HALF, mask=mask, other=0.0)
    w1, w2 = _norm_scale(k_norm_ptr, offs_h, cols, HALF, HALF_PAD, QK_NORM)
    k1, k2 = _norm_rope(x1, x2, w1, w2, cos, sin, QK_NORM, EPS, HEAD_DIM, dtype)
    store = ok[:, None] & cols[None, :]
    at = dst[:, None] + offs_h[None, :]
    tl.store(k_out_ptr + K_OFFSET + at, k1, mask=store)
    tl.store(k_out_ptr + K_OFFSET + at + HALF, k2, mask=store)
    tl.store(v_out_ptr + V_OFFSET + at, v1, mask=store)
    tl.store(v_out_ptr + V_OFFSET + at + HALF, v2, mask=store)


def rope_write_kv(layout: KVCacheLayout, qkv, cos, sin, q_norm, k_norm, eps: float, num_heads: int,
                  k_cache, v_cache, slot_mapping, layer):
  """The Triton launch: returns (q [T, H, D], k_cache, v_cache), the caches updated in place.

  `layout` is resolved (separate K and V buffers; stacked iff `layer` is given) and the arrays are
  validated (`jax_varlen_attn.nn.qkv.rope_write_kv`); cos / sin f32[T, D / 2] the rotation
  (`jax_varlen_attn.nn.qkv.rope_tables`, computed by XLA: in the kernel, libdevice's sinf / cosf
  with their local-memory range reduction took half of a 3.3 us call; in the serving step the
  tables add no kernel); q_norm / k_norm None: no norm.
  """
  num_tokens = qkv.shape[0]
  num_kv_heads, head_dim = layout.num_kv_heads, layout.head_dim
  block_t = tokens_per_program(num_tokens)
  half_pad = max(16, next_pow2(head_dim // 2))
  qk_norm = q_norm is not None
  # One warp per 16 tokens' 64-wide halves: the tile is small, the launch count is what matters.
  num_warps = max(1, min(4, block_t * half_pad // 256))
  consts = dict(NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
                HEAD_DIM=head_dim, HALF_PAD=half_pad, BLOCK_T=block_t, QK_NORM=qk_norm, EPS=float(eps),
                **layout_constexprs(layout))
  unused = jnp.zeros((1,), jnp.float32)  # norm scale pointers without QK_NORM: never read
  inputs = dict(qkv_ptr=qkv, cos_ptr=cos, sin_ptr=sin,
                q_norm_ptr=q_norm if qk_norm else unused, k_norm_ptr=k_norm if qk_norm else unused,
                slot_mapping_ptr=slot_mapping,
                layer_ptr=(jnp.zeros((1,), jnp.int32) if layer is None else jnp.reshape(layer, (1,))),
                k_cache_ptr=k_cache, v_cache_ptr=v_cache, num_tokens=num_tokens)
  outputs = [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
             jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
             jax.ShapeDtypeStruct((num_tokens, num_heads, head_dim), qkv.dtype)]
  grid = (-(-num_tokens // block_t), num_heads + num_kv_heads)
  k_cache, v_cache, q = launch(rope_write_kv_kernel, inputs, outputs, grid, num_warps, 1, consts,
                               input_output_aliases={"k_cache_ptr": 0, "v_cache_ptr": 1},
                               route=route_for(num_tokens))
  return q, k_cache, v_cache
