"""Every argument error is a ValueError / TypeError whose message names the argument and what was expected.

Each case starts from a valid `make_problem` call and breaks one thing. Calls run under
`jax.eval_shape`, so nothing compiles: validation is static and raises before any kernel is traced,
and a case that slips past validation still gets traced (a crash there shows up as the wrong type).

`test_every_raise_is_reached` traces the table and fails if any `raise` in api.py, layout.py or
`backends.select` was never executed, so a new check cannot land without its case here.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_varlen_attn import KVCacheLayout, api, flash_attn_varlen_func, layout as layout_mod
from jax_varlen_attn import backends as registry
from jax_varlen_attn.layout import resolve
from tests.oracle import reference_attention
from tests.problems import TOLERANCE, Problem, make_problem, rel_err

DROP = object()  # a `changes` value that removes the argument


def _kwargs(problem, changes):
  kw, _ = make_problem(problem)
  kw["backend"] = "xla"
  for name, value in changes.items():
    if value is DROP:
      kw.pop(name, None)
    else:
      # A callable derives the bad value from the valid one (e.g. a slice of k).
      kw[name] = value(kw) if callable(value) and not isinstance(value, type) else value
  return kw


def call(problem=None, **changes):
  """A thunk: flash_attn_varlen_func on a valid problem with `changes` applied."""
  def thunk():
    kw = _kwargs(problem or Problem(), changes)
    return jax.eval_shape(lambda: flash_attn_varlen_func(**kw))
  return thunk


def traced(name, value, problem=None, wrap=lambda x: x, **changes):
  """A thunk: `name` = wrap(a traced `value`) inside jax.jit, the rest a valid problem with `changes`."""
  def thunk():
    kw = _kwargs(problem or Problem(), changes)
    def f(x):
      return flash_attn_varlen_func(**{**kw, name: wrap(x)})
    return jax.jit(f)(value)
  return thunk


def just(fn, *args, **kwargs):
  return lambda: fn(*args, **kwargs)


@contextlib.contextmanager
def _no_triton_here():
  """Triton as on a machine without a CUDA GPU and without TRITON_INTERPRET (on any machine)."""
  old_env, old_gpu = os.environ.get("TRITON_INTERPRET"), registry._on_cuda_gpu
  os.environ["TRITON_INTERPRET"] = "0"
  registry._on_cuda_gpu = lambda: False
  try:
    yield
  finally:
    registry._on_cuda_gpu = old_gpu
    if old_env is None:
      os.environ.pop("TRITON_INTERPRET", None)
    else:
      os.environ["TRITON_INTERPRET"] = old_env


def _triton_unavailable():
  with _no_triton_here():
    call(backend="triton")()


NP = Problem(paged=False)
STACKED = Problem(layout="stacked_NHD")
STRIDED = Problem(layout="strided")
FPM = Problem(layout="fused_page_major")
FKM = Problem(layout="fused_kv_major")
H8 = Problem(num_heads=8)  # H = 8 differs from batch = 4, so alibi messages are unambiguous
D, HK, BS = 64, 2, 16  # head_dim, kv heads, page size of the default Problem
ROW = HK * D  # elements of one token of one page (NHD)


def custom(**fields):
  """A KVCacheLayout for the default Problem's NHD pages, with `fields` changed."""
  return KVCacheLayout(**{**dict(block_size=BS, num_kv_heads=HK, head_dim=D, page_stride=BS * ROW), **fields})


def _flat_plus(extra):
  """k / v as one flat buffer with `extra` elements appended."""
  return lambda kw: jnp.concatenate([kw["k"].reshape(-1), jnp.zeros((extra,), kw["k"].dtype)])


CASES = [
    # ---- q --------------------------------------------------------------------------------------
    pytest.param(call(q=lambda kw: np.asarray(kw["q"]).tolist()), TypeError, r"^q must be an array, got list",
                 id="q-list"),
    pytest.param(call(q=lambda kw: kw["q"][0]), ValueError, r"^q must have rank 3, got shape \(4, 64\)",
                 id="q-rank"),
    pytest.param(call(q=lambda kw: kw["q"].astype(jnp.int32)), TypeError,
                 r"^q must be float16, bfloat16 or float32, got int32", id="q-int"),
    pytest.param(call(Problem(head_dim=16)), ValueError,
                 r"^q's head_dim \(axis 2\) must be in \[32, 256\], got 16", id="head_dim-16"),
    pytest.param(call(Problem(head_dim=264)), ValueError,
                 r"^q's head_dim \(axis 2\) must be in \[32, 256\], got 264", id="head_dim-264"),
    pytest.param(call(q=lambda kw: kw["q"][:, :0]), ValueError,
                 r"^q must have at least one head, got shape \(26, 0, 64\)", id="q-no-heads"),
    pytest.param(call(q=lambda kw: kw["q"][:0]), ValueError,
                 r"^q must have at least one row \(total_q >= 1.*got shape \(0, 4, 64\)", id="q-no-rows"),
    # ---- cu_seqlens_q ---------------------------------------------------------------------------
    pytest.param(call(cu_seqlens_q=DROP), ValueError, r"^cu_seqlens_q is required: int32 \[batch \+ 1\]",
                 id="cu_q-missing"),
    pytest.param(call(cu_seqlens_q=[0, 5, 6, 23, 23]), TypeError, r"^cu_seqlens_q must be an array, got list",
                 id="cu_q-list"),
    # NumPy arrays keep int64 (jnp would silently make it int32 without x64).
    pytest.param(call(cu_seqlens_q=lambda kw: np.asarray(kw["cu_seqlens_q"], np.int64)), TypeError,
                 r"^cu_seqlens_q must be int32 \[batch \+ 1\], got int64", id="cu_q-int64"),
    pytest.param(call(cu_seqlens_q=lambda kw: kw["cu_seqlens_q"].astype(jnp.float32)), TypeError,
                 r"^cu_seqlens_q must be int32 \[batch \+ 1\], got float32", id="cu_q-float"),
    pytest.param(call(cu_seqlens_q=lambda kw: kw["cu_seqlens_q"][:, None]), ValueError,
                 r"^cu_seqlens_q must have rank 1, got shape \(5, 1\)", id="cu_q-rank"),
    pytest.param(call(cu_seqlens_q=jnp.zeros((1,), jnp.int32)), ValueError,
                 r"^cu_seqlens_q must have batch \+ 1 >= 2 entries, got shape \(1,\)", id="cu_q-too-short"),
    # ---- k / v dtypes ---------------------------------------------------------------------------
    pytest.param(call(k=lambda kw: np.asarray(kw["k"]).tolist()), TypeError, r"^k must be an array, got list",
                 id="k-list"),
    pytest.param(call(v=lambda kw: np.asarray(kw["v"]).tolist()), TypeError, r"^v must be an array, got list",
                 id="v-list"),
    pytest.param(call(k=lambda kw: kw["k"].astype(jnp.float32)), TypeError,
                 r"^k must have q's dtype float16, got float32", id="k-dtype"),
    pytest.param(call(v=lambda kw: kw["v"].astype(jnp.bfloat16)), TypeError,
                 r"^v must have q's dtype float16, got bfloat16", id="v-dtype"),
    pytest.param(call(NP, k=lambda kw: kw["k"].astype(jnp.float32), v=lambda kw: kw["v"].astype(jnp.float32)),
                 TypeError, r"^k must have q's dtype float16, got float32", id="nonpaged-k-dtype"),
    # ---- kv_layout (type, name) ------------------------------------------------------------------
    pytest.param(call(kv_layout="nhd"), ValueError,
                 r"^kv_layout must be one of \('NHD', 'HND', 'fused_page_major', 'fused_kv_major'\) or a "
                 r"KVCacheLayout, got 'nhd'", id="kv_layout-unknown"),
    pytest.param(call(NP, kv_layout="nhd"), ValueError, r"^kv_layout must be one of .*got 'nhd'",
                 id="nonpaged-kv_layout-unknown"),
    pytest.param(call(kv_layout=None), TypeError, r"^kv_layout must be a str or KVCacheLayout, got NoneType",
                 id="kv_layout-None"),
    pytest.param(just(resolve, "nhd", (4, 16, 2, 64), (4, 16, 2, 64), stacked=False), ValueError,
                 r"^kv_layout must be one of .*got 'nhd'", id="resolve-unknown"),
    pytest.param(just(resolve, 0, (4, 16, 2, 64), (4, 16, 2, 64), stacked=False), TypeError,
                 r"^kv_layout must be a str or KVCacheLayout, got int", id="resolve-type"),
    # ---- block_table ----------------------------------------------------------------------------
    pytest.param(call(block_table=lambda kw: kw["block_table"][0]), ValueError,
                 r"^block_table must have rank 2, got shape \(5,\)", id="block_table-rank"),
    pytest.param(call(block_table=lambda kw: kw["block_table"][:2]), ValueError,
                 r"^block_table must have batch=4 rows \(len\(cu_seqlens_q\) - 1\), got shape \(2, 5\)",
                 id="block_table-rows"),
    pytest.param(call(block_table=lambda kw: np.asarray(kw["block_table"], np.int64)), TypeError,
                 r"^block_table must be int32 \[batch, max_blocks\], got int64", id="block_table-int64"),
    pytest.param(call(block_table=lambda kw: kw["block_table"][:, :0]), ValueError,
                 r"^block_table must have at least one column \(max_blocks >= 1\)", id="block_table-no-columns"),
    # ---- layer ----------------------------------------------------------------------------------
    pytest.param(call(STACKED, layer=3), ValueError, r"^layer must be in \[0, 3\) \(axis 0 of k\), got 3",
                 id="layer-too-big"),
    pytest.param(call(STACKED, layer=np.array(-1, np.int32)), ValueError,
                 r"^layer must be in \[0, 3\) \(axis 0 of k\), got -1", id="layer-negative"),
    pytest.param(call(STACKED, layer=True), TypeError, r"^layer must be an int32 scalar, got bool",
                 id="layer-bool"),
    pytest.param(call(STACKED, layer=1.0), TypeError, r"^layer must be an int32 scalar .*got float",
                 id="layer-float"),
    pytest.param(call(STACKED, layer=np.array(1, np.int64)), TypeError,
                 r"^layer must be an int32 scalar, got int64", id="layer-int64"),
    pytest.param(call(STACKED, layer=jnp.ones((1,), jnp.int32)), ValueError,
                 r"^layer must have rank 0, got shape \(1,\)", id="layer-rank"),
    pytest.param(call(NP, layer=0), ValueError,
                 r"^layer= selects a layer of a stacked paged cache: pass block_table", id="layer-nonpaged"),
    # ---- paged / non-paged ----------------------------------------------------------------------
    pytest.param(call(seqused_k=DROP), ValueError,
                 r"^a paged cache \(block_table\) needs seqused_k: int32 \[batch\]", id="paged-no-lengths"),
    pytest.param(call(NP, cu_seqlens_k=DROP), ValueError,
                 r"^cu_seqlens_k is required without block_table: int32 \[batch \+ 1\]", id="nonpaged-no-cu_k"),
    pytest.param(call(NP, kv_layout="HND"), ValueError,
                 r"^kv_layout='HND' describes a paged cache: pass block_table, or leave kv_layout at 'NHD'",
                 id="nonpaged-HND"),
    pytest.param(call(NP, kv_layout=custom()), ValueError, r"^kv_layout=KVCacheLayout\(.*describes a paged cache",
                 id="nonpaged-custom-layout"),
    pytest.param(call(NP, v=None), ValueError, r"^v is None: non-paged attention needs v \[total_k, Hk, D\]",
                 id="nonpaged-v-None"),
    pytest.param(call(NP, k=lambda kw: kw["k"][None], v=lambda kw: kw["v"][None]), ValueError,
                 r"^k must have rank 3, got shape \(1, 98, 2, 64\)", id="nonpaged-k-rank"),
    pytest.param(call(NP, k=lambda kw: kw["k"][:0], v=lambda kw: kw["v"][:0]), ValueError,
                 r"^k \[total_k, Hk, D\] must have no empty axis, got shape \(0, 2, 64\)", id="nonpaged-k-empty"),
    pytest.param(call(NP, v=lambda kw: kw["v"][:-1]), ValueError,
                 r"^v must have k's shape \(98, 2, 64\), got \(97, 2, 64\)", id="nonpaged-v-shape"),
    # ---- heads ----------------------------------------------------------------------------------
    pytest.param(call(q=lambda kw: kw["q"][..., :32]), ValueError,
                 r"^k / v head_dim 64 must equal q's head_dim 32", id="head_dim-mismatch"),
    pytest.param(call(NP, q=lambda kw: kw["q"][..., :32]), ValueError,
                 r"^k / v head_dim 64 must equal q's head_dim 32", id="nonpaged-head_dim-mismatch"),
    pytest.param(call(Problem(num_heads=3, num_kv_heads=2)), ValueError,
                 r"^q's num_heads \(3\) must be a multiple of the cache's num_kv_heads \(2\)", id="gqa-ratio"),
    pytest.param(call(NP, k=lambda kw: kw["k"][:, :0], v=lambda kw: kw["v"][:, :0]), ValueError,
                 r"^k \[total_k, Hk, D\] must have no empty axis", id="nonpaged-no-kv-heads"),
    # ---- cu_seqlens_k / seqused_k ---------------------------------------------------------------
    pytest.param(call(NP, cu_seqlens_k=lambda kw: kw["cu_seqlens_k"][:-1]), ValueError,
                 r"^cu_seqlens_k must have batch \+ 1 = 5 entries \(as cu_seqlens_q\), got shape \(4,\)",
                 id="cu_k-length"),
    pytest.param(call(NP, cu_seqlens_k=lambda kw: np.asarray(kw["cu_seqlens_k"], np.int64)), TypeError,
                 r"^cu_seqlens_k must be int32 \[batch \+ 1\], got int64", id="cu_k-int64"),
    pytest.param(call(seqused_k=lambda kw: kw["seqused_k"][:3]), ValueError,
                 r"^seqused_k must have batch = 4 entries \(len\(cu_seqlens_q\) - 1\), got shape \(3,\)",
                 id="seqused_k-length"),
    pytest.param(call(seqused_k=lambda kw: kw["seqused_k"].astype(jnp.float32)), TypeError,
                 r"^seqused_k must be int32 \[batch\], got float32", id="seqused_k-float"),
    pytest.param(call(seqused_k=lambda kw: kw["seqused_k"][None]), ValueError,
                 r"^seqused_k must have rank 1, got shape \(1, 4\)", id="seqused_k-rank"),
    # ---- max_seqlen_q / max_seqlen_k ------------------------------------------------------------
    pytest.param(traced("max_seqlen_q", 5), TypeError,
                 r"^max_seqlen_q must be a static Python int .*got a traced value", id="max_seqlen_q-traced"),
    pytest.param(traced("max_seqlen_k", 50), TypeError,
                 r"^max_seqlen_k must be a static Python int .*got a traced value", id="max_seqlen_k-traced"),
    pytest.param(call(max_seqlen_q=5.0), TypeError, r"^max_seqlen_q must be a Python int or None, got float",
                 id="max_seqlen_q-float"),
    pytest.param(call(max_seqlen_k=True), TypeError, r"^max_seqlen_k must be a Python int or None, got bool",
                 id="max_seqlen_k-bool"),
    pytest.param(call(max_seqlen_q=jnp.int32(5)), TypeError,
                 r"^max_seqlen_q must be a Python int or None, got ArrayImpl", id="max_seqlen_q-array"),
    pytest.param(call(max_seqlen_k=-1), ValueError, r"^max_seqlen_k must be >= 0, got -1", id="max_seqlen_k-neg"),
    # ---- softmax_scale / softcap ----------------------------------------------------------------
    pytest.param(call(softmax_scale=0.0), ValueError, r"^softmax_scale must be a finite positive float, got 0\.0",
                 id="scale-zero"),
    pytest.param(call(softmax_scale=-0.125), ValueError,
                 r"^softmax_scale must be a finite positive float, got -0\.125", id="scale-negative"),
    pytest.param(call(softmax_scale=float("nan")), ValueError,
                 r"^softmax_scale must be a finite positive float, got nan", id="scale-nan"),
    pytest.param(call(softmax_scale=float("inf")), ValueError,
                 r"^softmax_scale must be a finite positive float, got inf", id="scale-inf"),
    pytest.param(traced("softmax_scale", 0.125), TypeError,
                 r"^softmax_scale must be a static Python float, got a traced value", id="scale-traced"),
    pytest.param(call(softmax_scale="0.125"), TypeError, r"^softmax_scale must be a float, got str",
                 id="scale-str"),
    pytest.param(call(softcap=-1.0), ValueError, r"^softcap must be a finite non-negative float, got -1\.0",
                 id="softcap-negative"),
    pytest.param(call(softcap=float("inf")), ValueError, r"^softcap must be a finite non-negative float, got inf",
                 id="softcap-inf"),
    pytest.param(call(softcap=True), TypeError, r"^softcap must be a float, got bool", id="softcap-bool"),
    pytest.param(traced("softcap", 30.0), TypeError, r"^softcap must be a static Python float, got a traced value",
                 id="softcap-traced"),
    # ---- causal / return_softmax_lse ------------------------------------------------------------
    pytest.param(call(causal=1), TypeError, r"^causal must be a bool, got int", id="causal-int"),
    pytest.param(call(causal="yes"), TypeError, r"^causal must be a bool, got str", id="causal-str"),
    pytest.param(traced("causal", True), TypeError, r"^causal must be a static Python bool, got a traced value",
                 id="causal-traced"),
    pytest.param(call(return_softmax_lse=None), TypeError, r"^return_softmax_lse must be a bool, got NoneType",
                 id="return_lse-None"),
    # ---- window_size ----------------------------------------------------------------------------
    pytest.param(call(window_size=8), TypeError,
                 r"^window_size must be a pair of ints \(left, right\), -1 for unbounded, got 8", id="window-int"),
    pytest.param(call(window_size=(1, 2, 3)), TypeError, r"^window_size must be a pair of ints .*got \(1, 2, 3\)",
                 id="window-triple"),
    pytest.param(call(window_size=(8.0, -1)), TypeError, r"^window_size must be a pair of ints .*got \(8\.0, -1\)",
                 id="window-float"),
    pytest.param(call(window_size=(True, -1)), TypeError, r"^window_size must be a pair of ints .*got \(True, -1\)",
                 id="window-bool"),
    pytest.param(call(window_size=np.array([8, -1])), TypeError, r"^window_size must be a pair of ints",
                 id="window-array"),
    pytest.param(call(window_size=(-2, -1)), ValueError,
                 r"^window_size entries must be >= -1 \(-1 = unbounded\), got \(-2, -1\)", id="window-left-neg"),
    pytest.param(call(window_size=(4, -5)), ValueError,
                 r"^window_size entries must be >= -1 \(-1 = unbounded\), got \(4, -5\)", id="window-right-neg"),
    pytest.param(traced("window_size", jnp.int32(8), wrap=lambda x: (x, -1)), TypeError,
                 r"^window_size must be static Python ints \(left, right\), got a traced value", id="window-traced"),
    # ---- alibi_slopes ---------------------------------------------------------------------------
    pytest.param(call(H8, alibi_slopes=jnp.ones((8,), jnp.float16)), TypeError,
                 r"^alibi_slopes must be float32 \[num_heads\] or \[batch, num_heads\], got float16",
                 id="alibi-f16"),
    pytest.param(call(H8, alibi_slopes=[0.1] * 8), TypeError, r"^alibi_slopes must be an array, got list",
                 id="alibi-list"),
    pytest.param(call(H8, alibi_slopes=jnp.ones((5,), jnp.float32)), ValueError,
                 r"^alibi_slopes must be \[num_heads\]=\(8,\) or \[batch, num_heads\]=\(4, 8\), got \(5,\)",
                 id="alibi-length"),
    pytest.param(call(H8, alibi_slopes=jnp.ones((8, 4), jnp.float32)), ValueError,
                 r"^alibi_slopes must be \[num_heads\]=\(8,\) or \[batch, num_heads\]=\(4, 8\), got \(8, 4\)",
                 id="alibi-transposed"),
    pytest.param(call(H8, alibi_slopes=jnp.ones((4, 8, 1), jnp.float32)), ValueError,
                 r"^alibi_slopes must be \[num_heads\].*got \(4, 8, 1\)", id="alibi-rank3"),
    # ---- named layouts: K / V arrays ------------------------------------------------------------
    pytest.param(call(FPM, v=lambda kw: kw["k"]), ValueError,
                 r"^kv_layout='fused_page_major' keeps K and V in one array: pass it as k and v=None",
                 id="fused_page_major-with-v"),
    pytest.param(call(FKM, v=lambda kw: kw["k"]), ValueError,
                 r"^kv_layout='fused_kv_major' keeps K and V in one array", id="fused_kv_major-with-v"),
    pytest.param(call(v=None), ValueError,
                 r"^v is None, but kv_layout='NHD' takes separate k and v arrays; pass v, or use", id="NHD-v-None"),
    pytest.param(call(Problem(layout="HND"), v=None), ValueError,
                 r"^v is None, but kv_layout='HND' takes separate k and v arrays", id="HND-v-None"),
    pytest.param(call(v=lambda kw: kw["v"][:-1]), ValueError,
                 r"^v must have the shape of k for kv_layout='NHD': k \(13, 16, 2, 64\), v \(12, 16, 2, 64\)",
                 id="NHD-v-shape"),
    pytest.param(call(Problem(layout="HND"), v=lambda kw: kw["v"][:, :1]), ValueError,
                 r"^v must have the shape of k for kv_layout='HND'", id="HND-v-shape"),
    pytest.param(call(k=lambda kw: kw["k"][:0], v=lambda kw: kw["v"][:0]), ValueError,
                 r"^k for kv_layout='NHD' must have no empty axis .*got shape \(0, 16, 2, 64\)", id="NHD-no-pages"),
    pytest.param(call(FKM, k=lambda kw: kw["k"][:, :, :0]), ValueError,
                 r"^k for kv_layout='fused_kv_major' must have no empty axis .*got shape \(2, 13, 0, 2, 64\)",
                 id="fused_kv_major-no-tokens"),
    pytest.param(call(FPM, k=lambda kw: jnp.concatenate([kw["k"], kw["k"][:, :1]], axis=1)), ValueError,
                 r"^k for kv_layout='fused_page_major' must have 2 at axis 1 \(K, V\), got \(13, 3, 16, 2, 64\)",
                 id="fused_page_major-axis1"),
    pytest.param(call(FKM, k=lambda kw: kw["k"][:1]), ValueError,
                 r"^k for kv_layout='fused_kv_major' must have 2 at axis 0 \(K, V\), got \(1, 13, 16, 2, 64\)",
                 id="fused_kv_major-axis0"),
    # ---- named layouts: rank, with and without layer= ------------------------------------------
    *[pytest.param(call(Problem(layout=name), k=lambda kw: kw["k"][0],
                        v=None if name.startswith("fused") else (lambda kw: kw["v"][0])),
                   ValueError, rf"^k for kv_layout='{name}' must be \[{axes}\] \(rank {rank}\), got shape \(",
                   id=f"{name}-k-rank")
      for name, axes, rank in (
          ("NHD", r"num_blocks, block_size, num_kv_heads, head_dim", 4),
          ("HND", r"num_blocks, num_kv_heads, block_size, head_dim", 4),
          ("fused_page_major", r"num_blocks, 2, block_size, num_kv_heads, head_dim", 5),
          ("fused_kv_major", r"2, num_blocks, block_size, num_kv_heads, head_dim", 5))],
    pytest.param(call(STACKED, layer=DROP), ValueError,
                 r"^k for kv_layout='NHD' must be .*\(rank 4\), got shape \(3, 13, 16, 2, 64\); a layer-stacked "
                 r"cache \[num_layers, \.\.\.\] also needs layer=", id="stacked-without-layer"),
    pytest.param(call(layer=0), ValueError,
                 r"^k for kv_layout='NHD' with layer= must be \[num_layers, num_blocks, .*\(rank 5\), got shape "
                 r"\(13, 16, 2, 64\); with layer= the cache needs a leading \[num_layers\] axis",
                 id="layer-on-unstacked"),
    pytest.param(call(STACKED, v=lambda kw: kw["v"][:2]), ValueError,
                 r"^with layer= k and v must have the same number of layers \(axis 0\): k \(3, 13, 16, 2, 64\), "
                 r"v \(2, 13, 16, 2, 64\)", id="stacked-layer-count"),
    pytest.param(call(Problem(layout="stacked_strided"), k=lambda kw: kw["k"].reshape(-1),
                      v=lambda kw: kw["v"].reshape(-1)), ValueError,
                 r"^with layer= the cache k must be \[num_layers >= 1, \.\.\.\], got shape \(\d+,\)",
                 id="stacked-custom-flat"),
    pytest.param(call(STACKED, k=lambda kw: kw["k"][:0], v=lambda kw: kw["v"][:0]), ValueError,
                 r"^with layer= the cache k must be \[num_layers >= 1, \.\.\.\], got shape \(0, 13, 16, 2, 64\)",
                 id="stacked-no-layers"),
    # A traced layer is clamped into [0, num_layers): with no layer at all that read would be outside.
    pytest.param(traced("layer", jnp.int32(0), Problem(layout="stacked_fused_kv_major"), k=lambda kw: kw["k"][:0]),
                 ValueError, r"^with layer= the cache k must be \[num_layers >= 1", id="stacked-traced-no-layers"),
    # ---- custom KVCacheLayout against its buffers ----------------------------------------------
    pytest.param(call(STRIDED, kv_layout=lambda kw: kw["kv_layout"].with_layers(3, 1024)), ValueError,
                 r"^pass an unstacked KVCacheLayout; layer= and the arrays' leading axis stack it",
                 id="custom-prestacked"),
    pytest.param(call(STRIDED, kv_layout=lambda kw: custom(page_stride=2 * BS * ROW, fused=True)), ValueError,
                 r"^KVCacheLayout\(fused=True\) needs v=None \(V in the k buffer\), got v of shape",
                 id="custom-fused-with-v"),
    pytest.param(call(STRIDED, v=None), ValueError,
                 r"^KVCacheLayout\(fused=False\) needs a v array, got v=None", id="custom-unfused-v-None"),
    pytest.param(call(STRIDED, kv_layout=custom(k_offset=10**6 * D)), ValueError,
                 r"^kv_layout KVCacheLayout\(.*\) addresses no whole page inside k \(size \d+\) / v \(size \d+\)",
                 id="custom-offset-past-buffer"),
    pytest.param(call(STRIDED, kv_layout=custom(page_stride=2 * BS * ROW, num_pages=100)), ValueError,
                 r"^kv_layout addresses \d+ elements of k \(page 99 ends there\) but k holds \d+",
                 id="custom-too-many-pages-k"),
    pytest.param(call(STRIDED, kv_layout=custom(num_pages=26), v=lambda kw: kw["v"][:-1]), ValueError,
                 r"^kv_layout addresses \d+ elements of v \(page 25 ends there\) but v holds \d+",
                 id="custom-too-many-pages-v"),
    pytest.param(call(STRIDED, kv_layout=custom(num_pages=26), k=_flat_plus(3), v=_flat_plus(3)), ValueError,
                 r"^k holds \d+ elements, not a whole number of head_dim=64 rows", id="custom-k-partial-row"),
    pytest.param(call(STRIDED, kv_layout=custom(num_pages=26), v=_flat_plus(5)), ValueError,
                 r"^v holds \d+ elements, not a whole number of head_dim=64 rows", id="custom-v-partial-row"),
    pytest.param(call(STRIDED, kv_layout=custom(head_dim=32, token_stride=ROW, head_stride=D,
                                                page_stride=BS * ROW)), ValueError,
                 r"^k / v head_dim 32 must equal q's head_dim 64", id="custom-head_dim-mismatch"),
    # ---- KVCacheLayout fields -------------------------------------------------------------------
    pytest.param(just(custom, block_size=0), ValueError, r"^KVCacheLayout\.block_size must be a positive int, got 0",
                 id="layout-block_size-0"),
    pytest.param(just(custom, num_kv_heads=-2), ValueError,
                 r"^KVCacheLayout\.num_kv_heads must be a positive int, got -2", id="layout-heads-neg"),
    pytest.param(just(custom, head_dim=64.0), ValueError, r"^KVCacheLayout\.head_dim must be a positive int, got 64\.0",
                 id="layout-head_dim-float"),
    pytest.param(just(custom, page_stride=True), ValueError,
                 r"^KVCacheLayout\.page_stride must be a positive int, got True", id="layout-page_stride-bool"),
    pytest.param(just(custom, token_stride=-D), ValueError,
                 r"^KVCacheLayout\.token_stride must be a non-negative int, got -64", id="layout-token_stride-neg"),
    pytest.param(just(custom, k_offset=1.5), ValueError, r"^KVCacheLayout\.k_offset must be a non-negative int, got 1\.5",
                 id="layout-k_offset-float"),
    pytest.param(just(custom, head_stride=D // 2), ValueError,
                 r"^KVCacheLayout\.head_stride=32 must be a multiple of head_dim=64: a layout addresses whole rows",
                 id="layout-head_stride-partial"),
    pytest.param(just(custom, v_offset=D + 1), ValueError,
                 r"^KVCacheLayout\.v_offset=65 must be a multiple of head_dim=64", id="layout-v_offset-partial"),
    pytest.param(just(custom, layer_stride=100), ValueError,
                 r"^KVCacheLayout\.layer_stride=100 must be a multiple of head_dim=64", id="layout-layer_stride-partial"),
    pytest.param(just(custom, page_stride=BS * ROW + 1), ValueError,
                 r"^KVCacheLayout\.page_stride=2049 must be a multiple of head_dim=64", id="layout-page_stride-partial"),
    pytest.param(just(custom, num_pages=0), ValueError,
                 r"^KVCacheLayout\.num_pages must be a positive int or None, got 0", id="layout-num_pages-0"),
    pytest.param(just(custom, num_pages=True), ValueError,
                 r"^KVCacheLayout\.num_pages must be a positive int or None, got True", id="layout-num_pages-bool"),
    pytest.param(just(custom, fused="yes"), TypeError, r"^KVCacheLayout\.fused must be a bool, got str",
                 id="layout-fused-str"),
    pytest.param(just(custom, num_layers=-1), ValueError,
                 r"^KVCacheLayout\.num_layers must be a non-negative int, got -1", id="layout-num_layers-neg"),
    # ---- backend / config -----------------------------------------------------------------------
    pytest.param(call(backend=3), TypeError,
                 r"^backend must be a str, one of \('auto', 'xla', 'pallas', 'triton'\), got int", id="backend-int"),
    pytest.param(call(backend="cuda"), ValueError,
                 r"^backend must be one of \('auto', 'xla', 'pallas', 'triton'\), got 'cuda'", id="backend-unknown"),
    pytest.param(_triton_unavailable, ValueError,
                 r"^backend='triton' cannot run here: .*\. Available here: \[.*'xla'.*\]", id="backend-unavailable"),
    pytest.param(call(config=dict(block_q=16)), TypeError,
                 r"^config for backend='xla' must be a jax_varlen_attn\.backends\.xla\.config\.Config, got dict",
                 id="config-type"),
]


@pytest.mark.parametrize("thunk,exc,match", CASES)
def test_rejects(thunk, exc, match):
  with pytest.raises(exc, match=match) as info:
    thunk()
  assert type(info.value) is exc  # not a subclass raised from somewhere deeper


# ---- the valid neighbours of the cases above are accepted -------------------------------------------

@pytest.mark.parametrize("problem,changes", [
    pytest.param(Problem(), {}, id="NHD"),
    pytest.param(Problem(layout="HND"), {}, id="HND"),
    pytest.param(FPM, {}, id="fused_page_major"),
    pytest.param(FKM, {}, id="fused_kv_major"),
    pytest.param(STRIDED, {}, id="strided"),
    pytest.param(STACKED, {}, id="stacked_NHD"),
    pytest.param(Problem(layout="stacked_strided"), {}, id="stacked_strided"),
    pytest.param(NP, {}, id="nonpaged"),
    pytest.param(H8, dict(alibi_slopes=jnp.ones((4, 8), jnp.float32)), id="alibi-batch"),
    pytest.param(Problem(), dict(cu_seqlens_k=lambda kw: jnp.asarray(
        np.concatenate([[0], np.cumsum(kw["seqused_k"])]), jnp.int32), seqused_k=DROP), id="paged-lengths-from-cu_k"),
    pytest.param(Problem(), dict(max_seqlen_q=np.int64(17), max_seqlen_k=0, causal=np.bool_(True),
                                 window_size=[np.int32(8), -1], softmax_scale=np.float32(0.1), softcap=50),
                 id="numpy-scalars"),
    pytest.param(Problem(), dict(softmax_scale=1), id="int-scale"),
    pytest.param(STACKED, dict(layer=np.int64(2)), id="layer-np-int64"),
    pytest.param(STACKED, dict(layer=jnp.asarray(0, jnp.int32)), id="layer-array"),
    pytest.param(Problem(head_dim=32), {}, id="head_dim-32"),
    pytest.param(Problem(head_dim=256), {}, id="head_dim-256"),
    pytest.param(Problem(num_heads=6, num_kv_heads=1), {}, id="mqa"),
    pytest.param(Problem(pad_q=0, seqlens_q=(0, 0, 0, 1)), {}, id="one-query"),
])
def test_accepts(problem, changes):
  kw = _kwargs(problem, changes)
  out, lse = jax.eval_shape(lambda: flash_attn_varlen_func(**kw))
  assert out.shape == kw["q"].shape and out.dtype == kw["q"].dtype
  assert lse.shape == (kw["q"].shape[1], kw["q"].shape[0]) and lse.dtype == jnp.float32


def test_traced_layer_is_accepted():
  """layer= is the one index that may be traced (a decoder scans over layers)."""
  kw = _kwargs(STACKED, {})
  f = jax.jit(lambda layer: flash_attn_varlen_func(**{**kw, "layer": layer})[0])
  assert f.lower(jnp.int32(1)).out_info.shape == kw["q"].shape


# ---- every raise is reached ---------------------------------------------------------------------

def _raises(module, function=None):
  """{(file, first line, last line, source)} of every `raise` in `module` (or in one of its functions)."""
  path = inspect.getsourcefile(module)
  source = open(path).read()
  tree = ast.parse(source)
  if function is not None:
    tree = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
  lines = source.splitlines()
  return {(path, n.lineno, n.end_lineno, lines[n.lineno - 1].strip())
          for n in ast.walk(tree) if isinstance(n, ast.Raise)}


def test_every_raise_is_reached():
  targets = (_raises(api) | _raises(layout_mod) | _raises(registry, "select"))
  files = {path for path, *_ in targets}
  hit = set()

  def local(frame, event, arg):
    if event == "line":
      hit.add((frame.f_code.co_filename, frame.f_lineno))
    return local

  def tracer(frame, event, arg):
    return local if frame.f_code.co_filename in files else None

  old = sys.gettrace()
  sys.settrace(tracer)
  try:
    for param in CASES:
      try:
        param.values[0]()
      except (ValueError, TypeError):
        pass
  finally:
    sys.settrace(old)
  missed = sorted((os.path.basename(path), first, text) for path, first, last, text in targets
                  if not any((path, line) in hit for line in range(first, last + 1)))
  assert not missed, "raises no case reaches:\n" + textwrap.indent(
      "\n".join(f"{f}:{n}: {t}" for f, n, t in missed), "  ")


def test_huge_window_is_unbounded():
  """A window wider than any sequence ("infinite": 2**40, 2**62) is unbounded, not an int32 overflow."""
  kw, oracle = make_problem(Problem(window=(2**40, 2**62)))
  out, _ = flash_attn_varlen_func(**kw, backend="xla")
  ref, _ = reference_attention(**oracle)
  assert rel_err(out, ref) < TOLERANCE["float16"]
