#!/usr/bin/env python3
"""Experiment (issue 15): can a matmul of our own read a decode step's weights faster than XLA's?

A batch-1 step of the serving model spends ~1.05 ms of its 1.8 ms of GPU time in XLA's GEMMs for
4 rows (benchmarks/NOTES.md session 9): the weights read at 2.5-3.4 TB/s of a 4.5 TB/s ceiling,
split-K with f32 partials summed again by the next fusion. This times, for the model's four
projections and a few row counts M, `x [M, K] @ w [K, N]` (bf16, f32 accumulation, bf16 out):

  xla       jnp.dot under jit, as the model calls it
  triton    `skinny_matmul_kernel` below, per variant (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages):
            a program per BLOCK_N columns (x SPLIT_K key ranges), x's rows padded to 16 for the MMA;
            SPLIT_K > 1 writes f32 partials that one XLA fusion sums (as XLA's split-K does)

Each timed call runs the product over ROTATION distinct weight sets, as a model's layers do, so
the weights come from HBM (the sets together exceed L2). Device time from a profiler trace per
product; TB/s over the weight bytes; % of the read ceiling measured in the same run. Every record
is checked against a float64 NumPy product first.

  python benchmarks/bench_gemv.py                       # GPU; writes <gpu>_<date>_gemv.json
  python benchmarks/bench_gemv.py --tiny                # CPU plumbing (Triton's interpreter)
  python benchmarks/bench_gemv.py --nk                  # the weight stored [N, K], CUDA-core dots
  python benchmarks/bench_gemv.py --partials --rows 4,16   # XLA's split-K GEMM vs its batched form
  python benchmarks/bench_gemv.py --mosaic              # a Mosaic GPU kernel streaming w by TMA
  python benchmarks/bench_gemv.py --mlp --rows 1,16     # the MLP block in forms XLA may fuse differently

--mlp: the model's whole MLP, down(silu(gate(x)) * up(x)), in MLP_FORMS (what XLA fuses
differs by how gate and up reach silu * up): "fused" is the model's today (one gate|up matmul,
its output split in halves), "fused_f32" the same with gate|up in f32 until silu * up,
"separate" two matmuls, "interleaved" one matmul whose columns
alternate gate / up (so silu * up reads neighbours of one row, not two halves). Records the
kernels a call and their names: the question is whether a form lets XLA fold silu * up (a
kernel and a graph node a layer, ~2.3 us at batch 16) into a matmul or its split-K sum.
The "triton_*" forms are mlp_fused.py's one-kernel MLP per FUSED_MLP_VARIANTS (its docstring).

--mosaic: `gemv_mosaic.py` (its docstring), per variant (BLOCK_N, BLOCK_K, SPLIT_K, stages): the
weight as wgmma's A operand, streamed by TMA `stages` tiles deep, x padded to 16 rows beforehand
(untimed: a model's producer would write it so); the timed op includes the fusion that sums the
K ranges. GPU only (sm_90a).

--partials: XLA's GEMM without its split-K sum. The model's step pays, after each split-K GEMM, a
separate reduce kernel (1.3-1.5 us, three a layer; NOTES.md session 16 item 4). Asked as a batched
dot, `x [M, S, K/S] x w [S, K/S, N] -> f32 partials [S, M, N]`, XLA runs the K ranges as a batch
and the sum could move into the kernel that consumes the projection (rope_write_kv, add_rms_norm).
Records "xla-partials" time only the batched dot (kernels_per_call says whether XLA added any);
the check sums the partials. Worth building only where it beats "xla" by the reduce's 1.3 us.

--nk: `gemv_nk_kernel`, the weight stored [out, in] (each program streams whole rows of it, K
contiguous) and no MMA: each row of x times each weight row, summed over K in f32 on the CUDA
cores (what a GEMV of 1-4 rows needs; tl.dot pads the rows to 16). Session 14's fused projections
(tl.dot over [N, K] tiles) read at 33-60% of the ceiling: this asks whether a plain GEMV does better.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import device_time  # noqa: E402  (benchmarks/)
import mlp_fused  # noqa: E402  (benchmarks/)
from jax_varlen_attn.backends.triton.call import launch  # noqa: E402

# (name, K, N) of the Qwen3-1.7B-like model's projections (bench_serving's preset).
SHAPES = [("qkv", 2048, 4096), ("o_proj", 2048, 2048), ("gate_up", 2048, 12288), ("down", 6144, 2048)]
TINY_SHAPES = [("qkv", 64, 128), ("down", 128, 64)]
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
VARIANTS = [(32, 256, 1, 4, 4), (16, 256, 1, 4, 4), (64, 128, 1, 4, 4), (32, 128, 2, 4, 4),
            (64, 256, 2, 4, 3), (32, 256, 4, 4, 3), (64, 128, 4, 4, 4), (128, 128, 8, 4, 3)]
TINY_VARIANTS = [(32, 32, 1, 1, 1), (16, 32, 2, 1, 1)]
# --nk: (BLOCK_N, BLOCK_K, num_warps, num_stages)
NK_VARIANTS = [(8, 256, 4, 3), (16, 256, 4, 3), (16, 128, 4, 4), (8, 512, 4, 2), (32, 128, 4, 3), (4, 512, 2, 3)]
TINY_NK_VARIANTS = [(8, 32, 1, 1), (16, 32, 1, 2)]
# --mosaic: (BLOCK_N, BLOCK_K, SPLIT_K, stages); CTAs = N / BLOCK_N x SPLIT_K (132 SMs on an H200)
MOSAIC_VARIANTS = [(64, 128, 1, 4), (64, 128, 2, 4), (64, 128, 4, 4), (64, 256, 2, 4), (128, 128, 2, 4),
                   (64, 64, 4, 8)]
ROTATION = 8


@triton.jit
def skinny_matmul_kernel(x_ptr, w_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr):
  """out [M, N] (SPLIT_K == 1, x's dtype) or partials f32[SPLIT_K, M, N] of x [M, K] @ w [K, N]."""
  pid_n = tl.program_id(0)
  pid_k = tl.program_id(1)
  offs_m = tl.arange(0, BLOCK_M)
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  rows = offs_m < M
  k_per: tl.constexpr = K // SPLIT_K
  acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
  for k0 in tl.range(0, k_per, BLOCK_K, num_stages=NUM_STAGES):
    offs_k = pid_k * k_per + k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=rows[:, None], other=0.0)
    w = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :])
    acc += tl.dot(x, w)
  at = offs_m[:, None] * N + offs_n[None, :]
  if SPLIT_K == 1:
    tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None])
  else:
    tl.store(out_ptr + pid_k * M * N + at, acc, mask=rows[:, None])


@triton.jit
def gemv_nk_kernel(x_ptr, w_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   NUM_STAGES: tl.constexpr):
  """out [M, N] = x [M, K] @ w[N, K].T, x's dtype: f32 products summed over K (no tl.dot)."""
  offs_m = tl.arange(0, BLOCK_M)
  offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  rows = offs_m < M
  acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
  for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=rows[:, None], other=0.0)
    w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :])
    acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
  tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
           mask=rows[:, None])


def gemv_nk(x, w_nk, block_n: int, block_k: int, num_warps: int, num_stages: int):
  """x [M, K] @ w_nk [N, K].T through `gemv_nk_kernel`; N % block_n == 0, K % block_k == 0."""
  (m, k), n = x.shape, w_nk.shape[0]
  consts = dict(M=m, K=k, N=n, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
                NUM_STAGES=num_stages)
  [y] = launch(gemv_nk_kernel, dict(x_ptr=x, w_ptr=w_nk), [jax.ShapeDtypeStruct((m, n), x.dtype)],
               (n // block_n,), num_warps, num_stages, consts)
  return y


def skinny_matmul(x, w, block_n: int, block_k: int, split_k: int, num_warps: int, num_stages: int):
  """x [M, K] @ w [K, N] through the kernel; N % block_n == 0 and K % (split_k * block_k) == 0."""
  (m, k), n = x.shape, w.shape[1]
  if n % block_n or k % (split_k * block_k):
    raise ValueError(f"N={n} must divide by block_n={block_n}, K={k} by split_k * block_k")
  out = (jax.ShapeDtypeStruct((m, n), x.dtype) if split_k == 1
         else jax.ShapeDtypeStruct((split_k, m, n), jnp.float32))
  consts = dict(M=m, K=k, N=n, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n,
                BLOCK_K=block_k, SPLIT_K=split_k, NUM_STAGES=num_stages)
  [y] = launch(skinny_matmul_kernel, dict(x_ptr=x, w_ptr=w), [out], (n // block_n, split_k), num_warps,
               num_stages, consts)
  return y if split_k == 1 else jnp.sum(y, axis=0).astype(x.dtype)


def mlp_forms(hidden: int, inter: int):
  """name -> (make_weights(rng, dtype) -> tuple of arrays, op(x, *weights) -> [M, hidden]).

  Every form computes the same function from the same gate / up / down matrices (the weights are
  laid out per form once, as a model would store them)."""
  def act(g, u):
    return jax.nn.silu(g) * u

  def fused(x, w_gu, w_d):
    g, u = jnp.split(jnp.dot(x, w_gu), 2, axis=-1)
    return jnp.dot(act(g, u), w_d)

  def separate(x, w_g, w_u, w_d):
    return jnp.dot(act(jnp.dot(x, w_g), jnp.dot(x, w_u)), w_d)

  def fused_f32(x, w_gu, w_d):  # gate|up left in f32 (the split-K sum's own precision) until silu * up
    g, u = jnp.split(jnp.dot(x, w_gu, preferred_element_type=jnp.float32), 2, axis=-1)
    return jnp.dot(act(g, u).astype(x.dtype), w_d)

  def interleaved(x, w_gu, w_d):
    y = jnp.dot(x, w_gu).reshape(x.shape[0], inter, 2)
    return jnp.dot(act(y[..., 0], y[..., 1]), w_d)

  forms = dict(
      fused=(lambda g, u, d: (jnp.concatenate([g, u], axis=1), d), fused),
      fused_f32=(lambda g, u, d: (jnp.concatenate([g, u], axis=1), d), fused_f32),
      separate=(lambda g, u, d: (g, u, d), separate),
      interleaved=(lambda g, u, d: (jnp.stack([g, u], axis=2).reshape(hidden, 2 * inter), d), interleaved))
  # mlp_fused.py's one-kernel MLP: (BI, BK, BN, warps, stages, atomic, prefetch) per variant.
  for v in (TINY_FUSED_MLP_VARIANTS if hidden < 1024 else FUSED_MLP_VARIANTS):
    if inter % v[0] == 0 and hidden % v[1] == 0 and hidden % v[2] == 0:
      forms["triton_bi%d_k%d_n%d_w%d_st%d_%s%s" % (*v[:5], "atomic" if v[5] else "partials",
                                                    "_prefetch" if v[6] else "")] = (
          lambda g, u, d, v=v: (mlp_fused.block_gate_up(g, u, v[0]), d),
          lambda x, wgu, wd, v=v: mlp_fused.fused_mlp(x, wgu, wd, *v))
  return forms


def mlp_reference(x, g, u, d):
  """float64 NumPy down(silu(x g) * (x u))."""
  x, g, u, d = (np.asarray(a, np.float64) for a in (x, g, u, d))
  a = x @ g
  return (a / (1 + np.exp(-a)) * (x @ u)) @ d


def run_mlp(rows, dtype, rotation: int, on_gpu: bool, tiny: bool) -> List[dict]:
  """--mlp: each form of mlp_forms at each row count; device time over `rotation` weight sets."""
  hidden, inter = (64, 192) if tiny else MLP_SHAPE
  rng = np.random.default_rng(1)
  sets = [tuple(jnp.asarray(rng.standard_normal(s) * 0.02, dtype)
                for s in ((hidden, inter), (hidden, inter), (inter, hidden))) for _ in range(rotation)]
  w_bytes = 3 * hidden * inter * 2
  records = []
  for m in rows:
    x = jnp.asarray(rng.standard_normal((m, hidden)), dtype)
    ref = mlp_reference(x, *sets[0])
    for form, (make, op) in mlp_forms(hidden, inter).items():
      laid = [make(*ws) for ws in sets]
      rec = dict(shape="mlp", M=m, K=hidden, N=inter, impl="xla-mlp", variant=form, weight_bytes=w_bytes)
      try:
        one = jax.jit(op)
        got = np.asarray(one(x, *laid[0]), np.float64)
        rec["rel_err"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        rec["status"] = "ok" if rec["rel_err"] < 2e-2 else "WRONG"
        if on_gpu and rec["status"] == "ok":
          n_w = len(laid[0])
          many = jax.jit(lambda a, *flat: [op(a, *flat[i:i + n_w]) for i in range(0, len(flat), n_w)])
          flat = [w for ws in laid for w in ws]
          dev = device_time.measure(jax, many, (x, *flat), rotation, breakdown=True)
          if dev:
            rec["device_us"] = round(dev["busy_ms"] * 1e3, 3)
            rec["span_us"] = round(dev["span_ms"] * 1e3, 3)
            rec["kernels_per_call"] = dev["kernels_per_call"]
            rec["per_kernel"] = dev["per_kernel"]
      except Exception as e:  # a form that fails to build is a record, not the end of the run
        rec["status"], rec["error"] = "error", f"{type(e).__name__}: {str(e)[:300]}"
      records.append(rec)
      print(f"mlp M={m:3d} {form:12s} {rec.get('device_us', '-'):>9} us busy {rec.get('span_us', '-'):>9} us "
            f"span {rec.get('kernels_per_call', '-'):>5} kernels {rec['status']}", flush=True)
      for k in rec.get("per_kernel", []):
        print(f"    {k['us_per_call']:8.2f} us x{k['count_per_call']:<4} {k['name']}")
  return records


# --mlp, mlp_fused.py: (BI, BK, BN, num_warps, num_stages, atomic, prefetch); I / BI programs.
FUSED_MLP_VARIANTS = [(64, 128, 256, 4, 4, False, False), (64, 128, 256, 4, 4, True, False),
                      (64, 128, 256, 4, 4, True, True), (64, 64, 256, 4, 6, True, True),
                      (48, 128, 256, 4, 4, False, False), (48, 128, 256, 4, 4, True, False),
                      (48, 128, 256, 4, 4, True, True), (48, 256, 256, 4, 3, True, True),
                      (48, 128, 256, 8, 4, True, True), (48, 64, 256, 4, 6, True, True),
                      (48, 64, 128, 4, 8, True, False), (32, 128, 256, 4, 4, True, True)]
TINY_FUSED_MLP_VARIANTS = [(32, 32, 32, 1, 1, False, False), (48, 32, 32, 1, 2, False, False),
                           (48, 32, 32, 1, 1, True, False)]
# (hidden, intermediate) of bench_serving's preset, for --mlp.
MLP_SHAPE = (2048, 6144)

# --partials: K split into this many ranges (the batch of the batched dot).
PARTIAL_SPLITS = (2, 4, 8)


def partials(x, w, splits: int):
  """f32[splits, M, N]: x [M, K] @ w [K, N] over `splits` contiguous K ranges, as one batched dot
  (the reshapes are free: row-major x and w)."""
  (m, k), n = x.shape, w.shape[1]
  xs = x.reshape(m, splits, k // splits)
  ws = w.reshape(splits, k // splits, n)
  return jax.lax.dot_general(xs, ws, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default="1,4,16", help="comma list of M")
  p.add_argument("--tiny", action="store_true", help="CPU plumbing run: tiny shapes, interpreter, float16 "
                 "(the interpreter's tl.dot mistakes bfloat16 bits)")
  p.add_argument("--nk", action="store_true", help="XLA against gemv_nk_kernel only (docstring)")
  p.add_argument("--partials", action="store_true",
                 help="XLA's GEMM against its batched, unsummed form only (docstring)")
  p.add_argument("--mosaic", action="store_true", help="XLA against gemv_mosaic.py only (docstring)")
  p.add_argument("--xla-only", action="store_true",
                 help="XLA's GEMM alone (to compare XLA_FLAGS, e.g. its exhaustive tiling search)")
  p.add_argument("--mlp", action="store_true", help="the whole MLP block in MLP_FORMS only (docstring)")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.mosaic and args.tiny:
    p.error("--mosaic runs on an H100 / H200 only (no interpreter run)")
  if args.mosaic:
    import gemv_mosaic  # noqa: F401  (benchmarks/)
  on_gpu = any(d.platform == "gpu" for d in jax.devices())
  if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
    p.error("no GPU: run with TRITON_INTERPRET=1 (and --tiny)")
  shapes, variants = (TINY_SHAPES, TINY_VARIANTS) if args.tiny else (SHAPES, VARIANTS)
  rotation = 2 if args.tiny else ROTATION
  dtype = jnp.float16 if args.tiny else jnp.bfloat16
  rng = np.random.default_rng(0)
  ceiling = None
  if on_gpu:
    from bench_serving import read_ceiling
    ceiling = read_ceiling(2048)
  gpu = jax.devices()[0].device_kind
  records: List[dict] = []
  if args.mlp:
    records = run_mlp([int(r) for r in args.rows.split(",")], dtype, rotation, on_gpu, args.tiny)
    shapes = []
  for name, k, n in shapes:
    ws = [jnp.asarray(rng.standard_normal((k, n)) * 0.02, dtype) for _ in range(rotation)]
    w_bytes = k * n * 2
    for m in [int(r) for r in args.rows.split(",")]:
      x = jnp.asarray(rng.standard_normal((m, k)), dtype)
      ref = np.asarray(x, np.float64) @ np.asarray(ws[0], np.float64)
      impls = [("xla", "jnp.dot",
                lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))]
      checks = {}  # impl variant -> the op checked against ref, where it differs from the timed one
      if args.partials:
        for sp in PARTIAL_SPLITS:
          if k % sp == 0:
            impls.append(("xla-partials", f"splits{sp}", lambda a, b, sp=sp: partials(a, b, sp)))
            checks[f"splits{sp}"] = lambda a, b, sp=sp: jnp.sum(partials(a, b, sp), axis=0)
      elif args.mosaic:
        ok = [v for v in MOSAIC_VARIANTS if n % v[0] == 0 and k % (v[2] * v[1]) == 0]
        impls += [("mosaic", "mosaic_n%d_k%d_s%d_st%d" % v,
                   lambda a, b, v=v, m=m: gemv_mosaic.matmul(a, b, m, *v)) for v in ok]
        # The weight stored [N, K] too (wgmma's A operand as it lies; a transposed copy, same bytes).
        impls += [("mosaic", "mosaic_nk_n%d_k%d_s%d_st%d" % v,
                   lambda a, b, v=v, m=m: gemv_mosaic.matmul(a, b, m, *v, w_nk=True), True) for v in ok]
      elif args.nk:  # the weight passed as [N, K] (a transposed copy: the same bytes)
        impls += [("triton-nk", "nk_n%d_k%d_w%d_st%d" % v,
                   lambda a, b, v=v: gemv_nk(a, b, *v), True)
                  for v in (TINY_NK_VARIANTS if args.tiny else NK_VARIANTS) if n % v[0] == 0 and k % v[1] == 0]
      elif not args.xla_only:
        impls += [("triton", "n%d_k%d_s%d_w%d_st%d" % v, lambda a, b, v=v: skinny_matmul(a, b, *v))
                  for v in variants if n % v[0] == 0 and k % (v[2] * v[1]) == 0]
      ws_nk = [w.T.copy() for w in ws] if args.nk or args.mosaic else None
      xp = None
      if args.mosaic:
        xp = gemv_mosaic.pad_rows(x)
      for impl, variant, op, *nk in impls:
        one = jax.jit(op)
        sets = ws_nk if nk else ws
        xin = xp if impl == "mosaic" else x
        rec = dict(shape=name, M=m, K=k, N=n, impl=impl, variant=variant, weight_bytes=w_bytes)
        try:
          checked = jax.jit(checks[variant]) if variant in checks else one
          got = np.asarray(checked(xin, sets[0]), np.float64)
          rec["rel_err"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
          rec["status"] = "ok" if rec["rel_err"] < 2e-2 else "WRONG"
          if on_gpu and rec["status"] == "ok":
            many = jax.jit(lambda a, *bs, op=op: [op(a, b) for b in bs])
            dev = device_time.measure(jax, many, (xin, *sets), rotation)
            if dev:
              rec["device_us"] = round(dev["busy_ms"] * 1e3, 3)
              rec["kernels_per_call"] = dev["kernels_per_call"]
              rec["tbps"] = round(w_bytes / (dev["busy_ms"] / 1e3) / 1e12, 3)
              rec["pct_ceiling"] = round(100 * rec["tbps"] * 1e3 / ceiling["read_gbps"], 1)
        except Exception as e:  # a variant that fails to build is a record, not the end of the run
          rec["status"], rec["error"] = "error", f"{type(e).__name__}: {str(e)[:300]}"
        records.append(rec)
        print(f"{name:8s} M={m:3d} {impl:9s} {variant:22s} {rec.get('device_us', '-'):>9} us "
              f"{rec.get('tbps', '-'):>6} TB/s {rec.get('pct_ceiling', '-'):>5}% {rec['status']}", flush=True)
  commit = os.environ.get("JVA_COMMIT", "unknown")
  date = datetime.date.today().isoformat()
  out = args.out or f"{gpu.lower().replace(' ', '_').replace('nvidia_', '')}_{date}_gemv"
  doc = dict(benchmark="skinny matmul: XLA vs a Triton kernel of ours", commit=commit, gpu=gpu, date=date,
             read_ceiling=ceiling, rotation=rotation, dtype=jnp.dtype(dtype).name, records=records,
             xla_flags=os.environ.get("XLA_FLAGS", ""))
  out_dir = Path(os.environ.get("OUT") or HERE / "results")
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{out}.json"
  path.write_text(json.dumps(doc, indent=1))
  print(f"wrote {path}")
  # The table to read: per (shape, M), the best triton variant against XLA.
  for name, k, n in shapes:
    for m in sorted({r["M"] for r in records}):
      rs = [r for r in records if r["shape"] == name and r["M"] == m and "device_us" in r]
      xla = [r for r in rs if r["impl"] == "xla"]
      tri = sorted((r for r in rs if r["impl"] in ("triton", "triton-nk", "xla-partials", "mosaic")),
                   key=lambda r: r["device_us"])
      if xla and tri:
        print(f"{name:8s} M={m:3d} xla {xla[0]['device_us']:8.2f} us ({xla[0]['pct_ceiling']}%)  best other "
              f"{tri[0]['variant']} {tri[0]['device_us']:8.2f} us ({tri[0]['pct_ceiling']}%)  "
              f"ratio {tri[0]['device_us'] / xla[0]['device_us']:.3f}")
  return 0 if all(r["status"] != "WRONG" for r in records) else 1


if __name__ == "__main__":
  sys.exit(main())
