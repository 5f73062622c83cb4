"""The Triton kernel of `write_kv`: new tokens' K / V rows stored into the caller's cache, in place.

One program stores BLOCK_T tokens of one kv head: a [BLOCK_T, HEAD_DIM] tile of K and one of V, each
row going to the address its slot (`page * PAGE_SIZE + offset`) names in the layout. The cache is an
input aliased to the output (`input_output_aliases`), so only those rows are written; under buffer
donation the compiled step copies nothing.

A slot of -1, any slot outside [0, NUM_PAGES * PAGE_SIZE), and (stacked caches) a layer outside
[0, NUM_LAYERS) write nothing: a store never leaves the buffer. Two slots naming the same row:
one of them lands (which one is unspecified, as in vLLM's reshape_and_cache).

Address specializations (all `tl.constexpr`, from the static KVCacheLayout):
  IS_CONTIGUOUS   token-major pages back to back: the slot is the row id (`slot * Hk + head`)
  otherwise       PAGE_STRIDE / TOKEN_STRIDE / HEAD_STRIDE constants, K_OFFSET / V_OFFSET added
`write_kv_kernel` takes separate K and V caches; `write_kv_fused_kernel` one buffer holding both
(fused forms, V at V_OFFSET of the same buffer).

QUANTIZE (an fp8 cache): each row is divided by its (token, kv head) scale and stored as fp8 by
`_quantize_fp8`, the rule of `jax_varlen_attn.cache.quantize_fp8` (its jnp twin): saturate, round
to the fp8 grid in f32 (ties to even), then an exact conversion. The rounding is spelled out rather
than left to the conversion so that Triton's CPU interpreter, whose fp8 casts drop the carry of a
rounding that reaches the next power of two and store e4m3's NaN as 384, stores what the GPU does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jax_varlen_attn.backends.triton.call import launch, route_for
from jax_varlen_attn.layout import KVCacheLayout
from jax_varlen_attn.spec import next_pow2

RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (t + M) - M rounds |t| < 2**22 to an integer, ties to even
FP8_NAN_BITS = tl.constexpr(0x7F)  # a NaN in both e4m3fn (S.1111.111) and e5m2 (S.11111.11)


@triton.jit
def _quantize_fp8(x, scale, out_dtype: tl.constexpr, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr,
                  MIN_EXP: tl.constexpr):
  """fp8 `out_dtype` values of x (f32[BLOCK_T, HEAD_DIM_PAD]) / scale (f32[BLOCK_T, 1]).

  y = x / scale (IEEE division); its magnitude, saturated to FP8_MAX, rounded to a multiple of
  ulp = 2**(max(exponent, MIN_EXP) - MANT_BITS), the fp8 spacing there (MIN_EXP: the smallest normal
  exponent, below which fp8 is subnormal with that spacing), ties to even; with y's sign bit back
  it is an fp8 value, so the conversion is exact. NaN is stored as FP8_NAN_BITS.
  """
  y = tl.div_rn(x, scale)
  nan = y != y
  sign = (y.to(tl.int32, bitcast=True) >> 31) << 31  # f32's sign bit (kept: -0.0 and -tiny give -0)
  a = tl.minimum(tl.abs(y), FP8_MAX)  # saturated magnitude
  exponent = (a.to(tl.int32, bitcast=True) >> 23) - 127  # f32's, unbiased
  exponent = tl.maximum(exponent, MIN_EXP) - MANT_BITS  # of the ulp
  ulp = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
  inv_ulp = ((127 - exponent) << 23).to(tl.float32, bitcast=True)  # exact: a power of two
  a = ((a * inv_ulp + RNE_MAGIC) - RNE_MAGIC) * ulp
  y = (a.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
  bits = y.to(out_dtype).to(tl.uint8, bitcast=True)
  return tl.where(nan, FP8_NAN_BITS, bits).to(out_dtype, bitcast=True)


@triton.jit
def cache_rows(slot_mapping_ptr, layer_ptr, offs_t, in_batch, kv_head, BLOCK_T: tl.constexpr,
               PAGE_SIZE: tl.constexpr, NUM_PAGES: tl.constexpr, PAGE_STRIDE: tl.constexpr,
               TOKEN_STRIDE: tl.constexpr, HEAD_STRIDE: tl.constexpr, IS_CONTIGUOUS: tl.constexpr,
               IS_STACKED: tl.constexpr, NUM_LAYERS: tl.constexpr, LAYER_STRIDE: tl.constexpr):
  """(i64[BLOCK_T] element offset of each token's (slot, kv_head) row in the cache, bool[BLOCK_T]
  whether to store it): tokens past num_tokens, slots outside the cache and (stacked) a layer
  outside [0, NUM_LAYERS) are not stored; their offsets are clamped in range all the same."""
  slot = tl.load(slot_mapping_ptr + offs_t, mask=in_batch, other=-1)
  ok = in_batch & (slot >= 0) & (slot < NUM_PAGES * PAGE_SIZE)
  slot = tl.where(ok, slot, 0).to(tl.int64)
  if IS_CONTIGUOUS:
    dst = slot * TOKEN_STRIDE + kv_head * HEAD_STRIDE  # row id (slot * Hk + head) * D
  else:
    dst = (slot // PAGE_SIZE) * PAGE_STRIDE + (slot % PAGE_SIZE) * TOKEN_STRIDE + kv_head * HEAD_STRIDE
  if IS_STACKED:
    # The layer is data (a traced scalar): out of range, nothing of this call is written.
    # Broadcast to the tile first: the interpreter turns (block & scalar bool) into an int mask.
    layer = tl.load(layer_ptr) + tl.zeros([BLOCK_T], tl.int32)
    ok = ok & (layer >= 0) & (layer < NUM_LAYERS)
    dst += tl.minimum(tl.maximum(layer, 0), NUM_LAYERS - 1).to(tl.int64) * LAYER_STRIDE
  return dst, ok


@triton.jit
def _store_rows(k_new_ptr, v_new_ptr, slot_mapping_ptr, layer_ptr, k_scale_ptr, v_scale_ptr, num_tokens,
                k_out_ptr, v_out_ptr,
                NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                BLOCK_T: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_PAGES: tl.constexpr,
                PAGE_STRIDE: tl.constexpr, TOKEN_STRIDE: tl.constexpr, HEAD_STRIDE: tl.constexpr,
                K_OFFSET: tl.constexpr, V_OFFSET: tl.constexpr, IS_CONTIGUOUS: tl.constexpr,
                IS_STACKED: tl.constexpr, NUM_LAYERS: tl.constexpr, LAYER_STRIDE: tl.constexpr,
                QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr,
                MIN_EXP: tl.constexpr):
  """Stores this program's tile of K into k_out_ptr and of V into v_out_ptr (may be one buffer);
  QUANTIZE: as fp8, each row divided by its k_scale / v_scale (f32[num_tokens, NUM_KV_HEADS])."""
  kv_head = tl.program_id(1)
  offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] token index
  offs_d = tl.arange(0, HEAD_DIM_PAD)  # [HEAD_DIM_PAD]
  in_batch = offs_t < num_tokens
  dst, ok = cache_rows(slot_mapping_ptr, layer_ptr, offs_t, in_batch, kv_head, BLOCK_T, PAGE_SIZE, NUM_PAGES,
                       PAGE_STRIDE, TOKEN_STRIDE, HEAD_STRIDE, IS_CONTIGUOUS, IS_STACKED, NUM_LAYERS,
                       LAYER_STRIDE)
  src = (offs_t.to(tl.int64) * NUM_KV_HEADS + kv_head) * HEAD_DIM  # [BLOCK_T] in k_new / v_new
  mask = ok[:, None] & (offs_d[None, :] < HEAD_DIM)
  load_mask = in_batch[:, None] & (offs_d[None, :] < HEAD_DIM)
  k = tl.load(k_new_ptr + src[:, None] + offs_d[None, :], mask=load_mask)
  v = tl.load(v_new_ptr + src[:, None] + offs_d[None, :], mask=load_mask)
  if QUANTIZE:
    scale_idx = offs_t * NUM_KV_HEADS + kv_head  # [BLOCK_T] in the [T, Hk] scales
    k_scale = tl.load(k_scale_ptr + scale_idx, mask=in_batch, other=1.0)
    v_scale = tl.load(v_scale_ptr + scale_idx, mask=in_batch, other=1.0)
    k = _quantize_fp8(k.to(tl.float32), k_scale[:, None], k_out_ptr.dtype.element_ty, FP8_MAX, MANT_BITS,
                      MIN_EXP)
    v = _quantize_fp8(v.to(tl.float32), v_scale[:, None], v_out_ptr.dtype.element_ty, FP8_MAX, MANT_BITS,
                      MIN_EXP)
  tl.store(k_out_ptr + K_OFFSET + dst[:, None] + offs_d[None, :], k, mask=mask)
  tl.store(v_out_ptr + V_OFFSET + dst[:, None] + offs_d[None, :], v, mask=mask)


@triton.jit
def write_kv_kernel(
    k_new_ptr, v_new_ptr,  # [num_tokens, NUM_KV_HEADS, HEAD_DIM], the cache's dtype (QUANTIZE: a float)
    slot_mapping_ptr,  # i32[num_tokens]
    layer_ptr,  # i32[1] (IS_STACKED)
    k_scale_ptr, v_scale_ptr,  # f32[num_tokens, NUM_KV_HEADS] (QUANTIZE)
    k_cache_ptr, v_cache_ptr,  # inputs aliased to k_out_ptr / v_out_ptr (the same memory)
    num_tokens,
    k_out_ptr, v_out_ptr,  # outputs: the caches, written where the slots say
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_PAGES: tl.constexpr,
    PAGE_STRIDE: tl.constexpr, TOKEN_STRIDE: tl.constexpr, HEAD_STRIDE: tl.constexpr,
    K_OFFSET: tl.constexpr, V_OFFSET: tl.constexpr, IS_CONTIGUOUS: tl.constexpr,
    IS_STACKED: tl.constexpr, NUM_LAYERS: tl.constexpr, LAYER_STRIDE: tl.constexpr,
    QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
):
  _store_rows(k_new_ptr, v_new_ptr, slot_mapping_ptr, layer_ptr, k_scale_ptr, v_scale_ptr, num_tokens,
              k_out_ptr, v_out_ptr, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_T, PAGE_SIZE, NUM_PAGES,
              PAGE_STRIDE, TOKEN_STRIDE, HEAD_STRIDE, K_OFFSET, V_OFFSET, IS_CONTIGUOUS, IS_STACKED,
              NUM_LAYERS, LAYER_STRIDE, QUANTIZE, FP8_MAX, MANT_BITS, MIN_EXP)


@triton.jit
def write_kv_fused_kernel(
    k_new_ptr, v_new_ptr,  # [num_tokens, NUM_KV_HEADS, HEAD_DIM], the cache's dtype (QUANTIZE: a float)
    slot_mapping_ptr,  # i32[num_tokens]
    layer_ptr,  # i32[1] (IS_STACKED)
    k_scale_ptr, v_scale_ptr,  # f32[num_tokens, NUM_KV_HEADS] (QUANTIZE)
    kv_cache_ptr,  # input aliased to kv_out_ptr: K at K_OFFSET, V at V_OFFSET of one buffer
    num_tokens,
    kv_out_ptr,  # output: the cache
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_PAGES: tl.constexpr,
    PAGE_STRIDE: tl.constexpr, TOKEN_STRIDE: tl.constexpr, HEAD_STRIDE: tl.constexpr,
    K_OFFSET: tl.constexpr, V_OFFSET: tl.constexpr, IS_CONTIGUOUS: tl.constexpr,
    IS_STACKED: tl.constexpr, NUM_LAYERS: tl.constexpr, LAYER_STRIDE: tl.constexpr,
    QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
):
  _store_rows(k_new_ptr, v_new_ptr, slot_mapping_ptr, layer_ptr, k_scale_ptr, v_scale_ptr, num_tokens,
              kv_out_ptr, kv_out_ptr, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_T, PAGE_SIZE, NUM_PAGES,
              PAGE_STRIDE, TOKEN_STRIDE, HEAD_STRIDE, K_OFFSET, V_OFFSET, IS_CONTIGUOUS, IS_STACKED,
              NUM_LAYERS, LAYER_STRIDE, QUANTIZE, FP8_MAX, MANT_BITS, MIN_EXP)



def kernel_arguments(layout: KVCacheLayout, k_new, v_new, k_cache, v_cache, slot_mapping, layer,
                     scales=None):
  """(kernel, inputs by parameter name, outputs, grid, num_warps, constexprs, aliases) of one launch.

  `layout` is resolved (num_pages known; stacked iff `layer` is given); arrays are validated;
  scales: None, or (k_scale, v_scale) f32[T, Hk] each for an fp8 cache.
  """
  num_tokens, num_kv_heads, head_dim = k_new.shape
  head_dim_pad = max(16, next_pow2(head_dim))
  block_t = tokens_per_program(num_tokens)
  num_warps = max(1, min(4, block_t * head_dim_pad // 256))
  consts = dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_T=block_t,
                **layout_constexprs(layout), **_fp8_constexprs(k_cache.dtype if scales is not None else None))
  unused = jnp.zeros((1,), jnp.float32)  # scale pointers of a cache that is not fp8: never read
  inputs = dict(k_new_ptr=k_new, v_new_ptr=v_new, slot_mapping_ptr=slot_mapping,
                layer_ptr=(jnp.zeros((1,), jnp.int32) if layer is None else jnp.reshape(layer, (1,))),
                k_scale_ptr=unused if scales is None else scales[0],
                v_scale_ptr=unused if scales is None else scales[1])
  if v_cache is None:
    kernel = write_kv_fused_kernel
    inputs.update(kv_cache_ptr=k_cache, num_tokens=num_tokens)
    outputs = [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype)]
    aliases = {"kv_cache_ptr": 0}
  else:
    kernel = write_kv_kernel
    inputs.update(k_cache_ptr=k_cache, v_cache_ptr=v_cache, num_tokens=num_tokens)
    outputs = [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
               jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
    aliases = {"k_cache_ptr": 0, "v_cache_ptr": 1}
  grid = (-(-num_tokens // block_t), num_kv_heads)
  return kernel, inputs, outputs, grid, num_warps, consts, aliases


def tokens_per_program(num_tokens: int) -> int:
  """BLOCK_T of the write kernels. 16 tokens a program (a 4 KB fp16 tile at D=128): enough bytes in
  flight per program, and a decode step of a few tokens still spreads over its kv heads."""
  return min(16, next_pow2(num_tokens))


def layout_constexprs(layout: KVCacheLayout) -> dict:
  """The address constexprs of `cache_rows` and the K / V offsets, from a resolved layout."""
  return dict(PAGE_SIZE=layout.block_size, NUM_PAGES=layout.num_pages, PAGE_STRIDE=layout.page_stride,
              TOKEN_STRIDE=layout.token_stride, HEAD_STRIDE=layout.head_stride, K_OFFSET=layout.k_offset,
              V_OFFSET=layout.v_offset, IS_CONTIGUOUS=layout.is_contiguous, IS_STACKED=layout.stacked,
              NUM_LAYERS=max(layout.num_layers, 1), LAYER_STRIDE=layout.layer_stride)


def _fp8_constexprs(dtype) -> dict:
  """QUANTIZE and the fp8 format's constants for `_quantize_fp8` (dtype None: no quantization)."""
  if dtype is None:
    return dict(QUANTIZE=False, FP8_MAX=0.0, MANT_BITS=0, MIN_EXP=0)
  info = jnp.finfo(dtype)
  return dict(QUANTIZE=True, FP8_MAX=float(info.max), MANT_BITS=int(info.nmant), MIN_EXP=int(info.minexp))


def write_kv(layout: KVCacheLayout, k_new, v_new, k_cache, v_cache, slot_mapping, layer, scales=None):
  """The Triton write: returns (k_cache, v_cache or None), the input buffers updated in place.
  scales: None, or (k_scale, v_scale) f32[T, Hk] each: quantize into an fp8 cache."""
  kernel, inputs, outputs, grid, num_warps, consts, aliases = kernel_arguments(
      layout, k_new, v_new, k_cache, v_cache, slot_mapping, layer, scales)
  outs = launch(kernel, inputs, outputs, grid, num_warps, 1, consts, input_output_aliases=aliases,
                route=route_for(k_new.shape[0]))
  return (outs[0], None) if v_cache is None else (outs[0], outs[1])
