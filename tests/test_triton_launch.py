"""How Triton launches reach XLA (backends/triton/call.py).

"xla": XLA's own Triton custom call, fed the IR of our kernel with its scalars folded in.
jax-triton 0.4 ("ffi"): its public triton_call, in-place buffers as Refs, f32 scalars as Python
floats (its default). jax-triton 0.3: the legacy custom call ("legacy", its default) or the same payload moved to
`triton_kernel_call_ffi` by our lowering ("ffi"). On the CPU we check the "xla" route's lowering
(the IR is compiled for sm_90 by the installed triton), the argument translation for 0.4 and the 0.3
rewrite on a stand-in primitive; on a GPU, that each route's program calls the target asked for and
that all routes agree."""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import mlir

from jax_varlen_attn.backends.triton import call
from jax_varlen_attn.backends.triton.call import FFI_TARGET, ffi_available, retarget_to_ffi
from tests.conftest import HAS_GPU
from tests.sm90 import run_compile_check

# A payload with every byte value: the rewrite must carry binary data through unchanged.
PAYLOAD = zlib.compress(bytes(range(256)) * 8)


def _primitive(name, lower):
  from jax.extend.core import Primitive
  prim = Primitive(name)
  prim.multiple_results = True
  prim.def_abstract_eval(lambda x, y: [jax.core.ShapedArray(x.shape, x.dtype),
                                       jax.core.ShapedArray(y.shape, y.dtype)])
  mlir.register_lowering(prim, lower)
  return prim


def _custom_calls(prim, *args):
  text = jax.jit(lambda *a: prim.bind(*a)).lower(*args).as_text()
  return [line.split("=", 1)[1].strip() for line in text.splitlines() if "custom_call" in line]


def test_retarget_replaces_the_legacy_call_with_the_ffi_call():
  aliases = {1: 1}  # operand 1 is result 1 (as write_kv aliases its cache)

  def legacy_then_retarget(ctx, x, y):
    legacy = jax.ffi.ffi_lowering(FFI_TARGET, api_version=2, backend_config=PAYLOAD,
                                  operand_output_aliases=aliases)(ctx, x, y)
    return retarget_to_ffi(ctx, (x, y), legacy, aliases)

  def direct_ffi(ctx, x, y):
    return jax.ffi.ffi_lowering(FFI_TARGET, operand_output_aliases=aliases)(ctx, x, y,
                                                                           opaque=PAYLOAD)

  x, y = jnp.ones((4,), jnp.float32), jnp.ones((3,), jnp.int32)
  got = _custom_calls(_primitive("jva_test_retarget", legacy_then_retarget), y, x)
  want = _custom_calls(_primitive("jva_test_direct_ffi", direct_ffi), y, x)
  assert len(got) == 1, got  # the legacy op is gone, not left beside the new one
  assert got == want
  assert "api_version = 2" not in got[0]
  assert f"@{FFI_TARGET}" in got[0] and "opaque" in got[0]
  assert "output_operand_aliases" in got[0]


def test_retarget_keeps_the_payload_bytes():
  def legacy_then_retarget(ctx, x, y):
    legacy = jax.ffi.ffi_lowering(FFI_TARGET, api_version=2, backend_config=PAYLOAD)(ctx, x, y)
    return retarget_to_ffi(ctx, (x, y), legacy, {})

  [call] = _custom_calls(_primitive("jva_test_payload", legacy_then_retarget),
                         jnp.ones((2,), jnp.float32), jnp.ones((2,), jnp.float32))
  escaped = re.search(r'opaque = "((?:[^"\\]|\\.)*)"', call).group(1)
  # MLIR prints non-printable bytes as \XX; decode and compare with what went in.
  raw = re.sub(rb"\\([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
               escaped.encode("latin-1")).replace(b'\\"', b'"').replace(b"\\\\", b"\\")
  assert raw == PAYLOAD


def _gpu_problem():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((40, 4, 64)), jnp.float16)
  cache = jnp.asarray(rng.standard_normal((12, 16, 2, 64)), jnp.float16)
  cu = jnp.asarray([0, 1, 40], jnp.int32)
  used = jnp.asarray([30, 60], jnp.int32)
  table = jnp.asarray([[3, 1, 0, 0], [5, 2, 7, 9]], jnp.int32)
  return q, cache, cache, cu, used, table


def _routed(route):
  from jax_varlen_attn import flash_attn_varlen_func
  from jax_varlen_attn.backends.triton import Config
  return jax.jit(lambda q, k, v, cu, used, table: flash_attn_varlen_func(
      q, k, v, max_seqlen_q=39, cu_seqlens_q=cu, max_seqlen_k=64, seqused_k=used,
      block_table=table, causal=True, backend="triton", config=Config(launch=route)))


ROUTE_TARGETS = {"xla": call.XLA_TRITON_TARGET, "ffi": FFI_TARGET, "legacy": "triton_kernel_call"}


@pytest.mark.skipif(not HAS_GPU, reason="launch paths exist on a CUDA GPU only")
def test_gpu_every_route_calls_its_target_and_all_agree():
  args = _gpu_problem()
  routes = ["xla"]
  gen = call.jax_triton_generation()
  if gen is not None:
    routes += ["ffi"] if gen >= (0, 4) else (["legacy", "ffi"] if ffi_available() else ["legacy"])
  outs = {}
  for route in routes:
    fn = _routed(route)
    text = fn.lower(*args).as_text()
    assert f"@{ROUTE_TARGETS[route]}" in text or f'"{ROUTE_TARGETS[route]}"' in text, route
    outs[route] = np.asarray(fn(*args), np.float32)
  default = np.asarray(_routed(None)(*args), np.float32)
  np.testing.assert_array_equal(default, outs[call.route_for(args[0].shape[0]) or call.default_route()])
  for route, out in outs.items():  # two compilers of one kernel: fp16 rounding may differ
    np.testing.assert_allclose(out, outs["xla"], atol=2e-3, rtol=2e-3, err_msg=route)
  if gen is not None and gen >= (0, 4):
    with pytest.raises(ValueError, match="typed FFI only"):
      _routed("legacy")(*args)


def test_xla_route_lowers_to_xla_triton_call_with_folded_scalars(tmp_path):
  """On any machine (tests/xla_route_check.py, exported for CUDA): attention and write_kv become
  XLA Triton custom calls whose IR takes only buffers, write_kv's caches aliased in place."""
  pytest.importorskip("triton")
  run_compile_check("tests.xla_route_check", tmp_path)


@pytest.mark.parametrize("text, want", [("0.3.1", (0, 3)), ("0.4.1", (0, 4)), ("0.4.0.dev20260801", (0, 4)),
                                        ("1.0", (1, 0))])
def test_generation_from_version_text(text, want):
  assert call._parse_version(text) == want


def test_v04_arguments_put_aliased_buffers_in_refs():
  """write_kv's launch on jax-triton 0.4: the cache inputs' parameters get 1-element placeholders,
  the output parameters Refs of the caches (0.4 aliases a Ref in place), and out_type is empty."""
  from jax_varlen_attn.backends.triton import write_kernel
  from jax_varlen_attn.layout import resolve

  cache = jnp.arange(4 * 16 * 2 * 32, dtype=jnp.float16).reshape(4, 16, 2, 32)
  new = jnp.ones((3, 2, 32), jnp.float16)
  slots = jnp.asarray([0, 5, 17], jnp.int32)
  layout = resolve("NHD", cache.shape, cache.shape, stacked=False)
  kernel, inputs, outputs, _, _, _, aliases = write_kernel.kernel_arguments(
      layout, new, new, cache, cache + 1, slots, None)
  refs = {name: jax.new_ref(inputs[name]) for name in aliases}
  args, kwargs, placed = call.v04_call_arguments(kernel, inputs, outputs, aliases, refs)
  names = list(inputs)
  assert len(args) == len(inputs)
  for name in ("k_cache_ptr", "v_cache_ptr"):
    assert args[names.index(name)].shape == (1,)
  assert kwargs["out_type"] == []
  assert set(placed) == {0, 1}
  assert kwargs["k_out_ptr"] is placed[0] and kwargs["v_out_ptr"] is placed[1]
  np.testing.assert_array_equal(np.asarray(placed[0][...]), np.asarray(cache))
  np.testing.assert_array_equal(np.asarray(placed[1][...]), np.asarray(cache + 1))
  assert args[names.index("num_tokens")] == 3  # ints stay static Python ints


def test_v04_arguments_put_new_outputs_after_the_refs():
  """rope_write_kv on jax-triton 0.4: the caches go as Refs, q through out_type, and q's pointer
  parameter follows both Refs' (0.4 hands the pointer parameters their buffers in order)."""
  from jax_varlen_attn.backends.triton import rope_write_kernel
  from jax_varlen_attn.layout import resolve

  captured = {}

  def fake_launch(kernel, inputs, outputs, grid, num_warps, num_stages, consts, input_output_aliases,
                  route):
    captured.update(kernel=kernel, inputs=inputs, outputs=outputs, aliases=input_output_aliases)
    return [jnp.zeros(o.shape, o.dtype) for o in outputs]

  t, h, hk, d = 19, 4, 2, 64
  cache = jnp.zeros((6, 4, hk, d), jnp.bfloat16)
  layout = resolve("NHD", cache.shape, cache.shape, stacked=False)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rope_write_kernel, "launch", fake_launch)
    q, k, v = rope_write_kernel.rope_write_kv(
        layout, jnp.zeros((t, (h + 2 * hk) * d), jnp.bfloat16), jnp.zeros((t, d // 2)),
        jnp.zeros((t, d // 2)), None, None, 1e-6, h, cache, cache, jnp.zeros((t,), jnp.int32), None)
  assert q.shape == (t, h, d) and k.shape == cache.shape
  refs = {name: jax.new_ref(captured["inputs"][name]) for name in captured["aliases"]}
  args, kwargs, placed = call.v04_call_arguments(captured["kernel"], captured["inputs"],
                                                 captured["outputs"], captured["aliases"], refs)
  params = list(captured["kernel"].arg_names)
  out_params = params[len(captured["inputs"]):len(captured["inputs"]) + len(captured["outputs"])]
  ref_params = [n for n in out_params if n in kwargs]
  new_params = [n for n in out_params if n not in kwargs]
  assert ref_params == ["k_out_ptr", "v_out_ptr"] and new_params == ["q_out_ptr"]
  assert max(map(params.index, ref_params)) < params.index("q_out_ptr")
  assert [tuple(o.shape) for o in kwargs["out_type"]] == [(t, h, d)]


def test_v04_launch_in_place_composes_with_custom_jvp_under_jit(monkeypatch):
  """jax-triton 0.4's Refs stay inside the launch: an in-place launch under a custom_jvp (the
  attention API's `_forward_only`) traces under jit, and the aliased output is the input's buffer
  as the kernel changed it. A stand-in `triton_call` does what 0.4's does with a Ref (the kernel
  writes it in place) and with out_type (new buffers); a Ref made outside `run_state` failed here
  with "No state discharge rule implemented for primitive: custom_jvp_call"."""
  import sys
  import types

  import triton

  @triton.jit
  def kernel(x_ptr, n, count_in_ptr, count_out_ptr, y_out_ptr):
    pass

  seen = {}

  def triton_call(*args, kernel, out_type, grid, num_warps, num_stages, name, **kwargs):
    seen.update(args=args, kwargs=kwargs)
    x = args[0]
    kwargs["count_out_ptr"][...] = kwargs["count_out_ptr"][...] + 1  # the kernel's in-place write
    return [jnp.broadcast_to(x.sum(), o.shape).astype(o.dtype) for o in out_type]

  monkeypatch.setitem(sys.modules, "jax_triton", types.SimpleNamespace(triton_call=triton_call))
  monkeypatch.setattr(call, "jax_triton_generation", lambda: (0, 4))
  monkeypatch.setattr(call, "triton_interpreting", lambda: False)

  @jax.custom_jvp
  def run(x, counts):
    return call.launch(kernel, {"x_ptr": x, "n": 3, "count_in_ptr": counts},
                       [jax.ShapeDtypeStruct(counts.shape, counts.dtype), jax.ShapeDtypeStruct((2,), x.dtype)],
                       (1,), 4, 1, {}, input_output_aliases={"count_in_ptr": 0}, route="ffi")

  run.defjvp(lambda primals, tangents: (_ for _ in ()).throw(TypeError("no derivative")))
  counts, y = jax.jit(run)(jnp.arange(3.0), jnp.asarray([5, 6], jnp.int32))
  np.testing.assert_array_equal(np.asarray(counts), [6, 7])
  np.testing.assert_array_equal(np.asarray(y), [3.0, 3.0])
  assert seen["args"][2].shape == (1,)  # the aliased input's own parameter: a placeholder
  assert "y_out_ptr" not in seen["kwargs"] and "count_out_ptr" in seen["kwargs"]


def test_launch_refuses_a_new_output_before_an_aliased_one():
  import triton

  @triton.jit
  def kernel(x_ptr, y_out_ptr, x_out_ptr):
    pass

  x = jnp.zeros((4,), jnp.float32)
  outputs = [jax.ShapeDtypeStruct((4,), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.float32)]
  with pytest.raises(ValueError, match="aliased outputs must be the first"):
    call.launch(kernel, {"x_ptr": x}, outputs, (1,), 1, 1, {}, input_output_aliases={"x_ptr": 1})


def test_v04_arguments_pass_f32_scalars_as_floats():
  from jax_varlen_attn.validation import AttentionArgs, validate
  from jax_varlen_attn.backends.triton import Config
  from jax_varlen_attn.backends.triton.kernel import varlen_attention_kernel
  from jax_varlen_attn.backends.triton.launcher import kernel_arguments

  q = jnp.ones((5, 4, 64), jnp.float16)
  cache = jnp.ones((6, 16, 2, 64), jnp.float16)
  spec, arrays = validate(AttentionArgs(q, cache, cache, None, jnp.asarray([0, 5], jnp.int32), None, None,
                                        jnp.asarray([20], jnp.int32), 0.125, True, (-1, -1), 0.0, None,
                                        jnp.asarray([[1, 2]], jnp.int32), False, "NHD", None))
  config = Config().resolved(spec)
  inputs, outputs, _, _, _ = kernel_arguments(spec, arrays, config)
  args, kwargs, placed = call.v04_call_arguments(varlen_attention_kernel, inputs, outputs, {}, {})
  scale = args[list(inputs).index("scale")]
  assert type(scale) is float and scale == 0.125
  assert placed == {} and kwargs["out_type"] == list(outputs)
  # A subnormal f32 would be typed f64 by jax-triton 0.4 as a float: it stays np.float32.
  tiny = np.float32(1e-40)
  assert isinstance(call._f32_scalar(tiny), np.float32)


def test_small_calls_take_the_xla_route_unless_the_environment_decides(monkeypatch):
  monkeypatch.delenv(call.LAUNCH_ENV, raising=False)
  assert call.route_for(1) == call.route_for(call.SMALL_CALL_TOKENS) == "xla"
  assert call.route_for(call.SMALL_CALL_TOKENS + 1) is None  # default_route()
  monkeypatch.setenv(call.LAUNCH_ENV, "legacy")
  assert call.route_for(1) is None


def test_default_route_follows_the_environment(monkeypatch):
  """$JAX_VARLEN_ATTN_LAUNCH picks the process's route; an unknown one is a ValueError naming it."""
  monkeypatch.delenv(call.LAUNCH_ENV, raising=False)
  installed = call.default_route()
  assert installed == ("xla" if call.jax_triton_generation() is None else
                       "ffi" if call.jax_triton_generation() >= (0, 4) else "legacy")
  for route in call.ROUTES:
    monkeypatch.setenv(call.LAUNCH_ENV, route)
    assert call.default_route() == route
  monkeypatch.setenv(call.LAUNCH_ENV, "fast")
  with pytest.raises(ValueError, match=r"\$JAX_VARLEN_ATTN_LAUNCH must be one of"):
    call.default_route()
