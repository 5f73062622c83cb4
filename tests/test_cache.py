"""`write_kv`: every layout, both write paths, skipped slots, untouched bits, in-place under donation.

Each case lays out logical pages [P, block_size, Hk, D] physically with this file's / problems.py's
own NumPy code (independent of `jax_varlen_attn.layout`), part of them holding old values and the
rest NaN poison. After the write, the whole physical buffer must equal, bit for bit, the layout of the
expected logical pages: new rows where valid slots point, every other element untouched.

The sm_90 compile check of the Triton write kernel is this module run as a script in a subprocess
where TRITON_INTERPRET is unset (`python -m tests.test_cache`), as tests/test_triton_compile.py does.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
import tempfile
import textwrap

if __name__ == "__main__":  # the sm_90 compile check: must hold before triton is imported
  os.environ.pop("TRITON_INTERPRET", None)
  os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="jva-write-cache-"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_varlen_attn import KVCacheLayout, flash_attn_varlen_func, write_kv  # noqa: E402
from jax_varlen_attn import cache as cache_mod  # noqa: E402
from tests.problems import LAYOUTS, NP_DTYPES, Problem, _physical  # noqa: E402
from tests.sm90 import run_compile_check  # noqa: E402
from tests.write_backends import BACKENDS  # noqa: E402

I32_MAX, I32_MIN = 2**31 - 1, -(2**31)


CUSTOM = ("custom_gapped", "custom_fused")
ALL_LAYOUTS = LAYOUTS + CUSTOM


# ---- physical layouts built here (no jax_varlen_attn.layout code) -----------------------------------

def _custom(name, K, V):
  """Custom KVCacheLayouts with gaps: (k buffer, v buffer or None, layout), in [rows, D] arrays.

  custom_gapped: HND-like pages with a spare row after each head and 2 spare rows after each page,
    K from row 3 of its buffer, V from row 1 of its own.
  custom_fused: one buffer, each page token-major [bs, (K, V), Hk, D] plus one spare row; K from
    row 1, V one Hk*D after K.
  Element (p, t, h, :) sits at offset + p * page_stride + t * token_stride + h * head_stride.
  """
  P, bs, Hk, D = K.shape
  if name == "custom_gapped":
    ts, hs, ps = D, (bs + 1) * D, (Hk * (bs + 1) + 2) * D
    k_off, v_off, fused = 3 * D, 1 * D, False
  else:
    ts, hs, ps = 2 * Hk * D, D, (2 * bs * Hk + 1) * D
    k_off, v_off, fused = D, D + Hk * D, True
  size = (max(k_off, v_off) + P * ps) + 4 * D
  kbuf = np.full(size, np.nan, K.dtype)
  vbuf = kbuf if fused else np.full(size, np.nan, K.dtype)
  for p in range(P):
    for t in range(bs):
      for h in range(Hk):
        at = p * ps + t * ts + h * hs
        kbuf[k_off + at:k_off + at + D] = K[p, t, h]
        vbuf[v_off + at:v_off + at + D] = V[p, t, h]
  layout = KVCacheLayout(block_size=bs, num_kv_heads=Hk, head_dim=D, page_stride=ps, token_stride=ts,
                         head_stride=hs, k_offset=k_off, v_offset=v_off, fused=fused, num_pages=P)
  return kbuf.reshape(-1, D), None if fused else vbuf.reshape(-1, D), layout


def lay_out(name, K, V, num_layers=3):
  """(k_cache, v_cache, kv_layout, layer) holding logical pages K / V in layout `name`.

  Stacked forms put the pages in layer num_layers // 2 and NaN in every other layer.
  """
  if name in CUSTOM:
    k, v, layout = _custom(name, K, V)
    return k, v, layout, None
  k, v, layout = _physical(Problem(layout=name, num_layers=num_layers), K, V, None)
  layer = np.int32(num_layers // 2) if name.startswith("stacked") else None
  return k, v, layout, layer


def old_pages(rng, P, bs, Hk, D, dtype):
  """Logical pages: every other page holds old values, the rest is NaN poison."""
  K = np.full((P, bs, Hk, D), np.nan, dtype)
  V = np.full_like(K, np.nan)
  K[::2] = rng.standard_normal(K[::2].shape).astype(dtype)
  V[::2] = rng.standard_normal(V[::2].shape).astype(dtype)
  return K, V


def new_tokens(rng, P, bs, Hk, D, dtype, n_valid=15):
  """(k_new, v_new, slots, valid) with distinct valid slots and every kind of skipped one mixed in."""
  capacity = P * bs
  # Distinct slots, both ends of the cache included: with a duplicate the GPU's unordered scatter
  # may land either token (that is the documented contract), so the expected cache would be ambiguous.
  inner = rng.choice(np.arange(1, capacity - 1), size=n_valid - 2, replace=False)
  valid_slots = np.concatenate([[0, capacity - 1], inner])
  skipped = np.array([-1, -1, capacity, capacity + bs, 10**6, -7, I32_MAX, I32_MIN])
  slots = np.concatenate([valid_slots, skipped]).astype(np.int32)
  order = rng.permutation(len(slots))
  slots = slots[order]
  valid = (slots >= 0) & (slots < capacity)
  k_new = rng.standard_normal((len(slots), Hk, D)).astype(dtype)
  v_new = rng.standard_normal((len(slots), Hk, D)).astype(dtype)
  return k_new, v_new, slots, valid


def expected_pages(K, V, k_new, v_new, slots, valid):
  K, V = K.copy(), V.copy()
  bs = K.shape[1]
  for i in np.flatnonzero(valid):
    K[slots[i] // bs, slots[i] % bs] = k_new[i]
    V[slots[i] // bs, slots[i] % bs] = v_new[i]
  return K, V


def bits(x):
  x = np.asarray(x)
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_bits_equal(got, want, what):
  got, want = bits(got), bits(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
  assert not bad.size, f"{what}: {bad.size} elements differ, first at flat index {bad[:8]}"


def check_write(backend, layout_name, dtype="float16", P=9, bs=8, Hk=2, D=64, seed=0, jit=False):
  rng = np.random.default_rng(seed)
  dt = NP_DTYPES[dtype]
  K, V = old_pages(rng, P, bs, Hk, D, dt)
  k_new, v_new, slots, valid = new_tokens(rng, P, bs, Hk, D, dt)
  k_cache, v_cache, kv_layout, layer = lay_out(layout_name, K, V)
  want_k, want_v, _, _ = lay_out(layout_name, *expected_pages(K, V, k_new, v_new, slots, valid))

  def f(k_new, v_new, k_cache, v_cache, slots, layer):
    return write_kv(k_new, v_new, k_cache, v_cache, slots, kv_layout=kv_layout, layer=layer,
                    backend=backend)

  args = [jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(k_cache),
          None if v_cache is None else jnp.asarray(v_cache), jnp.asarray(slots), layer]
  got_k, got_v = (jax.jit(f) if jit else f)(*args)
  assert got_k.shape == k_cache.shape and got_k.dtype == k_cache.dtype
  assert_bits_equal(got_k, want_k, "k_cache")
  if v_cache is None:
    assert got_v is None
  else:
    assert got_v.shape == v_cache.shape and got_v.dtype == v_cache.dtype
    assert_bits_equal(got_v, want_v, "v_cache")


# ---- correctness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_every_layout(backend, layout):
  """New rows land where the slots say; -1 / out-of-range slots and every other element untouched."""
  check_write(backend, layout, seed=ALL_LAYOUTS.index(layout))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,layout,D", [("bfloat16", "NHD", 64), ("float32", "fused_page_major", 64),
                                             ("float16", "HND", 80), ("bfloat16", "custom_gapped", 96)])
def test_dtypes_and_head_dims(backend, dtype, layout, D):
  """Other dtypes (bit-exact copies) and head dims that are not powers of two (masked tiles)."""
  check_write(backend, layout, dtype=dtype, D=D, seed=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_jit_single_token(backend):
  """Inside a caller's jax.jit; one token (a decode step) to one slot."""
  rng = np.random.default_rng(3)
  K, V = old_pages(rng, 4, 16, 2, 32, np.float16)
  k_cache, v_cache, _, _ = lay_out("NHD", K, V)
  k_new = rng.standard_normal((1, 2, 32)).astype(np.float16)
  slots = np.array([37], np.int32)
  step = jax.jit(lambda *a: write_kv(*a, backend=backend))
  got_k, got_v = step(k_new, -k_new, k_cache, v_cache, slots)
  want_k, want_v = expected_pages(K, V, k_new, -k_new, slots, np.array([True]))
  assert_bits_equal(got_k, want_k, "k_cache")
  assert_bits_equal(got_v, want_v, "v_cache")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["stacked_NHD", "stacked_fused_kv_major", "stacked_strided"])
def test_traced_layer(backend, layout):
  """A traced layer writes only that layer; a traced layer out of range writes nothing."""
  L, P, bs, Hk, D = 3, 5, 8, 2, 32
  rng = np.random.default_rng(11)
  K, V = old_pages(rng, P, bs, Hk, D, np.float16)
  k_new, v_new, slots, valid = new_tokens(rng, P, bs, Hk, D, np.float16, n_valid=6)
  inner = layout[len("stacked_"):]
  one_k, one_v, kv_layout, _ = lay_out(inner, K, V)
  want_k1, want_v1, _, _ = lay_out(inner, *expected_pages(K, V, k_new, v_new, slots, valid))
  k_cache = np.stack([one_k] * L)
  v_cache = None if one_v is None else np.stack([one_v] * L)

  step = jax.jit(lambda k_cache, v_cache, layer: write_kv(
      k_new, v_new, k_cache, v_cache, slots, kv_layout=kv_layout, layer=layer, backend=backend))
  for layer in (0, L - 1, L, -1, I32_MAX, I32_MIN):
    got_k, got_v = step(k_cache, v_cache, jnp.int32(layer))
    for got, old, one_want, what in ((got_k, k_cache, want_k1, "k"), (got_v, v_cache, want_v1, "v")):
      if old is None:
        assert got is None
        continue
      want = old.copy()
      if 0 <= layer < L:
        want[layer] = one_want
      assert_bits_equal(got, want, f"{what}_cache, layer {layer}")
  assert step._cache_size() == 1, "the layer is data: one compile"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
  k = jnp.full((2, 4, 1, 32), jnp.nan, jnp.float16)
  empty = jnp.zeros((0, 1, 32), jnp.float16)
  got_k, got_v = write_kv(empty, empty, k, k, jnp.zeros((0,), jnp.int32), backend=backend)
  assert_bits_equal(got_k, k, "k_cache")
  assert_bits_equal(got_v, k, "v_cache")


# ---- fp8 caches: new tokens quantized with their scales --------------------------------------------

def expected_fp8(x, scale, dt, nudge: int = 0):
  """fp8 of x [T, Hk, D] / scale [T, Hk] by NumPy and ml_dtypes (an implementation of its own):
  f32 division, saturation to the finite max, ml_dtypes' round to nearest even. nudge -1 / +1: the
  quotient one f32 ulp below / above the correctly rounded one."""
  big = float(ml_dtypes.finfo(dt).max)
  y = np.asarray(x, np.float32) / np.asarray(scale, np.float32)[..., None]
  if nudge:
    y = np.nextafter(y, np.float32(np.inf * nudge))
  return np.clip(y, -big, big).astype(dt)


def hard_values(rng, shape, dt, scale):
  """Random values and, in the first rows, the cases rounding gets wrong: ties (to even), a tie
  whose rounding carries into the next power of two, subnormals, saturation, +-inf, NaN."""
  info = ml_dtypes.finfo(dt)
  eps = float(info.eps)  # spacing at 1.0
  x = rng.standard_normal(shape).astype(np.float32) * 20
  special = np.array([1 + eps / 2, 1 + 3 * eps / 2, 2 - eps / 4, -(2 - eps / 4), 16 - eps * 4,
                      float(info.smallest_subnormal) * 1.5, float(info.smallest_subnormal) / 3,
                      float(info.max) * 1.01, -1e30, np.inf, -np.inf, np.nan, 0.0, -0.0,
                      float(info.smallest_normal) * (1 - eps / 2), float(info.max)], np.float32)
  flat = x.reshape(-1)
  flat[:special.size] = special * np.float32(scale.reshape(-1)[0])  # so that x / scale is `special`
  return x


def assert_fp8_equal(got, want, what):
  """Bit for bit, except that any NaN equals any NaN (sign and payload of a NaN are not specified)."""
  got, want = np.asarray(got), np.asarray(want)
  nan = np.isnan(want.astype(np.float32))
  np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan, err_msg=f"{what}: NaN positions")
  got, want = got.copy(), want.copy()
  got[nan] = want[nan] = 0
  assert_bits_equal(got, want, what)


def assert_fp8_among(got, wants, what):
  """Every element bit-equal to the same element of one of `wants` (NaN positions those of wants[0])."""
  got = np.asarray(got)
  nan = np.isnan(np.asarray(wants[0]).astype(np.float32))
  np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan, err_msg=f"{what}: NaN positions")
  ok = nan.copy()
  for want in wants:
    ok |= bits(got) == bits(np.asarray(want))
  bad = np.flatnonzero(~ok.reshape(-1))
  assert not bad.size, f"{what}: {bad.size} elements match none of the quotients, first at {bad[:8]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_dtype,new_dtype,layout,scale_form", [
    ("float8_e4m3fn", "float16", "NHD", "token_head"),
    ("float8_e5m2", "bfloat16", "HND", "head"),
    ("float8_e4m3fn", "float32", "fused_page_major", "scalar"),
    ("float8_e5m2", "float16", "stacked_strided", "none"),
    ("float8_e4m3fn", "float16", "custom_gapped", "python_float"),
])
def test_fp8_cache_write_quantizes(backend, cache_dtype, new_dtype, layout, scale_form):
  """Every new value is stored as fp8(value / scale) (round to nearest even, saturating, NaN kept);
  skipped slots and every other element of the cache untouched."""
  rng = np.random.default_rng(hash((cache_dtype, layout)) % 2**32)
  dt = NP_DTYPES[cache_dtype]
  P, bs, Hk, D = 9, 8, 2, 64
  K, V = old_pages(rng, P, bs, Hk, D, np.float32)
  K, V = K.astype(dt), V.astype(dt)  # old values and NaN poison, in fp8
  _, _, slots, valid = new_tokens(rng, P, bs, Hk, D, np.float32)
  T = len(slots)
  if scale_form == "none":
    k_arg = v_arg = None
    k_scale = v_scale = np.ones((T, Hk), np.float32)
  elif scale_form == "scalar":
    k_arg, v_arg = np.float32(0.07), np.ones((1,), np.float32) * np.float32(0.3)
    k_scale, v_scale = np.full((T, Hk), k_arg), np.full((T, Hk), v_arg[0])
  elif scale_form == "python_float":
    k_arg, v_arg = 0.05, 2.0
    k_scale, v_scale = np.full((T, Hk), 0.05, np.float32), np.full((T, Hk), 2.0, np.float32)
  elif scale_form == "head":
    k_arg, v_arg = (rng.uniform(0.01, 0.5, (Hk,)).astype(np.float32) for _ in range(2))
    k_scale, v_scale = np.broadcast_to(k_arg, (T, Hk)), np.broadcast_to(v_arg, (T, Hk))
  else:  # per token and kv head, e.g. k_descale of each token's sequence
    k_arg, v_arg = (rng.uniform(0.01, 0.5, (T, Hk)).astype(np.float32) for _ in range(2))
    k_scale, v_scale = k_arg, v_arg
  with np.errstate(over="ignore"):  # 1e30 is inf in float16: meant
    k_new = hard_values(rng, (T, Hk, D), dt, k_scale).astype(NP_DTYPES[new_dtype])
    v_new = hard_values(rng, (T, Hk, D), dt, v_scale).astype(NP_DTYPES[new_dtype])
  k_cache, v_cache, kv_layout, layer = lay_out(layout, K, V)
  want_k, want_v, _, _ = lay_out(layout, *expected_pages(K, V, expected_fp8(k_new, k_scale, dt),
                                                         expected_fp8(v_new, v_scale, dt), slots, valid))
  as_arg = lambda x: x if x is None or isinstance(x, float) else jnp.asarray(x)  # noqa: E731
  got_k, got_v = write_kv(jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(k_cache),
                          None if v_cache is None else jnp.asarray(v_cache), jnp.asarray(slots),
                          kv_layout=kv_layout, layer=layer, backend=backend, k_scale=as_arg(k_arg),
                          v_scale=as_arg(v_arg))
  assert got_k.dtype == k_cache.dtype
  if backend == "xla" and cache_mod.registry._on_cuda_gpu():
    # XLA's f32 division on a GPU measured one f32 ulp off IEEE's on one of these crafted ties
    # (docs/contract.md says so): each element is the fp8 of the quotient or of a neighbour of it.
    nudged = [lay_out(layout, *expected_pages(K, V, expected_fp8(k_new, k_scale, dt, n),
                                              expected_fp8(v_new, v_scale, dt, n), slots, valid))
              for n in (-1, 1)]
    assert_fp8_among(got_k, [want_k] + [w[0] for w in nudged], "k_cache")
    if v_cache is not None:
      assert_fp8_among(got_v, [want_v] + [w[1] for w in nudged], "v_cache")
    return
  assert_fp8_equal(got_k, want_k, "k_cache")
  if v_cache is not None:
    assert_fp8_equal(got_v, want_v, "v_cache")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_rounding_on_every_value_and_tie(backend, cache_dtype):
  """Every finite fp8 value, every midpoint between neighbours (the ties: to even, carries into the
  next power of two included) and the values just beside each midpoint, through write_kv with a
  scale that is not 1, against ml_dtypes."""
  dt = NP_DTYPES[cache_dtype]
  values = np.arange(256, dtype=np.uint8).view(dt).astype(np.float64)
  values = np.unique(values[np.isfinite(values)])
  mids = (values[1:] + values[:-1]) / 2
  x = np.concatenate([values, mids, mids * (1 + 2**-20), mids * (1 - 2**-20)]) * 4
  D = 64
  x = np.concatenate([x, np.zeros(-x.size % D)]).astype(np.float32).reshape(-1, 1, D)  # [T, 1, D]
  T = x.shape[0]
  scale = np.full((T, 1), 4.0, np.float32)
  cache = jnp.zeros((T, 1, 1, D), dt)
  got, _ = write_kv(jnp.asarray(x), jnp.asarray(x), cache, cache, jnp.arange(T, dtype=jnp.int32),
                    backend=backend, k_scale=4.0, v_scale=4.0)
  assert_fp8_equal(np.asarray(got).reshape(x.shape), expected_fp8(x, scale, dt), cache_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_write_then_attend_matches_the_oracle(backend):
  """A decode step on an e4m3 cache: write the new tokens quantized with k_scale / v_scale, attend
  with the same numbers as k_descale / v_descale: the float64 oracle on the dequantized cache."""
  from tests.oracle import reference_attention
  rng = np.random.default_rng(9)
  P, bs, Hk, D, H = 6, 8, 2, 64, 4
  dt = ml_dtypes.float8_e4m3fn
  k_scale = rng.uniform(0.01, 0.03, (2, Hk)).astype(np.float32)  # per (sequence, kv head)
  v_scale = rng.uniform(0.01, 0.03, (2, Hk)).astype(np.float32)
  K = expected_fp8(rng.standard_normal((P * bs, Hk, D)), np.repeat(k_scale[:1], P * bs, 0), dt)
  V = expected_fp8(rng.standard_normal((P * bs, Hk, D)), np.repeat(v_scale[:1], P * bs, 0), dt)
  K, V = K.reshape(P, bs, Hk, D), V.reshape(P, bs, Hk, D)
  block_table = np.array([[4, 1, 0], [2, 5, 3]], np.int32)
  seqused = np.array([20, 9], np.int32)
  # Sequence 1's pages hold sequence 0's scale; its 9 keys are all rewritten below with its own.
  k_new = rng.standard_normal((9 + 1, Hk, D)).astype(np.float16)
  v_new = rng.standard_normal((9 + 1, Hk, D)).astype(np.float16)
  tokens = [(0, 19)] + [(1, j) for j in range(9)]  # (sequence, key position)
  slots = np.array([block_table[b, j // bs] * bs + j % bs for b, j in tokens], np.int32)
  per_token = np.array([b for b, _ in tokens])
  q = rng.standard_normal((2, H, D)).astype(np.float16)
  kw = dict(cu_seqlens_q=jnp.array([0, 1, 2], jnp.int32), seqused_k=seqused, block_table=block_table,
            causal=True, backend=backend, return_softmax_lse=True)

  def step(q, k_new, v_new, k_cache, v_cache):
    k_cache, v_cache = write_kv(k_new, v_new, k_cache, v_cache, slots, backend=backend,
                                k_scale=jnp.asarray(k_scale[per_token]),
                                v_scale=jnp.asarray(v_scale[per_token]))
    return flash_attn_varlen_func(q, k_cache, v_cache, **kw, k_descale=k_scale, v_descale=v_scale)

  (out, lse) = jax.jit(step)(q, k_new, v_new, jnp.asarray(K), jnp.asarray(V))
  want_K, want_V = expected_pages(K, V, expected_fp8(k_new, k_scale[per_token], dt),
                                  expected_fp8(v_new, v_scale[per_token], dt), slots, np.ones(10, bool))
  keys = [np.concatenate([want_K[p] for p in block_table[b]])[:seqused[b]] for b in range(2)]
  values = [np.concatenate([want_V[p] for p in block_table[b]])[:seqused[b]] for b in range(2)]
  ref, ref_lse = reference_attention(q, keys, values, [0, 1, 2], scale=D ** -0.5, causal=True,
                                     k_descale=k_scale, v_descale=v_scale)
  out = np.asarray(out.astype(jnp.float32), np.float64)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 4e-3
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=2e-3, atol=2e-3)


def test_write_then_attend_reads_the_new_tokens():
  """A jitted decode step (write the token, attend over the cache) matches attention on a cache
  the test wrote itself."""
  rng = np.random.default_rng(5)
  P, bs, Hk, D, H = 6, 8, 2, 64, 4
  K = rng.standard_normal((P, bs, Hk, D)).astype(np.float16)
  V = rng.standard_normal((P, bs, Hk, D)).astype(np.float16)
  k_new = rng.standard_normal((2, Hk, D)).astype(np.float16)
  v_new = rng.standard_normal((2, Hk, D)).astype(np.float16)
  q = rng.standard_normal((2, H, D)).astype(np.float16)
  block_table = np.array([[4, 1, 0], [2, 5, 3]], np.int32)
  seqused = np.array([20, 9], np.int32)
  # The new token of each sequence is its last key: key 19 of sequence 0, key 8 of sequence 1.
  slots = np.array([block_table[0, 19 // bs] * bs + 19 % bs, block_table[1, 8 // bs] * bs + 8 % bs],
                   np.int32)
  kw = dict(cu_seqlens_q=jnp.array([0, 1, 2], jnp.int32), seqused_k=seqused, block_table=block_table,
            causal=True, backend="xla")

  def step(q, k_new, v_new, k_cache, v_cache):
    k_cache, v_cache = write_kv(k_new, v_new, k_cache, v_cache, slots)
    return flash_attn_varlen_func(q, k_cache, v_cache, **kw), k_cache, v_cache

  out, _, _ = jax.jit(step, donate_argnums=(3, 4))(q, k_new, v_new, jnp.asarray(K), jnp.asarray(V))
  want_K, want_V = expected_pages(K, V, k_new, v_new, slots, np.array([True, True]))
  ref = flash_attn_varlen_func(q, want_K, want_V, **kw)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


# ---- in place: the compiled step aliases the donated cache and copies nothing cache-sized ----------

# Ops that may produce a cache-sized value in place (into the aliased, donated buffer).
_IN_PLACE = re.compile(r"\b(scatter|custom-call)\(|calls=%wrapped_scatter|calls=%[\w.]*scatter")
_HEADER_ALIAS = re.compile(r"\{(\d+)\}: \((\d+), \{\}, (?:may|must)-alias\)")


def _large_buffers(hlo_text, limit):
  from tests.attention_suite import _large_buffers as find
  return [line for line in find(hlo_text, limit) if not _IN_PLACE.search(line)]


def _step_args(layout_name):
  rng = np.random.default_rng(1)
  P, bs, Hk, D, H = 256, 16, 2, 64, 4  # caches of 256 pages: far larger than the step's temporaries
  K, V = old_pages(rng, P, bs, Hk, D, np.float16)
  K[1::2] = V[1::2] = 0  # attention may read any page a block table names; no NaN there
  k_cache, v_cache, kv_layout, layer = lay_out(layout_name, K, V)
  k_new, v_new, slots, valid = new_tokens(rng, P, bs, Hk, D, np.float16, n_valid=4)
  q = rng.standard_normal((len(slots), H, D)).astype(np.float16)
  return dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, slots=slots,
              layer=layer, kv_layout=kv_layout, pages=(K, V, valid))


@pytest.mark.parametrize("backend", ["xla", pytest.param("triton", marks=pytest.mark.skipif(
    not cache_mod.registry._on_cuda_gpu(), reason="in-place Triton launches need the GPU (the "
    "interpreter runs in a host callback, which copies)"))])
@pytest.mark.parametrize("layout", ["NHD", "fused_kv_major", "stacked_strided"])
def test_donated_cache_is_written_in_place(backend, layout):
  a = _step_args(layout)
  T = a["q"].shape[0]
  static = dict(kv_layout=a["kv_layout"], backend=backend)

  def step(q, k_new, v_new, k_cache, v_cache, slots, layer):
    k_cache, v_cache = write_kv(k_new, v_new, k_cache, v_cache, slots, layer=layer, **static)
    out = flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q=jnp.arange(T + 1, dtype=jnp.int32),
        seqused_k=jnp.full((T,), 40, jnp.int32), block_table=jnp.tile(jnp.arange(3, dtype=jnp.int32), (T, 1)),
        causal=True, layer=layer, **static)
    return out, k_cache, v_cache

  fused = a["v_cache"] is None
  donate = (3,) if fused else (3, 4)
  args = [jnp.asarray(a[n]) if a[n] is not None else None
          for n in ("q", "k_new", "v_new", "k_cache", "v_cache", "slots", "layer")]
  compiled = jax.jit(step, donate_argnums=donate).lower(*args).compile()
  hlo = compiled.as_text()
  header = hlo.splitlines()[0]
  aliased = {int(param) for _, param in _HEADER_ALIAS.findall(header)}
  # Flat parameter numbers: None arguments (v_cache of a fused form) are no parameter.
  param_of = {}
  for i, x in enumerate(args):
    if x is not None:
      param_of[i] = len(param_of)
  for i in donate:
    assert param_of[i] in aliased, f"donated argument {i} is not aliased to an output: {header[:400]}"
  cache_elems = int(np.prod(a["k_cache"].shape))
  big = _large_buffers(hlo, cache_elems)
  assert not big, f"cache-sized instructions other than the in-place write: {big[:5]}"
  stats = compiled.memory_analysis()
  if stats is not None:
    # The write adds less than a cache of scratch to what the attention alone needs.
    def attend_only(q, k_new, v_new, k_cache, v_cache, slots, layer):
      return step(q, k_new[:0], v_new[:0], k_cache, v_cache, slots[:0], layer)[0]

    alone = jax.jit(attend_only).lower(*args).compile().memory_analysis()
    cache_bytes = cache_elems * 2
    assert stats.temp_size_in_bytes < alone.temp_size_in_bytes + cache_bytes, (
        stats.temp_size_in_bytes, alone.temp_size_in_bytes, cache_bytes)
    assert stats.alias_size_in_bytes >= cache_bytes * len(donate), stats.alias_size_in_bytes

  # And it runs: the output is the donated buffer, holding the right values.
  K, V, valid = a["pages"]
  want_k, want_v, _, _ = lay_out(layout, *expected_pages(K, V, a["k_new"], a["v_new"], a["slots"], valid))
  ptr = args[3].unsafe_buffer_pointer()
  out, got_k, got_v = compiled(*args)
  assert got_k.unsafe_buffer_pointer() == ptr, "the k cache was not written in place"
  assert args[3].is_deleted()
  assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()
  assert_bits_equal(got_k, want_k, "k_cache")
  if not fused:
    assert_bits_equal(got_v, want_v, "v_cache")


# ---- validation ------------------------------------------------------------------------------------

def _valid(**changes):
  k = np.zeros((4, 8, 2, 32), np.float16)
  kw = dict(k_new=np.zeros((3, 2, 32), np.float16), v_new=np.zeros((3, 2, 32), np.float16),
            k_cache=k, v_cache=k.copy(), slot_mapping=np.array([0, 5, -1], np.int32))
  kw.update(changes)
  return kw


def _bad(exc, match, **changes):
  return pytest.param(exc, match, changes, id=match[:40])


_KV = np.zeros((2, 4, 8, 2, 32), np.float16)
_FP8 = np.zeros((4, 8, 2, 32), ml_dtypes.float8_e4m3fn)
VALIDATION = [
    _bad(TypeError, "k_cache must be an array", k_cache=[1.0]),
    _bad(TypeError, r"k_cache must be float16, bfloat16, float32 or fp8 \(float8_e4m3fn or float8_e5m2\)",
         k_cache=np.zeros((4, 8, 2, 32), np.int8)),
    _bad(TypeError, "v_cache must be an array", v_cache="v"),
    _bad(TypeError, "v_cache must have k_cache's dtype", v_cache=np.zeros((4, 8, 2, 32), np.float32)),
    _bad(ValueError, "kv_layout must be one of", kv_layout="NDH"),
    _bad(TypeError, "kv_layout must be a str or KVCacheLayout", kv_layout=3),
    _bad(ValueError, "v is None, but kv_layout='NHD'", v_cache=None),
    _bad(ValueError, "keeps K and V in one array", k_cache=_KV, v_cache=_KV, kv_layout="fused_kv_major"),
    _bad(ValueError, r"must be \[num_blocks, block_size", k_cache=np.zeros((4, 8, 64), np.float16),
         v_cache=np.zeros((4, 8, 64), np.float16)),
    _bad(ValueError, "also needs layer=", k_cache=np.zeros((3, 4, 8, 2, 32), np.float16),
         v_cache=np.zeros((3, 4, 8, 2, 32), np.float16)),
    _bad(ValueError, r"layer must be in \[0, 3\)", k_cache=np.zeros((3, 4, 8, 2, 32), np.float16),
         v_cache=np.zeros((3, 4, 8, 2, 32), np.float16), layer=3),
    _bad(ValueError, r"layer must be in \[0, 3\)", k_cache=np.zeros((3, 4, 8, 2, 32), np.float16),
         v_cache=np.zeros((3, 4, 8, 2, 32), np.float16), layer=np.int32(-1)),
    _bad(TypeError, "layer must be an int32 scalar", layer=1.5),
    _bad(TypeError, "layer must be an int32 scalar", layer=True),
    _bad(ValueError, "needs a leading", layer=0),
    _bad(ValueError, "k_new is required", k_new=None),
    _bad(ValueError, "fused cache takes v_cache=None, not v_new=None", v_new=None),
    _bad(TypeError, "k_new must be an array", k_new=[[0.0]]),
    _bad(ValueError, r"k_new must be \[T, num_kv_heads=2, head_dim=32\]",
         k_new=np.zeros((3, 64), np.float16)),
    _bad(ValueError, r"v_new must be \[T, num_kv_heads=2", v_new=np.zeros((3, 1, 32), np.float16)),
    _bad(ValueError, r"k_new must be \[T, num_kv_heads=2, head_dim=32\]",
         k_new=np.zeros((3, 2, 64), np.float16)),
    _bad(TypeError, "k_new must have the cache's dtype float16", k_new=np.zeros((3, 2, 32), np.float32)),
    _bad(TypeError, "v_new must have the cache's dtype", v_new=np.zeros((3, 2, 32), jnp.bfloat16)),
    _bad(ValueError, "v_new must have k_new's shape", v_new=np.zeros((4, 2, 32), np.float16)),
    _bad(ValueError, "slot_mapping is required", slot_mapping=None),
    _bad(TypeError, r"slot_mapping must be int32 \[T=3\]", slot_mapping=np.array([0, 1, 2], np.int64)),
    _bad(TypeError, "slot_mapping must be an array", slot_mapping=[0, 1, 2]),
    _bad(ValueError, "slot_mapping must have rank 1", slot_mapping=np.zeros((3, 1), np.int32)),
    _bad(ValueError, "slot_mapping must have one entry per new token", slot_mapping=np.zeros((4,), np.int32)),
    _bad(ValueError, "backend must be one of", backend="cuda"),
    _bad(TypeError, "backend must be a str", backend=None),
    _bad(ValueError, "kv_layout addresses 7744 elements of k",
         kv_layout=KVCacheLayout(8, 2, 32, page_stride=1024, num_pages=8, k_offset=64)),
    # fp8 caches: float values to quantize, and their scales
    _bad(TypeError, "v_cache must have k_cache's dtype float8_e4m3fn",
         k_cache=_FP8, v_cache=np.zeros((4, 8, 2, 32), ml_dtypes.float8_e5m2)),
    _bad(TypeError, r"k_new must be float16, bfloat16 or float32 for the float8_e4m3fn cache \(quantized with "
         r"k_scale\), got float8_e4m3fn", k_cache=_FP8, v_cache=_FP8,
         k_new=np.zeros((3, 2, 32), ml_dtypes.float8_e4m3fn)),
    _bad(TypeError, r"v_new must be float16, bfloat16 or float32 for the float8_e4m3fn cache", k_cache=_FP8,
         v_cache=_FP8, v_new=np.zeros((3, 2, 32), np.int32)),
    _bad(TypeError, r"k_scale must be float32: a scalar, \[num_kv_heads=2\] or \[T, num_kv_heads\]=\(3, 2\), "
         "got float16", k_cache=_FP8, v_cache=_FP8, k_scale=np.ones((2,), np.float16)),
    _bad(TypeError, "v_scale must be an array, got list", k_cache=_FP8, v_cache=_FP8, v_scale=[1.0, 1.0]),
    _bad(ValueError, r"k_scale must be a scalar, \[num_kv_heads\]=\(2,\) or \[T, num_kv_heads\]=\(3, 2\), "
         r"got \(4, 2\)", k_cache=_FP8, v_cache=_FP8, k_scale=np.ones((4, 2), np.float32)),
    # checked where they are ignored too (a cache that is not fp8)
    _bad(ValueError, r"v_scale must be a scalar, \[num_kv_heads\]=\(2,\)", v_scale=np.ones((3,), np.float32)),
]


_OPTIONS = ("kv_layout", "layer", "backend", "k_scale", "v_scale")


def _call(changes):
  kw = _valid(**{k: v for k, v in changes.items() if k not in _OPTIONS})
  opts = {k: changes[k] for k in _OPTIONS if k in changes}
  opts.setdefault("backend", "xla")
  return jax.eval_shape(lambda: write_kv(**kw, **opts))


@pytest.mark.parametrize("exc,match,changes", VALIDATION)
def test_validation(exc, match, changes):
  with pytest.raises(exc, match=match):
    _call(changes)


def test_triton_unavailable_is_named(monkeypatch):
  if cache_mod.registry._on_cuda_gpu():
    pytest.skip("triton runs here")
  monkeypatch.setenv("TRITON_INTERPRET", "0")
  with pytest.raises(ValueError, match="backend='triton' cannot run here"):
    _call(dict(backend="triton"))


def test_huge_cache_on_the_xla_path_is_named():
  big = jax.ShapeDtypeStruct((2**25, 64, 1, 32), jnp.float16)  # 2**31 rows of D: abstract only
  with pytest.raises(ValueError, match="indexes rows with int32"):
    jax.eval_shape(lambda k: write_kv(jnp.zeros((1, 1, 32), jnp.float16), jnp.zeros((1, 1, 32), jnp.float16),
                                      k, k, jnp.zeros((1,), jnp.int32), backend="xla"), big)


def test_every_raise_in_cache_py_is_reached():
  source = inspect.getsource(cache_mod)
  path = inspect.getsourcefile(cache_mod)
  lines = source.splitlines()
  targets = [(n.lineno, n.end_lineno, lines[n.lineno - 1].strip())
             for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Raise)]
  hit = set()

  def local(frame, event, arg):
    if event == "line":
      hit.add(frame.f_lineno)
    return local

  def tracer(frame, event, arg):
    return local if frame.f_code.co_filename == path else None

  cases = [p.values[2] for p in VALIDATION]
  old = sys.gettrace()
  sys.settrace(tracer)
  try:
    for changes in cases:
      try:
        _call(changes)
      except (ValueError, TypeError):
        pass
    try:
      test_huge_cache_on_the_xla_path_is_named()
    except BaseException:
      pass
    if not cache_mod.registry._on_cuda_gpu():
      saved = os.environ.get("TRITON_INTERPRET")
      os.environ["TRITON_INTERPRET"] = "0"
      try:
        _call(dict(backend="triton"))
      except ValueError:
        pass
      finally:
        if saved is None:
          os.environ.pop("TRITON_INTERPRET")
        else:
          os.environ["TRITON_INTERPRET"] = saved
  finally:
    sys.settrace(old)
  missed = [(n, text) for first, last, text in targets if not any(l in hit for l in range(first, last + 1))
            for n in [first]]
  if cache_mod.registry._on_cuda_gpu():
    missed = [(n, t) for n, t in missed if "cannot run here" not in t]
  assert not missed, "raises no case reaches:\n" + textwrap.indent(
      "\n".join(f"cache.py:{n}: {t}" for n, t in missed), "  ")


# ---- the Triton write kernel compiles for sm_90 (H100) on any machine -----------------------------

COMPILE_VARIANTS = [
    # (name, layout, dtype, head_dim, tokens)
    ("nhd-contiguous-d128", "NHD", "float16", 128, 64),
    ("nhd-one-token", "NHD", "float16", 128, 1),
    ("hnd-bf16-d80", "HND", "bfloat16", 80, 21),
    ("fused-page-major-fp32", "fused_page_major", "float32", 64, 21),
    ("fused-kv-major-d256", "fused_kv_major", "float16", 256, 21),
    ("strided-d128", "strided", "float16", 128, 21),
    ("stacked-nhd", "stacked_NHD", "bfloat16", 128, 21),
    ("stacked-strided-d96", "stacked_strided", "float16", 96, 21),
    ("custom-fused", "custom_fused", "float16", 64, 21),
    ("fp8-e4m3-nhd-from-f16-d128", "NHD", "float16", 128, 64, "float8_e4m3fn"),
    ("fp8-e5m2-fused-from-bf16", "fused_kv_major", "bfloat16", 128, 21, "float8_e5m2"),
    ("fp8-e4m3-stacked-strided-from-f32", "stacked_strided", "float32", 96, 21, "float8_e4m3fn"),
]
_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32",
          "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5"}


def compile_variant(layout_name, dtype, head_dim, tokens, cache_dtype=None):
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource

  from jax_varlen_attn.backends.triton.write_kernel import kernel_arguments

  rng = np.random.default_rng(0)
  P, bs, Hk = 8, 16, 2
  K, V = old_pages(rng, P, bs, Hk, head_dim, NP_DTYPES[dtype])
  k_cache, v_cache, kv_layout, layer = lay_out(layout_name, K, V)
  k_new = np.zeros((tokens, Hk, head_dim), NP_DTYPES[dtype])
  if cache_dtype is not None:  # an fp8 cache, written from `dtype` values
    k_cache = k_cache.astype(NP_DTYPES[cache_dtype])
    v_cache = None if v_cache is None else v_cache.astype(NP_DTYPES[cache_dtype])
  layout, (k_new, v_new, k_cache, v_cache, slots, layer, scales) = cache_mod._validate(
      k_new, k_new, k_cache, v_cache, np.zeros((tokens,), np.int32), kv_layout, layer)
  kernel, inputs, outputs, grid, num_warps, consts, _ = kernel_arguments(
      layout, k_new, v_new, k_cache, v_cache, slots, layer, scales)
  consts = dict(consts)
  sig = {}
  for name, value in inputs.items():
    if isinstance(value, int):
      if value == 1:  # jax-triton turns a scalar 1 into a constexpr
        consts[name] = 1
        continue
      sig[name] = "i32"
    else:
      sig[name] = "*" + _TYPES[jnp.dtype(value.dtype).name]
  params = list(kernel.arg_names)
  for name, o in zip(params[len(inputs):], outputs):
    sig[name] = "*" + _TYPES[jnp.dtype(o.dtype).name]
  for name in consts:
    sig[name] = "constexpr"
  sig = {name: sig[name] for name in params}
  attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(params) if sig[n].startswith("*")}
  src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
  compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=1))
  ptx = compiled.asm.get("ptx", "")
  return dict(grid=grid, warps=num_warps, block_t=consts["BLOCK_T"],
              cubin=len(compiled.asm.get("cubin", b"")),
              stores=sorted(set(re.findall(r"st\.global(?:\.[a-z0-9]+)*", ptx))))


def compile_main():
  failures = 0
  for name, *variant in COMPILE_VARIANTS:
    try:
      r = compile_variant(*variant)
      print(f"ok   {name:24s} grid={r['grid']} T{r['block_t']} w{r['warps']} cubin={r['cubin']}B "
            f"{' '.join(r['stores'])}", flush=True)
    except Exception as e:  # report every failing variant, then fail
      failures += 1
      print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
  print(f"{failures} failures")
  return 1 if failures else 0


def test_write_kernel_compiles_for_sm90(tmp_path):
  pytest.importorskip("triton")
  stdout = run_compile_check("tests.test_cache", tmp_path, timeout=600)
  assert stdout.count("ok   ") == len(COMPILE_VARIANTS), stdout
  # Rows are stored 16 bytes a thread (whole head_dim rows, constexpr strides keep them aligned).
  for line in stdout.splitlines():
    if line.startswith(("ok   nhd-contiguous", "ok   strided", "ok   stacked-strided")):
      assert "st.global.v4" in line, line


if __name__ == "__main__":
  sys.exit(compile_main())
