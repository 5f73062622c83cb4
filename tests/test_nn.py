"""The Flax decoder over a paged, layer-stacked cache against the same weights with dense attention.

The paged path runs chunked prefills mixed with decodes over several steps (pages scattered over a
NaN-poisoned cache); the reference runs each whole sequence at once through the model's own
sub-modules with a plain jnp causal softmax (no cache). fp32, relative error < 1e-4.
"""

import dataclasses
import functools
import re

import numpy as np
import pytest

flax = pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jax_varlen_attn.nn import DecoderLM, ModelConfig, PagedBatch, apply_rope, init_cache, preset  # noqa: E402
from tests.attention_suite import _large_buffers  # noqa: E402
from tests.conftest import HAS_GPU  # noqa: E402

# f32 model. On a GPU, XLA's f32 GEMMs and the kernel's tiled sums order additions differently from
# the dense reference (2.0e-4 measured on an H200, the engine test): 1e-3 there.
RTOL = 1e-3 if HAS_GPU else 1e-4


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def dense_attention(q, k, v):
  """Causal softmax attention of one whole sequence: q [n, H, D], k / v [n, Hk, D] -> [n, H, D]."""
  n, h, d = q.shape
  group = h // k.shape[1]
  k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
  s = jnp.einsum("qhd,khd->hqk", q, k, precision="highest") / np.sqrt(d)
  s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
  return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s, axis=-1), v, precision="highest")


def dense_logits(model: DecoderLM, tokens, pad_to: int = 32) -> np.ndarray:
  """Logits [n, vocab] of one sequence, run whole through the model's weights, no cache. (Padded at
  the end to `pad_to` tokens so every length shares one compile; causal, so padding changes nothing.)"""
  n = len(tokens)
  padded = np.zeros(max(pad_to, n), np.int32)
  padded[:n] = tokens
  return np.asarray(_dense_logits(*nnx.split(model), jnp.asarray(padded)))[:n]


@functools.partial(jax.jit, static_argnums=0)
def _dense_logits(graphdef, state, tokens):
  model = nnx.merge(graphdef, state)
  positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
  x = model.embed(tokens)
  for i in range(model.config.num_layers):
    blk = model.block(i)
    q, k, v = blk.attn.project(blk.input_norm(x), positions)
    x = x + blk.attn.output(dense_attention(q, k, v))
    x = x + blk.mlp(blk.post_attn_norm(x))
  return model.logits(x)


def paged_batch(chunks, pages, block_size, num_tokens, num_seqs, max_blocks):
  """chunks: [(seq, start, n, tokens of the sequence)] -> (tokens i32[num_tokens], PagedBatch)."""
  tokens = np.zeros(num_tokens, np.int32)
  positions = np.zeros(num_tokens, np.int32)
  slots = np.full(num_tokens, -1, np.int32)
  cu = np.zeros(num_seqs + 1, np.int32)
  used = np.zeros(num_seqs, np.int32)
  table = np.full((num_seqs, max_blocks), 10**6, np.int32)  # padded entries out of range: never read
  row = 0
  for b, (seq, start, n, toks) in enumerate(chunks):
    pos = np.arange(start, start + n)
    tokens[row:row + n] = toks[start:start + n]
    positions[row:row + n] = pos
    slots[row:row + n] = pages[seq][pos // block_size] * block_size + pos % block_size
    used[b] = start + n
    table[b, :len(pages[seq])] = pages[seq]
    row += n
    cu[b + 1] = row
  cu[len(chunks) + 1:] = row
  return jnp.asarray(tokens), PagedBatch(*(jnp.asarray(a) for a in (positions, cu, used, table, slots)))


@jax.jit
def _forward(state_and_graph, tokens, k_cache, v_cache, batch):
  graphdef, state = state_and_graph
  return nnx.merge(graphdef, state)(tokens, k_cache, v_cache, batch)


# Steps of (sequence, first position, tokens): chunked prefills mixed with decodes and a 3-token
# chunk; step 3 leaves a sequence slot empty (padding).
LENGTHS = (24, 12, 7)
STEPS = [[(0, 0, 10), (1, 0, 11)],
         [(1, 11, 1), (0, 10, 10), (2, 0, 5)],
         [(0, 20, 1), (2, 5, 1)],
         [(0, 21, 3), (2, 6, 1)]]


def run_paged(model, cfg, block_size=4, num_tokens=32, num_seqs=4, seed=0):
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(0, cfg.vocab_size, n) for n in LENGTHS]
  max_blocks = -(-max(LENGTHS) // block_size)
  num_blocks = sum(-(-n // block_size) for n in LENGTHS) + 5
  perm = rng.permutation(num_blocks)
  pages, used = [], 0
  for n in LENGTHS:  # scattered, distinct pages per sequence
    k = -(-n // block_size)
    pages.append(perm[used:used + k])
    used += k
  shape = cfg.cache_shape(num_blocks, block_size)
  k_cache = jnp.full(shape, jnp.nan, jnp.float32)  # every slot never written is poison
  v_cache = jnp.full(shape, jnp.nan, jnp.float32)
  logits = [np.zeros((n, cfg.vocab_size), np.float32) for n in LENGTHS]
  split = nnx.split(model)
  for step in STEPS:
    chunks = [(s, start, n, seqs[s]) for s, start, n in step]
    tokens, batch = paged_batch(chunks, pages, block_size, num_tokens, num_seqs, max_blocks)
    out, k_cache, v_cache = _forward(split, tokens, k_cache, v_cache, batch)
    out, row = np.asarray(out), 0
    for s, start, n in step:
      logits[s][start:start + n] = out[row:row + n]
      row += n
    assert np.isfinite(out).all()  # padding rows too: NaN pages never reach an output
  return seqs, logits


@pytest.mark.parametrize("variant", ["tiny", "tied_no_qknorm_bias_unrolled_fused", "qknorm_fused",
                                     "naive_attention", "unfused_add_norm"])
def test_paged_steps_match_dense_attention(variant):
  cfg = ModelConfig.tiny()
  if variant == "naive_attention":  # the serving benchmark's baseline must be right too
    cfg = dataclasses.replace(cfg, backend="naive")
  elif variant == "qknorm_fused":  # the serving presets' path: rope_write_kv, add_rms_norm carried
    cfg = dataclasses.replace(cfg, scan_layers=False, fuse_projections=True)
  elif variant == "unfused_add_norm":  # XLA's adds and nnx.RMSNorm (ModelConfig.fuse_add_norm=False)
    cfg = dataclasses.replace(cfg, scan_layers=False, fuse_add_norm=False)
  elif variant != "tiny":
    cfg = dataclasses.replace(cfg, tie_embeddings=True, qk_norm=False, attention_bias=True,
                              scan_layers=False, fuse_projections=True, rope_theta=1e6)
  model = DecoderLM(cfg, rngs=nnx.Rngs(1))
  before = _forward._cache_size()
  seqs, logits = run_paged(model, cfg)
  assert _forward._cache_size() == before + 1  # four steps, different lengths, one compile
  for toks, got in zip(seqs, logits):
    ref = dense_logits(model, toks)
    assert rel_err(got, ref) < RTOL, (variant, rel_err(got, ref))
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("fused", [False, True], ids=["write_kv", "rope_write_kv"])
def test_forward_updates_donated_cache_in_place(fused):
  """The layer-stacked cache is written where it lies: no copy in the compiled HLO, same buffer."""
  cfg = ModelConfig.tiny(fuse_projections=fused)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def step(state, k_cache, v_cache, tokens, batch):
    return nnx.merge(graphdef, state)(tokens, k_cache, v_cache, batch)

  k_cache, v_cache = init_cache(cfg, num_blocks=256, block_size=8)
  tokens, batch = paged_batch([(0, 0, 5, np.arange(5))], [np.array([7])], 8, 16, 2, 4)
  jitted = jax.jit(step, donate_argnums=(1, 2))
  hlo = jitted.lower(state, k_cache, v_cache, tokens, batch).compile().as_text()
  assert not in_place_violations(hlo, k_cache.size)
  ptr = k_cache.unsafe_buffer_pointer()
  _, k_new, v_new = jitted(state, k_cache, v_cache, tokens, batch)
  assert k_cache.is_deleted() and k_new.unsafe_buffer_pointer() == ptr
  assert float(jnp.abs(k_new[:, 7, :5]).sum()) > 0 and float(jnp.abs(k_new[:, 8]).sum()) == 0


_IN_PLACE = ("scatter", "dynamic-update-slice")


def _op(line: str) -> str:
  """The opcode of an HLO instruction line (the first `name(` after the `=`)."""
  m = re.search(r"([a-z][\w\-]*)\(", line.split("=", 1)[1])
  return m.group(1) if m else ""


def in_place_violations(hlo: str, cache_elems: int):
  """Cache-sized buffers the compiled HLO writes other than in-place updates (scatter /
  dynamic-update-slice, or fusions rooted in one), plus entry parameters of the cache's size that
  are not aliased to an output (each of those would be a copy of the donated cache)."""
  roots, current = {}, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation's header
      words = line.split()
      current = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
    elif line.strip().startswith("ROOT ") and current:
      roots[current] = _op(line)

  def in_place(line):
    op = _op(line)
    if op == "fusion" and "calls=" in line:
      op = roots.get(line.split("calls=")[1].split(",")[0].split()[0].lstrip("%"))
    return op in _IN_PLACE

  bad = [line for line in _large_buffers(hlo, cache_elems) if not in_place(line)]
  alias = hlo.split("input_output_alias={", 1)[1].split("}, entry")[0] if "input_output_alias" in hlo else ""
  if alias.count("may-alias") + alias.count("must-alias") < 2:
    bad.append(f"the two caches are not both aliased to outputs: {alias!r}")
  return bad


def test_rope_is_relative_and_norm_preserving():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 2, 64)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 2, 64)), jnp.float32)

  def dot(m, n):
    return float(jnp.sum(apply_rope(q, jnp.array([m]), 1e4) * apply_rope(k, jnp.array([n]), 1e4)))

  assert dot(5, 3) == pytest.approx(dot(105, 103), rel=1e-4)
  assert dot(5, 3) != pytest.approx(dot(5, 4), rel=1e-3)
  assert float(jnp.linalg.norm(apply_rope(q, jnp.array([77]), 1e4))) == pytest.approx(
      float(jnp.linalg.norm(q)), rel=1e-5)
  np.testing.assert_allclose(apply_rope(q, jnp.array([0]), 1e4), q)  # position 0: identity


def test_presets():
  tiny = preset("tiny")
  assert tiny.head_dim >= 32 and tiny.num_heads % tiny.num_kv_heads == 0
  big = ModelConfig.qwen3_1_7b_like()
  assert (big.num_layers, big.hidden_size, big.num_heads, big.num_kv_heads, big.head_dim,
          big.intermediate_size, big.vocab_size) == (28, 2048, 16, 8, 128, 6144, 151936)
  assert big.qk_norm and big.tie_embeddings
  # Shapes only: no 3.4 GB of weights are made.
  abstract = nnx.eval_shape(lambda: DecoderLM(big, rngs=nnx.Rngs(0)))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert params == big.num_params() and 1.70e9 < params < 1.74e9
  assert len(abstract.layers) == 28 and not hasattr(abstract, "blocks")  # unrolled: one module per layer
  assert abstract.layers[27].attn.qkv_proj.kernel.shape == (2048, (16 + 2 * 8) * 128)
  assert abstract.layers[27].mlp.gate_up_proj.kernel.shape == (2048, 2 * 6144)
  stacked = nnx.eval_shape(lambda: DecoderLM(dataclasses.replace(big, scan_layers=True, fuse_projections=False), rngs=nnx.Rngs(0)))
  assert stacked.blocks.attn.q_proj.kernel.shape == (28, 2048, 16 * 128)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig.tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match="unknown preset"):
    preset("llama")


def test_cache_shape_is_checked():
  cfg = ModelConfig.tiny()
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  k, v = init_cache(cfg, 4, 8)
  tokens, batch = paged_batch([(0, 0, 3, np.arange(3))], [np.array([0])], 8, 4, 1, 1)
  with pytest.raises(ValueError, match="num_layers=2"):
    model(tokens, k[0], v[0], batch)
