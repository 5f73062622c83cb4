"""The multi-step decode path (`decode.decode_loop` via `serving.Engine(steps_per_call=N)`) and on-device
sampling (`decode.sample`).

The reference for the loop is the one-step path (`serving.serving_step`, itself checked against the
model with dense attention in tests/test_serving.py): same tokens, greedy and sampled, with sequences
of different lengths that stop at their eos or their max length mid-call and calls that cross page
boundaries. The reference for sampling is softmax(logits / T) restricted by top-k / top-p, computed
here in NumPy.
"""

import collections
import dataclasses

import numpy as np
import pytest

pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jax_varlen_attn import decode, serving  # noqa: E402
from jax_varlen_attn.nn import DecoderLM, ModelConfig, init_cache  # noqa: E402
from tests.test_nn import in_place_violations  # noqa: E402

PROMPT_LENS = (3, 17, 9)
MAX_NEW = (11, 6, 13)  # different lengths: the rows stop at different steps of a call
HOT = decode.Sampling(temperature=0.8, top_k=40, top_p=0.9, seed=5)
# Rows 0 and 1 greedy, row 2 sampled; row 2 runs longest, so every step of the one-step path samples
# (one compile of each path).
SAMPLINGS = (decode.GREEDY, decode.GREEDY, HOT)
BLOCK_SIZE = 4  # small pages: an 8-step call crosses a page boundary for every sequence
STEPS = 8
NUM_BLOCKS = 40
# One token bucket for prefill and decode steps and one sequence bucket: one compile of each path.
ENGINE = dict(block_size=BLOCK_SIZE, max_tokens_per_step=32, min_token_bucket=32, max_seqs=4,
              max_model_len=NUM_BLOCKS * BLOCK_SIZE)


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig.tiny()
  assert cfg.compute_dtype == jnp.float32 and cfg.weight_dtype == jnp.float32  # exact comparisons
  return DecoderLM(cfg, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(7)
  return [rng.integers(0, 256, n).tolist() for n in PROMPT_LENS]


def make_engine(model, steps_per_call, check_every=1, overlap=True):
  return serving.Engine(model, num_blocks=NUM_BLOCKS, steps_per_call=steps_per_call, check_every=check_every,
                        overlap=overlap, **ENGINE)


def run(engine, prompts, eos=(None, None, None), samplings=SAMPLINGS):
  seqs = [engine.add(*args) for args in zip(prompts, MAX_NEW, eos, samplings)]
  outputs = []
  while (out := engine.advance()) is not None:
    outputs.append(out)
  return [s.generated for s in seqs], outputs


def first_new_token(tokens, start):
  """(index, token): the first token at index >= start not seen before it (an eos that stops there)."""
  i = next(i for i in range(start, len(tokens)) if tokens.index(tokens[i]) == i)
  return i, tokens[i]


@pytest.fixture(scope="module")
def one_step(model, prompts):
  """The one-step path's tokens, with an eos for sequence 0 that stops it inside a call."""
  free, _ = run(make_engine(model, 1), prompts)
  index, eos = first_new_token(free[0], 3)  # token 0 comes from the prefill step: 3 is in a call
  stopped, _ = run(make_engine(model, 1), prompts, eos=(eos, None, None))
  assert stopped[0] == free[0][:index + 1] and stopped[1:] == free[1:]
  return stopped, (eos, None, None)


@pytest.mark.parametrize("check_every,overlap", [(1, True), (4, True), (STEPS, True), (1, False),
                                                 (decode.NEVER, True), (decode.NEVER, False)])
def test_multi_step_matches_one_step(model, prompts, one_step, check_every, overlap):
  """Greedy rows (one stops at its eos, one at its max length, mid-call) and a sampled row (keys are
  per seed, sequence and position, so grouping steps into calls changes no draw): the same tokens,
  whether the loop checks for finished rows every step, runs idle steps past them or never checks
  (a loop of static length, its steps cut to a power of two reaching the longest sequence's end),
  and whether each call is dispatched before the last one's tokens are read (overlap) or after."""
  want, eos = one_step
  engine = make_engine(model, STEPS, check_every, overlap)
  compiles = decode.decode_loop._cache_size()
  got, outputs = run(engine, prompts, eos)
  assert got == want
  chunks = [o for o in outputs if isinstance(o, serving.ChunkOutput)]
  # Calls at new lengths / pages: one program per step count (several only where the loop never checks).
  steps = {c.chunk.steps for c in chunks}
  assert decode.decode_loop._cache_size() - compiles <= len(steps)
  assert steps == {STEPS} if check_every else (STEPS in steps and len(steps) > 1)
  assert engine.num_chunks == len(chunks) >= 2 and engine.num_steps == 1  # the prefill, then calls
  # With overlap, every call after the first was seeded on the device from the one before it.
  assert [c.chunk.continues for c in chunks] == [False] + [overlap] * (len(chunks) - 1)
  assert set(engine.chunk_seconds) == {"schedule", "call", "update"}  # the last call's time, by part
  assert all(t >= 0 for t in engine.chunk_seconds.values()) and engine.chunk_seconds["call"] > 0
  # Rows stopped mid-call (eos, max length), rows ran whole calls, and padding rows made nothing.
  counts = np.concatenate([c.counts[:len(c.chunk.scheduled)] for c in chunks])
  assert (counts == STEPS).any() and ((counts > 0) & (counts < STEPS)).any()
  pad = np.concatenate([c.tokens[len(c.chunk.scheduled):].ravel() for c in chunks])
  assert pad.size and (pad == decode.PAD_TOKEN).all()
  assert engine.allocator.num_free == NUM_BLOCKS


def test_a_new_seed_changes_only_the_sampled_row(model, prompts, one_step):
  want, eos = one_step
  reseeded = (*SAMPLINGS[:2], decode.Sampling(temperature=0.8, top_k=40, top_p=0.9, seed=6))
  got, _ = run(make_engine(model, STEPS), prompts, eos, reseeded)
  assert got[:2] == want[:2] and got[2] != want[2]


@pytest.mark.parametrize("check_every,overlap", [(1, True), (STEPS, True), (1, False), (decode.NEVER, True)])
def test_finished_sequences_never_write_the_cache(model, prompts, one_step, check_every, overlap):
  """NaN-poisoned caches: after the run exactly the slots of the tokens each sequence computed hold
  numbers; every other slot (reserved tails of sequences that stopped early, padding rows' page 0,
  untouched pages) keeps its poison, and the tokens are still the one-step path's (with
  check_every=STEPS the loop runs idle steps once every row has stopped: they write nothing; with
  overlap a row that stopped rides the next call, dispatched before its stop was known, idle)."""
  want, eos = one_step
  engine = make_engine(model, STEPS, check_every, overlap)
  engine.k_cache = jnp.full_like(engine.k_cache, jnp.nan)
  engine.v_cache = jnp.full_like(engine.v_cache, jnp.nan)
  pages = collections.defaultdict(list)
  reserve = engine.allocator.reserve

  def spy(seq_id, num_tokens):
    new = reserve(seq_id, num_tokens)
    pages[seq_id] += new
    return new

  engine.allocator.reserve = spy
  got, _ = run(engine, prompts, eos)
  assert got == want
  written = np.zeros(NUM_BLOCKS * BLOCK_SIZE, bool)
  reserved = written.copy()
  for seq in engine.scheduler.finished:
    assert len(set(pages[seq.seq_id])) == len(pages[seq.seq_id])  # no page reused
    slots = (np.array(pages[seq.seq_id])[:, None] * BLOCK_SIZE + np.arange(BLOCK_SIZE)).ravel()
    reserved[slots] = True
    written[slots[:seq.num_computed]] = True
  assert (reserved & ~written).sum() > BLOCK_SIZE  # the eos row's unused reservation at least
  for cache in (engine.k_cache, engine.v_cache):
    finite = np.isfinite(np.asarray(cache)).reshape(cache.shape[0], NUM_BLOCKS * BLOCK_SIZE, -1)
    assert finite[:, written].all() and not finite[:, ~written].any()


def loop_args(model, seed, rows=4, num_blocks=NUM_BLOCKS):
  """decode_loop's arguments (the engine's shapes) for `rows` sequences at random lengths on random
  distinct pages."""
  rng = np.random.default_rng(seed)
  cfg = model.config
  k_cache, v_cache = init_cache(cfg, num_blocks, BLOCK_SIZE)
  used = 6  # pages per sequence
  positions = rng.integers(1, used * BLOCK_SIZE - STEPS, rows).astype(np.int32)
  table = np.zeros((rows, NUM_BLOCKS), np.int32)  # the engine's width: max_model_len / block_size
  table[:, :used] = rng.permutation(num_blocks)[:rows * used].reshape(rows, used)
  batch = decode.DecodeBatch(tokens=rng.integers(0, cfg.vocab_size, rows).astype(np.int32),
                             positions=positions, block_table=table,
                             remaining=rng.integers(1, STEPS + 3, rows).astype(np.int32),
                             eos=np.full(rows, decode.NO_EOS, np.int32))
  params = decode.sampling_arrays([decode.GREEDY] * rows, list(range(rows)), rows)
  return (*nnx.split(model), k_cache, v_cache, jax.tree.map(jnp.asarray, batch),
          jax.tree.map(jnp.asarray, params))


def test_decode_loop_compiles_once_for_new_lengths_tables_positions(model):
  sizes = []
  for seed in (0, 1, 2):  # new tokens, positions, tables, remaining counts: the same program
    args = loop_args(model, seed)
    tokens, counts, *_ = decode.decode_loop(*args, steps=STEPS, mode="filter")
    np.testing.assert_array_equal(counts, np.minimum(args[4].remaining, STEPS))
    sizes.append(decode.decode_loop._cache_size())
  assert sizes[0] == sizes[1] == sizes[2]


def test_decode_loop_updates_the_donated_cache_in_place(model):
  args = loop_args(model, 0, num_blocks=301)  # a cache larger than any other buffer
  k_cache = args[2]
  hlo = decode.decode_loop.lower(*args, steps=STEPS, mode="greedy").compile().as_text()  # no sort
  assert not in_place_violations(hlo, k_cache.size)
  ptr = k_cache.unsafe_buffer_pointer()
  _, _, k_new, _ = decode.decode_loop(*args, steps=STEPS, mode="greedy")
  assert k_cache.is_deleted() and k_new.unsafe_buffer_pointer() == ptr


def test_loop_for_takes_the_cublas_build_from_its_row_count_on_hopper_only(model, monkeypatch):
  """`loop_for`: cuBLAS matmuls (XLA's compiler option) from CUBLAS_FROM_ROWS sequences on a Hopper
  GPU, the default build otherwise; the cuBLAS build computes the same tokens (on the CPU the option
  changes nothing) and still updates the donated cache in place."""
  from jax_varlen_attn.backends import device
  n = decode.CUBLAS_FROM_ROWS
  assert decode.decode_loop_cublas is not decode.decode_loop
  if not device.is_hopper():
    assert decode.loop_for(n) is decode.loop_for(1) is decode.decode_loop
  monkeypatch.setattr(device, "is_hopper", lambda: True)
  assert decode.loop_for(n) is decode.loop_for(4 * n) is decode.decode_loop_cublas
  assert decode.loop_for(n - 1) is decode.decode_loop
  monkeypatch.setattr(device, "is_hopper", lambda: False)
  assert decode.loop_for(4 * n) is decode.decode_loop
  want = decode.decode_loop(*loop_args(model, 5), steps=STEPS, mode="greedy")[:2]
  args = loop_args(model, 5)
  ptr = args[2].unsafe_buffer_pointer()
  tokens, counts, k_new, _ = decode.decode_loop_cublas(*args, steps=STEPS, mode="greedy")
  np.testing.assert_array_equal(tokens, want[0])
  np.testing.assert_array_equal(counts, want[1])
  assert args[2].is_deleted() and k_new.unsafe_buffer_pointer() == ptr


def small_scheduler(num_blocks, max_model_len):
  """A scheduler of 4-token pages and one bucket of 4 sequences; returns (config, scheduler)."""
  cfg = serving.SchedulerConfig(num_blocks=num_blocks, block_size=4, max_tokens_per_step=32, max_seqs=4,
                                max_model_len=max_model_len, min_token_bucket=4, min_seq_bucket=4)
  return cfg, serving.Scheduler(cfg)


def test_schedule_decode_reserves_the_call_pages_and_waits_for_prefill():
  cfg, sched = small_scheduler(8, 32)
  a = sched.add(range(6), max_new_tokens=26)
  b = sched.add(range(3), max_new_tokens=3)
  assert sched.schedule_decode(STEPS) is None  # prompts wait
  sched.update(sched.schedule(), np.array([1, 2, 0, 0]))
  # 24 steps: a needs 6 + 24 = 30 tokens (8 pages), b 3 + 2 left (2 pages): 7 more, 5 free.
  assert sched.schedule_decode(3 * STEPS) is None and sched.allocator.num_free == 5
  chunk = sched.schedule_decode(STEPS)
  # a: 6 tokens in the cache + 8 this call = 14 -> 4 pages; b: 3 + min(8, 2 left) = 5 -> 2 pages.
  assert [len(sched.allocator.pages(s.seq_id)) for s in (a, b)] == [4, 2]
  bt = chunk.batch
  np.testing.assert_array_equal(bt.tokens, [1, 2, 0, 0])
  np.testing.assert_array_equal(bt.positions, [6, 3, 0, 0])
  np.testing.assert_array_equal(bt.remaining, [25, 2, 0, 0])
  assert list(bt.block_table[0, :4]) == sched.allocator.pages(a.seq_id) and chunk.mode == "greedy"
  out = np.full((4, STEPS), decode.PAD_TOKEN)
  out[0], out[1, :2] = np.arange(10, 18), [5, 6]
  done = sched.update_decode(chunk, out, np.array([STEPS, 2, 0, 0]))
  assert done == [b] and b.generated == [2, 5, 6] and a.generated == [1, *range(10, 18)]
  assert a.num_computed == 14 and sched.allocator.pages(b.seq_id) == []
  sched.add(range(30), max_new_tokens=2)  # a waiting prompt: the one-step path runs
  assert sched.schedule_decode(STEPS) is None
  full = serving.Scheduler(dataclasses.replace(cfg, max_seqs=1))
  c = full.add(range(3), max_new_tokens=4)
  full.add(range(3), max_new_tokens=4)
  full.update(full.schedule(), np.array([1]))
  chunk = full.schedule_decode(STEPS)  # a prompt waits, but no sequence slot is free: a call runs
  assert chunk.scheduled == [c] and len(full.waiting) == 1


def test_overlapped_calls_admit_prompts_that_arrive_mid_run(model, prompts, one_step):
  """A prompt added while a call is in flight: the next decode_chunk reads that call without
  dispatching another (a prompt waits with a free row), the one-step path prefills it, calls resume;
  a step() called with a call in flight reads it first. Every sequence's tokens are still the
  one-step path's."""
  want, eos = one_step
  engine = make_engine(model, STEPS)
  seqs = [engine.add(*args) for args in zip(prompts[:2], MAX_NEW[:2], eos[:2], SAMPLINGS[:2])]
  while not isinstance(engine.advance(), serving.ChunkOutput):
    pass
  assert engine._in_flight is not None  # the next call was dispatched before this one was read
  seqs.append(engine.add(prompts[2], MAX_NEW[2], eos[2], SAMPLINGS[2]))
  out = engine.decode_chunk()
  assert out.chunk.continues and engine._in_flight is None  # read, and no call after it: a prompt waits
  assert isinstance(engine.advance(), serving.StepOutput)  # the prefill
  out = engine.advance()
  assert isinstance(out, serving.ChunkOutput) and not out.chunk.continues and engine._in_flight is not None
  engine.step()  # reads the call in flight first
  assert engine._in_flight is None
  engine.run()
  assert [s.generated for s in seqs] == want
  assert engine.allocator.num_free == NUM_BLOCKS


def test_next_batch_matches_numpy():
  """decode.next_batch against its definition in NumPy: rows that made tokens continue from their
  last one, rows that made none keep theirs, a row whose last token is its eos has none left."""
  rng = np.random.default_rng(11)
  rows, steps = 6, 5
  batch = decode.DecodeBatch(tokens=rng.integers(0, 50, rows).astype(np.int32),
                             positions=rng.integers(0, 40, rows).astype(np.int32),
                             block_table=rng.integers(0, 9, (rows, 3)).astype(np.int32),
                             remaining=np.array([9, 5, 3, 7, 0, 4], np.int32),
                             eos=np.array([7, decode.NO_EOS, 2, 3, decode.NO_EOS, 1], np.int32))
  counts = np.array([5, 5, 2, 4, 0, 0], np.int32)
  tokens = np.full((rows, steps), decode.PAD_TOKEN, np.int32)
  for r in range(rows):
    tokens[r, :counts[r]] = rng.integers(10, 50, counts[r])
  tokens[2, 1] = 2  # row 2 stops at its eos
  table = rng.integers(0, 9, (rows, 3)).astype(np.int32)
  got = decode.next_batch(batch, tokens, counts, table)
  last = np.array([tokens[r, counts[r] - 1] if counts[r] else batch.tokens[r] for r in range(rows)])
  np.testing.assert_array_equal(got.tokens, last)
  np.testing.assert_array_equal(got.positions, batch.positions + counts)
  np.testing.assert_array_equal(got.remaining, [4, 0, 0, 3, 0, 4])
  np.testing.assert_array_equal(got.block_table, table)
  np.testing.assert_array_equal(got.eos, batch.eos)
  with pytest.raises(ValueError, match="counts"):
    decode.next_batch(batch, tokens, counts[:3], table)
  with pytest.raises(ValueError, match="block_table"):
    decode.next_batch(batch, tokens, counts, table[:2])
  with pytest.raises(TypeError, match="counts"):
    decode.next_batch(batch, tokens, counts.astype(np.float32), table)


def test_schedule_next_decode_reserves_two_calls_ahead_and_knows_when_not_to():
  cfg, sched = small_scheduler(12, 48)
  a = sched.add(range(6), max_new_tokens=30)
  b = sched.add(range(3), max_new_tokens=12)
  sched.update(sched.schedule(), np.array([1, 2, 0, 0]))
  chunk = sched.schedule_decode(4)
  nxt = sched.schedule_next_decode(chunk)
  # From the host's state (chunk's tokens unknown): a 6 + min(8, 29) = 14 -> 4 pages; b 3 + 8 -> 3.
  assert nxt.continues and nxt.scheduled == chunk.scheduled and nxt.steps == 4
  assert [len(sched.allocator.pages(s.seq_id)) for s in (a, b)] == [4, 3]
  assert nxt.batch.tokens is None and nxt.batch.positions is None and nxt.batch.remaining is None
  assert list(nxt.batch.block_table[1, :3]) == sched.allocator.pages(b.seq_id)
  out = np.full((4, 4), decode.PAD_TOKEN)
  out[0], out[1] = [5, 6, 7, 8], [9, 10, 11, 12]
  sched.update_decode(chunk, out, np.array([4, 4, 0, 0]))
  # b has 7 left and a call in flight: the call after that one is still wanted.
  assert sched.schedule_next_decode(nxt) is not None
  sched.add(range(2), max_new_tokens=2)  # a waiting prompt with a free row: no call ahead
  assert sched.schedule_next_decode(nxt) is None
  short = serving.Scheduler(cfg)
  short.add(range(3), max_new_tokens=3)
  short.update(short.schedule(), np.array([1, 0, 0, 0]))
  assert short.schedule_next_decode(short.schedule_decode(4)) is None  # the call ends the sequence
  tight = serving.Scheduler(dataclasses.replace(cfg, num_blocks=8, max_model_len=24))
  tight.add(range(3), max_new_tokens=20)
  tight.add(range(3), max_new_tokens=20)
  tight.update(tight.schedule(), np.array([1, 1, 0, 0]))
  first = tight.schedule_decode(8)  # 3 + 8 tokens each: 3 pages each, 2 of 8 left
  assert tight.schedule_next_decode(first) is None  # 3 + 16 tokens: 5 pages each, 4 more needed
  assert tight.allocator.num_free == 2  # nothing reserved


# ---- sampling ---------------------------------------------------------------------------------------
def random_logits(seed, rows=32, vocab=50):
  return np.random.default_rng(seed).standard_normal((rows, vocab)).astype(np.float32) * 2


def test_top_k_1_and_tiny_top_p_are_greedy():
  logits = random_logits(0)
  greedy = logits.argmax(-1)
  key = jax.random.key(1)
  for t, k, p in [(1.0, 1, 1.0), (0.7, 0, 1e-6), (2.0, 5, 1e-6), (0.0, 7, 0.5)]:
    np.testing.assert_array_equal(decode.sample(logits, key, t, k, p), greedy, err_msg=f"{t} {k} {p}")
  np.testing.assert_array_equal(decode.sample(logits, key, 0.0, 0, 1.0, mode="greedy"), greedy)


def restricted_softmax(logits, t, k, p):
  """f64 NumPy reference: softmax(logits / t) over the top-k tokens, then the top-p nucleus."""
  z = np.asarray(logits, np.float64) / t
  order = np.argsort(-z)[:k or len(z)]
  probs = np.exp(z[order] - z[order].max())
  probs /= probs.sum()
  before = np.cumsum(probs) - probs
  assert np.abs(before - p).min() > 1e-3  # no cut within rounding of top_p
  keep = order[before < p]
  out = np.zeros(len(z))
  out[keep] = np.exp(z[keep] - z[keep].max())
  return out / out.sum()


def test_sampling_matches_the_restricted_softmax():
  """4000 draws per option set (one vectorised call): chi-square against the reference within
  mean + 6 standard deviations, and never a token the restriction removes."""
  n, vocab = 4000, 8
  logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32) * 1.5
  options = [(0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8), (0.9, 5, 0.6)]
  t, k, p = (np.repeat(np.array(col), n) for col in zip(*options))
  rows = jnp.broadcast_to(jnp.asarray(logits), (len(t), vocab))
  tokens = np.asarray(decode.sample(rows, jax.random.key(0), t.astype(np.float32), k.astype(np.int32),
                                    p.astype(np.float32)))
  for i, opt in enumerate(options):
    want = restricted_softmax(logits, *opt)
    counts = np.bincount(tokens[i * n:(i + 1) * n], minlength=vocab)
    assert not counts[want == 0].any(), (opt, counts, want)
    kept = want > 0
    expected = n * want[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = kept.sum() - 1
    assert chi2 < df + 6 * np.sqrt(2 * df), (opt, chi2, counts, expected)


def test_sampling_modes_agree_and_a_fixed_key_is_reproducible():
  logits = random_logits(2)
  keys = jax.random.split(jax.random.key(3), 32)
  t = np.full(32, 0.9, np.float32)
  t[:4] = 0  # a few greedy rows among sampled ones
  draws = decode.sample(logits, keys, t, 0, 1.0, mode="sample")
  np.testing.assert_array_equal(draws, decode.sample(logits, keys, t, 0, 1.0, mode="filter"))
  np.testing.assert_array_equal(draws, decode.sample(logits, keys, t, 0, 1.0))
  np.testing.assert_array_equal(draws[:4], logits[:4].argmax(-1))
  raw = jax.random.PRNGKey(3)  # raw uint32 key data works too
  np.testing.assert_array_equal(decode.sample(logits, raw, t, 0, 1.0), decode.sample(logits, raw, t, 0, 1.0))
  other = decode.sample(logits, jax.random.split(jax.random.key(4), 32), t, 0, 1.0)
  assert (np.asarray(other) != np.asarray(draws)).any()
  jitted = jax.jit(decode.sample, static_argnames="mode")  # traced options: mode "filter"
  np.testing.assert_array_equal(jitted(logits, keys, t, jnp.zeros(32, jnp.int32), jnp.ones(32)), draws)


def test_sampling_options_are_checked(model):
  logits = jnp.zeros((2, 5))
  key = jax.random.key(0)
  for kw, err, word in [(dict(temperature=-1.0), ValueError, "temperature"),
                        (dict(top_p=0.0), ValueError, "top_p"), (dict(top_p=1.5), ValueError, "top_p"),
                        (dict(top_k=-1), ValueError, "top_k"), (dict(top_k=1.5), TypeError, "top_k"),
                        (dict(temperature=float("nan")), ValueError, "temperature"),
                        (dict(seed=-3), ValueError, "seed"),
                        (dict(temperature="hot"), TypeError, "temperature")]:
    with pytest.raises(err, match=word):
      decode.Sampling(**kw)
    if word != "seed":
      args = {**dict(temperature=1.0, top_k=0, top_p=1.0), **kw}
      with pytest.raises(err, match=word):
        decode.sample(logits, key, **{k: np.asarray(v) for k, v in args.items()})
  with pytest.raises(ValueError, match="logits"):
    decode.sample(jnp.zeros(5), key, 1.0, 0, 1.0)
  with pytest.raises(ValueError, match="temperature"):
    decode.sample(logits, key, jnp.ones(3), 0, 1.0)
  with pytest.raises(ValueError, match="mode"):
    decode.sample(logits, key, 1.0, 0, 1.0, mode="beam")
  args = loop_args(model, 0)
  bad_table = args[4]._replace(block_table=args[4].block_table[:2])
  with pytest.raises(ValueError, match="block_table"):
    decode.decode_loop(*args[:4], bad_table, args[5], steps=STEPS)
  with pytest.raises(TypeError, match="sampling.temperature"):
    decode.decode_loop(*args[:5], args[5]._replace(temperature=args[5].top_k), steps=STEPS)
  with pytest.raises(ValueError, match="steps"):
    decode.decode_loop(*args, steps=0)
  with pytest.raises(ValueError, match="check_every"):
    decode.decode_loop(*args, steps=STEPS, check_every=3)
  with pytest.raises(TypeError, match="check_every"):
    serving.Engine(model, num_blocks=4, steps_per_call=4, check_every=2.0)
  with pytest.raises(ValueError, match="steps_per_call"):
    serving.Engine(model, num_blocks=4, steps_per_call=0)
  with pytest.raises(TypeError, match="steps_per_call"):
    serving.generate(model, [[1, 2]], 2, steps_per_call=2.0)
  with pytest.raises(TypeError, match="sampling"):
    serving.generate(model, [[1, 2]], 2, sampling=0.7)
