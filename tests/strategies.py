"""Hypothesis strategies for attention problems (used by tests/test_properties.py).

`problems()` draws a `tests.problems.Problem`: everything `make_problem` needs to build poisoned inputs
for one call of `flash_attn_varlen_func`, in any cache layout, and the float64 oracle's view of them.
Every drawn problem is a *valid* call (docs/contract.md, "Semantics"): H % Hk == 0, at least one query row, a
block table with at least one column, at least one page.
"""

from __future__ import annotations

from typing import Optional, Sequence

from hypothesis import strategies as st

from tests.problems import LAYOUTS, Problem

DTYPES = ("float16", "bfloat16", "float32")
HEADS = ((1, 1), (2, 1), (4, 2), (6, 3), (8, 2))  # (H, Hk), H % Hk == 0: MHA, MQA, GQA 2/4, group 3
HEAD_DIMS = (32, 64, 80, 96, 128)
BLOCK_SIZES = (8, 16, 32)
NON_PAGED = "non_paged"
KV_FORMS = (NON_PAGED,) + LAYOUTS  # non-paged k / v, or a paged cache in any layout of problems.py

# -1 (unbounded) half the time, otherwise a bound that is often smaller than the sequences.
window_sides = st.one_of(st.just(-1), st.integers(0, 40))
softcaps = st.one_of(st.just(0.0), st.floats(0.5, 20.0))
scales = st.one_of(st.none(), st.floats(0.05, 2.0))
# How max_seqlen_q / max_seqlen_k (static upper bounds that size grids) are passed: not at all, the
# exact maxima, or a looser bound.
SEQLEN_BOUNDS = ("none", "exact", "loose")


DESCALES = ("seq_head", "scalar", "none")


@st.composite
def problems(draw, dtypes: Sequence[str] = DTYPES, max_batch: int = 4, max_q: int = 20,
             max_k: int = 70, kv_forms: Sequence[str] = KV_FORMS,
             kv_dtypes: Sequence[Optional[str]] = (None,), sinks: Sequence[bool] = (False,)) -> Problem:
  """kv_dtypes: cache dtypes to draw from (None: q's; "float8_e4m3fn" / "float8_e5m2": an fp8
  cache with a drawn descale form); sinks: whether s_aux is passed. The defaults draw neither (and
  consume no entropy for them, so the examples of existing tests are unchanged)."""
  batch = draw(st.integers(1, max_batch))
  seqlens_q = draw(st.lists(st.integers(0, max_q), min_size=batch, max_size=batch))
  if not any(seqlens_q):  # at least one query row
    seqlens_q[draw(st.integers(0, batch - 1))] = draw(st.integers(1, max_q))
  seqlens_k = draw(st.lists(st.integers(0, max_k), min_size=batch, max_size=batch))
  num_heads, num_kv_heads = draw(st.sampled_from(HEADS))
  form = draw(st.sampled_from(kv_forms))
  block_size = draw(st.sampled_from(BLOCK_SIZES))
  # The block table needs >= 1 column (the API rejects max_blocks == 0): with every sequence empty
  # that column is all padding.
  min_extra = 1 if not any(seqlens_k) else 0
  causal = draw(st.booleans())
  # With causal=True the API forces the right window to 0 (so does the oracle): drawing any right
  # side there checks that rule too.
  window = (draw(window_sides), draw(window_sides))
  extra = {}
  if len(kv_dtypes) > 1 or kv_dtypes[0] is not None:
    kv_dtype = draw(st.sampled_from(tuple(kv_dtypes)))
    if kv_dtype is not None:
      extra.update(kv_dtype=kv_dtype, descale=draw(st.sampled_from(DESCALES)))
  if len(sinks) > 1 or sinks[0]:
    extra["sinks"] = draw(st.sampled_from(tuple(sinks)))
  return Problem(
      **extra,
      seqlens_q=tuple(seqlens_q),
      seqlens_k=tuple(seqlens_k),
      pad_q=draw(st.integers(0, 4)),
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=draw(st.sampled_from(HEAD_DIMS)),
      dtype=draw(st.sampled_from(tuple(dtypes))),
      paged=form != NON_PAGED,
      layout="NHD" if form == NON_PAGED else form,
      block_size=block_size,
      extra_blocks=draw(st.integers(min_extra, 3)),
      spare_pages=draw(st.integers(1, 5)),  # >= 1: make_problem needs a page to point junk at
      causal=causal,
      window=window,
      softcap=draw(softcaps),
      alibi=draw(st.sampled_from((None, "head", "batch"))),
      softmax_scale=draw(scales),
      return_lse=draw(st.booleans()),
      num_layers=draw(st.integers(1, 3)),
      seed=draw(st.integers(0, 2**32 - 1)),
  )


def seqlen_bounds(p: Problem, how: str) -> dict:
  """max_seqlen_q / max_seqlen_k keyword arguments for `how` in SEQLEN_BOUNDS."""
  if how == "none":
    return {}
  extra = 0 if how == "exact" else 7
  return dict(max_seqlen_q=max(p.seqlens_q) + extra, max_seqlen_k=max(p.seqlens_k) + extra)


def describe(p: Problem, bounds: Optional[str] = None) -> str:
  """A one-line reproduction: the Problem (its seed fixes every input) and the bounds."""
  return f"{p!r}" + (f", bounds={bounds!r}" if bounds else "")
