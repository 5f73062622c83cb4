"""`write_kv`: stores new tokens' keys and values into a paged KV cache of any layout, in place.

The cache is updated, never rebuilt: the XLA path scatters rows into the flat row view of the
caller's buffer (a reshape, free), the Triton path launches a kernel whose cache inputs are aliased
to its outputs. Inside `jax.jit(step, donate_argnums=<the caches>)` both compile to an in-place
write: the donated buffer is the output buffer and nothing cache-sized is copied.

Every check here is static (shapes, dtypes, layout) and runs before anything is traced. Slot values
cannot be checked under `jax.jit`; a slot outside the cache (or -1) is skipped instead, and no store
ever lands outside the buffer.

An fp8 cache (float8_e4m3fn / float8_e5m2) stores each new value quantized with its scale,
`quantize_fp8` below (the Triton write kernel's `_quantize_fp8` is the same rule): in f32,
value / scale (IEEE division), saturated to the format's finite max, rounded to the nearest fp8
value, ties to even; NaN stays NaN. The rounding is done on the f32 value itself (to the fp8 grid,
then an exact conversion), so every platform and both write paths store the same bits.
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jax_varlen_attn import backends as registry
from jax_varlen_attn.layout import KVCacheLayout, resolve
from jax_varlen_attn.validation import (FLOAT_DTYPES, FP8_DESC, FP8_DTYPES, array_arg, check_kv_layout,
                                        is_array, layer_arg, static_layer)

WRITE_BACKENDS = ("auto", "xla", "triton", "pallas")
_I32_MAX = 2**31 - 1


def write_kv(k_new, v_new, k_cache, v_cache, slot_mapping, *,
             kv_layout: Union[str, KVCacheLayout] = "NHD", layer=None, backend: str = "auto",
             k_scale=None, v_scale=None):
  """Stores `k_new` / `v_new` at the cache slots `slot_mapping` names; returns the updated caches.

  Example (two prefill tokens into pages 3 and 0, a padded token skipped)::

      k_cache = jnp.zeros((16, 16, 2, 64), jnp.float16)   # [num_blocks, block_size, Hk, D]
      v_cache = jnp.zeros_like(k_cache)
      k_new = v_new = jnp.ones((3, 2, 64), jnp.float16)    # [T, Hk, D]
      slots = jnp.array([3 * 16 + 5, 0 * 16 + 0, -1], jnp.int32)
      k_cache, v_cache = write_kv(k_new, v_new, k_cache, v_cache, slots)

  Under `jax.jit(step, donate_argnums=...)` with the caches donated, the write happens in place
  (nothing cache-sized is copied); without donation XLA must keep the caller's buffers intact and
  the result is a new buffer.

  Args (T = new tokens, Hk = kv heads, D = head_dim):
    k_new, v_new: [T, Hk, D] in the cache's dtype (float16, bfloat16 or float32); for an fp8
      cache, float16, bfloat16 or float32 values to quantize.
    k_cache, v_cache: the cache as `kv_layout` describes it (as for `flash_attn_varlen_func`);
      `v_cache=None` where V lives in k_cache's buffer (the fused forms). float16, bfloat16,
      float32, or fp8 (float8_e4m3fn / float8_e5m2, k and v alike).
    slot_mapping: i32[T]; token i goes to slot `page * block_size + offset`. -1 skips the token
      (padding), and so does any slot outside [0, num_pages * block_size). Two tokens naming one
      slot: one of them is stored, which one is unspecified.
    kv_layout: "NHD" (default), "HND", "fused_page_major", "fused_kv_major" or a `KVCacheLayout`.
    layer: i32[] (traced is fine) selecting a layer of a stacked cache [L, ...]. A traced value
      outside [0, L) writes nothing; a Python / NumPy int outside it is a ValueError.
    backend: "auto" (triton on a CUDA GPU, else xla), "xla" (a scatter), "triton" (a kernel; on
      CPU only under TRITON_INTERPRET=1), or "pallas", which writes with the XLA scatter (Pallas
      has no write kernel of its own; the scatter is in place too).
    k_scale, v_scale: quantization scales of an fp8 cache (vLLM's reshape_and_cache names): f32[]
      (or f32[1], or a Python float: one for everything), f32[Hk] (per kv head) or f32[T, Hk] (per
      token and head, e.g. `k_descale[sequence of the token]`). The value stored is
      fp8(value / scale): f32 division, saturated to the format's finite max (448 for e4m3, 57344
      for e5m2; +-inf saturates too), rounded to nearest, ties to even; NaN stays NaN. These are
      the attention's `k_descale` / `v_descale`: reading multiplies by the same number. None: 1.0
      (as vLLM). With a cache that is not fp8 they are checked and ignored.

  Returns:
    (k_cache, v_cache): the updated buffers, same shapes and dtypes; (kv, None) for fused forms.
  """
  layout, args = _validate(k_new, v_new, k_cache, v_cache, slot_mapping, kv_layout, layer, k_scale,
                           v_scale)
  name = _select(backend)
  k_new, v_new, k_cache, v_cache, slot_mapping, layer, scales = args
  if k_new.shape[0] == 0:  # nothing to store (and no empty grid to launch)
    return k_cache, v_cache
  if name == "xla":
    num_rows = max(k_cache.size, 0 if v_cache is None else v_cache.size) // layout.head_dim
    if num_rows > _I32_MAX:
      raise ValueError(f"the cache holds {num_rows} rows of head_dim; write_kv's xla path indexes "
                       "rows with int32 (at most 2**31 - 1): use backend='triton' or a smaller cache")
  return _run(name, layout, k_new, v_new, k_cache, v_cache, slot_mapping, layer, scales)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(backend_name: str, layout: KVCacheLayout, k_new, v_new, k_cache, v_cache, slot_mapping, layer,
         scales):
  if backend_name == "triton":
    from jax_varlen_attn.backends.triton import write_kernel  # imports triton: only when asked

    return write_kernel.write_kv(layout, k_new, v_new, k_cache, v_cache, slot_mapping, layer, scales)
  return write_kv_xla(layout, k_new, v_new, k_cache, v_cache, slot_mapping, layer, scales)


def quantize_fp8(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """fp8 `dtype` values of x [T, Hk, D] (float) / scale f32[T, Hk]: the rule of the module docstring.

  In f32: y = x / scale, saturated to +-max (NaN kept), then rounded to the fp8 grid around y
  (ulp = 2**(max(exponent(y), min normal exponent) - mantissa bits); jnp.round ties to even),
  which the final conversion represents exactly.
  """
  info = jnp.finfo(dtype)
  # The divisor materialized behind a barrier: XLA rewrites A / broadcast(B) as A * broadcast(1 / B),
  # which rounds twice (measured on the CPU: 7% of quotients off by an ulp).
  divisor = jax.lax.optimization_barrier(jnp.broadcast_to(scale[..., None], x.shape))
  y = x.astype(jnp.float32) / divisor
  nan = jnp.isnan(y)
  y = jnp.clip(y, -float(info.max), float(info.max))
  exponent = ((jax.lax.bitcast_convert_type(y, jnp.int32) >> 23) & 0xFF) - 127  # f32's, unbiased
  exponent = jnp.maximum(exponent, int(info.minexp))  # fp8 subnormals: the smallest normal's ulp
  ulp = jax.lax.bitcast_convert_type((exponent - int(info.nmant) + 127) << 23, jnp.float32)
  y = jnp.round(y / ulp) * ulp  # exact: ulp is a power of two
  return jnp.where(nan, jnp.nan, y).astype(dtype)


def write_kv_xla(layout: KVCacheLayout, k_new, v_new, k_cache, v_cache, slot_mapping, layer,
                 scales=None):
  """The XLA write: one row scatter (`mode="drop"`) per buffer into its flat [size / D, D] view.

  Row of (slot s, head h) = layer * L + page(s) * P + offset(s) * T + h * H (+ the K / V offset),
  in rows of D elements, with the strides from `layout.strides_in_rows()`. A skipped token gets the
  first row past the buffer, which the scatter drops. scales: None, or (k_scale, v_scale)
  f32[T, Hk] each for an fp8 cache (the new rows are quantized first).
  """
  if scales is not None:
    k_new = quantize_fp8(k_new, scales[0], k_cache.dtype)
    v_new = quantize_fp8(v_new, scales[1], k_cache.dtype)
  d = layout.head_dim
  st = layout.strides_in_rows()
  num_tokens, num_kv_heads, _ = k_new.shape
  slots = slot_mapping
  ok = (slots >= 0) & (slots < layout.num_pages * layout.block_size)
  slots = jnp.where(ok, slots, 0)
  base = (slots // layout.block_size) * st["page"] + (slots % layout.block_size) * st["token"]
  if layout.stacked:
    ok = ok & (layer >= 0) & (layer < layout.num_layers)
    base = base + jnp.clip(layer, 0, layout.num_layers - 1) * st["layer"]
  rows = base[:, None] + jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :] * st["head"]  # [T, Hk]

  def targets(rows_in_buffer, offset):
    return jnp.where(ok[:, None], rows + offset, rows_in_buffer).reshape(-1)  # past the end: dropped

  k_upd = k_new.reshape(num_tokens * num_kv_heads, d)
  v_upd = v_new.reshape(num_tokens * num_kv_heads, d)
  k_rows = k_cache.size // d
  if v_cache is None:  # fused: K and V rows of one buffer, one scatter
    idx = jnp.concatenate([targets(k_rows, st["k_offset"]), targets(k_rows, st["v_offset"])])
    flat = k_cache.reshape(k_rows, d).at[idx].set(jnp.concatenate([k_upd, v_upd]), mode="drop")
    return flat.reshape(k_cache.shape), None
  v_rows = v_cache.size // d
  k_flat = k_cache.reshape(k_rows, d).at[targets(k_rows, st["k_offset"])].set(k_upd, mode="drop")
  v_flat = v_cache.reshape(v_rows, d).at[targets(v_rows, st["v_offset"])].set(v_upd, mode="drop")
  return k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)


def _select(backend) -> str:
  """The write path for `backend=`: "triton" or "xla"."""
  if not isinstance(backend, str):
    raise TypeError(f"backend must be a str, one of {WRITE_BACKENDS}, got {type(backend).__name__}")
  if backend not in WRITE_BACKENDS:
    raise ValueError(f"backend must be one of {WRITE_BACKENDS}, got {backend!r}")
  if backend == "auto":
    return registry.auto_name()
  if backend == "triton":
    ok, why = registry.status("triton")
    if not ok:
      raise ValueError(f"backend='triton' cannot run here: {why}. Use backend='xla' (or 'auto')")
    return "triton"
  return "xla"  # "xla", and "pallas" (no Pallas write kernel: the scatter)


def validate_cache(k_cache, v_cache, kv_layout, layer):
  """Static checks of a cache and its layer; returns (resolved layout, k_cache, v_cache, layer):
  the checks `write_kv` and `jax_varlen_attn.nn.rope_write_kv` share."""
  k_cache = array_arg("k_cache", k_cache, dtypes=FLOAT_DTYPES + FP8_DTYPES,
                      dtype_desc=f"float16, bfloat16, float32 or fp8 ({FP8_DESC})")
  dtype = jnp.dtype(k_cache.dtype)
  if v_cache is not None:
    v_cache = array_arg("v_cache", v_cache)
    if jnp.dtype(v_cache.dtype) != dtype:
      raise TypeError(f"v_cache must have k_cache's dtype {dtype.name}, got {jnp.dtype(v_cache.dtype).name}")
  check_kv_layout(kv_layout)

  layer_value = static_layer(layer)
  if layer is not None:
    layer = layer_arg(layer)
  layout = resolve(kv_layout, k_cache.shape, None if v_cache is None else v_cache.shape,
                   stacked=layer is not None)
  if layer_value is not None and not 0 <= layer_value < layout.num_layers:
    raise ValueError(f"layer must be in [0, {layout.num_layers}) (axis 0 of k_cache), got {layer_value}")
  return layout, k_cache, v_cache, layer


def _validate(k_new, v_new, k_cache, v_cache, slot_mapping, kv_layout, layer, k_scale=None,
              v_scale=None):
  """Static checks; returns (resolved layout, (k_new, v_new, k_cache, v_cache, slot_mapping, layer,
  scales)), scales (k_scale, v_scale) f32[T, Hk] each for an fp8 cache, else None."""
  layout, k_cache, v_cache, layer = validate_cache(k_cache, v_cache, kv_layout, layer)
  dtype = jnp.dtype(k_cache.dtype)
  fp8 = dtype in FP8_DTYPES

  want = f"[T, num_kv_heads={layout.num_kv_heads}, head_dim={layout.head_dim}]"
  for name, x in (("k_new", k_new), ("v_new", v_new)):
    if x is None:
      raise ValueError(f"{name} is required: {want} in the cache's dtype"
                       + (" (a fused cache takes v_cache=None, not v_new=None)" if name == "v_new" else ""))
    if not is_array(x):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 3 or tuple(x.shape[1:]) != (layout.num_kv_heads, layout.head_dim):
      raise ValueError(f"{name} must be {want} to match the cache, got shape {tuple(x.shape)}")
    if fp8 and jnp.dtype(x.dtype) not in FLOAT_DTYPES:
      raise TypeError(f"{name} must be float16, bfloat16 or float32 for the {dtype.name} cache (quantized "
                      f"with {name[0]}_scale), got {jnp.dtype(x.dtype).name}")
    if not fp8 and jnp.dtype(x.dtype) != dtype:
      raise TypeError(f"{name} must have the cache's dtype {dtype.name}, got {jnp.dtype(x.dtype).name}")
  if tuple(v_new.shape) != tuple(k_new.shape):
    raise ValueError(f"v_new must have k_new's shape {tuple(k_new.shape)}, got {tuple(v_new.shape)}")
  num_tokens = k_new.shape[0]
  if slot_mapping is None:
    raise ValueError(f"slot_mapping is required: int32 [T={num_tokens}]")
  array_arg("slot_mapping", slot_mapping, rank=1, dtypes=(jnp.dtype(jnp.int32),),
            dtype_desc=f"int32 [T={num_tokens}]")
  if slot_mapping.shape[0] != num_tokens:
    raise ValueError(f"slot_mapping must have one entry per new token (T={num_tokens}, axis 0 of k_new), "
                     f"got shape {tuple(slot_mapping.shape)}")
  scales = [_scale(name, x, num_tokens, layout.num_kv_heads)
            for name, x in (("k_scale", k_scale), ("v_scale", v_scale))]
  scales = tuple(jnp.ones((num_tokens, layout.num_kv_heads), jnp.float32) if x is None else x
                 for x in scales) if fp8 else None
  arrays = (jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(k_cache),
            None if v_cache is None else jnp.asarray(v_cache), jnp.asarray(slot_mapping), layer, scales)
  return layout, arrays


def _scale(name: str, x, num_tokens: int, num_kv_heads: int) -> Optional[jax.Array]:
  """A quantization scale as f32[T, Hk] (None stays None): from f32[] / f32[1] / a Python float,
  f32[Hk] (per kv head) or f32[T, Hk]."""
  if x is None:
    return None
  shape = (num_tokens, num_kv_heads)
  if isinstance(x, (numbers.Real, np.floating)) and not isinstance(x, (bool, np.bool_)):
    return jnp.full(shape, x, jnp.float32)
  x = array_arg(name, x, dtypes=(jnp.dtype(jnp.float32),),
                dtype_desc=f"float32: a scalar, [num_kv_heads={num_kv_heads}] or [T, num_kv_heads]={shape}")
  if tuple(x.shape) in ((), (1,)):
    return jnp.broadcast_to(jnp.reshape(jnp.asarray(x), ()), shape)
  if tuple(x.shape) == (num_kv_heads,):
    return jnp.broadcast_to(jnp.asarray(x), shape)
  if tuple(x.shape) != shape:
    raise ValueError(f"{name} must be a scalar, [num_kv_heads]=({num_kv_heads},) or [T, num_kv_heads]="
                     f"{shape}, got {tuple(x.shape)}")
  return jnp.asarray(x)
