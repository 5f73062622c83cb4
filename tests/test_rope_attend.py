"""`jax_varlen_attn.nn.rope_write_attend` (rope_write_kv, then causal attention over the updated cache)
against a float64 NumPy oracle: tests/test_qkv.py's q / k / v from the projection, tests/oracle.py's
attention over each sequence's keys (its pages as the block table lists them, its last key the new
token's).

A decode step (max_seqlen_q=1) with an inactive sequence (no query, no keys), a sequence whose only key
is the new one, pages shared by no one poisoned with NaN (unused pages, the pages padded block-table
entries name), padding rows of NaN with slot -1. The Triton backend runs it as one kernel (under
Triton's interpreter on a CPU), the XLA backend as the two calls; both must match the oracle, write
only the new tokens' rows, output zeros for padding rows, and (Triton) compile once across lengths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")

from jax_varlen_attn import TritonConfig  # noqa: E402
from jax_varlen_attn.nn import qkv as qkv_mod  # noqa: E402
from jax_varlen_attn.nn.qkv import rope_write_attend  # noqa: E402
from tests.oracle import reference_attention  # noqa: E402
from tests.test_qkv import NP, TOL, oracle  # noqa: E402
from tests.write_backends import BACKENDS, triton_runs  # noqa: E402

BLOCK_SIZE, NUM_BLOCKS, MAX_BLOCKS, LAYERS = 8, 16, 6, 3
# Keys of each sequence once this step's token is written; 0: inactive (no query row either).
LENGTHS = (5, 33, 0, 1)


@dataclasses.dataclass
class Step:
  qkv: np.ndarray  # [T, (H + 2 Hk) D]
  k0: np.ndarray  # the caches before the call
  v0: np.ndarray
  slots: np.ndarray  # i32[T]
  positions: np.ndarray  # i32[T]
  cu: np.ndarray  # i32[B + 1]
  lengths: np.ndarray  # i32[B]
  table: np.ndarray  # i32[B, MAX_BLOCKS]
  rows: list  # the query row of each active sequence, by sequence (None: inactive)


def make_step(rng, dtype, h, hk, d, stacked, lengths=LENGTHS, padding_rows=2) -> Step:
  """A decode step over `lengths`; pages nobody uses hold NaN, padded table entries name them."""
  batch = len(lengths)
  need = [-(-n // BLOCK_SIZE) for n in lengths]
  pages = rng.permutation(NUM_BLOCKS)
  used, spare = pages[:sum(need)], pages[sum(need):]
  table = np.empty((batch, MAX_BLOCKS), np.int32)
  at = 0
  for b, n in enumerate(need):
    table[b, :n] = used[at:at + n]
    table[b, n:] = rng.choice(spare, MAX_BLOCKS - n)  # padded entries: poisoned pages
    at += n
  shape = (NUM_BLOCKS, BLOCK_SIZE, hk, d)
  if stacked:
    shape = (LAYERS,) + shape
  k0 = rng.standard_normal(shape).astype(np.float32)
  v0 = rng.standard_normal(shape).astype(np.float32)
  k0[..., spare, :, :, :] = np.nan
  v0[..., spare, :, :, :] = np.nan
  rows, slots, positions = [], [], []
  for b, n in enumerate(lengths):
    if n == 0:
      rows.append(None)
      continue
    rows.append(len(slots))
    positions.append(n - 1)
    slots.append(table[b, (n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE)
  active = len(slots)
  cu = np.concatenate([[0], np.cumsum([n > 0 for n in lengths])]).astype(np.int32)
  t = active + padding_rows
  qkv = (rng.standard_normal((t, (h + 2 * hk) * d)) * 2).astype(np.float32)
  qkv[active:] = np.nan  # padding rows: poison
  return Step(qkv.astype(NP[dtype]), k0.astype(NP[dtype]), v0.astype(NP[dtype]),
              np.array(slots + [-1] * padding_rows, np.int32),
              np.array(positions + [0] * padding_rows, np.int32), cu, np.array(lengths, np.int32), table, rows)


def call(step: Step, h, qs, ks, layer, backend, max_seqlen_q=1, config=None):
  return rope_write_attend(
      jnp.asarray(step.qkv), jnp.asarray(step.k0), jnp.asarray(step.v0), jnp.asarray(step.slots),
      jnp.asarray(step.positions), cu_seqlens_q=jnp.asarray(step.cu), seqused_k=jnp.asarray(step.lengths),
      block_table=jnp.asarray(step.table), num_heads=h, rope_theta=1e4,
      q_norm_scale=None if qs is None else jnp.asarray(qs), k_norm_scale=None if ks is None else jnp.asarray(ks),
      max_seqlen_q=max_seqlen_q, layer=None if layer is None else jnp.int32(layer), backend=backend,
      config=config)


CASES = [
    # (dtype, H, Hk, D, stacked, qk_norm, num_splits)
    ("float32", 4, 2, 32, False, True, None),
    ("float16", 8, 2, 64, True, True, 3),  # three splits: the new key's program is the last one
    ("float32", 4, 4, 80, False, False, 2),  # a head dim that is no power of two
    ("float16", 6, 2, 32, True, False, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_step_matches_oracle_and_writes_only_new_rows(backend, case):
  dtype, h, hk, d, stacked, qk_norm, splits = case
  rng = np.random.default_rng(abs(hash(case)) % 2**32)
  step = make_step(rng, dtype, h, hk, d, stacked)
  qs = (1 + 0.3 * rng.standard_normal(d)).astype(NP[dtype]) if qk_norm else None
  ks = (1 + 0.3 * rng.standard_normal(d)).astype(NP[dtype]) if qk_norm else None
  layer = 1 if stacked else None
  config = TritonConfig(num_splits=splits) if backend == "triton" and splits else None
  out, k_cache, v_cache = call(step, h, qs, ks, layer, backend, config=config)

  q_ref, k_ref, v_ref = oracle(step.qkv.astype(np.float32), step.positions, h, hk, d, 1e4,
                               None if qs is None else qs.astype(np.float32),
                               None if ks is None else ks.astype(np.float32), 1e-6)
  k_old = (step.k0 if layer is None else step.k0[layer]).astype(np.float64)
  v_old = (step.v0 if layer is None else step.v0[layer]).astype(np.float64)
  keys, values = [], []
  for b, n in enumerate(step.lengths):
    pos = np.arange(n)
    kb = k_old[step.table[b, pos // BLOCK_SIZE], pos % BLOCK_SIZE]  # [n, Hk, D]
    vb = v_old[step.table[b, pos // BLOCK_SIZE], pos % BLOCK_SIZE]
    if step.rows[b] is not None:  # the new token is the last key
      kb[-1], vb[-1] = k_ref[step.rows[b]], v_ref[step.rows[b]]
    keys.append(kb)
    values.append(vb)
  ref, _ = reference_attention(np.nan_to_num(q_ref), keys, values, step.cu, scale=d ** -0.5, causal=True)
  active = int(step.cu[-1])
  tol = TOL[dtype]
  assert out.shape == (len(step.slots), h, d) and out.dtype == jnp.dtype(dtype)
  got = np.asarray(out, np.float64)
  np.testing.assert_allclose(got[:active], ref[:active], rtol=tol, atol=tol)
  np.testing.assert_array_equal(got[active:], 0.0)  # padding rows: zeros, not their NaN

  k_out, v_out = np.asarray(k_cache), np.asarray(v_cache)
  expect_k, expect_v = step.k0.copy(), step.v0.copy()
  for row, slot in enumerate(step.slots):
    if slot < 0:
      continue
    page, off = divmod(int(slot), BLOCK_SIZE)
    where = (page, off) if layer is None else (layer, page, off)
    np.testing.assert_allclose(k_out[where].astype(np.float64), k_ref[row], rtol=tol, atol=tol * 4)
    np.testing.assert_array_equal(v_out[where].astype(np.float64), v_ref[row])  # V as it comes
    expect_k[where], expect_v[where] = k_out[where], v_out[where]
  u = np.uint16 if np.dtype(NP[dtype]).itemsize == 2 else np.uint32
  np.testing.assert_array_equal(k_out.view(u), expect_k.view(u))  # the rest, NaN poison included
  np.testing.assert_array_equal(v_out.view(u), expect_v.view(u))


@pytest.mark.skipif(not triton_runs(), reason="no GPU and TRITON_INTERPRET is not 1")
def test_one_kernel_form_equals_the_two_calls_and_compiles_once():
  """Triton, max_seqlen_q=1 (one kernel) vs max_seqlen_q=None (rope_write_kv, then attention): the
  same outputs and caches; new lengths, slots and tables reuse the one compiled call."""
  h, hk, d = 4, 2, 32
  qkv_mod._run_fused.clear_cache()
  for seed, lengths in ((0, LENGTHS), (1, (17, 2, 9, 0)), (2, (40, 0, 44, 3))):
    rng = np.random.default_rng(seed)
    step = make_step(rng, "float32", h, hk, d, True, lengths)
    qs, ks = (1 + 0.3 * rng.standard_normal((2, d))).astype(np.float32)
    one = call(step, h, qs, ks, 2, "triton")
    two = call(step, h, qs, ks, 2, "triton", max_seqlen_q=None)
    for a, b in zip(one, two):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  assert qkv_mod._run_fused._cache_size() == 1


@pytest.mark.skipif(not jax.devices()[0].platform == "gpu", reason="the compiled kernel: a GPU")
def test_one_kernel_form_updates_the_donated_cache_in_place():
  from tests.test_nn import in_place_violations

  h, hk, d = 4, 2, 32
  rng = np.random.default_rng(4)
  step = make_step(rng, "float16", h, hk, d, True)
  k_cache, v_cache = jnp.asarray(np.nan_to_num(step.k0)), jnp.asarray(np.nan_to_num(step.v0))

  def f(k_cache, v_cache, qkv):
    return rope_write_attend(qkv, k_cache, v_cache, jnp.asarray(step.slots), jnp.asarray(step.positions),
                             cu_seqlens_q=jnp.asarray(step.cu), seqused_k=jnp.asarray(step.lengths),
                             block_table=jnp.asarray(step.table), num_heads=h, rope_theta=1e4,
                             max_seqlen_q=1, layer=jnp.int32(0))

  jitted = jax.jit(f, donate_argnums=(0, 1))
  qkv = jnp.asarray(np.nan_to_num(step.qkv))
  hlo = jitted.lower(k_cache, v_cache, qkv).compile().as_text()
  assert "rope_write_attend" in hlo
  assert not in_place_violations(hlo, k_cache.size)
  ptr = k_cache.unsafe_buffer_pointer()
  _, k_new, _ = jitted(k_cache, v_cache, qkv)
  assert k_cache.is_deleted() and k_new.unsafe_buffer_pointer() == ptr


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(qkv=jnp.ones((2, 100))), ValueError, r"qkv must be \[T, \(num_heads"),
    (dict(cu_seqlens_q=jnp.array([0, 1, 2], jnp.float32)), TypeError, "cu_seqlens_q"),
    (dict(block_table=jnp.zeros((3, 2), jnp.int32)), ValueError, "block_table must have batch=2 rows"),
    (dict(max_seqlen_q=jnp.int32(1)), TypeError, "max_seqlen_q"),
    (dict(num_heads=3), ValueError, "multiple of the cache's num_kv_heads"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
])
def test_bad_input_raises_naming_the_argument(kwargs, err, match):
  args = dict(qkv=jnp.ones((2, 8 * 32), jnp.float32), k_cache=jnp.zeros((4, 4, 2, 32), jnp.float32),
              v_cache=jnp.zeros((4, 4, 2, 32), jnp.float32), slot_mapping=jnp.array([0, 4], jnp.int32),
              positions=jnp.array([0, 0], jnp.int32), cu_seqlens_q=jnp.array([0, 1, 2], jnp.int32),
              seqused_k=jnp.array([1, 1], jnp.int32), block_table=jnp.array([[0, 2], [1, 3]], jnp.int32),
              num_heads=4, rope_theta=1e4, max_seqlen_q=1)
  args.update(kwargs)
  with pytest.raises(err, match=match):
    rope_write_attend(**args)


@pytest.mark.skipif(not triton_runs(), reason="no GPU and TRITON_INTERPRET is not 1")
def test_decode_loop_tokens_do_not_depend_on_the_fusion():
  """The serving engine's decode calls (max_seqlen_q=1) on the Triton backend, with
  `ModelConfig.fuse_rope_attend` on (one kernel a layer) and off (two): the same greedy tokens, the
  same logits' argmax at every step (tiny model, f32)."""
  from flax import nnx

  from jax_varlen_attn import serving
  from jax_varlen_attn.nn import DecoderLM, ModelConfig

  prompts = [[5, 9, 200, 3], list(range(30, 41)), [7]]
  generated = []
  for fuse in (True, False):
    cfg = ModelConfig.tiny(fuse_projections=True, backend="triton", fuse_rope_attend=fuse)
    model = DecoderLM(cfg, rngs=nnx.Rngs(1))
    engine = serving.Engine(model, num_blocks=24, steps_per_call=4, block_size=4, max_tokens_per_step=16,
                            min_token_bucket=16, max_seqs=4, max_model_len=48)
    seqs = [engine.add(p, 9) for p in prompts]
    while engine.advance() is not None:
      pass
    generated.append([s.generated for s in seqs])
    assert engine.num_chunks >= 2  # the tokens after the first came from decode calls
  assert generated[0] == generated[1]
