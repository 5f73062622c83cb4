"""The public function: validates every argument, normalizes options, picks a backend.

Every check here is static (shapes, dtypes, ranks, Python options) and runs before anything is traced
into a kernel. Checks of array *values* (monotonic cu_seqlens, block-table entries in range) cannot raise
inside `jax.jit`; kernels clamp addresses instead so nothing reads outside a buffer.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jax_varlen_attn import backends as registry
from jax_varlen_attn import sharding
from jax_varlen_attn.layout import NAMED_LAYOUTS, KVCacheLayout, named_form, resolve
from jax_varlen_attn.spec import FP8_DTYPES, AttentionArrays, AttentionSpec

MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256
_FLOAT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
_FP8_DTYPES = tuple(jnp.dtype(name) for name in FP8_DTYPES)
_FP8_DESC = " or ".join(FP8_DTYPES)


def flash_attn_varlen_func(
    q, k, v, max_seqlen_q=None, cu_seqlens_q=None, max_seqlen_k=None, cu_seqlens_k=None,
    seqused_k=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, block_table=None, return_softmax_lse=False, *,
    kv_layout: Union[str, KVCacheLayout] = "NHD", layer=None, backend: str = "auto", config=None,
    q_descale=None, k_descale=None, v_descale=None, s_aux=None):
  """Variable-length attention over packed sequences, with a contiguous or paged KV cache.

  Example (a prefill of 3 tokens and a decode of 1 over a paged NHD cache)::

      import jax, jax.numpy as jnp
      from jax_varlen_attn import flash_attn_varlen_func
      ks = jax.random.split(jax.random.key(0), 3)
      q = jax.random.normal(ks[0], (4, 8, 64), jnp.float16)              # [total_q, H, D]
      k_cache = jax.random.normal(ks[1], (16, 16, 2, 64), jnp.float16)   # [num_blocks, block_size, Hk, D]
      v_cache = jax.random.normal(ks[2], (16, 16, 2, 64), jnp.float16)
      out = flash_attn_varlen_func(
          q, k_cache, v_cache, cu_seqlens_q=jnp.array([0, 3, 4], jnp.int32),
          seqused_k=jnp.array([3, 20], jnp.int32),
          block_table=jnp.array([[0, 0], [5, 2]], jnp.int32), causal=True)  # out: [4, 8, 64] f16

  Args (shapes: T = total_q rows, B = batch, H / Hk = q / kv heads, D = head_dim):
    q: f16/bf16/f32[T, H, D], or fp8 (float8_e4m3fn / float8_e5m2, with an fp8 cache). Rows past
      `cu_seqlens_q[-1]` are padding: they output zeros.
    k, v: non-paged: [total_k, Hk, D] (with `cu_seqlens_k`). Paged: the cache as `kv_layout`
      describes it (with `block_table`); `v=None` where V lives in k's buffer (fused forms).
      In q's dtype, or an fp8 cache (float8_e4m3fn / float8_e5m2, k and v alike) read with
      `k_descale` / `v_descale`.
    max_seqlen_q, max_seqlen_k: optional static Python ints, upper bounds of the per-sequence
      lengths (hints for block sizes and split counts; a traced value is a TypeError).
    cu_seqlens_q: i32[B + 1], query offsets of each sequence in q.
    cu_seqlens_k: i32[B + 1], key offsets in k / v (non-paged; paged: used for lengths if
      `seqused_k` is None).
    seqused_k: i32[B], keys of each sequence (required for a paged cache unless cu_seqlens_k is given).
    softmax_scale: positive finite float; default 1 / sqrt(D).
    causal: bottom-right aligned: query i of a sequence sees key j iff j <= i + seqlen_k - seqlen_q.
    window_size: (left, right), -1 (or window_size=None) unbounded: key j allowed iff
      i + sk - sq - left <= j <= i + sk - sq + right (right is 0 under causal).
    softcap: > 0 turns scores into softcap * tanh(score / softcap) (before ALiBi and masking).
    alibi_slopes: f32[H] or f32[B, H]; adds -slope * |i + sk - sq - j| to the score.
    block_table: i32[B, max_blocks], pages of each sequence (entries past a sequence's pages are
      never read; an out-of-range entry within them is clamped into the cache).
    return_softmax_lse: also return the log-sum-exp, f32[H, T] (see Returns).
    kv_layout: "NHD" (default), "HND", "fused_page_major", "fused_kv_major" or a `KVCacheLayout`.
    layer: i32[] (traced is fine) selecting a layer of a stacked cache [L, ...] (a traced value is
      clamped to [0, L); a Python / NumPy int outside it is a ValueError).
    backend: "auto" (triton on a CUDA GPU, else xla), "xla", "pallas" or "triton".
    config: the chosen backend's `Config` (block sizes), or None for its default.
    k_descale, v_descale: f32[B, Hk], or a scalar (f32[] / f32[1] / a Python float: every
      sequence and head), dequantization scales of an fp8 cache (vLLM's names and shapes): the key
      sequence b reads in kv head h is `float(k element) * k_descale[b, h]`, likewise V. None: 1.0
      (as vLLM). Applied as given, sign included. With a cache in q's dtype (not fp8) they are
      checked and ignored, as FlashAttention 3 does, so vLLM's calls (which always pass them) port.
    q_descale: the same for an fp8 q (q row of sequence b, q head h: `float(q) * q_descale[b,
      h // (H / Hk)]`); checked and ignored for a q that is not fp8.
    s_aux: f32[H], attention sinks (gpt-oss): logit s_aux[h] joins the softmax denominator of
      every row of q head h and carries no value: out = sum_j exp(s_j) v_j / (exp(s_aux[h]) +
      sum_j exp(s_j)). -inf is no sink for that head.

  Returns:
    out [T, H, D] in q's dtype (bfloat16 for an fp8 q, as FlashAttention 3), or (out, lse) when
    `return_softmax_lse`. A row that sees no key (zero-length sequence, empty window) outputs zeros;
    padding rows (past cu_seqlens_q[-1]) output zeros too.
    lse: f32[H, T], the natural log of the softmax denominator, sinks included: log(exp(s_aux[h])
    + sum_j exp(s_j)). A row of a sequence that sees no key has lse +inf without a sink and
    s_aux[h] with one (its denominator is exp(s_aux[h]): out is still zeros); padding rows have
    +inf.

  fp8 precision: keys and values are converted to the compute dtype exactly (every fp8 value is an
  fp16 / bf16 / f32 value); descales are applied to the scores (q.k * k_descale) and to the output
  (p @ v * v_descale), exact up to f32 rounding. An fp8 q computes in fp16.

  Positional order: vLLM's (q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, ...).
  FlashAttention 2's `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, ...)` differs: pass the lengths by keyword. There is no `out=` argument: JAX arrays
  are immutable; the result is returned (jit with donation reuses buffers). Forward only: any
  derivative raises a TypeError.

  Multi-device (heads split over a mesh axis, no communication): inside `jax.shard_map` pass each
  device's arrays; under `jax.jit` on an Explicit mesh (`jax.make_mesh`'s default), or outside jit,
  a q / cache split on its head axis is detected and each device runs on its own heads. On an Auto
  mesh use `sharded_flash_attn_varlen_func(mesh, head_axis, ...)`. See `jax_varlen_attn.sharding`.
  Descales split with the kv heads (axis 1) and `s_aux` with the q heads.
  """
  return _attention(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k,
                    softmax_scale, causal, window_size, softcap, alibi_slopes, block_table,
                    return_softmax_lse, kv_layout=kv_layout, layer=layer, backend=backend,
                    config=config, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                    s_aux=s_aux, heads=None)


def sharded_flash_attn_varlen_func(mesh, head_axis, *args, **kwargs):
  """`flash_attn_varlen_func` with the heads split over mesh axis `head_axis`: no communication.

  Each of the n devices on `head_axis` (an axis name or a tuple of them) computes H/n q heads
  from its Hk/n kv heads. Use it under `jax.jit` on a mesh with Auto axes, where the arrays' types
  carry no sharding to detect; anywhere else it is the same as letting `flash_attn_varlen_func`
  detect the split. The arguments after (mesh, head_axis) are flash_attn_varlen_func's.

      mesh = jax.sharding.Mesh(jax.devices(), ("tp",))
      step = jax.jit(lambda q, k, v, cu, used, bt: sharded_flash_attn_varlen_func(
          mesh, "tp", q, k, v, cu_seqlens_q=cu, seqused_k=used, block_table=bt, causal=True))

  Inputs already split that way (q on axis 1, the cache on its kv-head axis: NHD 2, HND 1, fused
  forms 3, one more when layer-stacked; non-paged k / v 1) are used in place; others are resharded
  (a replicated input is sliced locally). Metadata (cu_seqlens, block_table, seqused_k) is used
  replicated. Returns out [T, H, D] (and lse [H, T]) split on H.

  Raises ValueError when num_kv_heads is not a multiple of the number of devices on `head_axis`,
  or for a `KVCacheLayout` (its kv-head axis is unknown: use jax.shard_map with per-device arrays).

  Descales ([B, Hk]) are split on their kv-head axis and `s_aux` ([H]) on its heads, like q.
  """
  bound = inspect.signature(flash_attn_varlen_func).bind(*args, **kwargs)
  bound.apply_defaults()
  return _attention(**bound.arguments, heads=(mesh, head_axis))


def _attention(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k,
               softmax_scale, causal, window_size, softcap, alibi_slopes, block_table,
               return_softmax_lse, *, kv_layout, layer, backend, config, heads, q_descale=None,
               k_descale=None, v_descale=None, s_aux=None):
  """heads: None (split as q's / the cache's sharding says, if it says) or (mesh, head_axis)."""
  spec, arrays = _validate(
      q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k, softmax_scale,
      causal, window_size, softcap, alibi_slopes, block_table, return_softmax_lse, kv_layout, layer,
      q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, s_aux=s_aux)
  impl = registry.select(backend)
  split = sharding.detect(spec, arrays) if heads is None else sharding.plan(spec, arrays, *heads)
  run_spec = spec if split is None else split.local_spec  # what each device's kernel sees
  if config is None:
    config = impl.config_cls.get_default(run_spec)
  elif not isinstance(config, impl.config_cls):
    raise TypeError(f"config for backend={impl.name!r} must be a jax_varlen_attn."
                    f"{impl.name.capitalize()}Config, got {type(config).__name__}")
  if split is None:
    # Inputs split on an Explicit mesh that we do not take up (a KVCacheLayout: its head axis is
    # unknown) are gathered first: jax's sharding-in-types would reject the unsplit computation.
    arrays = sharding.replicate_explicit(arrays)
    out, lse = _forward_only(_run, (impl.name, spec, config), arrays)
  else:
    out, lse = _forward_only(_run_split, (impl.name, spec, config, split), arrays)
  return (out, lse) if return_softmax_lse else out


FORWARD_ONLY = ("flash_attn_varlen_func is forward-only: it defines no derivative (jax.grad, jax.vjp, "
                "jax.jvp). For inference inside a differentiated function, pass its inputs through "
                "jax.lax.stop_gradient.")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _forward_only(run, static, arrays):
  """run(*static, arrays), with a derivative rule that raises FORWARD_ONLY (instead of an error
  from deep inside a backend: a while_loop's reverse mode, a Pallas assertion)."""
  return run(*static, arrays)


@_forward_only.defjvp
def _no_derivative(run, static, primals, tangents):
  raise TypeError(FORWARD_ONLY)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(backend_name: str, spec: AttentionSpec, config, arrays: AttentionArrays):
  return registry.load(backend_name).attention(spec, arrays, config)  # selected by _attention


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run_split(backend_name: str, spec: AttentionSpec, config, split, arrays: AttentionArrays):
  """_run on each device's heads (split: a sharding.HeadSplit)."""
  local = functools.partial(_run, backend_name, split.local_spec, config)
  return sharding.shard_heads(local, split, spec, arrays)


# ---- static validation ---------------------------------------------------------------------------

def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "shape") and hasattr(x, "dtype")


def _array(name: str, x, *, rank: Optional[int] = None, dtypes=None, dtype_desc: str = ""):
  if not _is_array(x):
    hint = _ORDER_HINT if name.startswith("cu_seqlens") and isinstance(x, numbers.Integral) else ""
    raise TypeError(f"{name} must be an array, got {type(x).__name__}{hint}")
  if rank is not None and x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
  if dtypes is not None and jnp.dtype(x.dtype) not in dtypes:
    raise TypeError(f"{name} must be {dtype_desc}, got {jnp.dtype(x.dtype).name}")
  return x


def _int32(name: str, x, rank: int, shape_desc: str):
  if x is None:
    raise ValueError(f"{name} is required: int32 {shape_desc}")
  return _array(name, x, rank=rank, dtypes=(jnp.dtype(jnp.int32),), dtype_desc=f"int32 {shape_desc}")


_ORDER_HINT = ("; the positional order is vLLM's (q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, "
               "cu_seqlens_k, ...): FlashAttention 2's puts cu_seqlens_q, cu_seqlens_k first, so pass "
               "those by keyword")


def _static_int(name: str, x) -> Optional[int]:
  if x is None:
    return None
  if _is_array(x) and not isinstance(x, jax.core.Tracer) and getattr(x, "ndim", 0) == 1:
    raise TypeError(f"{name} must be a Python int or None, got {type(x).__name__}{_ORDER_HINT}")
  if isinstance(x, jax.core.Tracer):
    raise TypeError(f"{name} must be a static Python int (an upper bound used to size grids), got a "
                    "traced value; pass it as a Python int, or leave it None")
  if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Integral, np.integer)):
    raise TypeError(f"{name} must be a Python int or None, got {type(x).__name__}")
  if int(x) < 0:
    raise ValueError(f"{name} must be >= 0, got {int(x)}")
  return int(x)


def _static_float(name: str, x, *, positive: bool) -> float:
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


def _static_bool(name: str, x) -> bool:
  if isinstance(x, jax.core.Tracer):
    raise TypeError(f"{name} must be a static Python bool, got a traced value (mark it static in jax.jit)")
  if not isinstance(x, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
  return bool(x)


def _window(window_size) -> Tuple[int, int]:
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


def _check_kv_layout(kv_layout) -> None:
  """kv_layout is a known name or a KVCacheLayout (shared by write_kv)."""
  if isinstance(kv_layout, str):
    if kv_layout not in NAMED_LAYOUTS:
      raise ValueError(f"kv_layout must be one of {NAMED_LAYOUTS} or a KVCacheLayout, got {kv_layout!r}")
  elif not isinstance(kv_layout, KVCacheLayout):
    raise TypeError(f"kv_layout must be a str or KVCacheLayout, got {type(kv_layout).__name__}")


def _validate(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k,
              softmax_scale, causal, window_size, softcap, alibi_slopes, block_table,
              return_softmax_lse, kv_layout, layer, *, q_descale=None, k_descale=None,
              v_descale=None, s_aux=None) -> Tuple[AttentionSpec, AttentionArrays]:
  q = _array("q", q, rank=3, dtypes=_FLOAT_DTYPES + _FP8_DTYPES,
             dtype_desc=f"float16, bfloat16, float32 or fp8 ({_FP8_DESC})")
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

  cu_seqlens_q = _int32("cu_seqlens_q", cu_seqlens_q, 1, "[batch + 1]")
  batch = cu_seqlens_q.shape[0] - 1
  if batch < 1:
    raise ValueError(f"cu_seqlens_q must have batch + 1 >= 2 entries, got shape {tuple(cu_seqlens_q.shape)}")

  k = _array("k", k)
  q_dtype, kv_dtype = jnp.dtype(q.dtype), jnp.dtype(k.dtype)
  if q_dtype in _FP8_DTYPES and kv_dtype not in _FP8_DTYPES:
    raise TypeError(f"q is {q_dtype.name}: an fp8 q needs an fp8 cache, k {_FP8_DESC}, got "
                    f"{kv_dtype.name}")
  if kv_dtype != q_dtype and kv_dtype not in _FP8_DTYPES:
    raise TypeError(f"k must have q's dtype {q_dtype.name} or be an fp8 cache ({_FP8_DESC}), got "
                    f"{kv_dtype.name}")
  if v is not None:
    v = _array("v", v)
    if jnp.dtype(v.dtype) != kv_dtype:
      raise TypeError(f"v must have k's dtype {kv_dtype.name}, got {jnp.dtype(v.dtype).name}")
  kv_fp8 = kv_dtype in _FP8_DTYPES

  # kv_layout's type and name are checked first, so that a misspelled name is reported as such and
  # not as "describes a paged cache" on the non-paged path.
  _check_kv_layout(kv_layout)

  paged = block_table is not None
  if paged:
    block_table = _int32("block_table", block_table, 2, "[batch, max_blocks]")
    if block_table.shape[0] != batch:
      raise ValueError(f"block_table must have batch={batch} rows (len(cu_seqlens_q) - 1), got shape "
                       f"{tuple(block_table.shape)}")
    if block_table.shape[1] < 1:
      raise ValueError("block_table must have at least one column (max_blocks >= 1)")
    static_layer = _static_layer(layer)
    if layer is not None:
      layer = _layer(layer)
    layout = resolve(kv_layout, k.shape, None if v is None else v.shape, stacked=layer is not None)
    if static_layer is not None and not 0 <= static_layer < layout.num_layers:
      # A traced layer is clamped in the kernel; a static one out of range is a bug we can name
      # (and -1 would otherwise be read as layer 0, not as Python's last layer).
      raise ValueError(f"layer must be in [0, {layout.num_layers}) (axis 0 of k), got {static_layer}")
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
    _array("k", k, rank=3)
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
    cu_seqlens_k = _int32("cu_seqlens_k", cu_seqlens_k, 1, "[batch + 1]")
    if cu_seqlens_k.shape[0] != batch + 1:
      raise ValueError(f"cu_seqlens_k must have batch + 1 = {batch + 1} entries (as cu_seqlens_q), got "
                       f"shape {tuple(cu_seqlens_k.shape)}")
  if seqused_k is not None:
    seqused_k = _int32("seqused_k", seqused_k, 1, "[batch]")
    if seqused_k.shape[0] != batch:
      raise ValueError(f"seqused_k must have batch = {batch} entries (len(cu_seqlens_q) - 1), got shape "
                       f"{tuple(seqused_k.shape)}")

  max_seqlen_q = _static_int("max_seqlen_q", max_seqlen_q)
  max_seqlen_k = _static_int("max_seqlen_k", max_seqlen_k)
  scale = (1.0 / math.sqrt(head_dim) if softmax_scale is None
           else _static_float("softmax_scale", softmax_scale, positive=True))
  causal = _static_bool("causal", causal)
  left, right = _window(window_size)
  # |i + sk - sq - j| < max(total_q, capacity) for every query / key pair, so a wider window is exactly
  # unbounded; saying so keeps huge "infinite" windows (2**40, sys.maxsize) out of int32 kernel math.
  reach = max(total_q, capacity)
  left, right = (-1 if w >= reach else w for w in (left, right))
  if causal:
    right = 0
  softcap = _static_float("softcap", softcap, positive=False)
  return_lse = _static_bool("return_softmax_lse", return_softmax_lse)

  if alibi_slopes is not None:
    alibi_slopes = _array("alibi_slopes", alibi_slopes, dtypes=(jnp.dtype(jnp.float32),),
                          dtype_desc="float32 [num_heads] or [batch, num_heads]")
    if tuple(alibi_slopes.shape) == (num_heads,):
      alibi_slopes = jnp.broadcast_to(jnp.asarray(alibi_slopes), (batch, num_heads))
    elif tuple(alibi_slopes.shape) != (batch, num_heads):
      raise ValueError(f"alibi_slopes must be [num_heads]=({num_heads},) or [batch, num_heads]=({batch}, "
                       f"{num_heads}), got {tuple(alibi_slopes.shape)}")

  # Descales are checked whatever the dtypes; they apply to fp8 tensors only (the docstring says why).
  scales = {name: _descale(name, x, batch, num_kv_heads)
            for name, x in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))}
  ones = jnp.ones((batch, num_kv_heads), jnp.float32)  # vLLM's missing descale: 1.0
  q_scale = (ones if scales["q_descale"] is None else scales["q_descale"]) if q_dtype in _FP8_DTYPES else None
  k_scale = (ones if scales["k_descale"] is None else scales["k_descale"]) if kv_fp8 else None
  v_scale = (ones if scales["v_descale"] is None else scales["v_descale"]) if kv_fp8 else None
  if s_aux is not None:
    s_aux = _array("s_aux", s_aux, dtypes=(jnp.dtype(jnp.float32),), dtype_desc="float32 [num_heads]")
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


def _descale(name: str, x, batch: int, num_kv_heads: int) -> Optional[jax.Array]:
  """A descale argument as f32[batch, num_kv_heads] (None stays None).

  Forms (vLLM's and a per-tensor scale's): f32[batch, Hk], f32[] or f32[1], or a Python float.
  """
  if x is None:
    return None
  want = f"float32 [batch, num_kv_heads]=({batch}, {num_kv_heads}) or a scalar"
  if isinstance(x, (numbers.Real, np.floating)) and not isinstance(x, (bool, np.bool_)):
    return jnp.full((batch, num_kv_heads), x, jnp.float32)
  x = _array(name, x, dtypes=(jnp.dtype(jnp.float32),), dtype_desc=want)
  if tuple(x.shape) in ((), (1,)):
    return jnp.broadcast_to(jnp.reshape(jnp.asarray(x), ()), (batch, num_kv_heads))
  if tuple(x.shape) != (batch, num_kv_heads):
    raise ValueError(f"{name} must be [batch, num_kv_heads]=({batch}, {num_kv_heads}) or a scalar "
                     f"(shape () or (1,)), got {tuple(x.shape)}")
  return jnp.asarray(x)


def _static_layer(layer) -> Optional[int]:
  """The value of a layer known on the host (Python / NumPy integer), else None (traced or device)."""
  if isinstance(layer, (bool, np.bool_)):
    return None  # _layer raises for it
  if isinstance(layer, (numbers.Integral, np.integer)):
    return int(layer)
  if isinstance(layer, np.ndarray) and layer.ndim == 0 and np.issubdtype(layer.dtype, np.integer):
    return int(layer)
  return None


def _layer(layer):
  if isinstance(layer, (bool, np.bool_)):
    raise TypeError(f"layer must be an int32 scalar, got {type(layer).__name__}")
  if isinstance(layer, (numbers.Integral, np.integer)):
    return jnp.asarray(layer, jnp.int32)
  if not _is_array(layer):
    raise TypeError(f"layer must be an int32 scalar (a Python int or an int32 array of shape ()), got "
                    f"{type(layer).__name__}")
  _array("layer", layer, rank=0, dtypes=(jnp.dtype(jnp.int32),), dtype_desc="an int32 scalar")
  return jnp.asarray(layer)
