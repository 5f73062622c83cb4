"""Heads split over devices (tensor parallel): equal to the unsharded call and the oracle, and the
compiled HLO has no collective (q and the cache are never gathered).

Runs on every device JAX has (CPU: the 4 host devices tests/conftest.py asks for; a GPU machine: its
GPUs, e.g. `bash scripts/gpu_check.sh tests/test_shard.py` on 2 H100s). Needs at least 2 devices.

Three ways in: the caller's own `jax.shard_map` (per-device arrays); `jax.jit` on an Explicit mesh,
where flash_attn_varlen_func reads the split off the arrays' types; `sharded_flash_attn_varlen_func`
on an Auto mesh, where the types carry no sharding.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_varlen_attn import KVCacheLayout, flash_attn_varlen_func
from jax_varlen_attn.api import sharded_flash_attn_varlen_func
from jax_varlen_attn.backends import status, triton_interpreting
from jax_varlen_attn.sharding import KV_HEAD_AXIS
from tests.oracle import reference_attention
from tests.problems import TOLERANCE, Problem, make_problem, rel_err

DEVICES = jax.devices()
# Up to 4 devices, a number that divides the problems' 4 kv heads.
N = 4 if len(DEVICES) >= 4 else 2 if len(DEVICES) >= 2 else 1
if N < 2:
  pytest.skip("needs at least 2 devices (tests/conftest.py asks for 4 CPU host devices)",
              allow_module_level=True)

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
ARRAYS = ("q", "k", "v", "cu_seqlens_q", "seqused_k", "block_table", "alibi_slopes", "layer", "q_descale",
          "k_descale", "v_descale", "s_aux")


def _triton_marks():
  """Triton's interpreter patches global state while a kernel runs: it is not thread-safe, and under
  shard_map the host callbacks of the CPU devices run at once. The launcher must serialize them."""
  if not triton_interpreting():
    return []
  from jax_varlen_attn.backends.triton import call
  if hasattr(call, "_INTERPRETER_LOCK"):
    return []
  return [pytest.mark.xfail(run=False, reason="Triton's interpreter is not thread-safe: "
                            "backends/triton/call.py must launch it under a lock (_INTERPRETER_LOCK)")]


def _backend(name):
  marks = []
  if not status(name)[0]:
    marks.append(pytest.mark.skip(reason=f"backend {name} cannot run here: {status(name)[1]}"))
  elif name == "triton":
    marks += _triton_marks()
  return pytest.param(name, marks=marks, id=name)


def _cases(table):
  return [pytest.param(b, layout, marks=_backend(b).marks, id=f"{b}-{layout}") for b, layouts in table
          for layout in layouts]


def _problem(layout="NHD", **overrides):
  fields = dict(num_heads=8, num_kv_heads=4, head_dim=32, seqlens_q=(5, 1, 7, 0), seqlens_k=(20, 9, 7, 3),
                causal=True, alibi="batch", dtype="float16", seed=np.random.SeedSequence().entropy % 2**32)
  if layout == "non_paged":
    fields["paged"] = False
  else:
    fields["layout"] = layout
  fields.update(overrides)
  return Problem(**fields)


def _kv_axis(layout: str) -> int:
  if layout == "non_paged":
    return 1
  inner = layout[len("stacked_"):] if layout.startswith("stacked_") else layout
  return KV_HEAD_AXIS[inner] + (1 if layout.startswith("stacked_") else 0)


def _split(kwargs, layout):
  """(array kwargs, static kwargs, PartitionSpecs of the arrays: heads on 'tp', the rest replicated)."""
  arrays = {n: jnp.asarray(kwargs[n]) for n in ARRAYS if kwargs.get(n) is not None}
  static = {n: v for n, v in kwargs.items() if n not in arrays}  # v=None for fused caches
  kv = [None] * arrays["k"].ndim
  kv[_kv_axis(layout)] = "tp"
  specs = {n: P() for n in arrays}
  specs.update(q=P(None, "tp", None), k=P(*kv))
  if "v" in arrays:
    specs["v"] = P(*kv)
  if "alibi_slopes" in arrays:
    specs["alibi_slopes"] = P(None, "tp") if arrays["alibi_slopes"].ndim == 2 else P("tp")
  for name in ("q_descale", "k_descale", "v_descale"):  # [B, Hk]; a scalar descale stays replicated
    if name in arrays and arrays[name].ndim == 2:
      specs[name] = P(None, "tp")
  if "s_aux" in arrays:
    specs["s_aux"] = P("tp")
  return arrays, static, specs


def _mesh(axis_type, n=N):
  return jax.make_mesh((n,), ("tp",), axis_types=(axis_type,), devices=DEVICES[:n])


def _put(arrays, specs, mesh):
  return {n: jax.device_put(x, NamedSharding(mesh, specs[n])) for n, x in arrays.items()}


def _collectives(hlo: str):
  return [line.strip()[:160] for line in hlo.splitlines()
          if any(re.search(rf"\s{c}(-start)?\(", line) for c in COLLECTIVES)]


def _check(p, kwargs, oracle, result, backend):
  """Sharded result == the unsharded call (same backend) and the float64 oracle."""
  out, lse = result if p.return_lse else (result, None)
  assert out.shape == kwargs["q"].shape and out.dtype == kwargs["q"].dtype
  ref = flash_attn_varlen_func(**kwargs, backend=backend)
  ref_out, ref_lse = ref if p.return_lse else (ref, None)
  out32 = np.asarray(out.astype(jnp.float32))
  # Per-device block sizes and KV splits may differ from the unsharded call's (fewer heads): on a GPU
  # the two can differ by fp16 rounding; on the CPU they are equal.
  np.testing.assert_allclose(out32, np.asarray(ref_out.astype(jnp.float32)), rtol=4e-3, atol=4e-3)
  o_out, o_lse = reference_attention(**oracle)
  n = int(oracle["cu_seqlens_q"][-1])
  assert (out32[n:] == 0).all(), "padding rows must be zero"
  assert rel_err(out32[:n], o_out[:n]) < TOLERANCE[p.dtype]
  if lse is not None:
    lse = np.asarray(lse)
    assert lse.shape == (p.num_heads, kwargs["q"].shape[0])
    np.testing.assert_array_equal(np.isposinf(lse), np.isposinf(np.asarray(ref_lse)))
    fin = np.isfinite(o_lse)
    np.testing.assert_allclose(lse[fin], np.asarray(ref_lse)[fin], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lse[fin], o_lse[fin], rtol=2e-3, atol=2e-3)


# ---- 1. inside the caller's shard_map: per-device arrays, nothing to split -----------------------

# Each backend sees every named layout across the three ways in (the mode tables below).
SHARD_MAP_CASES = _cases([
    ("xla", ("NHD", "fused_kv_major", "stacked_NHD", "non_paged")),
    ("pallas", ("HND", "stacked_fused_kv_major")),
    ("triton", ("NHD", "fused_page_major")),
])


@pytest.mark.parametrize("backend,layout", SHARD_MAP_CASES)
def test_shard_map_per_device_heads(backend, layout):
  p = _problem(layout)
  kwargs, oracle = make_problem(p)
  arrays, static, specs = _split(kwargs, layout)
  names = list(arrays)
  mesh = _mesh(AxisType.Auto)

  def per_device(*xs):
    return flash_attn_varlen_func(**dict(zip(names, xs)), **static, backend=backend)

  out_specs = (P(None, "tp", None), P("tp", None))
  f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=tuple(specs[n] for n in names),
                            out_specs=out_specs, check_vma=False))
  args = [arrays[n] for n in names]
  assert not _collectives(f.lower(*args).compile().as_text())
  _check(p, kwargs, oracle, f(*args), backend)


# ---- 2. under jax.jit with head-sharded inputs: no gather ----------------------------------------

EXPLICIT_CASES = _cases([
    ("xla", ("HND", "fused_page_major")),
    ("pallas", ("NHD",)),
    ("triton", ("HND", "stacked_NHD")),
])
AUTO_HELPER_CASES = _cases([
    ("xla", ("NHD", "stacked_fused_kv_major")),
    ("pallas", ("fused_kv_major",)),
    ("triton", ("fused_kv_major",)),
])


def _jit_check(backend, layout, axis_type, fn, **problem):
  p = _problem(layout, **problem)
  kwargs, oracle = make_problem(p)
  arrays, static, specs = _split(kwargs, layout)
  mesh = _mesh(axis_type)
  placed = _put(arrays, specs, mesh)
  f = jax.jit(lambda xs: fn(mesh, **xs, **static, backend=backend))
  hlo = f.lower(placed).compile().as_text()
  assert not _collectives(hlo), f"collectives in the compiled HLO: {_collectives(hlo)[:4]}"
  result = f(placed)
  out = result[0] if p.return_lse else result
  assert out.sharding.spec[1] == "tp", f"out is not split on heads: {out.sharding}"
  if p.return_lse:
    assert result[1].sharding.spec[0] == "tp", f"lse is not split on heads: {result[1].sharding}"
  _check(p, kwargs, oracle, result, backend)


@pytest.mark.parametrize("backend,layout", EXPLICIT_CASES)
def test_shard_jit_explicit_mesh_detects_heads(backend, layout):
  """jax.make_mesh's default (Explicit axes): the split is in the types; plain flash_attn_varlen_func."""
  _jit_check(backend, layout, AxisType.Explicit, lambda mesh, **kw: flash_attn_varlen_func(**kw))


@pytest.mark.parametrize("backend,layout", AUTO_HELPER_CASES)
def test_shard_jit_auto_mesh_with_helper(backend, layout):
  """An Auto mesh: sharded_flash_attn_varlen_func(mesh, head_axis, ...) names the split."""
  _jit_check(backend, layout, AxisType.Auto,
             lambda mesh, **kw: sharded_flash_attn_varlen_func(mesh, "tp", **kw))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_shard_jit_fp8_cache_and_sinks(axis_type):
  """Descales split on their kv heads and sinks on their q heads: no collective, out split."""
  fn = ((lambda mesh, **kw: flash_attn_varlen_func(**kw)) if axis_type == AxisType.Explicit
        else (lambda mesh, **kw: sharded_flash_attn_varlen_func(mesh, "tp", **kw)))
  _jit_check("xla", "NHD", axis_type, fn, kv_dtype="float8_e4m3fn", sinks=True, alibi=None)


def test_shard_jit_without_lse_and_heads_alibi():
  _jit_check("xla", "HND", AxisType.Explicit, lambda mesh, **kw: flash_attn_varlen_func(**kw),
             return_lse=False, alibi="head")


def test_shard_eager_sharded_arrays_detected():
  """Outside jit, committed NamedSharding arrays (Auto mesh) are split as their sharding says."""
  p = _problem("fused_page_major")
  kwargs, oracle = make_problem(p)
  arrays, static, specs = _split(kwargs, "fused_page_major")
  placed = _put(arrays, specs, _mesh(AxisType.Auto))
  result = flash_attn_varlen_func(**placed, **static, backend="xla")
  assert result[0].sharding.spec[1] == "tp" and result[1].sharding.spec[0] == "tp"
  _check(p, kwargs, oracle, result, "xla")


def test_shard_helper_replicated_inputs_sliced_locally():
  """Replicated inputs given to the helper are sliced per device (no collective)."""
  p = _problem("NHD")
  kwargs, oracle = make_problem(p)
  arrays, static, _ = _split(kwargs, "NHD")
  mesh = _mesh(AxisType.Auto)
  placed = {n: jax.device_put(x, NamedSharding(mesh, P())) for n, x in arrays.items()}
  f = jax.jit(lambda xs: sharded_flash_attn_varlen_func(mesh, "tp", **xs, **static, backend="xla"))
  assert not _collectives(f.lower(placed).compile().as_text())
  _check(p, kwargs, oracle, f(placed), "xla")


@pytest.mark.skipif(len(DEVICES) < 4, reason="needs 4 devices for a 2 x 2 mesh")
@pytest.mark.parametrize("head_axis", ["tp", ("dp", "tp")])
def test_shard_two_axis_mesh(head_axis):
  """A (dp, tp) mesh: heads over tp only (replicated over dp), or over both axes."""
  p = _problem("HND")
  kwargs, oracle = make_problem(p)
  arrays, static, _ = _split(kwargs, "HND")
  mesh = jax.make_mesh((2, 2), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2, devices=DEVICES[:4])
  f = jax.jit(lambda xs: sharded_flash_attn_varlen_func(mesh, head_axis, **xs, **static, backend="xla"))
  hlo = f.lower(arrays).compile().as_text()
  assert not _collectives(hlo), _collectives(hlo)[:4]
  result = f(arrays)
  assert result[0].sharding.spec[1] == head_axis
  _check(p, kwargs, oracle, result, "xla")


# ---- errors --------------------------------------------------------------------------------------

def test_shard_kv_heads_not_divisible_raises():
  p = _problem("NHD", num_heads=8, num_kv_heads=1)
  kwargs, _ = make_problem(p)
  arrays, static, specs = _split(kwargs, "NHD")
  with pytest.raises(ValueError, match=rf"num_kv_heads=1.*multiple of {N}"):
    sharded_flash_attn_varlen_func(_mesh(AxisType.Auto), "tp", **arrays, **static, backend="xla")
  # Detected from an Explicit mesh's types: the same message (q split, cache replicated).
  mesh = _mesh(AxisType.Explicit)
  specs["k"] = specs["v"] = P()
  placed = _put(arrays, specs, mesh)
  with pytest.raises(ValueError, match=rf"num_kv_heads=1.*multiple of {N}"):
    jax.jit(lambda xs: flash_attn_varlen_func(**xs, **static, backend="xla"))(placed)


def test_shard_helper_bad_arguments_raise():
  kwargs, _ = make_problem(_problem("NHD"))
  arrays, static, _ = _split(kwargs, "NHD")
  mesh = _mesh(AxisType.Auto)
  with pytest.raises(ValueError, match="names axes \\['heads'\\]"):
    sharded_flash_attn_varlen_func(mesh, "heads", **arrays, **static, backend="xla")
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    sharded_flash_attn_varlen_func("tp", mesh, **arrays, **static, backend="xla")
  with pytest.raises(TypeError, match="head_axis must be"):
    sharded_flash_attn_varlen_func(mesh, 0, **arrays, **static, backend="xla")
  with pytest.raises(TypeError, match="unexpected keyword"):
    sharded_flash_attn_varlen_func(mesh, "tp", **arrays, **static, backend="xla", heads=2)


def test_shard_custom_layout_helper_raises_and_detection_leaves_it():
  """A KVCacheLayout does not say which axis of k holds the kv heads: the helper refuses, and an
  Explicit-mesh split of q alone is not taken up: q is gathered and the call runs unsplit (jax 0.11
  would otherwise reject the unsplit einsums of the XLA backend for their mixed shardings)."""
  p = _problem("strided")
  kwargs, oracle = make_problem(p)
  assert isinstance(kwargs["kv_layout"], KVCacheLayout)
  arrays, static, _ = _split(kwargs, "NHD")  # strided storage is [2P, bs, Hk, D]
  with pytest.raises(ValueError, match="KVCacheLayout does not say which axis"):
    sharded_flash_attn_varlen_func(_mesh(AxisType.Auto), "tp", **arrays, **static, backend="xla")
  mesh = _mesh(AxisType.Explicit)
  specs = {n: P() for n in arrays}
  specs["q"] = P(None, "tp", None)
  result = jax.jit(lambda xs: flash_attn_varlen_func(**xs, **static, backend="xla"))(
      _put(arrays, specs, mesh))
  o_out, _ = reference_attention(**oracle)
  n = int(oracle["cu_seqlens_q"][-1])
  assert rel_err(np.asarray(result[0].astype(jnp.float32))[:n], o_out[:n]) < TOLERANCE[p.dtype]


def test_shard_custom_layout_named_like_a_named_form_is_not_split():
  """A KVCacheLayout only *named* "NHD" (here HND strides) is custom: its head axis is not guessed."""
  p = _problem("HND")
  kwargs, _ = make_problem(p)
  n, hk, bs, d = kwargs["k"].shape
  kwargs["kv_layout"] = KVCacheLayout(block_size=bs, num_kv_heads=hk, head_dim=d, page_stride=hk * bs * d,
                                      token_stride=d, head_stride=bs * d, num_pages=n, name="NHD")
  arrays, static, _ = _split(kwargs, "HND")
  with pytest.raises(ValueError, match="KVCacheLayout does not say which axis"):
    sharded_flash_attn_varlen_func(_mesh(AxisType.Auto), "tp", **arrays, **static, backend="xla")
