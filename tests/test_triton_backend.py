"""The shared suite on the Triton backend: on a GPU natively, elsewhere under Triton's interpreter."""

import dataclasses
import os

import pytest

from tests.attention_suite import AttentionSuite
from tests.conftest import HAS_GPU

triton = pytest.importorskip("triton")

if not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
  pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

import triton.language as tl  # noqa: E402 (after the skips above)

from jax_varlen_attn.backends.triton.kernel import _find_sequence  # noqa: E402


class TestTriton(AttentionSuite):
  backend = "triton"
  # Triton's interpreter computes bf16 on raw bits (wrong numbers): bf16 is checked on the GPU only.
  dtypes = ("float16", "bfloat16", "float32") if HAS_GPU else ("float16", "float32")
  # On the GPU an fp32 dot is exact only with input_precision="ieee", which the kernel uses.


class TestTritonSplitKV(AttentionSuite):
  """The whole suite again with split-KV forced on (small key tiles so every sequence really splits)."""

  backend = "triton"
  dtypes = TestTriton.dtypes
  # What splitting changes: the sink joins one split's partial only (every sink case), and the
  # descales scale each split's partial (two fp8 cases; the rest run unsplit above).
  fp8_cases = ("e4m3_nhd_causal", "e5m2_q_e4m3_cache_scalar")

  def run(self, kwargs, **extra):
    from jax_varlen_attn import flash_attn_varlen_func
    from jax_varlen_attn.backends.triton import Config
    extra.setdefault("config", Config(block_n=16, num_splits=3))
    return flash_attn_varlen_func(**kwargs, backend=self.backend, **extra)


def test_split_count_follows_static_shapes_only():
  """Split-KV turns on for few long sequences (grid below the SM count), off for big batches."""
  from jax_varlen_attn.backends.triton import Config
  from tests.problems import static_spec as spec_for

  long_few = Config.get_default(spec_for(8, 2048))  # decode_8x32768
  many = Config.get_default(spec_for(256, 256))  # decode_256x4096
  short_few = Config.get_default(spec_for(2, 2))
  assert long_few.num_splits > 1
  assert many.num_splits == 1
  assert short_few.num_splits == 1


def test_decode_stages_double_buffer_small_grids_only():
  """Decode tiles get two K / V buffers where the grid is about one program an SM and the sequences
  are long enough to fill the pipeline (fp8: at any grid); bigger grids and short sequences keep
  one. A paged fp16 tile's two buffers are 5 stages (its table takes a stage each), an fp8 tile's
  3 (the kernel looks the table up a tile ahead)."""
  from jax_varlen_attn.backends.triton import Config
  from jax_varlen_attn.backends.triton.config import stages_for_buffers
  from tests.problems import static_spec as spec_for

  fp16 = spec_for(16, 38)  # decode_16x600: 144 programs
  fp8 = dataclasses.replace(fp16, kv_dtype="float8_e4m3fn")
  non_paged = dataclasses.replace(fp16, layout=None)
  assert [stages_for_buffers(b, s) for b in (1, 2, 3) for s in (fp16, fp8, non_paged)] == [
      2, 2, 2, 5, 3, 3, 7, 4, 4]
  double = stages_for_buffers(2, fp16)
  assert Config.get_default(fp16).num_stages == double
  assert Config.get_default(spec_for(1, 38)).num_stages == double  # one sequence, split-KV
  assert Config.get_default(spec_for(24, 38)).num_stages == 2  # 216 programs: residency wins
  assert Config.get_default(spec_for(256, 256)).num_stages == 2  # decode_256x4096
  big_fp8 = dataclasses.replace(spec_for(256, 256), kv_dtype="float8_e4m3fn")
  assert Config.get_default(big_fp8).num_stages == stages_for_buffers(2, big_fp8) == 3
  assert Config.get_default(spec_for(16, 38, max_seqlen_k=70)).num_stages == 2  # 1 tile a program
  # Prefill tiles: the shared rule's two buffers.
  prefill = spec_for(1, 32, q_per_seq=512)
  assert Config.get_default(prefill).num_stages == double
  prefill_fp8 = dataclasses.replace(prefill, kv_dtype="float8_e4m3fn")
  assert Config.get_default(prefill_fp8).num_stages == 3
  assert Config(num_stages=3).resolved(fp16).num_stages == 3  # the caller's wins
  # Two buffers only where they fit in shared memory (an H100's without a GPU): a 2048-token
  # prompt's 256 x 128 tile and an f32 decode tile of 128 keys get one.
  assert Config.get_default(spec_for(1, 128, q_per_seq=2048)).num_stages == 2
  f32_decode = dataclasses.replace(fp16, dtype="float32")
  assert Config.get_default(f32_decode).num_stages == 2


def test_table_ahead_only_where_pipelined_paged_fp8():
  """A paged fp8 tile with two or more K / V buffers looks its pages up a tile ahead (TABLE_AHEAD);
  one buffer, fp16 caches and non-paged tiles keep the pipeliner's own schedule."""
  from jax_varlen_attn.backends.triton import Config
  from tests.problems import static_spec as spec_for

  fp16 = spec_for(16, 38)
  fp8 = dataclasses.replace(fp16, kv_dtype="float8_e4m3fn")
  ahead = lambda spec, st: Config(num_stages=st).resolved(spec).constexprs(spec)["TABLE_AHEAD"]
  assert [ahead(fp8, st) for st in (1, 2, 3, 4)] == [False, False, True, True]
  assert not any(ahead(fp16, st) for st in (2, 3, 5))
  assert not ahead(dataclasses.replace(fp8, layout=None), 3)


def test_fp8_v_form_rule(monkeypatch):
  """fp8 decode tiles read V as 16-bit pairs, but convert it at load on small grids of short
  decode (about a program an SM, few tiles each); split-KV grids and prefill tiles keep Triton's
  own conversion; the caller's form wins where it applies; the PTX forms need sm_89+ and no
  interpreter, pairs also an fp16 / bf16 compute dtype and an even head dim; no constexpr without
  an fp8 cache."""
  from jax_varlen_attn.backends.triton import Config
  from jax_varlen_attn.backends.triton import config as cfg_mod
  from tests.problems import static_spec as spec_for

  monkeypatch.setattr(cfg_mod, "triton_interpreting", lambda: False)
  monkeypatch.setattr(cfg_mod, "compute_capability", lambda: 90)
  fp8 = lambda batch, pages, **kw: dataclasses.replace(spec_for(batch, pages, **kw),  # noqa: E731
                                                       kv_dtype="float8_e4m3fn")
  form = lambda spec, **kw: Config(**kw).resolved(spec).fp8_v  # noqa: E731
  flags = lambda spec, **kw: {k: v for k, v in Config(**kw).resolved(spec).constexprs(spec).items()  # noqa: E731
                              if k in ("V_AT_LOAD", "V_PAIRS")}
  short, long_ = fp8(64, 38), fp8(256, 256)  # 600 and 4096 keys
  assert form(short) == form(long_) == "pairs"
  assert form(fp8(16, 38)) == form(fp8(1, 38)) == "load"  # decode_16x600 / 1x600: few programs
  assert form(fp8(16, 256)) == "pairs"  # few programs, but 32 tiles each
  assert form(fp8(16, 38, q_per_seq=2)) == "pairs"  # not a decode batch
  assert flags(long_) == dict(V_AT_LOAD=False, V_PAIRS=True)
  assert Config().resolved(long_).block_n == 64  # pairs: 64-key tiles at any length
  split = Config().resolved(fp8(8, 2048))  # decode_8x32768: split-KV keeps Triton's own, 128 keys
  assert split.num_splits > 1 and split.fp8_v == "operand" and split.block_n == 128
  assert Config(fp8_v="operand").resolved(long_).block_n == 128 == Config().resolved(spec_for(256, 256)).block_n
  assert flags(long_, fp8_v="load") == dict(V_AT_LOAD=True, V_PAIRS=False)
  assert flags(long_, fp8_v="operand") == dict(V_AT_LOAD=False, V_PAIRS=False)
  prefill = fp8(4, 38, q_per_seq=64)
  assert form(prefill) == "operand" and form(prefill, fp8_v="pairs") == "pairs"
  fp16 = spec_for(64, 38)
  assert flags(fp16, fp8_v="pairs") == dict(V_AT_LOAD=False, V_PAIRS=False)
  assert form(dataclasses.replace(short, dtype="bfloat16")) == "pairs"
  assert form(dataclasses.replace(short, dtype="float32")) == "operand"  # fp32 products asked for
  assert form(dataclasses.replace(short, head_dim=16)) == "operand"  # halves narrower than a dot
  odd = dataclasses.replace(short, head_dim=33)  # pairs would straddle rows
  assert form(odd) == "operand" and form(odd, fp8_v="load") == "load"
  monkeypatch.setattr(cfg_mod, "compute_capability", lambda: 80)
  assert form(fp8(16, 38)) == form(short, fp8_v="load") == "operand"  # the PTX conversions need sm_89
  monkeypatch.setattr(cfg_mod, "compute_capability", lambda: 90)
  monkeypatch.setattr(cfg_mod, "triton_interpreting", lambda: True)
  assert form(short, fp8_v="pairs") == "operand"  # no PTX to interpret
  with pytest.raises(ValueError, match="fp8_v"):
    Config(fp8_v="bytes")


@pytest.mark.skipif(not HAS_GPU, reason="the PTX forms of an fp8 V tile run on a GPU only")
@pytest.mark.parametrize("fp8_v", ["operand", "load", "pairs"])
@pytest.mark.parametrize("case", ["e4m3_nhd_causal", "e5m2_hnd_window_scalar", "e4m3_stacked_gqa8_decode",
                                  "bf16_q_e4m3"])
@pytest.mark.parametrize("head_dim", [80, 128])
def test_fp8_v_forms_on_the_gpu(fp8_v, case, head_dim):
  """Each way an fp8 V tile reaches P @ V, on decode and prefill tiles, split and not, against the
  oracle on the dequantized cache (NaN poison in every unused slot, as the suite's fp8 cases)."""
  from jax_varlen_attn.backends.triton import Config
  from tests.attention_suite import FP8_CASES
  suite = TestTriton()
  for seqlens_q, seqlens_k, splits in (((1, 1, 1, 1), (203, 17, 600, 1), 1), ((1, 1, 1), (700, 33, 5), 3),
                                       ((37, 1, 5), (300, 9, 40), 1)):
    p = suite.problem(seqlens_q=seqlens_q, seqlens_k=seqlens_k, head_dim=head_dim,
                      **{k: v for k, v in FP8_CASES[case].items() if k not in ("seqlens_q", "seqlens_k")})
    suite.check(p, config=Config(fp8_v=fp8_v, num_splits=splits))


@pytest.mark.skipif(not HAS_GPU, reason="shared memory limits are a GPU's")
@pytest.mark.parametrize("dtype,kv_dtype,seqlens", [
    ("bfloat16", None, (1024, 1024)),  # 256 x 128 prefill tile: two buffers would not fit
    ("float32", None, (1,) * 16), ("float16", "float8_e4m3fn", (1,) * 16)])  # decode tiles
def test_default_stages_launch(dtype, kv_dtype, seqlens):
  """The default config's stages launch on the GPU (the stage rule's shared-memory bound) and agree
  with the oracle: big tiles and long sequences, where two K / V buffers are largest."""
  suite = TestTriton()
  seqlens_k = tuple(1024 if q > 1 else 600 for q in seqlens)
  p = suite.problem(seqlens_q=seqlens, seqlens_k=seqlens_k, causal=True, dtype=dtype, kv_dtype=kv_dtype,
                    head_dim=128, num_heads=4, num_kv_heads=2)
  suite.check(p)


@pytest.mark.parametrize("layout", ["NHD", "HND", "strided", "stacked_strided"])
@pytest.mark.parametrize("kv_dtype", [None, "float8_e4m3fn"])
def test_double_buffered_decode_tiles(layout, kv_dtype):
  """The double-buffered decode pipeline (the default for small decode grids, see above) against the
  oracle: many 16-key tiles a sequence, a partial last page, poisoned spare pages and padding, with
  and without split-KV. fp8 tiles look their pages up a tile ahead (TABLE_AHEAD), which the
  interpreter runs too; num_stages itself has effect on a GPU only, where this is the pipelined
  build."""
  from jax_varlen_attn.backends.triton import Config
  from jax_varlen_attn.backends.triton.config import stages_for_buffers
  from tests.problems import static_spec
  suite = TestTriton()
  stages = stages_for_buffers(2, dataclasses.replace(static_spec(1, 1), kv_dtype=kv_dtype))
  for splits in (1, 3):
    p = suite.problem(seqlens_q=(1, 1, 1, 2), seqlens_k=(203, 17, 64, 1), causal=True, layout=layout,
                      kv_dtype=kv_dtype, head_dim=64)
    suite.check(p, config=Config(block_n=16, num_splits=splits, num_stages=stages))


def test_config_is_resolved_once_per_call(monkeypatch):
  """api chooses the None fields once (the caller's config or the default) and the launcher takes
  the result as is: no second pass over the tuned table and the heuristics."""
  from jax_varlen_attn import flash_attn_varlen_func
  from jax_varlen_attn.backends.triton import Config
  from tests.problems import Problem, make_problem

  calls = []
  resolved = Config.resolved
  monkeypatch.setattr(Config, "resolved", lambda self, spec: calls.append(self) or resolved(self, spec))
  kwargs, _ = make_problem(Problem(seqlens_q=(3, 1), seqlens_k=(9, 5), causal=True))
  flash_attn_varlen_func(**kwargs, backend="triton")
  flash_attn_varlen_func(**kwargs, backend="triton", config=Config(block_n=16))
  assert calls == [Config(), Config(block_n=16)]


def test_config_holds_tunables_only():
  """Tiles, warps, stages, splits and the launch route; the kernel's ABI (constexprs) is derived,
  and the measured-and-retired experiment switches are gone (NOTES.md, session 7)."""
  from jax_varlen_attn.backends.triton import Config
  for retired in ("row_id_fast_path", "constexpr_strides", "heavy_first"):
    with pytest.raises(TypeError, match=retired):
      Config(**{retired: True})
  with pytest.raises(ValueError, match="launch"):
    Config(launch="cuda-graph")


def test_key_tile_follows_sequence_length_and_head_dim():
  """Decode tiles: 128 keys for long sequences, 64 for short ones (more programs per SM), 16 for
  wide heads; prefill: 256 x 64 tiles on 8 warps (config.py says what was measured)."""
  from jax_varlen_attn.backends.triton import Config
  from tests.problems import static_spec
  assert Config.get_default(static_spec(200, 146, max_seqlen_k=2333)).block_n == 128  # seed4_distinct-like
  assert Config.get_default(static_spec(200, 64, max_seqlen_k=1024)).block_n == 128
  assert Config.get_default(static_spec(200, 33, max_seqlen_k=515)).block_n == 64  # seed3-like
  assert Config.get_default(static_spec(200, 256, head_dim=256)).block_n == 16
  prefill = Config.get_default(static_spec(4, 256, q_per_seq=4096))
  assert (prefill.block_m, prefill.block_n, prefill.num_warps) == (256, 64, 8)
  small = Config.get_default(static_spec(1, 32, q_per_seq=512))  # seed1
  assert (small.block_m, small.num_warps) == (64, 4)


def test_one_key_loop_on_16_bit_decode_tiles_only():
  """ONE_KEY_LOOP (one masked key loop, no second pipeline for a last partial tile): fp16 / bf16
  decode tiles; not fp8 decode tiles, nor prefill tiles (config.DECODE_ONE_LOOP says why)."""
  import dataclasses

  from jax_varlen_attn.backends.triton import Config
  from tests.problems import static_spec

  def one_loop(spec):
    return Config.get_default(spec).constexprs(spec)["ONE_KEY_LOOP"]

  decode = static_spec(16, 38, max_seqlen_k=600)  # the serving model's batch-16 step
  assert one_loop(decode) is True
  assert one_loop(dataclasses.replace(decode, kv_dtype="float8_e4m3fn")) is False
  assert one_loop(static_spec(4, 256, q_per_seq=4096)) is False


@pytest.mark.parametrize("dtype", TestTriton.dtypes[:2])
@pytest.mark.parametrize("layout", ["NHD", "strided"])
def test_prefill_256_row_tiles_on_8_warps(dtype, layout):
  """The big prefill tile (256 rows = 128 queries x a group of 2, 8 warps) against the oracle,
  causal and windowed: small problems never reach it by default (their grids are too small)."""
  from jax_varlen_attn.backends.triton import Config
  suite = TestTriton()
  config = Config(block_m=256, block_n=64, num_warps=8)
  for window in ((-1, -1), (100, 0)):
    p = suite.problem(seqlens_q=(300, 40, 0), seqlens_k=(300, 90, 5), causal=True, window=window,
                      dtype=dtype, layout=layout)
    suite.check(p, config=config)


@triton.jit
def _search_kernel(cu_seqlens_q_ptr, batch, total_q, out_ptr, BLOCK_Q: tl.constexpr, PROBES: tl.constexpr):
  """out i32[programs, 3]: each program's `_find_sequence` (sequence, its start, its end)."""
  pid = tl.program_id(0)
  seq, start, end = _find_sequence(cu_seqlens_q_ptr, pid, batch, total_q, BLOCK_Q, PROBES)
  tl.store(out_ptr + pid * 3, seq)
  tl.store(out_ptr + pid * 3 + 1, start)
  tl.store(out_ptr + pid * 3 + 2, end)


@pytest.mark.parametrize("probes,block_q", [(32, 1), (4, 8), (1, 8)])  # 1: a binary search
def test_sequence_search_against_numpy(probes, block_q):
  """Every program's (sequence, its first query, its end) from `_find_sequence`, against a linear
  scan: batches that take one to several rounds of probes, empty and multi-block sequences.

  The attention suite alone cannot see a wrong start on a CPU: a program given the wrong rows
  writes rows its neighbour's program (run after it, in the interpreter's order) overwrites."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jax_varlen_attn.backends.triton.call import launch

  rng = np.random.default_rng()
  for batch in (1, 5, 40):  # 40: two rounds of 32 probes, three of 4, six of a binary search
    lens = rng.choice([0, 1, 1, 1, 2, 9, 17], size=batch)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total_q = int(cu[-1]) + 3  # padding rows past the last sequence
    programs = -(-total_q // block_q) + batch + 2  # the kernel's grid and a little more
    (got,) = launch(_search_kernel, dict(cu_seqlens_q_ptr=jnp.asarray(cu), batch=batch, total_q=total_q),
                    [jax.ShapeDtypeStruct((programs * 3,), jnp.int32)], (programs, 1, 1), 4, 1,
                    dict(BLOCK_Q=block_q, PROBES=probes))
    first = cu // block_q + np.arange(batch + 1)  # each sequence's first program
    seq = np.searchsorted(first, np.arange(programs), side="right") - 1
    want = np.stack([seq, cu[seq], np.append(cu[1:], total_q)[seq]], axis=1)
    np.testing.assert_array_equal(np.asarray(got).reshape(programs, 3), want,
                                  err_msg=f"batch {batch}")


TAIL_CASES = {
    # (slots, problem): items = working query blocks x kv heads; the tail is items % slots
    "decode_two_pieces": (8, dict(seqlens_q=(1,) * 5, seqlens_k=(40, 33, 0, 16, 7), causal=True)),
    "decode_gqa_three_pieces": (6, dict(num_heads=8, num_kv_heads=2, seqlens_q=(1,) * 7,
                                       seqlens_k=(1, 40, 33, 16, 7, 64, 50), causal=True)),
    "many_sequences_lse": (28, dict(seqlens_q=tuple((1, 1, 0, 1, 2)[i % 5] for i in range(40)),
                                    seqlens_k=tuple(20 + (7 * i) % 31 for i in range(40)), causal=True,
                                    return_lse=True)),
    "sinks_window": (8, dict(sinks=True, window=(9, -1), seqlens_q=(1,) * 5, seqlens_k=(40, 33, 0, 16, 7))),
    "fp8_stacked": (8, dict(kv_dtype="float8_e4m3fn", layout="stacked_fused_kv_major", seqlens_q=(1,) * 5,
                            seqlens_k=(40, 33, 20, 16, 7), causal=True)),
}
# Cases whose cu_seqlens_q the plan reads in several vectors (config.TAIL_CHUNK made small).
TAIL_CHUNKS = {"many_sequences_lse": 8}


@pytest.mark.parametrize("case", sorted(TAIL_CASES) + [f"{c}_in_chunks" for c in sorted(TAIL_CHUNKS)])
def test_tail_pieces_against_the_oracle(case, monkeypatch):
  """The grid's last round split into pieces (kernel._tail_plan), forced on with a small round
  under the interpreter: tail items' keys in pieces run by helper programs, partials combined by
  the last piece to finish, against the oracle; the plan really split (its constexprs). The
  `_in_chunks` cases read cu_seqlens_q in several vectors."""
  import jax

  from jax_varlen_attn.backends.triton import config

  base = case.removesuffix("_in_chunks")
  slots, overrides = TAIL_CASES[base]
  chunk = TAIL_CHUNKS[base] if base != case else None
  plans = []
  plan = config.tail_constexprs
  monkeypatch.setattr(config, "tail_slots", lambda spec: slots)
  monkeypatch.setattr(config, "TAIL_MIN_KEYS", 0)
  if chunk:
    monkeypatch.setattr(config, "TAIL_CHUNK", chunk)
  monkeypatch.setattr(config, "tail_constexprs", lambda spec, cfg: plans.append((cfg, plan(spec, cfg))) or plans[-1][1])
  jax.clear_caches()
  suite = TestTriton()
  p = suite.problem(**overrides)
  suite.check(p)
  jax.clear_caches()
  (cfg, consts), = plans
  assert consts["TAIL_PIECES"] > 1 and consts["TAIL_SLOTS"] == slots
  if chunk:
    assert consts["BATCH_CHUNK"] == chunk and len(p.seqlens_q) > 2 * chunk
  items = sum(-(-q // (cfg.block_m // (p.num_heads // p.num_kv_heads))) for q in p.seqlens_q) * p.num_kv_heads
  assert 0 < items % slots <= slots // 2, f"the case must have a tail to split ({items} items)"
