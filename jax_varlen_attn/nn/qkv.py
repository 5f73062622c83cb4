"""From a fused q|k|v projection to attention's inputs: q / k RMSNorm, RoPE and the cache write.

    q, k_cache, v_cache = rope_write_kv(qkv, k_cache, v_cache, slot_mapping, positions,
                                        num_heads=16, rope_theta=1e6, q_norm_scale=qs, k_norm_scale=ks)

`rope_write_kv` is what `PagedAttention` runs after its fused projection. On the Triton backend it is
one kernel (`backends/triton/rope_write_kernel.py`) in place of the half dozen small XLA kernels a
decode step otherwise spends between the projection and attention; elsewhere it is the jnp form
below, `rope_write_kv_xla`, which defines the semantics. `apply_rope` (over `rope_tables`) and
`rms_norm` are the pieces.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

from jax_varlen_attn import cache
from jax_varlen_attn.layout import KVCacheLayout
from jax_varlen_attn.validation import FP8_DTYPES, array_arg, is_array


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """f32[head_dim // 2]: theta ** (-2i / head_dim)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """(cos, sin), each f32[T, head_dim // 2]: of the angles positions * theta ** (-2i / head_dim)."""
  angles = positions.astype(jnp.float32)[:, None] * rope_frequencies(head_dim, theta)[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, "rotate half" form (Llama / Qwen): x [T, heads, D], positions i32[T].

  Pairs (x[i], x[i + D/2]) rotate by angle positions * theta ** (-2i / D); computed in fp32.
  """
  d = x.shape[-1]
  cos, sin = rope_tables(positions, d, theta)
  cos, sin = cos[:, None, :], sin[:, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, as `flax.nnx.RMSNorm` computes it: in f32,
  x * (rsqrt(mean(x^2) + eps) * scale), rounded to x's dtype. x [..., D], scale [D]."""
  xf = x.astype(jnp.float32)
  mean_sq = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
  return (xf * (jax.lax.rsqrt(mean_sq + eps) * scale.astype(jnp.float32))).astype(x.dtype)


def split_qkv(qkv: jax.Array, num_heads: int, num_kv_heads: int, head_dim: int):
  """qkv [T, (H + 2 Hk) * D], columns q | k | v -> q [T, H, D], k [T, Hk, D], v [T, Hk, D]."""
  t, h, hk, d = qkv.shape[0], num_heads, num_kv_heads, head_dim
  q, k, v = jnp.split(qkv, [h * d, (h + hk) * d], axis=-1)
  return q.reshape(t, h, d), k.reshape(t, hk, d), v.reshape(t, hk, d)


def rope_write_kv(qkv, k_cache, v_cache, slot_mapping, positions, *, num_heads: int, rope_theta: float,
                  q_norm_scale=None, k_norm_scale=None, eps: float = 1e-6,
                  kv_layout: Union[str, KVCacheLayout] = "NHD", layer=None, backend: str = "auto"):
  """Splits a fused projection into heads, RMSNorms q and k per head, rotates them (RoPE), stores K
  and V into the paged cache in place; returns (q, k_cache, v_cache).

  Example (4 q / 2 kv heads of 32; two tokens at positions 7 and 8 into page 1)::

      k_cache = v_cache = jnp.zeros((4, 16, 2, 32), jnp.bfloat16)       # [num_blocks, block_size, Hk, D]
      qkv = jnp.ones((2, (4 + 2 * 2) * 32), jnp.bfloat16)
      q, k_cache, v_cache = rope_write_kv(
          qkv, k_cache, v_cache, jnp.array([23, 24], jnp.int32), jnp.array([7, 8], jnp.int32),
          num_heads=4, rope_theta=1e4, q_norm_scale=jnp.ones(32), k_norm_scale=jnp.ones(32))

  The same as, and on every backend but Triton computed as, `rope_write_kv_xla`:
  q, k, v = split_qkv(qkv); q, k = rms_norm(q), rms_norm(k) (when the scales are given);
  q, k = apply_rope(q), apply_rope(k); write_kv(k, v, ...).

  Args (T tokens, H q heads, Hk kv heads, D head_dim):
    qkv: [T, (H + 2 Hk) * D] in the cache's dtype (float16, bfloat16 or float32): q heads, then k
      heads, then v heads (`PagedAttention(fused_qkv=True)`'s projection).
    k_cache, v_cache: separate K and V caches as `kv_layout` describes them (NHD / HND or a
      `KVCacheLayout`; not fp8 and not the fused forms: use `write_kv` for those).
    slot_mapping: i32[T], as `write_kv`'s (-1 or a slot outside the cache: not stored).
    positions: i32[T], each token's position in its sequence (RoPE).
    num_heads: H, a multiple of the cache's Hk. rope_theta: RoPE's base (> 0).
    q_norm_scale, k_norm_scale: [D] RMSNorm scales of q and of k heads (both or neither); eps its
      epsilon.
    layer: a stacked cache's layer, as `write_kv`'s. backend: as `write_kv`'s ("pallas" takes the
      jnp form).

  Returns:
    q [T, H, D] in qkv's dtype, and the updated caches (the input buffers, in place under donation).
  """
  if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
    raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
  if not isinstance(rope_theta, (int, float)) or isinstance(rope_theta, bool) or not rope_theta > 0:
    raise ValueError(f"rope_theta must be a number > 0, got {rope_theta!r}")
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
    raise ValueError(f"eps must be a number >= 0, got {eps!r}")
  if (q_norm_scale is None) != (k_norm_scale is None):
    raise ValueError("q_norm_scale and k_norm_scale go together: give both or neither")
  if v_cache is None:
    raise ValueError("rope_write_kv takes separate k_cache and v_cache; for a fused cache form, "
                     "compute q / k / v and call write_kv")
  # The cache's checks are write_kv's; its heads and head_dim shape qkv. (write_kv's own checks on
  # the K / V views follow, in cache._validate.)
  cache_layout, k_cache, v_cache, layer = cache.validate_cache(k_cache, v_cache, kv_layout, layer)
  if jnp.dtype(k_cache.dtype) in FP8_DTYPES:
    raise TypeError(f"rope_write_kv does not quantize: k_cache is {jnp.dtype(k_cache.dtype).name}; "
                    "compute q / k / v and call write_kv with k_scale / v_scale")
  qkv = array_arg("qkv", qkv, rank=2)
  if not is_array(positions):
    raise TypeError(f"positions must be an array, got {type(positions).__name__}")
  positions = array_arg("positions", positions, rank=1, dtypes=(jnp.dtype(jnp.int32),),
                        dtype_desc=f"int32 [T={qkv.shape[0]}]")
  if positions.shape[0] != qkv.shape[0]:
    raise ValueError(f"positions must have one entry per token (T={qkv.shape[0]}, axis 0 of qkv), got "
                     f"shape {tuple(positions.shape)}")
  hk, d = cache_layout.num_kv_heads, cache_layout.head_dim
  if num_heads % hk:
    raise ValueError(f"num_heads ({num_heads}) must be a multiple of the cache's num_kv_heads ({hk})")
  width = (num_heads + 2 * hk) * d
  if qkv.shape[1] != width:
    raise ValueError(f"qkv must be [T, (num_heads + 2 * num_kv_heads) * head_dim] = [T, {width}] for "
                     f"num_heads={num_heads} and the cache's num_kv_heads={hk}, head_dim={d}; got "
                     f"{tuple(qkv.shape)}")
  for name, s in (("q_norm_scale", q_norm_scale), ("k_norm_scale", k_norm_scale)):
    if s is not None:
      s = array_arg(name, s, rank=1)
      if s.shape[0] != d:
        raise ValueError(f"{name} must be [head_dim={d}], got {tuple(s.shape)}")
  _, k, v = split_qkv(qkv, num_heads, hk, d)
  layout, args = cache._validate(k, v, k_cache, v_cache, slot_mapping, kv_layout, layer)
  _, _, k_cache, v_cache, slot_mapping, layer, _ = args
  name = cache._select(backend)
  return _run(name, layout, num_heads, float(rope_theta), float(eps), jnp.asarray(qkv), k_cache, v_cache,
              slot_mapping, jnp.asarray(positions), q_norm_scale, k_norm_scale, layer)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _run(backend_name: str, layout: KVCacheLayout, num_heads: int, rope_theta: float, eps: float, qkv,
         k_cache, v_cache, slot_mapping, positions, q_norm_scale, k_norm_scale, layer):
  if backend_name == "triton" and qkv.shape[0]:
    from jax_varlen_attn.backends.triton import rope_write_kernel  # imports triton: only when asked

    cos, sin = rope_tables(positions, layout.head_dim, rope_theta)
    return rope_write_kernel.rope_write_kv(layout, qkv, cos, sin, q_norm_scale, k_norm_scale, eps,
                                           num_heads, k_cache, v_cache, slot_mapping, layer)
  return rope_write_kv_xla(layout, num_heads, rope_theta, eps, qkv, k_cache, v_cache, slot_mapping, positions,
                           q_norm_scale, k_norm_scale, layer)


def rope_write_kv_xla(layout: KVCacheLayout, num_heads: int, rope_theta: float, eps: float, qkv, k_cache,
                      v_cache, slot_mapping, positions, q_norm_scale: Optional[jax.Array],
                      k_norm_scale: Optional[jax.Array], layer):
  """The jnp form (the semantics): split, RMSNorm q and k (scales given), RoPE, `write_kv_xla`."""
  q, k, v = split_qkv(qkv, num_heads, layout.num_kv_heads, layout.head_dim)
  if q_norm_scale is not None:
    q, k = rms_norm(q, q_norm_scale, eps), rms_norm(k, k_norm_scale, eps)
  q, k = apply_rope(q, positions, rope_theta), apply_rope(k, positions, rope_theta)
  if not qkv.shape[0]:
    return q, k_cache, v_cache
  k_cache, v_cache = cache.write_kv_xla(layout, k, v, k_cache, v_cache, slot_mapping, layer)
  return q, k_cache, v_cache
