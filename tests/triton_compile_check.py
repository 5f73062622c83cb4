"""Compiles every specialization of the Triton kernel for the H100 (sm_90) on a CPU-only machine.

Run in a process where TRITON_INTERPRET is unset (tests/test_triton_compile.py starts one): it turns
each launch's real arguments (built by the launcher from a validated call) into a Triton signature
and asks `triton.compile` for a cubin, which catches type and compile errors of every branch the
constexprs select. Prints registers / spills / shared memory per variant.

  python -m tests.triton_compile_check [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="jva-triton-cache-"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from jax_varlen_attn.validation import AttentionArgs, validate  # noqa: E402
from jax_varlen_attn.backends.triton import Config  # noqa: E402
from jax_varlen_attn.backends.triton import config as config_rules  # noqa: E402
from jax_varlen_attn.backends.triton.kernel import varlen_attention_kernel  # noqa: E402
from jax_varlen_attn.backends.triton.launcher import kernel_arguments  # noqa: E402
from tests.problems import Problem, make_problem  # noqa: E402

_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32",
          "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5"}  # jax-triton 0.3 / 0.4's names

VARIANTS = [
    # (name, Problem overrides, Config)
    ("nhd-page-stride-constexpr-causal", dict(causal=True), Config()),
    ("strided-constexpr", dict(layout="strided", causal=True), Config()),
    ("hnd-window", dict(layout="HND", window=(8, 4)), Config()),
    ("fused-page-major-softcap", dict(layout="fused_page_major", softcap=5.0), Config()),
    ("fused-kv-major-alibi", dict(layout="fused_kv_major", alibi="batch", causal=True), Config()),
    ("stacked-strided", dict(layout="stacked_strided", causal=True), Config()),
    ("non-paged", dict(paged=False, causal=True), Config()),
    ("bf16-d128-prefill", dict(dtype="bfloat16", head_dim=128, causal=True, seqlens_q=(300, 40), seqlens_k=(300, 90)), Config()),
    ("fp32-d64", dict(dtype="float32", causal=True), Config()),
    ("d80", dict(head_dim=80, causal=True), Config()),
    ("d192-gqa8", dict(head_dim=192, num_heads=8, num_kv_heads=1, causal=True), Config()),
    ("d256-decode", dict(head_dim=256, seqlens_q=(1, 1, 1), seqlens_k=(40, 7, 33)), Config()),
    ("page32-single-page-tiles", dict(block_size=32, causal=True), Config(block_n=32)),
    ("prefill-128x64", dict(causal=True, seqlens_q=(300, 40), seqlens_k=(300, 90)), Config(block_m=128, block_n=64)),
    ("prefill-256x64-w8", dict(causal=True, seqlens_q=(300, 40), seqlens_k=(300, 90)),
     Config(block_m=256, block_n=64, num_warps=8)),
    ("split-kv-decode", dict(seqlens_q=(1, 1, 1), seqlens_k=(400, 7, 33), causal=True), Config(num_splits=4)),
    ("split-kv-strided-window-lse", dict(layout="strided", window=(30, 2), alibi="head"), Config(num_splits=3)),
    # fp8 caches (fp8 tiles converted in registers) and sinks, on the decode and prefill tiles.
    ("fp8-e4m3-decode", dict(kv_dtype="float8_e4m3fn", head_dim=128, seqlens_q=(1, 1, 1),
                             seqlens_k=(400, 7, 33), causal=True), Config()),
    # The same tile with V's other forms: Triton's own conversion in the dot operand, at load.
    ("fp8-e4m3-decode-v-in-dot", dict(kv_dtype="float8_e4m3fn", head_dim=128, seqlens_q=(1, 1, 1),
                                      seqlens_k=(400, 7, 33), causal=True), Config(fp8_v="operand")),
    ("fp8-e4m3-decode-v-at-load", dict(kv_dtype="float8_e4m3fn", head_dim=128, seqlens_q=(1, 1, 1),
                                       seqlens_k=(400, 7, 33), causal=True), Config(fp8_v="load")),
    # V as pairs with a padded head dim on a layer-stacked strided cache, and on a prefill tile.
    ("fp8-e5m2-d80-stacked-decode", dict(kv_dtype="float8_e5m2", head_dim=80, layout="stacked_strided",
                                         seqlens_q=(1, 1, 1), seqlens_k=(400, 7, 33)), Config()),
    ("fp8-e4m3-prefill-pairs", dict(kv_dtype="float8_e4m3fn", head_dim=128, causal=True,
                                    seqlens_q=(300, 40), seqlens_k=(300, 90)),
     Config(block_m=128, block_n=64, fp8_v="pairs")),
    ("fp8-e5m2-bf16-hnd-decode", dict(dtype="bfloat16", kv_dtype="float8_e5m2", layout="HND", head_dim=128,
                                      seqlens_q=(1, 1, 1), seqlens_k=(400, 7, 33)), Config()),
    ("fp8-e4m3-prefill-128x64", dict(kv_dtype="float8_e4m3fn", head_dim=128, causal=True,
                                     seqlens_q=(300, 40), seqlens_k=(300, 90)),
     Config(block_m=128, block_n=64)),
    ("fp8-e4m3-prefill-256x64-w8", dict(kv_dtype="float8_e4m3fn", head_dim=128, causal=True,
                                        seqlens_q=(300, 40), seqlens_k=(300, 90)),
     Config(block_m=256, block_n=64, num_warps=8)),
    ("fp8-q-e4m3-strided", dict(dtype="float8_e4m3fn", kv_dtype="float8_e4m3fn", layout="strided",
                                causal=True), Config()),
    ("fp8-f32-q-e5m2", dict(dtype="float32", kv_dtype="float8_e5m2", causal=True), Config()),
    ("fp8-e4m3-decode-sinks", dict(sinks=True, kv_dtype="float8_e4m3fn", head_dim=128, seqlens_q=(1, 1, 1),
                                   seqlens_k=(400, 7, 33), causal=True), Config()),
    ("sinks-decode-split-kv", dict(sinks=True, head_dim=128, seqlens_q=(1, 1, 1), seqlens_k=(400, 7, 33)),
     Config(num_splits=4)),
    ("sinks-fp8-softcap-prefill", dict(sinks=True, kv_dtype="float8_e4m3fn", softcap=5.0, head_dim=128,
                                       causal=True, seqlens_q=(300, 40), seqlens_k=(300, 90)), Config()),
]
# Tiles under the grid's last-round plan (kernel._tail_plan), as a long-sequence decode batch of 255
# sequences builds them (one 4096-key sequence sets the static reach: the key loop's trip count
# bounds what the compiler keeps live). The plan counts config.programs_per_sm programs an SM; a
# build resident at another count puts the grid's real last round elsewhere (benchmarks/NOTES.md,
# session 23 item 4: triton 3.7.1 built session 22's fp8 plan tile at 96 registers, 5 an SM against
# the 4 counted).
_DECODE_BATCH = dict(head_dim=128, num_heads=16, num_kv_heads=8, block_size=16, seqlens_q=(1,) * 255,
                     seqlens_k=(4096,) + tuple(20 + (7 * i) % 31 for i in range(254)))
RESIDENCY_VARIANTS = [
    ("tail-plan-fp8-e4m3-decode", dict(kv_dtype="float8_e4m3fn", **_DECODE_BATCH), Config()),
    ("tail-plan-fp16-decode", dict(_DECODE_BATCH), Config()),
]
# sm_90 (H100 / H200): registers and shared memory of one SM, shared memory the driver keeps per block.
SM90_REGISTERS, SM90_SHARED_MEMORY, BLOCK_RESERVED_SHARED = 65536, 233472, 1024
QUICK = {"split-kv-decode", "prefill-256x64-w8", "nhd-page-stride-constexpr-causal", "strided-constexpr",
         "stacked-strided", "non-paged", "d80", "bf16-d128-prefill",
         "fp8-e4m3-decode", "sinks-decode-split-kv"}


def signature_of(inputs, outputs):
  sig = {}
  for name, value in inputs.items():
    if isinstance(value, (jax.Array, np.ndarray)):
      sig[name] = "*" + _TYPES[jnp.dtype(value.dtype).name]
    elif isinstance(value, np.float32):
      sig[name] = "fp32"
    elif isinstance(value, int):  # as jax-triton types a Python int
      sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
    else:
      raise TypeError(f"{name}: {type(value)}")
  params = list(varlen_attention_kernel.arg_names)
  for name, o in zip(params[len(inputs):], outputs):
    sig[name] = "*" + _TYPES[jnp.dtype(o.dtype).name]
  return sig


def compile_variant(name, overrides, config):
  kwargs, _ = make_problem(Problem(**overrides))
  keys = ["q", "k", "v", "max_seqlen_q", "cu_seqlens_q", "max_seqlen_k", "cu_seqlens_k", "seqused_k",
          "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "block_table",
          "return_softmax_lse", "kv_layout", "layer"]
  defaults = dict(max_seqlen_q=None, max_seqlen_k=None, cu_seqlens_k=None, alibi_slopes=None,
                  block_table=None, kv_layout="NHD", layer=None)
  extra = {k: kwargs[k] for k in ("q_descale", "k_descale", "v_descale", "s_aux") if k in kwargs}
  spec, arrays = validate(AttentionArgs(*[kwargs.get(k, defaults.get(k)) for k in keys], **extra))
  config = config.resolved(spec)
  inputs, outputs, grid, consts, _ = kernel_arguments(spec, arrays, config)
  plan = dict(tail_pieces=consts.get("TAIL_PIECES"), programs_per_sm=config_rules.programs_per_sm(spec))
  sig = signature_of(inputs, outputs)
  for k in consts:
    sig[k] = "constexpr"
  pointer_idx = [i for i, n in enumerate(varlen_attention_kernel.arg_names) if sig[n].startswith("*")]
  # jax-triton assumes every buffer is 16-byte aligned; tell the compiler the same.
  attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_idx}
  src = ASTSource(fn=varlen_attention_kernel, signature=sig, constexprs=consts, attrs=attrs)
  compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
  meta = compiled.metadata
  regs, stack = resource_usage(compiled.asm.get("cubin", b""))
  return dict(name=name, instructions=sass_instructions(compiled.asm.get("cubin", b"")), block_m=config.block_m, block_n=config.block_n, warps=config.num_warps,
              stages=config.num_stages, shared=getattr(meta, "shared", None), regs=regs,
              stack=stack, cubin=len(compiled.asm.get("cubin", b"")), **plan)


def resident_programs(regs: int, shared: int, warps: int) -> int:
  """Programs of one build an sm_90 SM holds at once: registers (allocated 8 a thread at a time),
  shared memory, and the warp limit, whichever binds first."""
  threads = 32 * warps
  by_registers = SM90_REGISTERS // (-(-regs // 8) * 8 * threads)
  by_shared = SM90_SHARED_MEMORY // (shared + BLOCK_RESERVED_SHARED)
  return min(by_registers, by_shared, 2048 // threads)


def check_plan_residency() -> int:
  """Failures among RESIDENCY_VARIANTS: the plan off, or a residency unlike programs_per_sm's."""
  failures = 0
  for name, overrides, config in RESIDENCY_VARIANTS:
    r = compile_variant(name, overrides, config)
    resident = None if r["regs"] is None else resident_programs(r["regs"], r["shared"], r["warps"])
    print(f"ok   {name:28s} M{r['block_m']:<4d}N{r['block_n']:<4d}w{r['warps']} s{r['stages']} "
          f"regs={r['regs']} smem={r['shared']} -> {resident} an SM (programs_per_sm "
          f"{r['programs_per_sm']}, TAIL_PIECES {r['tail_pieces']})", flush=True)
    if r["tail_pieces"] <= 1 or resident != r["programs_per_sm"]:  # None: no cuobjdump to read registers
      failures += 1
      print(f"FAIL {name}: the plan's tile is resident {resident} an SM, config.programs_per_sm "
            f"counts {r['programs_per_sm']} (TAIL_PIECES {r['tail_pieces']})", flush=True)
  return failures


def _cuobjdump(cubin: bytes, flag: str):
  """Output of Triton's bundled cuobjdump (else one on PATH) `flag` over a cubin; None without it."""
  import shutil
  import subprocess
  tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
  tool = str(tool) if tool.is_file() else shutil.which("cuobjdump")
  if not cubin or tool is None:
    return None
  with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(cubin)
    f.flush()
    return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def sass_instructions(cubin: bytes):
  """Number of SASS instructions in a cubin (None without cuobjdump)."""
  import re
  out = _cuobjdump(cubin, "-sass")
  return None if out is None else len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", out, re.M))


def resource_usage(cubin: bytes):
  """(registers, stack bytes) of a cubin by Triton's bundled cuobjdump; (None, None) without it.

  STACK > 0 at 255 registers means spills (local memory on the tile loop's path): on sm_90 the
  seed1 tile (64 x 128, 3 stages) and both prefill tiles spill, decode tiles do not
  (benchmarks/NOTES.md, session 3)."""
  import re
  out = _cuobjdump(cubin, "--dump-resource-usage")
  if out is None:
    return None, None
  m = re.search(r"REG:(\d+) STACK:(\d+)", out)
  return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="a representative subset")
  args = parser.parse_args(argv)
  failures = 0
  counts = {}
  for name, overrides, config in VARIANTS:
    if args.quick and name not in QUICK:
      continue
    try:
      r = compile_variant(name, overrides, config)
      print(f"ok   {name:28s} M{r['block_m']:<4d}N{r['block_n']:<4d}w{r['warps']} s{r['stages']} "
            f"smem={r['shared']} regs={r['regs']} stack={r['stack']}B sass={r['instructions']} "
            f"cubin={r['cubin']}B", flush=True)
      counts[name] = r["instructions"]
    except Exception as e:  # report every failing variant, then fail
      failures += 1
      print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
  # The specialization's promise: a strided cache (page stride and K / V offsets unlike a contiguous
  # cache's) compiles to the contiguous cache's code but for constants. Before commit 5cd9bb1 the
  # compiler re-added constant K / V offsets per pointer per tile: 26% more SASS in seed2's kernel.
  same = ("nhd-page-stride-constexpr-causal", "strided-constexpr")
  if all(counts.get(n) for n in same) and counts[same[0]] != counts[same[1]]:
    failures += 1
    print(f"FAIL {same[1]} has {counts[same[1]]} SASS instructions, {same[0]} {counts[same[0]]}: "
          "the strided build should differ only in constants", flush=True)
  if not args.quick:
    failures += check_plan_residency()
  print(f"{failures} failures")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
