"""The shared test base: every backend subclasses `AttentionSuite` and must pass all of it.

A subclass sets `backend` and, where its platform needs it, smaller problems (`shrink`) or fewer
dtypes. Every test draws fresh random inputs with poisoned padding (see problems.py) and compares
against the float64 oracle.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_varlen_attn import flash_attn_varlen_func
from tests.oracle import reference_attention
from tests.problems import LAYOUTS, TOLERANCE, Problem, make_problem, out_dtype, rel_err

# 40 sequences: a program's search for its sequence (the Triton kernel's several probes a round)
# runs more than one round, over owners of 0, 1 and several query blocks.
_MANY_Q = tuple((0, 1, 1, 3, 1, 9, 1, 0, 2, 1)[i % 10] for i in range(40))
_MANY_K = tuple(q + (7 * i) % 31 for i, q in enumerate(_MANY_Q))

FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "causal_more_q_than_k": dict(causal=True, seqlens_q=(9, 1, 4), seqlens_k=(3, 30, 4)),
    "window_left": dict(window=(7, -1)),
    "window_both": dict(window=(5, 3)),
    "causal_window": dict(causal=True, window=(6, -1)),
    "window_empty_rows": dict(window=(0, 0), seqlens_q=(6, 2), seqlens_k=(3, 40)),
    "softcap": dict(softcap=2.0, softmax_scale=0.5),
    "alibi_heads": dict(alibi="head", causal=True),
    "alibi_batch": dict(alibi="batch", window=(9, 2)),
    "mqa": dict(num_heads=4, num_kv_heads=1, causal=True),
    "mha": dict(num_heads=2, num_kv_heads=2),
    "gqa8": dict(num_heads=8, num_kv_heads=1, causal=True),
    "zero_lengths": dict(seqlens_q=(0, 4, 3, 0), seqlens_k=(5, 0, 20, 0), causal=True),
    "decode": dict(seqlens_q=(1, 1, 1, 1, 1), seqlens_k=(1, 40, 33, 16, 7), causal=True),
    "many_sequences": dict(seqlens_q=_MANY_Q, seqlens_k=_MANY_K, causal=True),
    "all_kwargs": dict(causal=True, window=(12, -1), softcap=3.0, alibi="batch", softmax_scale=0.3),
}

# fp8 caches (docs/contract.md, "fp8"): both formats, every descale form, paged layouts, GQA and the
# mask / score options, with NaN poison (an fp8 NaN) in every unused slot.
FP8_CASES = {
    "e4m3_nhd_causal": dict(kv_dtype="float8_e4m3fn", causal=True),
    "e5m2_hnd_window_scalar": dict(kv_dtype="float8_e5m2", layout="HND", window=(5, 3), descale="scalar"),
    "e4m3_fused_softcap_alibi": dict(kv_dtype="float8_e4m3fn", layout="fused_page_major", softcap=2.0,
                                     alibi="batch"),
    "e5m2_strided_causal_window_none": dict(kv_dtype="float8_e5m2", layout="strided", causal=True,
                                            window=(6, -1), descale="none"),
    "e4m3_stacked_gqa8_decode": dict(kv_dtype="float8_e4m3fn", layout="stacked_fused_kv_major",
                                     num_heads=8, num_kv_heads=1, causal=True,
                                     seqlens_q=(1, 1, 1, 1, 1), seqlens_k=(1, 40, 33, 16, 7)),
    "e4m3_non_paged": dict(kv_dtype="float8_e4m3fn", paged=False, causal=True),
    "e4m3_q_and_cache": dict(dtype="float8_e4m3fn", kv_dtype="float8_e4m3fn", causal=True, alibi="head"),
    "e5m2_q_e4m3_cache_scalar": dict(dtype="float8_e5m2", kv_dtype="float8_e4m3fn", descale="scalar",
                                     window=(7, -1)),
    "bf16_q_e4m3": dict(dtype="bfloat16", kv_dtype="float8_e4m3fn", causal=True),
    "f32_q_e5m2": dict(dtype="float32", kv_dtype="float8_e5m2", causal=True),
}

# Attention sinks (s_aux): with and without LSE, rows that see no key (empty windows, a sequence
# without keys), decode, and with fp8.
SINK_CASES = {
    "causal_lse": dict(sinks=True, causal=True),
    "no_lse": dict(sinks=True, return_lse=False, window=(5, 3)),
    "empty_rows": dict(sinks=True, window=(0, 0), seqlens_q=(6, 2), seqlens_k=(3, 40)),
    "zero_lengths": dict(sinks=True, seqlens_q=(0, 4, 3, 0), seqlens_k=(5, 0, 20, 0), causal=True),
    "decode_gqa": dict(sinks=True, num_heads=8, num_kv_heads=2, seqlens_q=(1, 1, 1, 1, 1),
                       seqlens_k=(1, 40, 33, 0, 7), causal=True),
    "softcap_alibi_fp8": dict(sinks=True, softcap=3.0, alibi="head", kv_dtype="float8_e4m3fn",
                              layout="HND", causal=True),
}


class AttentionSuite:
  """Subclass with `backend = "..."`; optional overrides below."""

  backend: str = ""
  dtypes = ("float16", "bfloat16", "float32")
  head_dims = (32, 64, 80, 96, 112, 128, 192, 256)
  fp8_cases = tuple(FP8_CASES)  # a subclass may run fewer (interpreters are slow)
  sink_cases = tuple(SINK_CASES)
  tolerance = TOLERANCE  # per dtype
  shrink: dict = {}  # Problem overrides applied to every problem (smaller for interpreters)

  # ---- helpers ----------------------------------------------------------------------------------
  def problem(self, **overrides) -> Problem:
    fields = {**overrides}
    for key, value in self.shrink.items():
      fields.setdefault(key, value)
    return Problem(seed=np.random.SeedSequence().entropy % (2**32), **fields)

  def run(self, kwargs, **extra):
    return flash_attn_varlen_func(**kwargs, backend=self.backend, **extra)

  def check(self, p: Problem, **extra):
    kwargs, oracle = make_problem(p)
    result = self.run(kwargs, **extra)
    out, lse = result if p.return_lse else (result, None)
    dtype = out_dtype(p)
    assert out.shape == kwargs["q"].shape and out.dtype == jnp.dtype(dtype)
    ref_out, ref_lse = reference_attention(**oracle)
    out = np.asarray(out.astype(jnp.float32))
    n_real = int(oracle["cu_seqlens_q"][-1])
    assert np.isfinite(out).all(), "NaN/Inf in the output (poison leaked?)"
    assert (out[n_real:] == 0).all(), "padding rows past cu_seqlens_q[-1] must be zero"
    err = rel_err(out[:n_real], ref_out[:n_real])
    assert err < self.tolerance[dtype], f"rel err {err:.2e} >= {self.tolerance[dtype]} ({p})"
    if lse is not None:
      lse = np.asarray(lse)
      assert lse.shape == (p.num_heads, kwargs["q"].shape[0]) and lse.dtype == np.float32
      inf_ref = np.isinf(ref_lse)
      np.testing.assert_array_equal(np.isposinf(lse), inf_ref, err_msg="+inf LSE rows differ")
      np.testing.assert_allclose(lse[~inf_ref], ref_lse[~inf_ref], rtol=2e-3, atol=2e-3)
    return err

  # ---- the suite --------------------------------------------------------------------------------
  @pytest.mark.parametrize("feature", sorted(FEATURES))
  def test_feature(self, feature):
    self.check(self.problem(**FEATURES[feature]))

  @pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
  def test_dtype(self, dtype):
    if dtype not in self.dtypes:
      pytest.skip(f"{dtype} is checked elsewhere for backend={self.backend}")
    self.check(self.problem(dtype=dtype, causal=True, alibi="head"))

  @pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 112, 128, 192, 256])
  def test_head_dim(self, head_dim):
    if head_dim not in self.head_dims:
      pytest.skip(f"head_dim {head_dim} is checked elsewhere for backend={self.backend}")
    self.check(self.problem(head_dim=head_dim, causal=True))

  @pytest.mark.parametrize("case", sorted(FP8_CASES))
  def test_fp8_cache(self, case):
    """An fp8 cache (and q) against the oracle on the dequantized inputs."""
    overrides = FP8_CASES[case]
    if case not in self.fp8_cases:
      pytest.skip(f"{case} is checked elsewhere for backend={self.backend}")
    if overrides.get("dtype", "float16") not in self.dtypes + ("float8_e4m3fn", "float8_e5m2"):
      pytest.skip(f"q dtype {overrides['dtype']} is checked elsewhere for backend={self.backend}")
    self.check(self.problem(**overrides))

  @pytest.mark.parametrize("case", sorted(SINK_CASES))
  def test_sinks(self, case):
    if case not in self.sink_cases:
      pytest.skip(f"{case} is checked elsewhere for backend={self.backend}")
    self.check(self.problem(**SINK_CASES[case]))

  @pytest.mark.parametrize("layout", LAYOUTS)
  def test_layout(self, layout):
    self.check(self.problem(layout=layout, causal=True, window=(20, -1)))

  @pytest.mark.parametrize("block_size", [8, 32])
  def test_page_size(self, block_size):
    self.check(self.problem(block_size=block_size, causal=True, layout="HND"))

  @pytest.mark.parametrize("with_seqused", [False, True])
  def test_non_paged(self, with_seqused):
    p = self.problem(paged=False, causal=True)
    kwargs, oracle = make_problem(p)
    if not with_seqused:
      # Without seqused_k the lengths come from cu_seqlens_k: repack without the gaps.
      p = dataclasses.replace(p, seqlens_k=p.seqlens_k)
      k_rows = np.concatenate([np.asarray(x) for x in oracle["keys"]]).astype(kwargs["k"].dtype)
      v_rows = np.concatenate([np.asarray(x) for x in oracle["values"]]).astype(kwargs["v"].dtype)
      kwargs.update(k=jnp.asarray(k_rows), v=jnp.asarray(v_rows), seqused_k=None,
                    cu_seqlens_k=jnp.asarray(np.concatenate([[0], np.cumsum(p.seqlens_k)]), jnp.int32))
    out, lse = self.run(kwargs)
    ref, _ = reference_attention(**oracle)
    n = int(oracle["cu_seqlens_q"][-1])
    assert rel_err(np.asarray(out.astype(jnp.float32))[:n], ref[:n]) < self.tolerance[p.dtype]

  def test_returns_only_out_without_lse(self):
    kwargs, _ = make_problem(self.problem(return_lse=False))
    out = self.run(kwargs)
    assert isinstance(out, jax.Array) and out.shape == kwargs["q"].shape

  def test_one_compile_when_lengths_change(self):
    """Lengths are data: three different length sets of one shape compile once."""
    base = self.problem(causal=True, seqlens_q=(5, 1, 17, 0), seqlens_k=(40, 23, 17, 9))
    kwargs0, _ = make_problem(base)

    @jax.jit
    def step(q, k, v, cu_seqlens_q, seqused_k, block_table):
      return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k,
                                    block_table=block_table, causal=True, backend=self.backend)

    for lens_q, lens_k in [((5, 1, 17, 0), (40, 23, 17, 9)), ((9, 9, 4, 1), (10, 35, 4, 40)),
                           ((0, 0, 23, 0), (1, 2, 30, 3))]:
      p = dataclasses.replace(base, seqlens_q=lens_q, seqlens_k=lens_k,
                              seed=base.seed + sum(lens_k))
      kwargs, oracle = make_problem(p)
      # Same shapes: pad the block table / q to the base problem's shapes.
      q = _pad_rows(kwargs["q"], kwargs0["q"].shape[0])
      bt = _pad_cols(kwargs["block_table"], kwargs0["block_table"].shape[1])
      k = _pad_rows(kwargs["k"], kwargs0["k"].shape[0])
      v = _pad_rows(kwargs["v"], kwargs0["v"].shape[0])
      out = step(q, k, v, kwargs["cu_seqlens_q"], kwargs["seqused_k"], bt)
      ref, _ = reference_attention(**oracle)
      n = int(oracle["cu_seqlens_q"][-1])
      assert rel_err(np.asarray(out.astype(jnp.float32))[:n], ref[:n]) < self.tolerance[p.dtype]
    assert step._cache_size() == 1

  @pytest.mark.parametrize("layout", ["NHD", "HND", "stacked_strided"])
  def test_hostile_block_table_only_affects_its_sequence(self, layout):
    """Garbage in one sequence's block table and seqused_k: no crash, the others stay exact."""
    p = self.problem(layout=layout, causal=True)
    kwargs, oracle = make_problem(p)
    rng = np.random.default_rng(p.seed)
    bt = np.array(kwargs["block_table"])
    bt[0] = rng.integers(-(10**6), 10**6, bt.shape[1])
    used = np.array(kwargs["seqused_k"])
    used[0] = 10**6  # far beyond the block table's capacity
    kwargs.update(block_table=jnp.asarray(bt), seqused_k=jnp.asarray(used))
    out, _ = self.run(kwargs)
    ref, _ = reference_attention(**oracle)
    cu = oracle["cu_seqlens_q"]
    rows = slice(int(cu[1]), int(cu[-1]))
    assert rel_err(np.asarray(out.astype(jnp.float32))[rows], ref[rows]) < self.tolerance[p.dtype]

  @pytest.mark.parametrize("layout", ["NHD", "fused_kv_major", "stacked_strided"])
  def test_cache_not_copied(self, layout):
    """The compiled HLO never materializes anything as large as the cache: it is read in place."""
    p = self.problem(layout=layout, spare_pages=60, causal=True)
    kwargs, _ = make_problem(p)
    cache_elems = int(np.prod(kwargs["k"].shape))
    names = ["q", "k", "v", "cu_seqlens_q", "seqused_k", "block_table"]
    static = {k: kwargs[k] for k in kwargs if k not in names}
    args = [kwargs[k] for k in names]
    if "layer" in static:
      names.append("layer")
      args.append(jnp.asarray(static.pop("layer")))

    def f(*arrays):
      return flash_attn_varlen_func(**dict(zip(names, arrays)), **static, backend=self.backend)

    hlo = jax.jit(f).lower(*args).compile().as_text()
    big = _large_buffers(hlo, cache_elems)
    assert not big, f"instructions as large as the cache ({cache_elems} elements): {big[:5]}"


def _pad_rows(x, rows):
  if x is None:
    return None
  pad = rows - x.shape[0]
  return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], jnp.nan, x.dtype)]) if pad > 0 else x


def _pad_cols(x, cols):
  pad = cols - x.shape[1]
  return jnp.concatenate([x, jnp.zeros((x.shape[0], pad), x.dtype)], axis=1) if pad > 0 else x


_INSTRUCTION = re.compile(r"^(?:ROOT )?%?[\w.\-]+ = (\(?)(\w+)\[([0-9,]*)\][^ ]* ([\w\-]+)\(")
# Ops that name or pass a buffer through without writing a new one.
_PASS_THROUGH = {"parameter", "bitcast", "get-tuple-element", "tuple", "while", "call", "conditional"}


def _large_buffers(hlo_text: str, limit: int):
  """Instructions of the compiled HLO that write an array of >= limit elements (a copy, a slice,
  a gather of the whole cache...), other than parameters and pass-throughs of them."""
  found = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line.strip())
    if not m:
      continue
    is_tuple, _, dims, op = m.groups()
    if is_tuple or op in _PASS_THROUGH:
      continue
    if int(np.prod([int(d) for d in dims.split(",") if d])) >= limit:
      found.append(line.strip()[:200])
  return found
