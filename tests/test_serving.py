"""The serving loop: page allocator, scheduler (budget, buckets, padding, preemption), and the engine's
greedy generation checked against the model run with dense attention over each whole sequence."""

import numpy as np
import pytest

pytest.importorskip("flax")

from flax import nnx  # noqa: E402

from jax_varlen_attn import serving  # noqa: E402
from jax_varlen_attn.nn import DecoderLM, ModelConfig  # noqa: E402
from tests.test_nn import RTOL, dense_logits, in_place_violations, rel_err  # noqa: E402


@pytest.fixture(scope="module")
def model():
  return DecoderLM(ModelConfig.tiny(), rngs=nnx.Rngs(3))


def test_allocator():
  alloc = serving.PageAllocator(num_blocks=5, block_size=4)
  assert alloc.reserve(7, 9) == [0, 1, 2]  # 9 tokens: 3 pages
  assert alloc.reserve(7, 12) == [] and alloc.reserve(8, 1) == [3]
  assert alloc.slot(7, 9) == 2 * 4 + 1 and alloc.num_free == 1
  with pytest.raises(serving.OutOfPages):
    alloc.reserve(8, 12)  # needs 2 more, 1 free: nothing allocated
  assert alloc.pages(8) == [3] and alloc.num_free == 1
  assert alloc.free(7) == 3 and alloc.num_free == 4
  assert alloc.reserve(9, 16) == [4, 0, 1, 2]  # freed pages are reused
  assert alloc.free(123) == 0


def test_buckets():
  assert [serving.bucket(n, 16, 256) for n in (1, 16, 17, 100, 256)] == [16, 16, 32, 128, 256]
  assert serving.bucket(90, 16, 96) == 96  # the budget itself is the last bucket
  with pytest.raises(ValueError):
    serving.bucket(300, 16, 256)


def test_scheduler_mixes_decodes_and_prefill_chunks():
  cfg = serving.SchedulerConfig(num_blocks=32, block_size=4, max_tokens_per_step=16, max_seqs=4,
                                max_model_len=64, min_token_bucket=4, min_seq_bucket=2)
  sched = serving.Scheduler(cfg)
  a = sched.add(range(10), max_new_tokens=3)
  b = sched.add(range(100, 130), max_new_tokens=3)
  step = sched.schedule()  # a whole (10), b's first 6 tokens
  assert [(s.seq_id, start, n, samples) for s, start, n, samples in step.scheduled] == [
      (a.seq_id, 0, 10, True), (b.seq_id, 0, 6, False)]
  assert step.bucket == (16, 2) and step.num_tokens == 16
  bt = step.batch
  np.testing.assert_array_equal(bt.cu_seqlens_q, [0, 10, 16])
  np.testing.assert_array_equal(bt.seqused_k, [10, 6])
  np.testing.assert_array_equal(step.tokens[10:16], range(100, 106))
  np.testing.assert_array_equal(bt.positions[10:16], range(6))
  pages_b = sched.allocator.pages(b.seq_id)
  assert bt.slot_mapping[10 + 5] == pages_b[1] * 4 + 1
  assert list(bt.block_table[1, :2]) == pages_b and step.sample_rows[0] == 9
  sched.update(step, np.array([42, 0]))
  assert a.generated == [42] and b.generated == [] and b.num_computed == 6

  step = sched.schedule()  # a decodes first, then b's next 15 tokens
  assert [(s.seq_id, start, n) for s, start, n, _ in step.scheduled] == [(a.seq_id, 10, 1), (b.seq_id, 6, 15)]
  assert step.tokens[0] == 42 and step.batch.positions[0] == 10
  sched.update(step, np.array([43, 0]))

  c = sched.add([5, 6], max_new_tokens=1)
  step = sched.schedule()  # a decode, b's last 9 (samples), c whole: 12 tokens in a bucket of 16
  assert [(s.seq_id, start, n) for s, start, n, _ in step.scheduled] == [
      (a.seq_id, 11, 1), (b.seq_id, 21, 9), (c.seq_id, 0, 2)]
  assert step.bucket == (16, 4) and step.num_tokens == 12
  np.testing.assert_array_equal(step.batch.slot_mapping[12:], -1)  # padding rows write nothing
  np.testing.assert_array_equal(step.batch.cu_seqlens_q, [0, 1, 10, 12, 12])  # padded sequence: empty
  assert step.batch.seqused_k[3] == 0
  done = sched.update(step, np.array([44, 7, 9, 0]))
  assert done == [a, c] and a.generated == [42, 43, 44] and c.generated == [9]
  assert sched.allocator.pages(a.seq_id) == [] and len(sched.running) == 1


def test_scheduler_preempts_the_newest_when_pages_run_out():
  cfg = serving.SchedulerConfig(num_blocks=4, block_size=4, max_tokens_per_step=32, max_seqs=4,
                                max_model_len=16, min_token_bucket=4, min_seq_bucket=2)
  sched = serving.Scheduler(cfg)
  a = sched.add(range(8), max_new_tokens=4)  # 2 pages, then a third at token 8
  b = sched.add(range(8), max_new_tokens=4)
  sched.update(sched.schedule(), np.array([1, 2]))  # both prefilled: 4 pages used
  step = sched.schedule()  # a needs a 3rd page: b (newest) is preempted, to be recomputed
  assert [s for s, *_ in step.scheduled] == [a] and b.num_preemptions == 1 and b.num_computed == 0
  assert list(sched.waiting) == [b] and b.generated == [2]


def run_engine(model, prompts, max_new_tokens, **kw):
  engine = serving.Engine(model, **kw)
  seqs = [engine.add(p, max_new_tokens) for p in prompts]
  sampled = {s.seq_id: [] for s in seqs}  # logits at every sampled row, in order
  buckets = set()
  while (out := engine.step()) is not None:
    buckets.add(out.step.bucket)
    logits = np.asarray(out.logits)
    for b, (seq, start, n, samples) in enumerate(out.step.scheduled):
      if samples:
        sampled[seq.seq_id].append((start + n - 1, logits[b]))
  return engine, seqs, sampled, buckets


PROMPTS_LENS = (3, 17, 40, 9, 26)


def test_engine_matches_dense_and_compiles_once_per_bucket(model):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 256, n).tolist() for n in PROMPTS_LENS]
  before = serving.serving_step._cache_size()
  engine, seqs, sampled, buckets = run_engine(model, prompts, 6, num_blocks=37, block_size=8,
                                              max_tokens_per_step=32, max_seqs=4, min_seq_bucket=4)
  # Chunked prompts shared steps with decodes, every sequence finished, every page came back.
  assert engine.num_steps > 6 and all(s.finished and len(s.generated) == 6 for s in seqs)
  assert engine.allocator.num_free == 37
  assert serving.serving_step._cache_size() - before == len(buckets) <= 3
  for seq in seqs:
    tokens = seq.tokens[:-1]  # the last generated token was never fed back
    ref = dense_logits(model, tokens, pad_to=64)
    rows = [pos for pos, _ in sampled[seq.seq_id]]
    got = np.stack([lg for _, lg in sampled[seq.seq_id]])
    assert rows == list(range(len(seq.prompt) - 1, len(tokens)))
    assert rel_err(got, ref[rows]) < RTOL
    # Greedy: each generated token is the dense argmax (where the top two are not a near tie).
    top2 = np.sort(ref[rows], axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(np.asarray(seq.generated)[clear], ref[rows].argmax(-1)[clear])


def test_preemption_does_not_change_the_output(model):
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 256, n).tolist() for n in (14, 15, 13)]
  want = serving.generate(model, prompts, 5, block_size=4, max_tokens_per_step=16, max_seqs=4)
  engine, seqs, _, _ = run_engine(model, prompts, 5, num_blocks=11, block_size=4,
                                  max_tokens_per_step=16, max_seqs=4, max_model_len=20)
  assert sum(s.num_preemptions for s in seqs) > 0
  assert [s.generated for s in seqs] == want
  assert engine.allocator.num_free == 11
  # Many steps per call: a call runs only once nothing waits and the free pages cover it; before
  # that, the one-step path admits, prefills and preempts as above.
  engine = serving.Engine(model, num_blocks=11, block_size=4, max_tokens_per_step=16, max_seqs=4,
                          max_model_len=20, steps_per_call=4)
  seqs = [engine.add(p, 5) for p in prompts]
  engine.run()
  assert sum(s.num_preemptions for s in seqs) > 0 and engine.num_chunks > 0
  assert [s.generated for s in seqs] == want and engine.allocator.num_free == 11


def test_step_updates_the_donated_cache_in_place(model):
  engine = serving.Engine(model, num_blocks=301, block_size=8, max_tokens_per_step=16, max_seqs=2)
  engine.add(range(5), max_new_tokens=2)
  step = engine.scheduler.schedule()
  args = engine.device_args(step)
  hlo = serving.serving_step.lower(*args).compile().as_text()
  assert not in_place_violations(hlo, engine.k_cache.size)
  k_old = engine.k_cache
  ptr = k_old.unsafe_buffer_pointer()
  _, _, engine.k_cache, engine.v_cache = serving.serving_step(*args)
  assert k_old.is_deleted() and engine.k_cache.unsafe_buffer_pointer() == ptr


def test_generate_stops_at_eos(model):
  prompt = [1, 2, 3, 4]
  free = serving.generate(model, [prompt], 6)[0]
  stopped = serving.generate(model, [prompt], 6, eos_token_id=free[2])[0]
  assert stopped == free[:free.index(free[2]) + 1]
  with pytest.raises(ValueError, match="max_model_len"):
    serving.Engine(model, num_blocks=4, block_size=4).add(range(10), max_new_tokens=10)
