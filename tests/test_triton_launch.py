"""How Triton launches reach XLA: jax-triton's legacy custom call (default) or jaxlib's typed FFI.

`Config(ffi_launch=True)` rewrites our launches to `triton_kernel_call_ffi` (backends/triton/call.py
says why that is opt-in). On the CPU we check the rewrite itself on a stand-in primitive; on a GPU,
that the compiled program calls the target asked for and that both paths give bitwise the same
answer."""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import mlir

from jax_varlen_attn.backends.triton.call import FFI_TARGET, ffi_available, retarget_to_ffi
from tests.conftest import HAS_GPU

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


@pytest.mark.skipif(not HAS_GPU, reason="launch paths exist on a CUDA GPU only")
def test_gpu_program_calls_the_ffi_target_and_both_paths_agree():
  from jax_varlen_attn import flash_attn_varlen_func
  from jax_varlen_attn.backends.triton import Config

  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((40, 4, 64)), jnp.float16)
  cache = jnp.asarray(rng.standard_normal((12, 16, 2, 64)), jnp.float16)
  cu = jnp.asarray([0, 1, 40], jnp.int32)
  used = jnp.asarray([30, 60], jnp.int32)
  table = jnp.asarray([[3, 1, 0, 0], [5, 2, 7, 9]], jnp.int32)

  def run(ffi):
    fn = jax.jit(lambda q, k, v, cu, used, table: flash_attn_varlen_func(
        q, k, v, max_seqlen_q=39, cu_seqlens_q=cu, max_seqlen_k=64, seqused_k=used,
        block_table=table, causal=True, backend="triton", config=Config(ffi_launch=ffi)))
    args = (q, cache, cache, cu, used, table)
    return fn.lower(*args).compile().as_text(), np.asarray(fn(*args))

  ffi_hlo, ffi_out = run(True)
  legacy_hlo, legacy_out = run(False)
  want = FFI_TARGET if ffi_available() else "triton_kernel_call"
  assert f'custom_call_target="{want}"' in ffi_hlo
  assert 'custom_call_target="triton_kernel_call"' in legacy_hlo
  np.testing.assert_array_equal(ffi_out, legacy_out)
