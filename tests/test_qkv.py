"""`jax_varlen_attn.nn.rope_write_kv` (projection -> q-k RMSNorm -> RoPE -> cache write) on every backend
against a float64 NumPy oracle written here from the docstring's semantics.

The caches start as random values with NaN poison in half of the pages; after the call every element
that no valid slot names must be bit-for-bit what it was, and the written rows must match the
oracle's normed, rotated K and the raw V. Padding tokens (slot -1), slots past the cache and (stacked)
a traced layer out of range write nothing.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("flax")

from jax_varlen_attn.nn import qkv as qkv_mod  # noqa: E402
from jax_varlen_attn.nn.qkv import rope_write_kv  # noqa: E402
from tests.write_backends import BACKENDS  # noqa: E402


NP = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
# f32: the RoPE angle is an f32 product (position * inv_freq), off by up to ~position * 2**-24 rad.
TOL = {"bfloat16": 2e-2, "float16": 4e-3, "float32": 1e-3}


def oracle(qkv, positions, num_heads, num_kv_heads, head_dim, theta, q_scale, k_scale, eps):
  """float64: (q [T, H, D], k [T, Hk, D], v [T, Hk, D]) from the semantics, no rounding."""
  x = np.asarray(qkv, np.float64)
  t, h, hk, d = x.shape[0], num_heads, num_kv_heads, head_dim
  q = x[:, :h * d].reshape(t, h, d)
  k = x[:, h * d:(h + hk) * d].reshape(t, hk, d)
  v = x[:, (h + hk) * d:].reshape(t, hk, d)

  def norm(y, s):
    return y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + eps) * np.asarray(s, np.float64)

  def rope(y):
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.asarray(positions, np.float64)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    y1, y2 = y[..., :d // 2], y[..., d // 2:]
    return np.concatenate([y1 * c - y2 * s, y2 * c + y1 * s], axis=-1)

  if q_scale is not None:
    q, k = norm(q, q_scale), norm(k, k_scale)
  return rope(q), rope(k), v


def _cache(rng, shape, dtype):
  """Random values, with NaN poison in every other page (axis -4: pages, for NHD and HND alike)."""
  c = rng.standard_normal(shape).astype(np.float32)
  c[..., 1::2, :, :, :] = np.nan
  return c.astype(NP[dtype])


def _rows(layout, cache, slot, head, layer):
  """The [D] row of (slot, head) in the numpy cache of `layout` (NHD / HND, optionally stacked)."""
  c = cache if layer is None else cache[layer]
  page, off = divmod(slot, c.shape[1] if layout == "NHD" else c.shape[2])
  return c[page, off, head] if layout == "NHD" else c[page, head, off]


CASES = [
    # (layout, stacked, dtype, H, Hk, D, T, qk_norm)
    ("NHD", False, "bfloat16", 4, 2, 32, 5, True),
    ("NHD", True, "bfloat16", 4, 2, 64, 19, True),
    ("HND", False, "float16", 2, 2, 32, 3, True),
    ("NHD", False, "float32", 6, 2, 32, 4, False),
    ("HND", True, "float32", 8, 2, 16, 17, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_oracle_and_writes_only_its_slots(backend, case):
  layout, stacked, dtype, h, hk, d, t, qk_norm = case
  rng = np.random.default_rng(hash(case) % 2**32)
  num_blocks, bs, layers = 6, 4, 3
  shape = (num_blocks, bs, hk, d) if layout == "NHD" else (num_blocks, hk, bs, d)
  if stacked:
    shape = (layers,) + shape
  k0, v0 = _cache(rng, shape, dtype), _cache(rng, shape, dtype)
  # Slots: distinct, some in poisoned pages; the last token padding (-1), one past the cache.
  slots = rng.choice(num_blocks * bs, size=t, replace=False).astype(np.int32)
  slots[-1] = -1
  if t > 3:
    slots[1] = num_blocks * bs + 5
  positions = rng.integers(0, 5000, t).astype(np.int32)
  qkv = (rng.standard_normal((t, (h + 2 * hk) * d)) * 2).astype(NP[dtype])
  qs = (1 + 0.3 * rng.standard_normal(d)).astype(NP[dtype]) if qk_norm else None
  ks = (1 + 0.3 * rng.standard_normal(d)).astype(NP[dtype]) if qk_norm else None
  layer = 1 if stacked else None

  q, k_cache, v_cache = rope_write_kv(
      jnp.asarray(qkv), jnp.asarray(k0), jnp.asarray(v0), jnp.asarray(slots), jnp.asarray(positions),
      num_heads=h, rope_theta=1e4, q_norm_scale=None if qs is None else jnp.asarray(qs),
      k_norm_scale=None if ks is None else jnp.asarray(ks), eps=1e-6, kv_layout=layout,
      layer=None if layer is None else jnp.int32(layer), backend=backend)
  q_ref, k_ref, v_ref = oracle(qkv.astype(np.float32), positions, h, hk, d, 1e4,
                               None if qs is None else qs.astype(np.float32),
                               None if ks is None else ks.astype(np.float32), 1e-6)
  assert q.shape == (t, h, d) and q.dtype == jnp.dtype(dtype)
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(q, np.float64), q_ref, rtol=tol, atol=tol * 4)

  k_out, v_out = np.asarray(k_cache), np.asarray(v_cache)
  expect_k, expect_v = k0.copy(), v0.copy()
  for i, s in enumerate(slots):
    if not 0 <= s < num_blocks * bs:
      continue
    for j in range(hk):
      got_k = _rows(layout, k_out, int(s), j, layer).astype(np.float64)
      got_v = _rows(layout, v_out, int(s), j, layer).astype(np.float64)
      np.testing.assert_allclose(got_k, k_ref[i, j], rtol=tol, atol=tol * 4)
      np.testing.assert_array_equal(got_v, v_ref[i, j])  # V is stored as it comes
      _rows(layout, expect_k, int(s), j, layer)[...] = _rows(layout, k_out, int(s), j, layer)
      _rows(layout, expect_v, int(s), j, layer)[...] = _rows(layout, v_out, int(s), j, layer)
  # Everything else untouched, NaN poison included (compared as bits).
  u = np.uint16 if np.dtype(NP[dtype]).itemsize == 2 else np.uint32
  np.testing.assert_array_equal(k_out.view(u), expect_k.view(u))
  np.testing.assert_array_equal(v_out.view(u), expect_v.view(u))


@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_layer_out_of_range_writes_nothing(backend):
  rng = np.random.default_rng(3)
  shape = (2, 4, 4, 2, 32)
  k0, v0 = _cache(rng, shape, "bfloat16"), _cache(rng, shape, "bfloat16")
  qkv = jnp.asarray(rng.standard_normal((3, (4 + 4) * 32)).astype(ml_dtypes.bfloat16))

  @jax.jit
  def step(layer):
    return rope_write_kv(qkv, jnp.asarray(k0), jnp.asarray(v0), jnp.array([0, 5, 9], jnp.int32),
                         jnp.array([1, 2, 3], jnp.int32), num_heads=4, rope_theta=1e4, layer=layer,
                         backend=backend)

  _, k_cache, v_cache = step(jnp.int32(7))
  np.testing.assert_array_equal(np.asarray(k_cache).view(np.uint16), k0.view(np.uint16))
  np.testing.assert_array_equal(np.asarray(v_cache).view(np.uint16), v0.view(np.uint16))


def test_one_compile_across_lengths_and_positions():
  """Positions, slots and the layer are data: new values reuse the compiled call."""
  shape = (4, 4, 2, 32)
  k = v = jnp.zeros(shape, jnp.float32)
  qkv = jnp.ones((2, 8 * 32), jnp.float32)
  qkv_mod._run.clear_cache()
  for pos, slots in (([0, 1], [0, 1]), ([40, 41], [7, -1]), ([3, 9], [15, 2])):
    rope_write_kv(qkv, k, v, jnp.array(slots, jnp.int32), jnp.array(pos, jnp.int32), num_heads=4,
                  rope_theta=1e4, backend="xla")
  assert qkv_mod._run._cache_size() == 1


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(num_heads=3), ValueError, "multiple of the cache's num_kv_heads"),
    (dict(num_heads=0), ValueError, "num_heads must be a positive int"),
    (dict(rope_theta=0.0), ValueError, "rope_theta"),
    (dict(q_norm_scale=jnp.ones(32)), ValueError, "go together"),
    (dict(q_norm_scale=jnp.ones(16), k_norm_scale=jnp.ones(16)), ValueError,
     r"q_norm_scale must be \[head_dim=32\]"),
    (dict(qkv=jnp.ones((2, 100))), ValueError, r"qkv must be \[T, \(num_heads"),
    (dict(positions=jnp.zeros((3,), jnp.int32)), ValueError, "positions must have one entry per token"),
    (dict(positions=jnp.zeros((2,), jnp.float32)), TypeError, "positions"),
    (dict(v_cache=None), ValueError, "separate k_cache and v_cache"),
    (dict(k_cache=jnp.zeros((4, 4, 2, 32), jnp.float8_e4m3fn),
          v_cache=jnp.zeros((4, 4, 2, 32), jnp.float8_e4m3fn)), TypeError, "does not quantize"),
    (dict(slot_mapping=jnp.zeros((3,), jnp.int32)), ValueError, "slot_mapping"),
])
def test_bad_input_raises_naming_the_argument(kwargs, err, match):
  args = dict(qkv=jnp.ones((2, 8 * 32), jnp.float32), k_cache=jnp.zeros((4, 4, 2, 32), jnp.float32),
              v_cache=jnp.zeros((4, 4, 2, 32), jnp.float32), slot_mapping=jnp.array([0, 1], jnp.int32),
              positions=jnp.array([0, 1], jnp.int32), num_heads=4, rope_theta=1e4)
  args.update(kwargs)
  with pytest.raises(err, match=match):
    rope_write_kv(**args)


def test_model_fused_path_equals_separate_ops():
  """`PagedAttention.project_and_write` = `project` then `write_kv` (xla)."""
  from flax import nnx

  from jax_varlen_attn import write_kv
  from jax_varlen_attn.nn import PagedAttention, PagedBatch

  attn = PagedAttention(64, 4, 2, 32, qk_norm=True, fused_qkv=True, dtype=jnp.bfloat16,
                        param_dtype=jnp.bfloat16, backend="xla", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
  batch = PagedBatch(positions=jnp.array([5, 6, 900], jnp.int32), cu_seqlens_q=jnp.array([0, 3], jnp.int32),
                     seqused_k=jnp.array([3], jnp.int32), block_table=jnp.zeros((1, 2), jnp.int32),
                     slot_mapping=jnp.array([0, 1, -1], jnp.int32))
  k0 = jnp.asarray(rng.standard_normal((2, 4, 4, 2, 32)), jnp.bfloat16)
  v0 = jnp.asarray(rng.standard_normal((2, 4, 4, 2, 32)), jnp.bfloat16)
  q, k_cache, v_cache = attn.project_and_write(x, k0, v0, batch, jnp.int32(1))
  q2, k2, v2 = attn.project(x, batch.positions)
  k_ref, v_ref = write_kv(k2, v2, k0, v0, batch.slot_mapping, layer=jnp.int32(1), backend="xla")
  # Within a bf16 ulp of values ~1: the two graphs compile the projection and the f32 arithmetic
  # apart (on a GPU the matmul's tiling differs too), and RoPE's differences cancel into small values.
  np.testing.assert_allclose(np.asarray(q, np.float32), np.asarray(q2, np.float32), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(k_cache, np.float32), np.asarray(k_ref, np.float32), rtol=2e-2,
                             atol=2e-2)
  np.testing.assert_array_equal(np.asarray(v_cache, np.float32), np.asarray(v_ref, np.float32))
