"""The "xla" launch route lowered for CUDA on any machine: `python -m tests.xla_route_check`.

Run without TRITON_INTERPRET (tests/sm90.py starts it): jax.export lowers a jitted attention call and
a write_kv call for the "cuda" platform, which needs no GPU; the installed triton compiles the
kernels for sm_90 on the way. Checks that each becomes one `__gpu$xla.gpu.triton` custom call whose
Triton IR takes only buffers (every scalar folded in), and that write_kv's caches are aliased to its
outputs (in place). add_rms_norm's kernel too (it takes this route at every size). Prints "0 failures" when all hold.
"""

from __future__ import annotations

import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jax_varlen_attn.validation import AttentionArgs, validate  # noqa: E402
from jax_varlen_attn.backends.triton import Config, call, launcher, write_kernel  # noqa: E402
from jax_varlen_attn.layout import KVCacheLayout, resolve  # noqa: E402


def exported_text(fn, *args) -> str:
  unchecked = [jax.export.DisabledSafetyCheck.custom_call(call.XLA_TRITON_TARGET)]
  return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=unchecked)(*args).mlir_module()


def ir_parameters(text: str):
  """The parameter types of the Triton function inside the custom call's `ir` attribute."""
  escaped = re.search(r'ir = "(.*?)(?<!\\\\)"', text, re.S).group(1)
  ir = re.sub(r"\\([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), escaped)  # MLIR's \XX
  header = re.search(r"tt\.func public @\w+\((.*?)\) attributes", ir, re.S).group(1)
  return re.findall(r"%\w+: (!tt\.ptr<\w+>|i\d+|f\d+|bf16)", header)


def attention_case(layout_name: str, kv_dtype=jnp.float16):
  """fp8 `kv_dtype`: the cache in that dtype, per-(sequence, kv head) descales and sinks."""
  q = jnp.ones((5, 4, 64), jnp.float16)
  if layout_name == "strided":
    storage = jnp.ones((12, 16, 2, 64), jnp.float16)
    page = 16 * 2 * 64
    layout = KVCacheLayout(block_size=16, num_kv_heads=2, head_dim=64, page_stride=2 * page,
                           k_offset=page, v_offset=page)
    k = v = storage
  else:
    layout, k, v = "NHD", jnp.ones((6, 16, 2, 64), kv_dtype), jnp.ones((6, 16, 2, 64), kv_dtype)
  fp8 = jnp.dtype(kv_dtype).itemsize == 1
  extra = dict(k_descale=jnp.full((1, 2), 0.5, jnp.float32), v_descale=jnp.full((1, 2), 2.0, jnp.float32),
               s_aux=jnp.zeros((4,), jnp.float32)) if fp8 else {}

  def f(q, k, v, cu, used, table):
    spec, arrays = validate(AttentionArgs(q, k, v, None, cu, None, None, used, 0.125, True, (-1, -1), 0.0,
                                          None, table, True, layout, None, **extra))
    out, lse = launcher.attention(spec, arrays, Config(launch="xla").resolved(spec))
    return out, lse

  return f, (q, k, v, jnp.asarray([0, 5], jnp.int32), jnp.asarray([20], jnp.int32),
             jnp.asarray([[1, 2]], jnp.int32))


def write_case(cache_dtype=jnp.float16):
  """An fp8 `cache_dtype` quantizes with per-(token, kv head) scales."""
  cache = jnp.zeros((4, 16, 2, 32), cache_dtype)
  new = jnp.ones((3, 2, 32), jnp.float16)
  slots = jnp.asarray([0, 5, 17], jnp.int32)
  layout = resolve("NHD", cache.shape, cache.shape, stacked=False)
  scales = None
  if jnp.dtype(cache_dtype).itemsize == 1:
    scales = (jnp.full((3, 2), 0.5, jnp.float32), jnp.full((3, 2), 0.25, jnp.float32))

  def f(new, slots, k, v):
    kernel, inputs, outputs, grid, warps, consts, aliases = write_kernel.kernel_arguments(
        layout, new, new, k, v, slots, None, scales)
    return call.launch(kernel, inputs, outputs, grid, warps, 1, consts, input_output_aliases=aliases,
                       route="xla")

  return f, (new, slots, cache, cache + 1)


def norm_case(with_residual: bool):
  """add_rms_norm's kernel (which takes the "xla" route at every size) over 40 rows of 2048."""
  from jax_varlen_attn.backends.triton import norm_kernel

  x = jnp.ones((40, 2048), jnp.bfloat16)

  def f(x, r, w):
    return norm_kernel.add_rms_norm(x, r if with_residual else None, w, 1e-6)

  return f, (x, x, jnp.ones((2048,), jnp.bfloat16))


def main() -> int:
  failures = 0
  # buffers: attention's 13 inputs (q, k, v, metadata, layer, descales, sinks, the tail plan's
  # counts) + the counts, out, lse and the tail pieces' two partials; write_kv's 8 (new k / v,
  # slots, layer, scales, caches) + the two aliased caches
  checks = [("attention-nhd", *attention_case("nhd"), 13 + 5, None),
            ("attention-strided", *attention_case("strided"), 13 + 5, None),
            ("attention-fp8", *attention_case("nhd", jnp.float8_e4m3fn), 13 + 5, "f8E4M3FN"),
            ("write_kv", *write_case(), 8 + 2, "output_operand_aliases"),
            ("write_kv-fp8", *write_case(jnp.float8_e5m2), 8 + 2, "f8E5M2"),
            # add_rms_norm: x, residual (or a placeholder), scale + y, the sum (or a placeholder)
            ("add_rms_norm", *norm_case(True), 3 + 2, None),
            ("rms_norm", *norm_case(False), 3 + 2, None)]
  for name, fn, args, buffers, needs in checks:
    try:
      text = exported_text(fn, *args)
      calls = text.count(f"@{call.XLA_TRITON_TARGET}(")
      params = ir_parameters(text)
      problems = []
      if calls != 1:
        problems.append(f"{calls} XLA Triton calls")
      if len(params) != buffers or any(not p.startswith("!tt.ptr") for p in params):
        problems.append(f"IR parameters {params} (want {buffers} buffers, no scalars)")
      if needs and needs not in text:
        problems.append(f"no {needs}")
      print(("FAIL " if problems else "ok   ") + f"{name}: {calls} call(s), {len(params)} buffer "
            f"parameters {'; '.join(problems)}", flush=True)
      failures += bool(problems)
    except Exception as e:
      failures += 1
      print(f"FAIL {name}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
  print(f"{failures} failures")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
