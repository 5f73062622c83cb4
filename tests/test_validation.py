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

from jax_varlen_attn import KVCacheLayout, api, flash_attn_varlen_func, layout as layout_mod, validation
from jax_varlen_attn import backends as registry
from jax_varlen_attn.layout import resolve
from tests.oracle import reference_attention
from tests.problems import TOLERANCE, Problem, make_problem, out_dtype, rel_err

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


def grad_of_q(problem=None):
  """A thunk: jax.grad of a valid problem's output sum with respect to q."""
  def thunk():
    kw = _kwargs(problem or Problem(), {})
    q = kw.pop("q")
    return jax.grad(lambda q: flash_attn_varlen_func(q=q, **kw).astype(jnp.float32).sum())(q)
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


def case(name, exc, match, thunk):
  """One row of the table: `thunk()` raises `exc` whose message matches `match` (from its start)."""
  return pytest.param(thunk, exc, match, id=name)


NP = Problem(paged=False)
STACKED = Problem(layout="stacked_NHD")
STRIDED = Problem(layout="strided")
FPM = Problem(layout="fused_page_major")
FKM = Problem(layout="fused_kv_major")
H8 = Problem(num_heads=8)  # H = 8 differs from batch = 4, so alibi messages are unambiguous
FP8 = Problem(kv_dtype="float8_e4m3fn")
FP8Q = Problem(dtype="float8_e4m3fn", kv_dtype="float8_e4m3fn")
D, HK, BS = 64, 2, 16  # head_dim, kv heads, page size of the default Problem
ROW = HK * D  # elements of one token of one page (NHD)


def custom(**fields):
  """A KVCacheLayout for the default Problem's NHD pages, with `fields` changed."""
  return KVCacheLayout(**{**dict(block_size=BS, num_kv_heads=HK, head_dim=D, page_stride=BS * ROW), **fields})


def _flat_plus(extra):
  """k / v as one flat buffer with `extra` elements appended."""
  return lambda kw: jnp.concatenate([kw["k"].reshape(-1), jnp.zeros((extra,), kw["k"].dtype)])


# Where the raises live: validation.py (validate and its helpers array_arg, int32_arg, static_int,
# static_float, static_bool, window, layer_arg, descale), api.py (the config check), layout.py
# (KVCacheLayout.__post_init__, resolve, _named, _with_page_count, _check_fits) and backends.select.
# test_every_raise_is_reached is the exact list: it names any raise no case below reaches.
CASES = [
    # ---- q --------------------------------------------------------------------------------------
    case("q-list", TypeError, r"^q must be an array, got list",
         call(q=lambda kw: np.asarray(kw["q"]).tolist())),
    case("q-rank", ValueError, r"^q must have rank 3, got shape \(4, 64\)",
         call(q=lambda kw: kw["q"][0])),
    case("q-int", TypeError,
         r"^q must be float16, bfloat16, float32 or fp8 \(float8_e4m3fn or float8_e5m2\), got int32",
         call(q=lambda kw: kw["q"].astype(jnp.int32))),
    case("head_dim-16", ValueError, r"^q's head_dim \(axis 2\) must be in \[32, 256\], got 16",
         call(Problem(head_dim=16))),
    case("head_dim-264", ValueError, r"^q's head_dim \(axis 2\) must be in \[32, 256\], got 264",
         call(Problem(head_dim=264))),
    case("q-no-heads", ValueError, r"^q must have at least one head, got shape \(26, 0, 64\)",
         call(q=lambda kw: kw["q"][:, :0])),
    case("q-no-rows", ValueError, r"^q must have at least one row \(total_q >= 1.*got shape \(0, 4, 64\)",
         call(q=lambda kw: kw["q"][:0])),
    # ---- cu_seqlens_q ---------------------------------------------------------------------------
    case("cu_q-missing", ValueError, r"^cu_seqlens_q is required: int32 \[batch \+ 1\]",
         call(cu_seqlens_q=DROP)),
    case("cu_q-list", TypeError, r"^cu_seqlens_q must be an array, got list",
         call(cu_seqlens_q=[0, 5, 6, 23, 23])),
    # NumPy arrays keep int64 (jnp would silently make it int32 without x64).
    case("cu_q-int64", TypeError, r"^cu_seqlens_q must be int32 \[batch \+ 1\], got int64",
         call(cu_seqlens_q=lambda kw: np.asarray(kw["cu_seqlens_q"], np.int64))),
    case("cu_q-float", TypeError, r"^cu_seqlens_q must be int32 \[batch \+ 1\], got float32",
         call(cu_seqlens_q=lambda kw: kw["cu_seqlens_q"].astype(jnp.float32))),
    case("cu_q-rank", ValueError, r"^cu_seqlens_q must have rank 1, got shape \(5, 1\)",
         call(cu_seqlens_q=lambda kw: kw["cu_seqlens_q"][:, None])),
    case("cu_q-too-short", ValueError, r"^cu_seqlens_q must have batch \+ 1 >= 2 entries, got shape \(1,\)",
         call(cu_seqlens_q=jnp.zeros((1,), jnp.int32))),
    # ---- k / v dtypes ---------------------------------------------------------------------------
    case("k-list", TypeError, r"^k must be an array, got list",
         call(k=lambda kw: np.asarray(kw["k"]).tolist())),
    case("v-list", TypeError, r"^v must be an array, got list",
         call(v=lambda kw: np.asarray(kw["v"]).tolist())),
    case("k-dtype", TypeError,
         r"^k must have q's dtype float16 or be an fp8 cache \(float8_e4m3fn or float8_e5m2\), got float32",
         call(k=lambda kw: kw["k"].astype(jnp.float32))),
    case("k-int8", TypeError, r"^k must have q's dtype float16 or be an fp8 cache .*got int8",
         call(k=lambda kw: kw["k"].astype(jnp.int8))),
    case("v-dtype", TypeError, r"^v must have k's dtype float16, got bfloat16",
         call(v=lambda kw: kw["v"].astype(jnp.bfloat16))),
    case("v-fp8-k-f16", TypeError, r"^v must have k's dtype float16, got float8_e4m3fn",
         call(v=lambda kw: kw["v"].astype(jnp.float8_e4m3fn))),
    case("v-e5m2-k-e4m3", TypeError, r"^v must have k's dtype float8_e4m3fn, got float8_e5m2",
         call(FP8, v=lambda kw: kw["v"].astype(jnp.float8_e5m2))),
    case("nonpaged-k-dtype", TypeError, r"^k must have q's dtype float16 or be an fp8 cache",
         call(NP, k=lambda kw: kw["k"].astype(jnp.float32), v=lambda kw: kw["v"].astype(jnp.float32))),
    case("q-fp8-cache-f16", TypeError,
         r"^q is float8_e4m3fn: an fp8 q needs an fp8 cache, k float8_e4m3fn or float8_e5m2, got float16",
         call(q=lambda kw: kw["q"].astype(jnp.float8_e4m3fn))),
    # ---- descales (fp8) -------------------------------------------------------------------------
    case("k_descale-f16", TypeError,
         r"^k_descale must be float32 \[batch, num_kv_heads\]=\(4, 2\) or a scalar, got float16",
         call(FP8, k_descale=jnp.ones((4, 2), jnp.float16))),
    case("v_descale-list", TypeError, r"^v_descale must be an array, got list",
         call(FP8, v_descale=[[1.0, 1.0]] * 4)),
    case("k_descale-transposed", ValueError,
         r"^k_descale must be \[batch, num_kv_heads\]=\(4, 2\) or a scalar \(shape \(\) or \(1,\)\), "
         r"got \(2, 4\)",
         call(FP8, k_descale=jnp.ones((2, 4), jnp.float32))),
    case("q_descale-per-q-head", ValueError,
         r"^q_descale must be \[batch, num_kv_heads\]=\(4, 2\).*got \(4, 4\)",
         call(FP8Q, q_descale=jnp.ones((4, 4), jnp.float32))),
    # Checked also where they are ignored (a cache in q's dtype), so a wrong shape is never silent.
    case("k_descale-f16-cache-bool", TypeError, r"^k_descale must be an array, got bool",
         call(k_descale=True)),
    case("q_descale-f16-q-shape", ValueError, r"^q_descale must be \[batch, num_kv_heads\]=\(4, 2\)",
         call(q_descale=jnp.ones((3,), jnp.float32))),
    # ---- s_aux (sinks) --------------------------------------------------------------------------
    case("s_aux-bf16", TypeError, r"^s_aux must be float32 \[num_heads\], got bfloat16",
         call(H8, s_aux=jnp.zeros((8,), jnp.bfloat16))),
    case("s_aux-list", TypeError, r"^s_aux must be an array, got list",
         call(H8, s_aux=[0.0] * 8)),
    case("s_aux-kv-heads", ValueError,
         r"^s_aux must be \[num_heads\]=\(8,\), one sink logit per q head, got \(2,\)",
         call(H8, s_aux=jnp.zeros((2,), jnp.float32))),
    case("s_aux-per-row", ValueError, r"^s_aux must be \[num_heads\]=\(8,\).*got \(4, 8\)",
         call(H8, s_aux=jnp.zeros((4, 8), jnp.float32))),
    # ---- kv_layout (type, name) ------------------------------------------------------------------
    case("kv_layout-unknown", ValueError,
         r"^kv_layout must be one of \('NHD', 'HND', 'fused_page_major', 'fused_kv_major'\) or a "
         r"KVCacheLayout, got 'nhd'",
         call(kv_layout="nhd")),
    case("nonpaged-kv_layout-unknown", ValueError, r"^kv_layout must be one of .*got 'nhd'",
         call(NP, kv_layout="nhd")),
    case("kv_layout-None", TypeError, r"^kv_layout must be a str or KVCacheLayout, got NoneType",
         call(kv_layout=None)),
    case("resolve-unknown", ValueError, r"^kv_layout must be one of .*got 'nhd'",
         just(resolve, "nhd", (4, 16, 2, 64), (4, 16, 2, 64), stacked=False)),
    case("resolve-type", TypeError, r"^kv_layout must be a str or KVCacheLayout, got int",
         just(resolve, 0, (4, 16, 2, 64), (4, 16, 2, 64), stacked=False)),
    # ---- block_table ----------------------------------------------------------------------------
    case("block_table-rank", ValueError, r"^block_table must have rank 2, got shape \(5,\)",
         call(block_table=lambda kw: kw["block_table"][0])),
    case("block_table-rows", ValueError,
         r"^block_table must have batch=4 rows \(len\(cu_seqlens_q\) - 1\), got shape \(2, 5\)",
         call(block_table=lambda kw: kw["block_table"][:2])),
    case("block_table-int64", TypeError, r"^block_table must be int32 \[batch, max_blocks\], got int64",
         call(block_table=lambda kw: np.asarray(kw["block_table"], np.int64))),
    case("block_table-no-columns", ValueError,
         r"^block_table must have at least one column \(max_blocks >= 1\)",
         call(block_table=lambda kw: kw["block_table"][:, :0])),
    # ---- layer ----------------------------------------------------------------------------------
    case("layer-too-big", ValueError, r"^layer must be in \[0, 3\) \(axis 0 of k\), got 3",
         call(STACKED, layer=3)),
    case("layer-negative", ValueError, r"^layer must be in \[0, 3\) \(axis 0 of k\), got -1",
         call(STACKED, layer=np.array(-1, np.int32))),
    case("layer-bool", TypeError, r"^layer must be an int32 scalar, got bool",
         call(STACKED, layer=True)),
    case("layer-float", TypeError, r"^layer must be an int32 scalar .*got float",
         call(STACKED, layer=1.0)),
    case("layer-int64", TypeError, r"^layer must be an int32 scalar, got int64",
         call(STACKED, layer=np.array(1, np.int64))),
    case("layer-rank", ValueError, r"^layer must have rank 0, got shape \(1,\)",
         call(STACKED, layer=jnp.ones((1,), jnp.int32))),
    case("layer-nonpaged", ValueError, r"^layer= selects a layer of a stacked paged cache: pass block_table",
         call(NP, layer=0)),
    # ---- paged / non-paged ----------------------------------------------------------------------
    case("paged-no-lengths", ValueError, r"^a paged cache \(block_table\) needs seqused_k: int32 \[batch\]",
         call(seqused_k=DROP)),
    case("nonpaged-no-cu_k", ValueError,
         r"^cu_seqlens_k is required without block_table: int32 \[batch \+ 1\]",
         call(NP, cu_seqlens_k=DROP)),
    case("nonpaged-HND", ValueError,
         r"^kv_layout='HND' describes a paged cache: pass block_table, or leave kv_layout at 'NHD'",
         call(NP, kv_layout="HND")),
    case("nonpaged-custom-layout", ValueError, r"^kv_layout=KVCacheLayout\(.*describes a paged cache",
         call(NP, kv_layout=custom())),
    case("nonpaged-v-None", ValueError, r"^v is None: non-paged attention needs v \[total_k, Hk, D\]",
         call(NP, v=None)),
    case("nonpaged-k-rank", ValueError, r"^k must have rank 3, got shape \(1, 98, 2, 64\)",
         call(NP, k=lambda kw: kw["k"][None], v=lambda kw: kw["v"][None])),
    case("nonpaged-k-empty", ValueError,
         r"^k \[total_k, Hk, D\] must have no empty axis, got shape \(0, 2, 64\)",
         call(NP, k=lambda kw: kw["k"][:0], v=lambda kw: kw["v"][:0])),
    case("nonpaged-v-shape", ValueError, r"^v must have k's shape \(98, 2, 64\), got \(97, 2, 64\)",
         call(NP, v=lambda kw: kw["v"][:-1])),
    # ---- heads ----------------------------------------------------------------------------------
    case("head_dim-mismatch", ValueError, r"^k / v head_dim 64 must equal q's head_dim 32",
         call(q=lambda kw: kw["q"][..., :32])),
    case("nonpaged-head_dim-mismatch", ValueError, r"^k / v head_dim 64 must equal q's head_dim 32",
         call(NP, q=lambda kw: kw["q"][..., :32])),
    case("gqa-ratio", ValueError,
         r"^q's num_heads \(3\) must be a multiple of the cache's num_kv_heads \(2\)",
         call(Problem(num_heads=3, num_kv_heads=2))),
    case("HND-on-an-NHD-cache", ValueError,  # Hk read as block_size: the message names the reading
         r"^q's num_heads \(4\) must be a multiple of the cache's num_kv_heads \(16\) \(GQA/MQA\), read "
         r"from k's shape \(\d+, 16, 2, 64\) as kv_layout='HND' \[num_blocks, num_kv_heads, block_size, "
         r"head_dim\]", call(kv_layout="HND")),
    case("nonpaged-no-kv-heads", ValueError, r"^k \[total_k, Hk, D\] must have no empty axis",
         call(NP, k=lambda kw: kw["k"][:, :0], v=lambda kw: kw["v"][:, :0])),
    # ---- cu_seqlens_k / seqused_k ---------------------------------------------------------------
    case("cu_k-length", ValueError,
         r"^cu_seqlens_k must have batch \+ 1 = 5 entries \(as cu_seqlens_q\), got shape \(4,\)",
         call(NP, cu_seqlens_k=lambda kw: kw["cu_seqlens_k"][:-1])),
    case("cu_k-int64", TypeError, r"^cu_seqlens_k must be int32 \[batch \+ 1\], got int64",
         call(NP, cu_seqlens_k=lambda kw: np.asarray(kw["cu_seqlens_k"], np.int64))),
    case("seqused_k-length", ValueError,
         r"^seqused_k must have batch = 4 entries \(len\(cu_seqlens_q\) - 1\), got shape \(3,\)",
         call(seqused_k=lambda kw: kw["seqused_k"][:3])),
    case("seqused_k-float", TypeError, r"^seqused_k must be int32 \[batch\], got float32",
         call(seqused_k=lambda kw: kw["seqused_k"].astype(jnp.float32))),
    case("seqused_k-rank", ValueError, r"^seqused_k must have rank 1, got shape \(1, 4\)",
         call(seqused_k=lambda kw: kw["seqused_k"][None])),
    # ---- max_seqlen_q / max_seqlen_k ------------------------------------------------------------
    case("max_seqlen_q-traced", TypeError, r"^max_seqlen_q must be a static Python int .*got a traced value",
         traced("max_seqlen_q", 5)),
    case("max_seqlen_k-traced", TypeError, r"^max_seqlen_k must be a static Python int .*got a traced value",
         traced("max_seqlen_k", 50)),
    case("max_seqlen_q-float", TypeError, r"^max_seqlen_q must be a Python int or None, got float",
         call(max_seqlen_q=5.0)),
    case("max_seqlen_k-bool", TypeError, r"^max_seqlen_k must be a Python int or None, got bool",
         call(max_seqlen_k=True)),
    case("max_seqlen_q-array", TypeError, r"^max_seqlen_q must be a Python int or None, got ArrayImpl",
         call(max_seqlen_q=jnp.int32(5))),
    case("max_seqlen_k-neg", ValueError, r"^max_seqlen_k must be >= 0, got -1",
         call(max_seqlen_k=-1)),
    case("max_seqlen_q-cu-array", TypeError,
         r"^max_seqlen_q must be a Python int or None, got ArrayImpl; the positional order is vLLM's",
         call(max_seqlen_q=lambda kw: kw["cu_seqlens_q"])),
    # ---- derivatives ----------------------------------------------------------------------------
    case("grad", TypeError, r"^flash_attn_varlen_func is forward-only",
         grad_of_q()),
    # ---- softmax_scale / softcap ----------------------------------------------------------------
    case("scale-zero", ValueError, r"^softmax_scale must be a finite positive float, got 0\.0",
         call(softmax_scale=0.0)),
    case("scale-negative", ValueError, r"^softmax_scale must be a finite positive float, got -0\.125",
         call(softmax_scale=-0.125)),
    case("scale-nan", ValueError, r"^softmax_scale must be a finite positive float, got nan",
         call(softmax_scale=float("nan"))),
    case("scale-inf", ValueError, r"^softmax_scale must be a finite positive float, got inf",
         call(softmax_scale=float("inf"))),
    case("scale-traced", TypeError, r"^softmax_scale must be a static Python float, got a traced value",
         traced("softmax_scale", 0.125)),
    case("scale-str", TypeError, r"^softmax_scale must be a float, got str",
         call(softmax_scale="0.125")),
    case("softcap-negative", ValueError, r"^softcap must be a finite non-negative float, got -1\.0",
         call(softcap=-1.0)),
    case("softcap-inf", ValueError, r"^softcap must be a finite non-negative float, got inf",
         call(softcap=float("inf"))),
    case("softcap-bool", TypeError, r"^softcap must be a float, got bool",
         call(softcap=True)),
    case("softcap-traced", TypeError, r"^softcap must be a static Python float, got a traced value",
         traced("softcap", 30.0)),
    # ---- causal / return_softmax_lse ------------------------------------------------------------
    case("causal-int", TypeError, r"^causal must be a bool, got int",
         call(causal=1)),
    case("causal-str", TypeError, r"^causal must be a bool, got str",
         call(causal="yes")),
    case("causal-traced", TypeError, r"^causal must be a static Python bool, got a traced value",
         traced("causal", True)),
    case("return_lse-None", TypeError, r"^return_softmax_lse must be a bool, got NoneType",
         call(return_softmax_lse=None)),
    # ---- window_size ----------------------------------------------------------------------------
    case("window-int", TypeError,
         r"^window_size must be a pair of ints \(left, right\), -1 for unbounded, got 8",
         call(window_size=8)),
    case("window-triple", TypeError, r"^window_size must be a pair of ints .*got \(1, 2, 3\)",
         call(window_size=(1, 2, 3))),
    case("window-float", TypeError, r"^window_size must be a pair of ints .*got \(8\.0, -1\)",
         call(window_size=(8.0, -1))),
    case("window-bool", TypeError, r"^window_size must be a pair of ints .*got \(True, -1\)",
         call(window_size=(True, -1))),
    case("window-array", TypeError, r"^window_size must be a pair of ints",
         call(window_size=np.array([8, -1]))),
    case("window-left-neg", ValueError,
         r"^window_size entries must be >= -1 \(-1 = unbounded\), got \(-2, -1\)",
         call(window_size=(-2, -1))),
    case("window-right-neg", ValueError,
         r"^window_size entries must be >= -1 \(-1 = unbounded\), got \(4, -5\)",
         call(window_size=(4, -5))),
    case("window-traced", TypeError,
         r"^window_size must be static Python ints \(left, right\), got a traced value",
         traced("window_size", jnp.int32(8), wrap=lambda x: (x, -1))),
    # ---- alibi_slopes ---------------------------------------------------------------------------
    case("alibi-f16", TypeError,
         r"^alibi_slopes must be float32 \[num_heads\] or \[batch, num_heads\], got float16",
         call(H8, alibi_slopes=jnp.ones((8,), jnp.float16))),
    case("alibi-list", TypeError, r"^alibi_slopes must be an array, got list",
         call(H8, alibi_slopes=[0.1] * 8)),
    case("alibi-length", ValueError,
         r"^alibi_slopes must be \[num_heads\]=\(8,\) or \[batch, num_heads\]=\(4, 8\), got \(5,\)",
         call(H8, alibi_slopes=jnp.ones((5,), jnp.float32))),
    case("alibi-transposed", ValueError,
         r"^alibi_slopes must be \[num_heads\]=\(8,\) or \[batch, num_heads\]=\(4, 8\), got \(8, 4\)",
         call(H8, alibi_slopes=jnp.ones((8, 4), jnp.float32))),
    case("alibi-rank3", ValueError, r"^alibi_slopes must be \[num_heads\].*got \(4, 8, 1\)",
         call(H8, alibi_slopes=jnp.ones((4, 8, 1), jnp.float32))),
    # ---- named layouts: K / V arrays ------------------------------------------------------------
    case("fused_page_major-with-v", ValueError,
         r"^kv_layout='fused_page_major' keeps K and V in one array: pass it as k and v=None",
         call(FPM, v=lambda kw: kw["k"])),
    case("fused_kv_major-with-v", ValueError, r"^kv_layout='fused_kv_major' keeps K and V in one array",
         call(FKM, v=lambda kw: kw["k"])),
    case("NHD-v-None", ValueError,
         r"^v is None, but kv_layout='NHD' takes separate k and v arrays; pass v, or use",
         call(v=None)),
    case("HND-v-None", ValueError, r"^v is None, but kv_layout='HND' takes separate k and v arrays",
         call(Problem(layout="HND"), v=None)),
    case("NHD-v-shape", ValueError,
         r"^v must have the shape of k for kv_layout='NHD': k \(13, 16, 2, 64\), v \(12, 16, 2, 64\)",
         call(v=lambda kw: kw["v"][:-1])),
    case("HND-v-shape", ValueError, r"^v must have the shape of k for kv_layout='HND'",
         call(Problem(layout="HND"), v=lambda kw: kw["v"][:, :1])),
    case("NHD-no-pages", ValueError,
         r"^k for kv_layout='NHD' must have no empty axis .*got shape \(0, 16, 2, 64\)",
         call(k=lambda kw: kw["k"][:0], v=lambda kw: kw["v"][:0])),
    case("fused_kv_major-no-tokens", ValueError,
         r"^k for kv_layout='fused_kv_major' must have no empty axis .*got shape \(2, 13, 0, 2, 64\)",
         call(FKM, k=lambda kw: kw["k"][:, :, :0])),
    case("fused_page_major-axis1", ValueError,
         r"^k for kv_layout='fused_page_major' must have 2 at axis 1 \(K, V\), got \(13, 3, 16, 2, 64\)",
         call(FPM, k=lambda kw: jnp.concatenate([kw["k"], kw["k"][:, :1]], axis=1))),
    case("fused_kv_major-axis0", ValueError,
         r"^k for kv_layout='fused_kv_major' must have 2 at axis 0 \(K, V\), got \(1, 13, 16, 2, 64\)",
         call(FKM, k=lambda kw: kw["k"][:1])),
    # ---- named layouts: rank, with and without layer= ------------------------------------------
    *[case(f"{name}-k-rank", ValueError,
           rf"^k for kv_layout='{name}' must be \[{axes}\] \(rank {rank}\), got shape \(",
           call(Problem(layout=name), k=lambda kw: kw["k"][0],
                v=None if name.startswith("fused") else (lambda kw: kw["v"][0])))
      for name, axes, rank in (
          ("NHD", "num_blocks, block_size, num_kv_heads, head_dim", 4),
          ("HND", "num_blocks, num_kv_heads, block_size, head_dim", 4),
          ("fused_page_major", "num_blocks, 2, block_size, num_kv_heads, head_dim", 5),
          ("fused_kv_major", "2, num_blocks, block_size, num_kv_heads, head_dim", 5))],
    case("stacked-without-layer", ValueError,
         r"^k for kv_layout='NHD' must be .*\(rank 4\), got shape \(3, 13, 16, 2, 64\); a layer-stacked "
         r"cache \[num_layers, \.\.\.\] also needs layer=",
         call(STACKED, layer=DROP)),
    case("layer-on-unstacked", ValueError,
         r"^k for kv_layout='NHD' with layer= must be \[num_layers, num_blocks, .*\(rank 5\), got shape "
         r"\(13, 16, 2, 64\); with layer= the cache needs a leading \[num_layers\] axis",
         call(layer=0)),
    case("stacked-layer-count", ValueError,
         r"^with layer= k and v must have the same number of layers \(axis 0\): k \(3, 13, 16, 2, 64\), "
         r"v \(2, 13, 16, 2, 64\)",
         call(STACKED, v=lambda kw: kw["v"][:2])),
    case("stacked-custom-flat", ValueError,
         r"^with layer= the cache k must be \[num_layers >= 1, \.\.\.\], got shape \(\d+,\)",
         call(Problem(layout="stacked_strided"), k=lambda kw: kw["k"].reshape(-1),
              v=lambda kw: kw["v"].reshape(-1))),
    case("stacked-no-layers", ValueError,
         r"^with layer= the cache k must be \[num_layers >= 1, \.\.\.\], got shape \(0, 13, 16, 2, 64\)",
         call(STACKED, k=lambda kw: kw["k"][:0], v=lambda kw: kw["v"][:0])),
    # A traced layer is clamped into [0, num_layers): with no layer at all that read would be outside.
    case("stacked-traced-no-layers", ValueError, r"^with layer= the cache k must be \[num_layers >= 1",
         traced("layer", jnp.int32(0), Problem(layout="stacked_fused_kv_major"),
                k=lambda kw: kw["k"][:0])),
    # ---- custom KVCacheLayout against its buffers ----------------------------------------------
    case("custom-prestacked", ValueError,
         r"^pass an unstacked KVCacheLayout; layer= and the arrays' leading axis stack it",
         call(STRIDED, kv_layout=lambda kw: kw["kv_layout"].with_layers(3, 1024))),
    case("custom-fused-with-v", ValueError,
         r"^KVCacheLayout\(fused=True\) needs v=None \(V in the k buffer\), got v of shape",
         call(STRIDED, kv_layout=lambda kw: custom(page_stride=2 * BS * ROW, fused=True))),
    case("custom-unfused-v-None", ValueError, r"^KVCacheLayout\(fused=False\) needs a v array, got v=None",
         call(STRIDED, v=None)),
    case("custom-offset-past-buffer", ValueError,
         r"^kv_layout KVCacheLayout\(.*\) addresses no whole page inside k \(size \d+\) / v \(size \d+\)",
         call(STRIDED, kv_layout=custom(k_offset=10**6 * D))),
    case("custom-too-many-pages-k", ValueError,
         r"^kv_layout addresses \d+ elements of k \(page 99 ends there\) but k holds \d+",
         call(STRIDED, kv_layout=custom(page_stride=2 * BS * ROW, num_pages=100))),
    case("custom-too-many-pages-v", ValueError,
         r"^kv_layout addresses \d+ elements of v \(page 25 ends there\) but v holds \d+",
         call(STRIDED, kv_layout=custom(num_pages=26), v=lambda kw: kw["v"][:-1])),
    case("custom-k-partial-row", ValueError, r"^k holds \d+ elements, not a whole number of head_dim=64 rows",
         call(STRIDED, kv_layout=custom(num_pages=26), k=_flat_plus(3), v=_flat_plus(3))),
    case("custom-v-partial-row", ValueError, r"^v holds \d+ elements, not a whole number of head_dim=64 rows",
         call(STRIDED, kv_layout=custom(num_pages=26), v=_flat_plus(5))),
    case("custom-head_dim-mismatch", ValueError, r"^k / v head_dim 32 must equal q's head_dim 64",
         call(STRIDED, kv_layout=custom(head_dim=32, token_stride=ROW, head_stride=D, page_stride=BS * ROW))),
    # ---- KVCacheLayout fields -------------------------------------------------------------------
    case("layout-block_size-0", ValueError, r"^KVCacheLayout\.block_size must be a positive int, got 0",
         just(custom, block_size=0)),
    case("layout-heads-neg", ValueError, r"^KVCacheLayout\.num_kv_heads must be a positive int, got -2",
         just(custom, num_kv_heads=-2)),
    case("layout-head_dim-float", ValueError, r"^KVCacheLayout\.head_dim must be a positive int, got 64\.0",
         just(custom, head_dim=64.0)),
    case("layout-page_stride-bool", ValueError,
         r"^KVCacheLayout\.page_stride must be a positive int, got True",
         just(custom, page_stride=True)),
    case("layout-token_stride-neg", ValueError,
         r"^KVCacheLayout\.token_stride must be a non-negative int, got -64",
         just(custom, token_stride=-D)),
    case("layout-k_offset-float", ValueError,
         r"^KVCacheLayout\.k_offset must be a non-negative int, got 1\.5",
         just(custom, k_offset=1.5)),
    case("layout-head_stride-partial", ValueError,
         r"^KVCacheLayout\.head_stride=32 must be a multiple of head_dim=64: a layout addresses whole rows",
         just(custom, head_stride=D // 2)),
    case("layout-v_offset-partial", ValueError,
         r"^KVCacheLayout\.v_offset=65 must be a multiple of head_dim=64",
         just(custom, v_offset=D + 1)),
    case("layout-layer_stride-partial", ValueError,
         r"^KVCacheLayout\.layer_stride=100 must be a multiple of head_dim=64",
         just(custom, layer_stride=100)),
    case("layout-page_stride-partial", ValueError,
         r"^KVCacheLayout\.page_stride=2049 must be a multiple of head_dim=64",
         just(custom, page_stride=BS * ROW + 1)),
    case("layout-num_pages-0", ValueError, r"^KVCacheLayout\.num_pages must be a positive int or None, got 0",
         just(custom, num_pages=0)),
    case("layout-num_pages-bool", ValueError,
         r"^KVCacheLayout\.num_pages must be a positive int or None, got True",
         just(custom, num_pages=True)),
    case("layout-fused-str", TypeError, r"^KVCacheLayout\.fused must be a bool, got str",
         just(custom, fused="yes")),
    case("layout-num_layers-neg", ValueError,
         r"^KVCacheLayout\.num_layers must be a non-negative int, got -1",
         just(custom, num_layers=-1)),
    # ---- backend / config -----------------------------------------------------------------------
    case("backend-int", TypeError,
         r"^backend must be a str, one of \('auto', 'xla', 'pallas', 'triton'\), got int",
         call(backend=3)),
    case("backend-unknown", ValueError,
         r"^backend must be one of \('auto', 'xla', 'pallas', 'triton'\), got 'cuda'",
         call(backend="cuda")),
    case("backend-unavailable", ValueError,
         r"^backend='triton' cannot run here: .*\. Available here: \[.*'xla'.*\]",
         _triton_unavailable),
    case("config-type", TypeError,
         r"^config for backend='xla' must be a jax_varlen_attn\.XlaConfig, got dict",
         call(config=dict(block_q=16))),
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
        np.concatenate([[0], np.cumsum(kw["seqused_k"])]), jnp.int32), seqused_k=DROP),
                 id="paged-lengths-from-cu_k"),
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
    pytest.param(FP8, {}, id="fp8-e4m3-cache"),
    pytest.param(Problem(kv_dtype="float8_e5m2", layout="fused_kv_major"), {}, id="fp8-e5m2-fused"),
    pytest.param(FP8, dict(k_descale=DROP, v_descale=DROP), id="fp8-no-descales"),
    pytest.param(FP8, dict(k_descale=0.5, v_descale=np.float32(2.0)), id="fp8-python-scalar-descales"),
    pytest.param(FP8, dict(k_descale=jnp.ones((1,), jnp.float32)), id="fp8-descale-shape-1"),
    pytest.param(FP8Q, {}, id="fp8-q"),
    pytest.param(Problem(dtype="bfloat16", kv_dtype="float8_e5m2"), {}, id="bf16-q-fp8-cache"),
    pytest.param(Problem(), dict(k_descale=jnp.ones((4, 2), jnp.float32), q_descale=1.0),
                 id="descales-ignored-without-fp8"),
    pytest.param(Problem(sinks=True), {}, id="sinks"),
])
def test_accepts(problem, changes):
  kw = _kwargs(problem, changes)
  out, lse = jax.eval_shape(lambda: flash_attn_varlen_func(**kw))
  assert out.shape == kw["q"].shape and out.dtype == jnp.dtype(out_dtype(problem))
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
  targets = (_raises(api) | _raises(validation) | _raises(layout_mod) | _raises(registry, "select"))
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


# ---- check_inputs: the eager value checks of descales and sinks --------------------------------------

@pytest.mark.parametrize("name,value,match", [
    ("k_descale", np.nan, r"^k_descale: entry \[1, 0\] \(sequence, kv head\) is nan: descales must be finite"),
    ("v_descale", np.inf, r"^v_descale: entry \[1, 0\] \(sequence, kv head\) is inf"),
    ("s_aux", np.nan, r"^s_aux\[1\] = nan: a sink logit must be a number or -inf \(no sink\)"),
    ("s_aux", np.inf, r"^s_aux\[1\] = inf"),
])
def test_check_inputs_names_bad_scales_and_sinks(name, value, match):
  from jax_varlen_attn.checks import check_inputs
  kw, _ = make_problem(Problem(kv_dtype="float8_e4m3fn", sinks=True))
  check_inputs(**kw)  # valid as drawn
  bad = np.array(kw[name])
  bad[(1, 0) if bad.ndim == 2 else 1] = value
  with pytest.raises(ValueError, match=match):
    check_inputs(**{**kw, name: jnp.asarray(bad)})


def test_check_inputs_takes_minus_inf_sinks_and_ignores_unused_descales():
  from jax_varlen_attn.checks import check_inputs
  kw, _ = make_problem(Problem(sinks=True))
  check_inputs(**{**kw, "s_aux": jnp.full((4,), -jnp.inf, jnp.float32),
                  "k_descale": jnp.full((4, 2), jnp.nan, jnp.float32)})  # f16 cache: not applied
