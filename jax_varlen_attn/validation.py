"""Static validation of `flash_attn_varlen_func`'s arguments, shared by `api`, `checks` and `cache`.

    args = AttentionArgs(q, k_cache, v_cache, cu_seqlens_q=cu, seqused_k=used, block_table=table)
    spec, arrays = validate(args)   # AttentionSpec (static), AttentionArrays (normalized)

`AttentionArgs` holds the arguments as the caller passed them (bound once, in the public order);
`validate` checks them once. Every check is static (shapes, dtypes, ranks, Python options) and runs
before anything is traced into a kernel. Checks of array *values* (monotonic cu_seqlens, block-table
entries in range) cannot raise inside `jax.jit`; kernels clamp addresses instead so nothing reads
outside a buffer (`checks.check_inputs` is the opt-in eager check).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_varlen_attn.layout import NAMED_LAYOUTS, KVCacheLayout, named_form, resolve
from jax_varlen_attn.spec import FP8_DTYPES as FP8_NAMES, AttentionArrays, AttentionSpec

MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256
FLOAT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
FP8_DTYPES = tuple(jnp.dtype(name) for name in FP8_NAMES)
FP8_DESC = " or ".join(FP8_NAMES)


class AttentionArgs(NamedTuple):
  """`flash_attn_varlen_func`'s arguments as passed (backend / config aside), in its order.

  The first 15 are positional there (vLLM's order); the rest keyword-only. `flash_attn_varlen_func`
  documents each.
  """

  q: Any
  k: Any
  v: Any
  max_seqlen_q: Any = None
  cu_seqlens_q: Any = None
  max_seqlen_k: Any = None
  cu_seqlens_k: Any = None
  seqused_k: Any = None
  softmax_scale: Any = None
  causal: Any = False
  window_size: Any = (-1, -1)
  softcap: Any = 0.0
  alibi_slopes: Any = None
  block_table: Any = None
  return_softmax_lse: Any = False
  kv_layout: Any = "NHD"
  layer: Any = None
  q_descale: Any = None
  k_descale: Any = None
  v_descale: Any = None
  s_aux: Any = None


def is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "shape") and hasattr(x, "dtype")


def array_arg(name: str, x, *, rank: Optional[int] = None, dtypes=None, dtype_desc: str = ""):
  if not is_array(x):
    hint = ORDER_HINT if name.startswith("cu_seqlens") and isinstance(x, numbers.Integral) else ""
    raise TypeError(f"{name} must be an array, got {type(x).__name__}{hint}")
  if rank is not None and x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
  if dtypes is not None and jnp.dtype(x.dtype) not in dtypes:
    raise TypeError(f"{name} must be {dtype_desc}, got {jnp.dtype(x.dtype).name}")
  return x


def int32_arg(name: str, x, rank: int, shape_desc: str):
  if x is None:
    raise ValueError(f"{name} is required: int32 {shape_desc}")
  return array_arg(name, x, rank=rank, dtypes=(jnp.dtype(jnp.int32),), dtype_desc=f"int32 {shape_desc}")


ORDER_HINT = ("; the positional order is vLLM's (q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, "
               "cu_seqlens_k, ...): FlashAttention 2's puts cu_seqlens_q, cu_seqlens_k first, so pass "
               "those by keyword")


def static_int(name: str, x) -> Optional[int]:
  if x is None:
    return None
  if is_array(x) and not isinstance(x, jax.core.Tracer) and getattr(x, "ndim", 0) == 1:
    raise TypeError(f"{name} must be a Python int or None, got {type(x).__name__}{ORDER_HINT}")
  if isinstance(x, jax.core.Tracer):
    raise TypeError(f"{name} must be a static Python int (an upper bound used to size grids), got a "
                    "traced value; pass it as a Python int, or leave it None")
  if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Integral, np.integer)):
    raise TypeError(f"{name} must be a Python int or None, got {type(x).__name__}")
  if int(x) < 0:
    raise ValueError(f"{name} must be >= 0, got {int(x)}")
  return int(x)


def static_float(name: str, x, *, positive: bool) -> float:
  if isinstance(x, jax.core.Tracer):
    raise TypeError(f"{name} must be a static Python float, got a traced value")
  if isinstance(x, (jax.Array, np.ndarray)) and x.shape == () and jnp.issubdtype(x.dtype, jnp.floating):
    x = x.item()  # a concrete scalar (np.float32(0.1) as an array, jnp.float32(0.1)) is its value
  if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Real, np.floating, np.integer)):
    raise TypeError(f"{name} must be a float, got {type(x).__name__}")
  x = float(x)
  if not math.isfinite(x) or (x <= 0 if positive else x < 0):
    raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} float, got {x}")
  return x


def static_bool(name: str, x) -> bool:
  if isinstance(x, jax.core.Tracer):
    raise TypeError(f"{name} must be a static Python bool, got a traced value (mark it static in jax.jit)")
  if not isinstance(x, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
  return bool(x)


def window(window_size) -> Tuple[int, int]:
  if window_size is None:  # vLLM's spelling of unbounded
    return -1, -1
  if isinstance(window_size, (tuple, list)) and any(isinstance(w, jax.core.Tracer) for w in window_size):
    raise TypeError("window_size must be static Python ints (left, right), got a traced value")
  if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
      or not all(isinstance(w, (numbers.Integral, np.integer)) and not isinstance(w, bool)
                 for w in window_size)):
    raise TypeError(f"window_size must be a pair of ints (left, right), -1 for unbounded, got {window_size!r}")
  left, right = (int(w) for w in window_size)
  if left < -1 or right < -1:
    raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {(left, right)}")
  return left, right


def check_kv_layout(kv_layout) -> None:
  """kv_layout is a known name or a KVCacheLayout (shared by write_kv)."""
  if isinstance(kv_layout, str):
    if kv_layout not in NAMED_LAYOUTS:
      raise ValueError(f"kv_layout must be one of {NAMED_LAYOUTS} or a KVCacheLayout, got {kv_layout!r}")
  elif not isinstance(kv_layout, KVCacheLayout):
    raise TypeError(f"kv_layout must be a str or KVCacheLayout, got {type(kv_layout).__name__}")


def validate(args: AttentionArgs) -> Tuple[AttentionSpec, AttentionArrays]:
  """(static spec, normalized arrays) of one call's arguments, or the ValueError / TypeError that
  names the first bad one. Static: shapes, dtypes, ranks and Python options only (module docstring)."""
  (q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k, softmax_scale, causal,
   window_size, softcap, alibi_slopes, block_table, return_softmax_lse, kv_layout, layer, q_descale,
   k_descale, v_descale, s_aux) = args
  q = array_arg("q", q, rank=3, dtypes=FLOAT_DTYPES + FP8_DTYPES,
                dtype_desc=f"float16, bfloat16, float32 or fp8 ({FP8_DESC})")
  total_q, num_heads, head_dim = q.shape
  if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
    raise ValueError(f"q's head_dim (axis 2) must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
  if num_heads < 1:
    raise ValueError(f"q must have at least one head, got shape {tuple(q.shape)}")
  # An empty q has no row for the kernels' first block to read (XLA rejects the gather); engines pad
  # to a bucket of >= 1 row anyway.
  if total_q < 1:
    raise ValueError(f"q must have at least one row (total_q >= 1; pad an empty batch), got shape "
                     f"{tuple(q.shape)}")

  cu_seqlens_q = int32_arg("cu_seqlens_q", cu_seqlens_q, 1, "[batch + 1]")
  batch = cu_seqlens_q.shape[0] - 1
  if batch < 1:
    raise ValueError(f"cu_seqlens_q must have batch + 1 >= 2 entries, got shape {tuple(cu_seqlens_q.shape)}")

  k = array_arg("k", k)
  q_dtype, kv_dtype = jnp.dtype(q.dtype), jnp.dtype(k.dtype)
  if q_dtype in FP8_DTYPES and kv_dtype not in FP8_DTYPES:
    raise TypeError(f"q is {q_dtype.name}: an fp8 q needs an fp8 cache, k {FP8_DESC}, got "
                    f"{kv_dtype.name}")
  if kv_dtype != q_dtype and kv_dtype not in FP8_DTYPES:
    raise TypeError(f"k must have q's dtype {q_dtype.name} or be an fp8 cache ({FP8_DESC}), got "
                    f"{kv_dtype.name}")
  if v is not None:
    v = array_arg("v", v)
    if jnp.dtype(v.dtype) != kv_dtype:
      raise TypeError(f"v must have k's dtype {kv_dtype.name}, got {jnp.dtype(v.dtype).name}")
  kv_fp8 = kv_dtype in FP8_DTYPES

  # kv_layout's type and name are checked first, so that a misspelled name is reported as such and
  # not as "describes a paged cache" on the non-paged path.
  check_kv_layout(kv_layout)

  paged = block_table is not None
  if paged:
    block_table = int32_arg("block_table", block_table, 2, "[batch, max_blocks]")
    if block_table.shape[0] != batch:
      raise ValueError(f"block_table must have batch={batch} rows (len(cu_seqlens_q) - 1), got shape "
                       f"{tuple(block_table.shape)}")
    if block_table.shape[1] < 1:
      raise ValueError("block_table must have at least one column (max_blocks >= 1)")
    layer_value = static_layer(layer)
    if layer is not None:
      layer = layer_arg(layer)
    layout = resolve(kv_layout, k.shape, None if v is None else v.shape, stacked=layer is not None)
    if layer_value is not None and not 0 <= layer_value < layout.num_layers:
      # A traced layer is clamped in the kernel; a static one out of range is a bug we can name
      # (and -1 would otherwise be read as layer 0, not as Python's last layer).
      raise ValueError(f"layer must be in [0, {layout.num_layers}) (axis 0 of k), got {layer_value}")
    num_kv_heads, kv_head_dim = layout.num_kv_heads, layout.head_dim
    if seqused_k is None and cu_seqlens_k is None:
      raise ValueError("a paged cache (block_table) needs seqused_k: int32 [batch], keys per sequence")
    max_blocks, total_k = block_table.shape[1], 0
    capacity = max_blocks * layout.block_size
  else:
    if not (isinstance(kv_layout, str) and kv_layout == "NHD"):
      raise ValueError(f"kv_layout={kv_layout!r} describes a paged cache: pass block_table, or leave "
                       "kv_layout at 'NHD' for non-paged k / v [total_k, Hk, D]")
    if layer is not None:
      raise ValueError("layer= selects a layer of a stacked paged cache: pass block_table too")
    if v is None:
      raise ValueError("v is None: non-paged attention needs v [total_k, Hk, D]")
    array_arg("k", k, rank=3)
    if 0 in tuple(k.shape):
      # No key row to gather from (kernels clamp indices into [0, total_k), which is empty).
      raise ValueError(f"k [total_k, Hk, D] must have no empty axis, got shape {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
      raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    total_k, num_kv_heads, kv_head_dim = k.shape
    if cu_seqlens_k is None:
      raise ValueError("cu_seqlens_k is required without block_table: int32 [batch + 1], key offsets in k")
    layout, max_blocks, capacity = None, 0, total_k

  if kv_head_dim != head_dim:
    raise ValueError(f"k / v head_dim {kv_head_dim} must equal q's head_dim {head_dim}")
  if num_kv_heads < 1 or num_heads % num_kv_heads:
    where = ""
    if layout is not None and isinstance(kv_layout, str):  # a named form: say how Hk was read
      where = (f", read from k's shape {tuple(k.shape)} as kv_layout={kv_layout!r} "
               f"{named_form(kv_layout)} (is the cache laid out another way?)")
    raise ValueError(f"q's num_heads ({num_heads}) must be a multiple of the cache's num_kv_heads "
                     f"({num_kv_heads}) (GQA/MQA){where}")

  if cu_seqlens_k is not None:
    cu_seqlens_k = int32_arg("cu_seqlens_k", cu_seqlens_k, 1, "[batch + 1]")
    if cu_seqlens_k.shape[0] != batch + 1:
      raise ValueError(f"cu_seqlens_k must have batch + 1 = {batch + 1} entries (as cu_seqlens_q), got "
                       f"shape {tuple(cu_seqlens_k.shape)}")
  if seqused_k is not None:
    seqused_k = int32_arg("seqused_k", seqused_k, 1, "[batch]")
    if seqused_k.shape[0] != batch:
      raise ValueError(f"seqused_k must have batch = {batch} entries (len(cu_seqlens_q) - 1), got shape "
                       f"{tuple(seqused_k.shape)}")

  max_seqlen_q = static_int("max_seqlen_q", max_seqlen_q)
  max_seqlen_k = static_int("max_seqlen_k", max_seqlen_k)
  scale = (1.0 / math.sqrt(head_dim) if softmax_scale is None
           else static_float("softmax_scale", softmax_scale, positive=True))
  causal = static_bool("causal", causal)
  left, right = window(window_size)
  # |i + sk - sq - j| < max(total_q, capacity) for every query / key pair, so a wider window is exactly
  # unbounded; saying so keeps huge "infinite" windows (2**40, sys.maxsize) out of int32 kernel math.
  reach = max(total_q, capacity)
  left, right = (-1 if w >= reach else w for w in (left, right))
  if causal:
    right = 0
  softcap = static_float("softcap", softcap, positive=False)
  return_lse = static_bool("return_softmax_lse", return_softmax_lse)

  if alibi_slopes is not None:
    alibi_slopes = array_arg("alibi_slopes", alibi_slopes, dtypes=(jnp.dtype(jnp.float32),),
                             dtype_desc="float32 [num_heads] or [batch, num_heads]")
    if tuple(alibi_slopes.shape) == (num_heads,):
      alibi_slopes = jnp.broadcast_to(jnp.asarray(alibi_slopes), (batch, num_heads))
    elif tuple(alibi_slopes.shape) != (batch, num_heads):
      raise ValueError(f"alibi_slopes must be [num_heads]=({num_heads},) or [batch, num_heads]=({batch}, "
                       f"{num_heads}), got {tuple(alibi_slopes.shape)}")

  # Descales are checked whatever the dtypes; they apply to fp8 tensors only (the docstring says why).
  scales = {name: descale(name, x, batch, num_kv_heads)
            for name, x in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))}
  ones = jnp.ones((batch, num_kv_heads), jnp.float32)  # vLLM's missing descale: 1.0
  q_scale = (ones if scales["q_descale"] is None else scales["q_descale"]) if q_dtype in FP8_DTYPES else None
  k_scale = (ones if scales["k_descale"] is None else scales["k_descale"]) if kv_fp8 else None
  v_scale = (ones if scales["v_descale"] is None else scales["v_descale"]) if kv_fp8 else None
  if s_aux is not None:
    s_aux = array_arg("s_aux", s_aux, dtypes=(jnp.dtype(jnp.float32),), dtype_desc="float32 [num_heads]")
    if tuple(s_aux.shape) != (num_heads,):
      raise ValueError(f"s_aux must be [num_heads]=({num_heads},), one sink logit per q head, got "
                       f"{tuple(s_aux.shape)}")

  if seqused_k is not None:
    seqlens_k = jnp.asarray(seqused_k)
  else:
    cu = jnp.asarray(cu_seqlens_k)
    seqlens_k = cu[1:] - cu[:-1]

  spec = AttentionSpec(
      total_q=total_q, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, batch=batch,
      layout=layout, max_blocks=max_blocks, total_k=total_k,
      max_seqlen_q=total_q if max_seqlen_q is None else min(max_seqlen_q, total_q),
      max_seqlen_k=capacity if max_seqlen_k is None else min(max_seqlen_k, capacity),
      scale=scale, causal=causal, window_left=left, window_right=right, softcap=softcap,
      has_alibi=alibi_slopes is not None, return_lse=return_lse, dtype=q_dtype.name,
      kv_dtype=kv_dtype.name if kv_fp8 else None, has_sinks=s_aux is not None)
  arrays = AttentionArrays(
      q=jnp.asarray(q), k=jnp.asarray(k), v=jnp.asarray(k if v is None else v),
      cu_seqlens_q=jnp.asarray(cu_seqlens_q), seqlens_k=seqlens_k,
      kv_index=jnp.asarray(block_table if paged else cu_seqlens_k),
      alibi=None if alibi_slopes is None else jnp.asarray(alibi_slopes), layer=layer,
      q_descale=q_scale, k_descale=k_scale, v_descale=v_scale,
      s_aux=None if s_aux is None else jnp.asarray(s_aux))
  return spec, arrays


def descale(name: str, x, batch: int, num_kv_heads: int) -> Optional[jax.Array]:
  """A descale argument as f32[batch, num_kv_heads] (None stays None).

  Forms (vLLM's and a per-tensor scale's): f32[batch, Hk], f32[] or f32[1], or a Python float.
  """
  if x is None:
    return None
  want = f"float32 [batch, num_kv_heads]=({batch}, {num_kv_heads}) or a scalar"
  if isinstance(x, (numbers.Real, np.floating)) and not isinstance(x, (bool, np.bool_)):
    return jnp.full((batch, num_kv_heads), x, jnp.float32)
  x = array_arg(name, x, dtypes=(jnp.dtype(jnp.float32),), dtype_desc=want)
  if tuple(x.shape) in ((), (1,)):
    return jnp.broadcast_to(jnp.reshape(jnp.asarray(x), ()), (batch, num_kv_heads))
  if tuple(x.shape) != (batch, num_kv_heads):
    raise ValueError(f"{name} must be [batch, num_kv_heads]=({batch}, {num_kv_heads}) or a scalar "
                     f"(shape () or (1,)), got {tuple(x.shape)}")
  return jnp.asarray(x)


def static_layer(layer) -> Optional[int]:
  """The value of a layer known on the host (Python / NumPy integer), else None (traced or device)."""
  if isinstance(layer, (bool, np.bool_)):
    return None  # layer_arg raises for it
  if isinstance(layer, (numbers.Integral, np.integer)):
    return int(layer)
  if isinstance(layer, np.ndarray) and layer.ndim == 0 and np.issubdtype(layer.dtype, np.integer):
    return int(layer)
  return None


def layer_arg(layer):
  if isinstance(layer, (bool, np.bool_)):
    raise TypeError(f"layer must be an int32 scalar, got {type(layer).__name__}")
  if isinstance(layer, (numbers.Integral, np.integer)):
    return jnp.asarray(layer, jnp.int32)
  if not is_array(layer):
    raise TypeError(f"layer must be an int32 scalar (a Python int or an int32 array of shape ()), got "
                    f"{type(layer).__name__}")
  array_arg("layer", layer, rank=0, dtypes=(jnp.dtype(jnp.int32),), dtype_desc="an int32 scalar")
  return jnp.asarray(layer)
