"""The Pallas backend's Mosaic GPU kernel (`PallasConfig(kernel="mosaic")`, backends/pallas/mosaic.py).

On a CPU: its index arithmetic against brute force built from the semantics (which program holds
which row, the padded q / output rows, the key tiles each warpgroup visits and which need a mask),
what it refuses and why, that JAX lowers it for CUDA (Mosaic GPU lowers without a GPU), and the
kernel's own program under Mosaic GPU's interpreter against the oracle (matmuls as dots). On a
CUDA GPU (H100 / H200): the float64 oracle over the features, layouts, dtypes and head dims it
covers, with poisoned padding, one compile across lengths, and no copy of the cache.
"""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_varlen_attn import PallasConfig
from jax_varlen_attn.backends.pallas import mosaic
from jax_varlen_attn.layout import KVCacheLayout, resolve
from jax_varlen_attn.spec import AttentionArrays, AttentionSpec
from jax_varlen_attn import flash_attn_varlen_func
from tests.attention_suite import (FEATURES, SINK_CASES, AttentionSuite, _large_buffers, _pad_cols,
                                   _pad_rows)
from tests.conftest import HAS_GPU
from tests.oracle import reference_attention
from tests.problems import LAYOUTS, TOLERANCE, Problem, make_problem, rel_err

MOSAIC = PallasConfig(kernel="mosaic")


def _spec(layout="NHD", head_dim=64, block_size=16, **overrides) -> AttentionSpec:
  hk, nb = 2, 12
  shape = {"NHD": (nb, block_size, hk, head_dim), "HND": (nb, hk, block_size, head_dim),
           "fused_page_major": (nb, 2, block_size, hk, head_dim)}[layout]
  lay = resolve(layout, shape, None if layout.startswith("fused") else shape, False)
  fields = dict(total_q=40, num_heads=4, num_kv_heads=hk, head_dim=head_dim, batch=3, layout=lay,
                max_blocks=6, total_k=0, max_seqlen_q=40, max_seqlen_k=96, scale=0.125, causal=True,
                window_left=-1, window_right=0, softcap=0.0, has_alibi=False, return_lse=True,
                dtype="float16")
  fields.update(overrides)
  return AttentionSpec(**fields)


# ---- index arithmetic (CPU) ---------------------------------------------------------------------

@pytest.mark.parametrize("seqlens", [(5, 0, 130, 1, 128), (0, 0, 3), (300,), (127, 129, 256)])
def test_programs_cover_every_row_once_and_padded_rows_round_trip(seqlens):
  R, pad = 128, 5
  cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
  total_q = int(cu[-1]) + pad
  num_programs = -(-total_q // R) + len(seqlens)  # AttentionSpec.query_programs
  table = np.asarray(mosaic.program_table(jnp.asarray(cu), num_programs, R))
  owner = {}
  for prog, (b, q_lo) in enumerate(table):
    for r in range(q_lo, min(q_lo + R, seqlens[b])):
      assert (b, r) not in owner, f"row {r} of sequence {b} in programs {owner[(b, r)]} and {prog}"
      owner[(b, r)] = prog
  assert len(owner) == sum(seqlens), "a row no program holds"
  rows = np.asarray(mosaic.padded_rows(jnp.asarray(table), jnp.asarray(cu), total_q, R))
  for (b, r), prog in owner.items():
    assert rows[prog * R + r - table[prog, 1]] == cu[b] + r
  # The output path inverts it: token t's value comes from its padded row; padding rows are `fill`.
  q = np.random.default_rng(0).standard_normal((total_q, 3)).astype(np.float32)
  padded = q[rows]
  back = np.asarray(mosaic.compact_rows(jnp.asarray(padded), jnp.asarray(cu), total_q, R, axis=0,
                                        fill=0))
  np.testing.assert_array_equal(back[:cu[-1]], q[:cu[-1]])
  assert (back[cu[-1]:] == 0).all()
  hlo = jax.jit(mosaic.compact_rows, static_argnums=(2, 3, 4, 5)).lower(
      jnp.asarray(padded), jnp.asarray(cu), total_q, R, 0, 0).as_text()
  assert "while" not in hlo  # XLA's binary search: ~20 tiny kernels a call on the GPU


@pytest.mark.parametrize("window", [(-1, 0), (40, 0)])
def test_heaviest_first_orders_programs_by_their_key_tiles(window):
  """A permutation of the programs, key tiles never increasing along it (counted here from the
  mask), programs without rows last; the table is built without an XLA while loop (the default
  binary search ran as some twenty tiny kernels a call on the GPU)."""
  R, bkv, seqlens, kv_extra = 128, 64, (5, 0, 300, 1, 129), (0, 7, 64, 500, 3)
  cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
  lens_k = np.asarray(seqlens) + np.asarray(kv_extra)
  num_programs = -(-int(cu[-1]) // R) + len(seqlens)
  table = mosaic.program_table(jnp.asarray(cu), num_programs, R)
  order = np.asarray(mosaic.heaviest_first(table, jnp.asarray(cu), jnp.asarray(lens_k, jnp.int32),
                                           R, *window, bkv))
  assert sorted(order.tolist()) == list(range(num_programs))
  table = np.asarray(table)

  def tiles(prog):
    b, q_lo = table[prog]
    rows = range(q_lo, min(q_lo + R, seqlens[b]))
    cols = {c // bkv for r in rows for c in range(lens_k[b])
            if _allowed(r, c, seqlens[b], lens_k[b], *window)}
    return len(cols) if rows else -1

  weights = [tiles(prog) for prog in order]
  assert weights == sorted(weights, reverse=True), weights
  hlo = jax.jit(mosaic.program_table, static_argnums=(1, 2)).lower(
      jnp.asarray(cu), num_programs, R).as_text()
  assert "while" not in hlo


@pytest.mark.parametrize("n, high", [(1, 3), (7, 2), (133, 40), (300, 1000)])
def test_descending_order_is_a_stable_descending_argsort_without_a_sort(n, high):
  """Against NumPy's stable argsort of -w, with many ties (small `high`) and none; the GPU
  program holds no sort kernel (XLA's cost 3-5 us a call)."""
  w = np.random.default_rng(n).integers(-1, high, n).astype(np.int32)
  got = np.asarray(mosaic.descending_order(jnp.asarray(w)))
  np.testing.assert_array_equal(got, np.argsort(-w, kind="stable"))
  hlo = jax.jit(mosaic.descending_order).lower(jnp.asarray(w)).as_text()
  assert "sort" not in hlo


def _allowed(r, c, q_len, kv_len, wl, wr):
  """The contract's mask, written out: bottom-right aligned band, keys inside the sequence."""
  off = kv_len - q_len
  ok = 0 <= c < kv_len
  if wl >= 0:
    ok = ok and c >= r + off - wl
  if wr >= 0:
    ok = ok and c <= r + off + wr
  return ok


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (5, 0), (200, 3), (0, 0), (70, -1)])
def test_key_ranges_match_the_mask(window):
  wl, wr = window
  B = 64
  rng = np.random.default_rng(1)
  for _ in range(150):
    q_len = int(rng.integers(1, 300))
    kv_len = int(rng.integers(0, 400))
    r0 = int(rng.integers(0, q_len))
    r1 = int(rng.integers(r0, min(q_len, r0 + 64)))
    lo, full_lo, full_hi, hi = (int(x) for x in mosaic.key_ranges(r0, r1, q_len, kv_len, wl, wr, B))
    assert lo <= full_lo <= full_hi <= hi
    for j in range(-(-max(kv_len, 1) // B) + 1):
      keys = range(j * B, (j + 1) * B)
      cells = [_allowed(r, c, q_len, kv_len, wl, wr) for r in range(r0, r1 + 1) for c in keys]
      if any(cells):
        assert lo <= j < hi, (j, lo, hi, q_len, kv_len, r0, r1)
      if lo <= j < hi and (full_lo <= j < full_hi):
        assert all(cells), f"tile {j} runs unmasked but has a masked key"


# ---- what it refuses, and its lowering (CPU) ----------------------------------------------------

@pytest.mark.parametrize("overrides, reason", [
    (dict(dtype="float32"), "float32"), (dict(kv_dtype="float8_e4m3fn"), "float8"),
    (dict(head_dim=96), "head_dim 96"), (dict(block_size=4), "page size 4"),
    (dict(block_size=48), "page size 48"),
])
def test_unsupported_calls_say_why(overrides, reason):
  assert reason in mosaic.unsupported_reason(_spec(**overrides))


def test_layouts_it_reads_and_one_it_cannot():
  for layout in ("NHD", "HND", "fused_page_major"):
    assert mosaic.unsupported_reason(_spec(layout=layout)) is None, layout
  one_head = resolve("NHD", (12, 16, 1, 64), (12, 16, 1, 64), False)  # MQA: token stride = D
  assert mosaic.unsupported_reason(_spec(layout="NHD", num_kv_heads=1).__class__(
      **{**dataclasses.asdict(_spec()), "layout": one_head, "num_kv_heads": 1})) is None
  odd = KVCacheLayout(block_size=16, num_kv_heads=2, head_dim=64, page_stride=16 * 128 + 64,
                      num_pages=8)
  assert "token stride" in mosaic.unsupported_reason(_spec(layout="NHD").__class__(
      **{**dataclasses.asdict(_spec()), "layout": odd}))


def test_config_rejects_an_unknown_kernel():
  with pytest.raises(ValueError, match="Config.kernel"):
    PallasConfig(kernel="cuda")


def test_q_and_out_in_place_where_the_staging_tiles_fit():
  """q read / out written in place needs a second q tile of shared memory: head_dim <= 128."""
  for head_dim, fits in ((64, True), (128, True), (256, False)):
    assert mosaic.direct_rows(mosaic.MosaicTiles.get_default(head_dim), head_dim, 2) is fits


# total_q 300: q and out in place (the staging tiles); 40 (< one program's rows) and head_dim 256:
# XLA's padded copies.
@pytest.mark.parametrize("layout, head_dim, dtype, total_q, features", [
    ("NHD", 128, "float16", 300, False), ("HND", 64, "bfloat16", 300, True),
    ("NHD", 64, "float16", 40, False), ("fused_page_major", 256, "float16", 300, False)])
def test_lowers_for_cuda_without_a_gpu(layout, head_dim, dtype, total_q, features):
  """JAX lowers the Mosaic kernel to its CUDA custom call on any machine (PTX comes later, from XLA).
  features: with softcap, ALiBi and sinks (their wgmma-layout arithmetic is not interpreted)."""
  spec = _spec(layout=layout, head_dim=head_dim, dtype=dtype, window_left=30, total_q=total_q,
               max_seqlen_q=total_q, softcap=2.0 if features else 0.0, has_alibi=features,
               has_sinks=features)
  kshape = {"NHD": (12, 16, 2, head_dim), "HND": (12, 2, 16, head_dim),
            "fused_page_major": (12, 2, 16, 2, head_dim)}[layout]
  kv = jax.ShapeDtypeStruct(kshape, jnp.dtype(dtype))
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  arrays = AttentionArrays(q=jax.ShapeDtypeStruct((total_q, 4, head_dim), jnp.dtype(dtype)), k=kv, v=kv,
                           cu_seqlens_q=i32(4), seqlens_k=i32(3), kv_index=i32(3, 6), alibi=None,
                           layer=None)
  if features:
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    arrays = arrays._replace(alibi=f32(3, 4), s_aux=f32(4))
  text = jax.jit(lambda a: mosaic.attention(spec, a)).trace(arrays).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_an_uncovered_call_raises_before_any_launch():
  kwargs, _ = make_problem(Problem(kv_dtype="float8_e4m3fn"))
  with pytest.raises(ValueError, match="float8"):
    flash_attn_varlen_func(**kwargs, backend="pallas", config=MOSAIC)


# ---- the oracle on the GPU ----------------------------------------------------------------------

COVERED = ("plain", "causal", "causal_more_q_than_k", "window_left", "window_both", "causal_window",
           "window_empty_rows", "softcap", "alibi_heads", "alibi_batch", "mqa", "mha", "gqa8",
           "zero_lengths", "decode", "all_kwargs")
SINKS_COVERED = sorted(name for name, case in SINK_CASES.items() if "kv_dtype" not in case)
gpu = pytest.mark.skipif(not HAS_GPU, reason="the Mosaic kernel runs on a CUDA GPU (sm_90)")


class _Mosaic(AttentionSuite):
  """The shared suite's helpers (fresh poisoned problems, the float64 oracle), every call with the
  Mosaic kernel. Not collected itself: the features it does not cover are not its to pass."""

  backend = "pallas"

  def run(self, kwargs, **extra):
    return super().run(kwargs, config=MOSAIC, **extra)


SUITE = _Mosaic()


@gpu
@pytest.mark.parametrize("feature", COVERED)
def test_gpu_feature(feature):
  SUITE.check(SUITE.problem(**FEATURES[feature]))


@gpu
@pytest.mark.parametrize("case", SINKS_COVERED)
def test_gpu_sinks(case):
  SUITE.check(SUITE.problem(**SINK_CASES[case]))


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_layout(layout):
  SUITE.check(SUITE.problem(layout=layout, causal=True, window=(20, -1)))


# 130 padding rows make q taller than one program (R = 128 rows): q is read and the output written
# in place (mosaic.direct_rows), sequences start on unaligned rows, and the programs past the last
# sequence zero two programs' worth of padding rows.
IN_PLACE = dict(pad_q=130)


@gpu
@pytest.mark.parametrize("feature", COVERED)
def test_gpu_feature_in_place(feature):
  SUITE.check(SUITE.problem(**FEATURES[feature], **IN_PLACE))


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_layout_in_place(layout):
  SUITE.check(SUITE.problem(layout=layout, causal=True, window=(20, -1), **IN_PLACE))


@gpu
@pytest.mark.parametrize("seqlens", [(63, 127, 45, 200), (1, 64, 65, 129, 0, 3)])
def test_gpu_in_place_partial_tiles(seqlens):
  """Last tiles of every row count 1..63 (stored in power-of-two pieces), no padding and some."""
  for pad_q in (0, 7):
    SUITE.check(SUITE.problem(seqlens_q=seqlens, seqlens_k=tuple(s + 9 for s in seqlens),
                              causal=True, head_dim=128, pad_q=pad_q))


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("pad_q", [3, 130])  # padded copies / in place (head_dim 256: copies)
def test_gpu_dtype_head_dim(dtype, head_dim, pad_q):
  SUITE.check(SUITE.problem(dtype=dtype, head_dim=head_dim, causal=True, pad_q=pad_q))


@gpu
@pytest.mark.parametrize("block_size", [8, 32, 128, 256])
def test_gpu_page_sizes(block_size):
  SUITE.check(SUITE.problem(block_size=block_size, causal=True, seqlens_q=(130, 1, 257, 0),
                            seqlens_k=(300, 40, 257, 9)))


@gpu
def test_gpu_long_prefill_many_tiles():
  SUITE.check(SUITE.problem(seqlens_q=(700, 3, 1029), seqlens_k=(900, 3, 1029), causal=True,
                            head_dim=128, num_heads=8, num_kv_heads=2, window=(600, -1)))


@gpu
def test_gpu_no_lse():
  kwargs, _ = make_problem(SUITE.problem(return_lse=False))
  assert SUITE.run(kwargs).shape == kwargs["q"].shape


@gpu
def test_gpu_hostile_block_table_only_affects_its_sequence():
  p = SUITE.problem(causal=True, **IN_PLACE)
  kwargs, oracle = make_problem(p)
  bt = np.array(kwargs["block_table"])
  bt[0] = np.random.default_rng(p.seed).integers(-(10**6), 10**6, bt.shape[1])
  used = np.array(kwargs["seqused_k"])
  used[0] = 10**6
  kwargs.update(block_table=jnp.asarray(bt), seqused_k=jnp.asarray(used))
  out, _ = SUITE.run(kwargs)
  ref, _ = reference_attention(**oracle)
  rows = slice(int(oracle["cu_seqlens_q"][1]), int(oracle["cu_seqlens_q"][-1]))
  assert rel_err(np.asarray(out.astype(jnp.float32))[rows], ref[rows]) < TOLERANCE["float16"]


@gpu
def test_gpu_one_compile_and_no_cache_copy():
  """Lengths are data (one compile for three length sets); no buffer as large as the cache."""
  base = SUITE.problem(causal=True, spare_pages=400, **IN_PLACE)  # a cache far larger than q
  kwargs0, _ = make_problem(base)

  @jax.jit
  def step(q, k, v, cu_seqlens_q, seqused_k, block_table):
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k,
                                  block_table=block_table, causal=True, backend="pallas",
                                  config=MOSAIC)

  for lens_q, lens_k in [((5, 1, 17, 0), (40, 23, 17, 9)), ((9, 9, 4, 1), (10, 35, 4, 40))]:
    p = dataclasses.replace(base, seqlens_q=lens_q, seqlens_k=lens_k, seed=base.seed + sum(lens_k))
    kwargs, oracle = make_problem(p)
    args = (_pad_rows(kwargs["q"], kwargs0["q"].shape[0]), _pad_rows(kwargs["k"], kwargs0["k"].shape[0]),
            _pad_rows(kwargs["v"], kwargs0["v"].shape[0]), kwargs["cu_seqlens_q"], kwargs["seqused_k"],
            _pad_cols(kwargs["block_table"], kwargs0["block_table"].shape[1]))
    out = step(*args)
    ref, _ = reference_attention(**oracle)
    n = int(oracle["cu_seqlens_q"][-1])
    assert rel_err(np.asarray(out.astype(jnp.float32))[:n], ref[:n]) < TOLERANCE["float16"]
  assert step._cache_size() == 1
  hlo = step.lower(*args).compile().as_text()
  big = _large_buffers(hlo, int(np.prod(kwargs0["k"].shape)))
  assert not big, f"instructions as large as the cache: {big[:5]}"


@gpu
def test_gpu_runs_replayed_in_a_command_buffer():
  """Six calls in one executable, run three times: XLA captures a run of that many kernels into a
  CUDA graph (a command buffer) and replays it, as it does in a model's jitted step (a benchmark
  harness once died there: benchmarks/NOTES.md, session 29 item 1); each call must match the
  oracle on every run."""
  kwargs, oracle = make_problem(SUITE.problem(causal=True, return_lse=False, **IN_PLACE))
  q = jnp.asarray(kwargs.pop("q"))
  arrays = {k: jnp.asarray(v) for k, v in kwargs.items() if isinstance(v, np.ndarray)}
  static = {k: v for k, v in kwargs.items() if k not in arrays}
  factors = np.array([1.0, 0.5, 1.5, 0.75, 1.25, 2.0], np.float32)  # distinct inputs: no CSE

  @jax.jit
  def six(q, factors, arrays):
    return [flash_attn_varlen_func((q * factors[i]).astype(q.dtype), **arrays, **static,
                                   backend="pallas", config=MOSAIC)
            for i in range(len(factors))]

  refs = [reference_attention(**{**oracle, "q": np.asarray((q * f).astype(q.dtype), np.float64)})[0]
          for f in factors]
  n = int(oracle["cu_seqlens_q"][-1])
  for _ in range(3):
    outs = jax.block_until_ready(six(q, jnp.asarray(factors), arrays))
    for out, ref in zip(outs, refs):
      assert rel_err(np.asarray(out.astype(jnp.float32))[:n], ref[:n]) < TOLERANCE["float16"]


def test_interpret_mode_runs_the_same_semantics_off_the_gpu():
  """kernel="mosaic" off a GPU runs the Pallas kernel in interpret mode: the oracle still holds."""
  if HAS_GPU:
    pytest.skip("on a GPU the Mosaic kernel itself runs (test_gpu_*)")
  SUITE.check(SUITE.problem(causal=True, window=(9, -1)))


# ---- the Mosaic kernel itself under Mosaic GPU's interpreter (CPU) ------------------------------

def _interpreter_missing() -> str:
  try:
    mosaic._interpret_params()
  except ImportError as e:  # a private module of JAX's: it may move
    return f"Mosaic GPU's interpreter is not importable here ({e})"
  return ""


class _MosaicInterpreted(_Mosaic):
  """The kernel's own program (the warpgroups, barriers, TMA page copies, masks, in-place rows and
  partial stores), simulated on the CPU; only its two wgmmas are plain f32 dots there."""

  ctas = None  # the persistent grid's CTAs (None: mosaic.INTERPRET_CTAS)

  def run(self, kwargs, **extra):
    import inspect
    from jax_varlen_attn.validation import AttentionArgs, validate
    bound = inspect.signature(flash_attn_varlen_func).bind(**kwargs)
    bound.apply_defaults()
    named = {k: v for k, v in bound.arguments.items() if k not in ("backend", "config")}
    spec, arrays = validate(AttentionArgs(**named))
    out, lse = _within(INTERPRETED_DEADLINE_S, lambda: jax.block_until_ready(jax.jit(
        lambda a: mosaic.attention(spec, a, interpret=True, ctas=self.ctas))(arrays)))
    return (out, lse) if spec.return_lse else out


# The slowest interpreted case takes ~1.5 min on CI's two cores; a deadlock would take forever.
INTERPRETED_DEADLINE_S = 900


def _within(seconds: float, fn):
  """fn() in a daemon thread, failing the test after `seconds`: where a warpgroup's thread raises or
  the barriers deadlock, the interpreter's other threads wait forever, and the suite would hang."""
  box = {}

  def target():
    try:
      box["out"] = fn()
    except BaseException as e:  # re-raised in the test's thread
      box["err"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    pytest.fail(f"the interpreted kernel did not finish in {seconds} s: a warpgroup raised or its "
                "barriers deadlocked (the other threads then wait forever)")
  if "err" in box:
    raise box["err"]
  return box["out"]


# Seconds each on the CPU (the interpreter runs every CTA's three warpgroups as threads), so: one kv
# head, small sequences, each case covering several paths.
INTERPRETED = {
    # q in place (taller than a program's 128 rows): unaligned sequence starts, a sequence's last
    # partial tile stored in power-of-two pieces, programs past the last sequence zeroing padding
    # rows, causal bottom-right with more keys than queries, the last K / V tile's poisoned tail.
    "in_place_causal": dict(seqlens_q=(130, 3, 20), seqlens_k=(140, 40, 60), pad_q=130,
                            causal=True),
    # q through the padded copies (shorter than a program), a window on both sides, an empty
    # sequence, a long sequence whose window skips its first tiles, hostile block-table padding.
    "padded_window": dict(seqlens_q=(3, 0, 7), seqlens_k=(300, 5, 7), pad_q=2, causal=True,
                          window=(40, 3)),
    # Softcap, ALiBi per sequence and head, and sinks (the second head's is -inf: none), in the
    # masked edges and the unmasked middle.
    "softcap_alibi_sinks": dict(seqlens_q=(20, 5), seqlens_k=(40, 300), num_heads=2, softcap=3.0,
                                alibi="batch", sinks=True, causal=True, window=(200, -1)),
    # One layer of a stacked, strided K|V cache (the layer's rows), bf16, pages of 32 rows.
    "stacked_strided_bf16": dict(seqlens_q=(6, 11), seqlens_k=(70, 11), layout="stacked_strided",
                                 dtype="bfloat16", block_size=32, causal=True),
    # A head-major cache, head_dim 128, GQA 2, not causal (only the length masks keys), no LSE.
    "hnd_d128_gqa": dict(seqlens_q=(9, 17), seqlens_k=(9, 150), layout="HND", head_dim=128,
                         num_heads=2, return_lse=False),
}


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the Mosaic kernel itself runs (test_gpu_*)")
@pytest.mark.parametrize("case", sorted(INTERPRETED))
def test_mosaic_kernel_interpreted_matches_the_oracle(case):
  why = _interpreter_missing()
  if why:
    pytest.skip(why)
  SUITE_INTERPRETED.check(SUITE_INTERPRETED.problem(
      **{"num_heads": 1, "num_kv_heads": 1, **INTERPRETED[case]}))


SUITE_INTERPRETED = _MosaicInterpreted()


class _OneCTA(_MosaicInterpreted):
  ctas = 1


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the Mosaic kernel itself runs (test_gpu_*)")
@pytest.mark.parametrize("case", ["in_place_causal", "padded_window"])
def test_mosaic_kernel_interpreted_one_cta_runs_every_item(case):
  """One persistent CTA: every work item (padding programs included) in one K / V stream, each
  item's q landing while the one before runs (in place) or after it left (padded copies)."""
  why = _interpreter_missing()
  if why:
    pytest.skip(why)
  suite = _OneCTA()
  suite.check(suite.problem(**{"num_heads": 1, "num_kv_heads": 1, **INTERPRETED[case]}))


class _FourCTAs(_MosaicInterpreted):
  ctas = 4


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the Mosaic kernel itself runs (test_gpu_*)")
def test_mosaic_kernel_interpreted_many_short_items_on_several_ctas():
  """Decode-like sequences (1-16 queries, 1-2 key tiles, q in place) over 4 CTAs: each CTA ends
  on items of few or no tiles, which its compute warpgroups can finish before the loader reaches
  its q wait.
  The kernel once released q's tile after its last item too, with no q load behind it, so a late
  loader met two completions of that barrier and waited forever on the GPU (NOTES.md, session
  32); the interpreter raises on a barrier completing twice unobserved. The race is timing
  dependent (the old kernel failed 1 of 5 interpreted runs of a larger case), so this guards the
  protocol on every run rather than proving it."""
  why = _interpreter_missing()
  if why:
    pytest.skip(why)
  suite = _FourCTAs()
  # 129 rows, q in place; 128 padding rows keep the last sequences' q boxes inside q (the
  # interpreter raises on a read past an array, where the GPU's TMA fills zeros).
  suite.check(suite.problem(num_heads=1, num_kv_heads=1, causal=True, pad_q=128,
                            seqlens_q=(16, 1, 16, 16, 1, 16, 16, 16, 15, 16),
                            seqlens_k=(40, 30, 140, 20, 60, 90, 25, 130, 50, 70)))


@pytest.mark.parametrize("ctas", [0, -2, 2.0, True])
def test_ctas_must_be_a_positive_int(ctas):
  spec = _spec(layout="NHD", head_dim=64, total_q=300, max_seqlen_q=300)
  kv = jax.ShapeDtypeStruct((12, 16, 2, 64), jnp.float16)
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  arrays = AttentionArrays(q=jax.ShapeDtypeStruct((300, 4, 64), jnp.float16), k=kv, v=kv,
                           cu_seqlens_q=i32(4), seqlens_k=i32(3), kv_index=i32(3, 6), alibi=None,
                           layer=None)
  with pytest.raises(ValueError, match="ctas"):
    mosaic.attention(spec, arrays, ctas=ctas)


# ---- which kernel runs by default (CPU, with the GPU facts patched) -------------------------------

def _long_short_one():
  n, batch = mosaic.MIN_QUERIES, -(-mosaic.MIN_TOTAL_QUERIES // mosaic.MIN_QUERIES)
  long = _spec(total_q=batch * n, batch=batch, max_seqlen_q=n, max_seqlen_k=n)
  short = _spec(total_q=2 * batch * (n // 2), batch=2 * batch, max_seqlen_q=n // 2)  # per sequence
  one_prompt = _spec(total_q=n, batch=1, max_seqlen_q=n, max_seqlen_k=n)  # a small call
  return long, short, one_prompt


def test_the_switch_off_keeps_the_mosaic_kernel_out_of_defaults(monkeypatch):
  """BY_DEFAULT off (the switch for a kernel found unsafe): long prefill on a Hopper GPU takes the
  Triton kernels, and the pallas backend's status says why."""
  from jax_varlen_attn import backends as registry
  from jax_varlen_attn.backends import device
  long, _, _ = _long_short_one()
  monkeypatch.setattr(device, "is_hopper", lambda: True)
  monkeypatch.setattr(registry, "_on_cuda_gpu", lambda: True)
  monkeypatch.setattr(registry, "status", lambda name: (True, "patched"))
  assert mosaic.BY_DEFAULT and registry.auto_name(long) == "pallas"  # on since its GPU soak
  monkeypatch.setattr(mosaic, "BY_DEFAULT", False)
  assert not mosaic.preferred(long) and registry.auto_name(long) == "triton"
  monkeypatch.undo()
  monkeypatch.setattr(registry, "_on_cuda_gpu", lambda: True)
  monkeypatch.setattr(mosaic, "BY_DEFAULT", False)
  assert mosaic.KNOWN_HANG in registry._pallas_status()[1]


def test_long_prefill_on_hopper_prefers_the_mosaic_kernel(monkeypatch):
  """Where `preferred` takes the kernel: a Hopper GPU, long prefill, every option it covers."""
  from jax_varlen_attn import backends as registry
  from jax_varlen_attn.backends import device
  long, short, one_prompt = _long_short_one()
  monkeypatch.setattr(device, "is_hopper", lambda: False)
  assert not mosaic.preferred(long)  # not a Hopper GPU
  monkeypatch.setattr(device, "is_hopper", lambda: True)
  assert mosaic.preferred(long) and not mosaic.preferred(short)
  assert not mosaic.preferred(one_prompt)
  for option in (dict(softcap=1.0), dict(has_alibi=True), dict(has_sinks=True)):  # timed: faster
    assert mosaic.preferred(dataclasses.replace(long, **option)), option
    assert not mosaic.preferred(dataclasses.replace(short, **option)), option
  assert not mosaic.preferred(dataclasses.replace(long, dtype="float32"))  # not covered
  assert not mosaic.preferred(long, k_size=12 * 16 * 2 * 64 + 64)  # a buffer of partial tiles
  monkeypatch.setattr(registry, "_on_cuda_gpu", lambda: True)
  monkeypatch.setattr(registry, "status", lambda name: (True, "patched"))
  assert registry.auto_name(long) == "pallas"
  assert registry.auto_name(short) == "triton"
  assert registry.auto_name() == "triton"  # write_kv's choice: no spec


def test_a_stuck_interpreted_kernel_fails_its_test_instead_of_hanging_the_suite():
  """_within's deadline: a call that never returns (a deadlocked barrier) fails the test in time."""
  stuck = threading.Event()
  with pytest.raises(pytest.fail.Exception, match="did not finish in 0.2 s"):
    _within(0.2, stuck.wait)
  stuck.set()
  assert _within(5, lambda: 7) == 7
  with pytest.raises(KeyError):
    _within(5, lambda: {}["x"])
