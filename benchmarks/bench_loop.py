#!/usr/bin/env python3
"""What a call costs inside a jitted loop: per-call wall time beside the GPU's busy time, and FlagGems.

For each case x layout, our Triton backend is checked against the float32 reference, then timed two
ways a user's inference loop calls it:
  unrolled  K calls (default 32) on distinct q / rotated cache sets inside one jit; wall clock around
            block_until_ready, median over repeats, / K.
  stacked   K calls unrolled in one jit as a model's layers make them: call i reads layer i % S of
            the rotation sets stacked into one layer-stacked cache and takes call i-1's output as its
            q; six parameters, one result (the `unrolled` unit's 100+ parameters make the executable's
            own per-execution work dominate its figure: see `harness-floor`); / K.
  fori      a `lax.fori_loop` of N calls (default 64), each call's output the next call's q (so XLA
            cannot hoist the call out of the loop, and no op is added between calls); / N.
`harness-floor` (impl): the same loops with the attention call replaced by one trivial copy kernel
of q through the same launch route: what any one-kernel op costs in that loop.
`ms_pipelined`: the same function dispatched 8 times back to back with one wait (a loop that does not
read results every step: host work overlaps the previous execution's GPU work), / 8 / K.
Each record also carries the device busy time per call from a profiler trace (`ms_device`,
device_time.py), its ratio (`loop_over_device`), the kernels per call, and for the unrolled loop the
host-side events of the run (`host`: XLA thunks, driver calls; where the time between kernels goes).
FlagGems (CUDA-graph replay of the same K calls, bench_attention's unit) runs in the same process.

The `launch_floor` section times a trivial kernel the same way through each launch route this
process can take (XLA's Triton custom call, jax-triton's calls; an XLA fusion for scale), which
separates launch cost from kernel time.

  python benchmarks/bench_loop.py                      # GPU; writes benchmarks/results/<gpu>_<date>_loop_<jt>.json
  python benchmarks/bench_loop.py --tiny --impls jva-xla   # CPU dry run of the plumbing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
  if p not in sys.path:
    sys.path.insert(0, p)

import numpy as np  # noqa: E402

import bench_attention as ba  # noqa: E402  (sets the GPU env defaults before jax is imported; inputs,
#                                             reference, FlagGems unit, ceilings)
import device_time  # noqa: E402
import shapes  # noqa: E402

DEFAULT_CASES = ("seed1_prefill512", "seed2_small_mixed", "seed3_mixed55", "seed4_long200",
                 "seed4_distinct", "decode_256x4096")
IMPLS = ("jva-triton", "jva-xla", "flaggems", "harness-floor")
EXTRA_CONFIG: dict = {}  # --config: Config fields every jva-triton route takes (a tile sweep point)
log = ba.log


def jax_triton_version() -> Optional[str]:
  from jax_varlen_attn.backends.triton import call
  gen = call.jax_triton_generation()
  if gen is None:
    return None
  import importlib.metadata
  return importlib.metadata.version("jax-triton")


def routes_for(impl: str) -> List[tuple]:
  """(variant name, Config kwargs) per launch route of this process (jax-triton 0.3: both routes)."""
  if impl not in ("jva-triton", "harness-floor"):
    return [("default", {})]
  from jax_varlen_attn.backends.triton import call
  gen = call.jax_triton_generation()
  routes = ["xla"]
  if gen is not None:
    routes += ["ffi"] if gen >= (0, 4) else (["legacy", "ffi"] if call.ffi_available() else ["legacy"])
  return [(r, dict(launch=r, **EXTRA_CONFIG)) for r in routes]


def _metas(cd, ld, sets: int):
  return [dict(m, **(ld.meta_sets[s] if ld.meta_sets else {})) for s, m in enumerate(cd.metas[:sets])]


def _timed(env, args, rec, cd, fn, fargs, calls, ceilings, host: bool):
  sec, spread, n = ba.time_jax(env.jax, fn, fargs, args.reps, args.unit_time_s)
  ba.finish_timing(rec, cd, sec * 1e3 / calls, ceilings)
  rec["spread"], rec["reps"] = round(spread, 3), n
  rec["status"] = "ok"
  # 8 executions dispatched before one wait: a loop that does not read every step's results
  rec["ms_pipelined"] = round(ba.time_chained(env.jax, fn, *fargs, inner=8) * 1e3 / calls, 5)
  if env.on_gpu:
    dev = device_time.profile(env.jax, fn, fargs, calls)
    if dev is not None:
      ba.finish_timing(rec, cd, dev["busy_ms"], ceilings, suffix="_device")
      rec["ms_device_span"] = round(dev["span_ms"], 5)
      rec["kernels_per_call"] = dev["kernels_per_call"]
      rec["kernel_names"] = dev["names"]
      rec["loop_over_device"] = round(rec["ms"] / rec["ms_device"], 3)
      if host:
        rec["host"] = dev["host"]


def floor_call(env, route: str):
  """one(q, kv, meta) -> a copy of q by one trivial Triton kernel through launch `route`: the
  harness's own cost per call (same parameters and outputs as the attention units, kept alive by
  keep_unused), i.e. what any one-kernel op costs in this loop."""
  import triton
  import triton.language as tl
  from jax_varlen_attn.backends.triton import call

  @triton.jit
  def _copy(x_ptr, o_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(o_ptr + offs, tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)

  block = 1024  # elements per program: one small copy kernel, not a bandwidth test

  def one(q, kv, meta):
    flat = q.reshape(-1)
    out = env.jax.ShapeDtypeStruct(flat.shape, flat.dtype)
    grid = (-(-flat.size // block),)
    return call.launch(_copy, dict(x_ptr=flat), [out], grid, 4, 1, dict(N=flat.size, BLOCK=block),
                       route=route)[0].reshape(q.shape)

  return one


def _unit_op(env, cd, ld, impl, variant, config_kwargs, loop: str, jt):
  """(record, one(q, kv, meta), is the harness floor) of a unit."""
  rec = dict(ba.base_record(cd, ld.name, impl, variant), loop=loop, jax_triton=jt,
             config=dict(EXTRA_CONFIG))
  config = None
  if impl == "jva-triton" and config_kwargs:
    from jax_varlen_attn.backends.triton import Config
    config = Config(**config_kwargs)
  floor = impl == "harness-floor"
  one = floor_call(env, variant) if floor else ba.case_call(cd, ld, impl.split("-", 1)[1], config)
  return rec, one, floor


def _check_first(rec, cd, first, floor: bool) -> bool:
  """The first call's output: the reference's, or for the floor q itself."""
  if not floor:
    return ba.check(rec, cd, first)
  ok = bool(np.array_equal(np.asarray(first), np.asarray(cd.qs[0])))
  rec.update(status="ok" if ok else "wrong", what="copy of q, one kernel per call")
  return ok


def unrolled_unit(env, cd, ld, impl, variant, config_kwargs, args, ceilings, jt) -> dict:
  rec, one, floor = _unit_op(env, cd, ld, impl, variant, config_kwargs, "unrolled", jt)
  calls = min(cd.calls, args.calls)
  sets = min(cd.sets, calls)
  metas = _metas(cd, ld, sets)

  def many(qs, kvs, ms):
    return tuple(one(qs[i], kvs[i % sets], ms[i % sets]) for i in range(calls))

  fn = env.jax.jit(many, keep_unused=floor)
  fargs = (tuple(cd.qs[:calls]), tuple(ld.kv_sets[:sets]), tuple(metas))
  t0 = time.perf_counter()
  outs = fn(*fargs)
  env.jax.block_until_ready(outs)
  rec["compile_s"] = round(time.perf_counter() - t0, 2)
  rec["k_calls"], rec["sets"], rec["rotation_mb"] = calls, sets, cd.rotation_mb(calls)
  ok = _check_first(rec, cd, outs[0], floor)
  del outs
  if ok:
    _timed(env, args, rec, cd, fn, fargs, calls, ceilings, host=True)
  return rec


def stacked_unit(env, cd, ld, impl, variant, config_kwargs, args, ceilings, jt) -> dict:
  """K chained calls unrolled in one jit over a layer-stacked cache: call i reads layer i % S of
  [S, ...] (the S rotation sets stacked) and takes call i-1's output as its q, as a model's layers
  do. Six parameters and one result, so the executable's own per-execution work (which the
  `unrolled` unit's 100+ parameters make dominant) is amortized over the K calls."""
  jax, jnp = env.jax, env.jnp
  rec, one, floor = _unit_op(env, cd, ld, impl, variant, config_kwargs, "stacked", jt)
  calls = min(cd.calls, args.calls)
  sets = min(cd.sets, calls)
  stack = tuple(jnp.stack([ld.kv_sets[s][j] for s in range(sets)]) for j in range(len(ld.kv_sets[0])))
  meta = _metas(cd, ld, 1)[0]
  layers = [jnp.asarray(i % sets, jnp.int32) for i in range(calls)]

  def chain(q, kv, meta):
    x = q
    for i in range(calls):
      x = one(x, kv, dict(meta, layer=layers[i]))
    return x

  fn = jax.jit(chain, keep_unused=floor)
  fargs = (cd.qs[0], stack, meta)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*fargs))
  rec["compile_s"] = round(time.perf_counter() - t0, 2)
  rec["k_calls"], rec["sets"], rec["rotation_mb"] = calls, sets, cd.rotation_mb(calls)
  first = jax.jit(lambda q, kv, m: one(q, kv, dict(m, layer=layers[0])))(*fargs)
  ok = _check_first(rec, cd, first, floor)  # call 0 reads layer 0 = set 0 with set 0's metadata
  if ok:
    _timed(env, args, rec, cd, fn, fargs, calls, ceilings, host=False)
  del stack
  return rec


def fori_unit(env, cd, ld, impl, variant, config_kwargs, args, ceilings, jt) -> dict:
  """N chained calls in a fori_loop: call i's output is call i+1's q (same shape and dtype)."""
  jax = env.jax
  rec, one, _ = _unit_op(env, cd, ld, impl, variant, config_kwargs, "fori", jt)
  n = args.fori
  meta = _metas(cd, ld, 1)[0]

  def chain(q, kv, meta):
    return jax.lax.fori_loop(0, n, lambda i, x: one(x, kv, meta), q)

  fn = jax.jit(chain)
  fargs = (cd.qs[0], ld.kv_sets[0], meta)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*fargs))
  rec["compile_s"] = round(time.perf_counter() - t0, 2)
  rec["k_calls"], rec["sets"] = n, 1
  # Correctness is the unrolled record's (same kernel); here: one step equals one plain call.
  ok = ba.check(rec, cd, jax.jit(lambda q, kv, m: jax.lax.fori_loop(0, 1, lambda i, x: one(x, kv, m), q))(
      *fargs))
  if ok:
    _timed(env, args, rec, cd, fn, fargs, n, ceilings, host=False)
  return rec


# ---- the launch floor: a trivial kernel through each route -----------------------------------------

def launch_floor(env, args) -> List[dict]:
  """Per-call wall and device time of K chained trivial launches, per route."""
  jax, jnp = env.jax, env.jnp
  import triton
  import triton.language as tl
  from jax_varlen_attn.backends.triton import call

  @triton.jit
  def _plus_one(x_ptr, o_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(o_ptr + offs, tl.load(x_ptr + offs) + 1.0)

  n, k = 256, args.calls
  x = jnp.arange(n, dtype=jnp.float32)
  out = jax.ShapeDtypeStruct((n,), jnp.float32)
  routes = []
  for variant, kw in routes_for("jva-triton"):
    routes.append((f"route {variant}", lambda y, r=variant: call.launch(
        _plus_one, dict(x_ptr=y), [out], (1,), 1, 1, dict(N=n), route=r)[0]))
  routes.append(("xla fusion", lambda y: y + 1.0))
  recs = []
  for name, step in routes:
    rec = dict(impl="launch-floor", route=name, k_calls=k)

    def chain(y, step=step):
      for _ in range(k):  # optimization_barrier: XLA may not fuse the XLA steps into one kernel
        y = jax.lax.optimization_barrier(step(y))
      return y

    try:
      fn = jax.jit(chain)
      got = np.asarray(fn(x))
      want = np.arange(n, dtype=np.float32) + k
      if not np.array_equal(got, want):
        rec.update(status="wrong", note=f"max err {np.abs(got - want).max()}")
      else:
        sec, spread, reps = ba.time_jax(jax, fn, (x,), args.reps, args.unit_time_s)
        rec.update(status="ok", us=round(sec * 1e6 / k, 2), spread=round(spread, 3))
        dev = device_time.profile(jax, fn, (x,), k)
        if dev is not None:
          rec.update(us_device=round(dev["busy_ms"] * 1e3, 2), kernels_per_call=dev["kernels_per_call"],
                     host=dev["host"][:6])
    except Exception as e:
      rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:400]}")
    log(f"  launch floor {name:36s} {rec.get('status')} us/call {rec.get('us')} device {rec.get('us_device')}")
    recs.append(rec)
  return recs


# ---- report ----------------------------------------------------------------------------------------

def add_peer_ratios(records: List[dict]):
  """ours / FlagGems (same case and layout, this run), on wall loop time and on device time."""
  fg = {(r["case"], r["layout"]): r for r in records if r.get("impl") == "flaggems" and r.get("ms")}
  for r in records:
    peer = fg.get((r.get("case"), r.get("layout")))
    if r.get("impl", "").startswith("jva") and peer and r.get("ms"):
      r["over_flaggems"] = round(r["ms"] / peer["ms"], 3)
      if r.get("ms_device"):
        r["device_over_flaggems"] = round(r["ms_device"] / peer["ms"], 3)


def table(doc: dict) -> str:
  lines = [f"{doc['gpu']}  commit {doc['commit'][:10]}  jax-triton {doc['versions'].get('jax_triton')}  "
           f"triton {doc['versions'].get('triton')}  jax {doc['versions'].get('jax')}",
           f"{'case':18s} {'layout':10s} {'impl/route':22s} {'loop':8s} {'us/call':>8s} {'device':>8s} "
           f"{'loop/dev':>8s} {'/FlagGems':>9s}"]
  for r in doc["records"]:
    if r.get("impl") == "launch-floor":
      continue
    ms, dev = r.get("ms"), r.get("ms_device")
    lines.append(f"{r['case'][:18]:18s} {r['layout'][:10]:10s} {(r['impl'] + ':' + r['variant'])[:22]:22s} "
                 f"{r.get('loop', 'graph')[:8]:8s} {_us(ms):>8s} {_us(dev):>8s} "
                 f"{ba._fmt(r.get('loop_over_device'), 3):>8s} {ba._fmt(r.get('over_flaggems'), 3):>9s}"
                 + ("" if r.get("status") == "ok" else f"  {r.get('status')} {r.get('error', '')[:60]}"))
  for r in doc.get("launch_floor", []):
    lines.append(f"launch floor {r['route'][:36]:36s} {r.get('status')}: {r.get('us')} us/call, "
                 f"device {r.get('us_device')} us")
  return "\n".join(lines)


def _us(ms) -> str:
  return "-" if ms is None else f"{ms * 1e3:.1f}"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", default=",".join(DEFAULT_CASES))
  p.add_argument("--layouts", default="contiguous,strided")
  p.add_argument("--impls", default="jva-triton,flaggems", help="comma list of " + ",".join(IMPLS))
  p.add_argument("--routes", default=None, help="jva-triton launch routes (default: every one this "
                 "process has: xla, and ffi / legacy by jax-triton generation)")
  p.add_argument("--calls", type=int, default=32, help="calls unrolled in one jit")
  p.add_argument("--fori", type=int, default=64, help="calls in the fori_loop (0: skip)")
  p.add_argument("--config", default="", help="Config fields for every jva-triton route, "
                 "'block_m=128;num_warps=8' (recorded as config)")
  p.add_argument("--loops", default="unrolled,stacked,fori", help="comma list of unrolled, stacked, fori")
  p.add_argument("--reps", type=int, default=50)
  p.add_argument("--unit-time-s", type=float, default=1.0)
  p.add_argument("--max-sets", type=int, default=48)
  p.add_argument("--mem-gb", type=float, default=24.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
  p.add_argument("--strided-parity", type=int, default=1, choices=(0, 1))
  p.add_argument("--out", default=None, help="results name (benchmarks/results/<name>.json)")
  p.add_argument("--results-dir", default=str(HERE / "results"))
  p.add_argument("--no-ceilings", action="store_true")
  p.add_argument("--no-floor", action="store_true")
  p.add_argument("--floor-only", action="store_true", help="only the launch floor")
  p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny shapes")
  args = p.parse_args(argv)
  args.cases = args.cases.split(",")
  args.layouts = args.layouts.split(",")
  args.impls = args.impls.split(",")
  args.loops = args.loops.split(",")
  EXTRA_CONFIG.update(ba.parse_config_variant("cfg:" + args.config) if args.config else {})
  for i in args.impls:
    if i not in IMPLS:
      p.error(f"unknown impl {i!r}")
  # bench_attention's CaseData / setup_env read these
  args.min_calls = args.calls
  args.interpret = False
  args.device_time = 1
  if args.tiny:
    args.reps, args.max_sets, args.unit_time_s = min(args.reps, 3), 2, 0.2
    args.calls, args.min_calls, args.fori = min(args.calls, 2), min(args.calls, 2), min(args.fori, 2)
    args.no_ceilings = args.no_floor = True
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  if args.tiny:
    jax.config.update("jax_platforms", "cpu")
  env = ba.setup_env(args)
  if not env.on_gpu:
    env.why_not["harness-floor"] = "no GPU (the floor launches a compiled kernel)"
  jt = jax_triton_version() if "jva-triton" in args.impls and "jva-triton" not in env.why_not else None
  date = datetime.date.today().isoformat()
  gpu_tag = env.gpu.split()[1].lower() if env.on_gpu and len(env.gpu.split()) > 1 else "cpu"
  name = args.out or f"{gpu_tag}_{date}_loop_jt{(jt or 'none').replace('.', '')}"
  out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
  if out_dir is not None:
    log.open(out_dir / f"{name}.log")
  commit, dirty = ba.git_commit()
  if jt:
    env.versions["jax_triton"] = jt
  log(f"bench_loop: gpu {env.gpu}; commit {commit}; versions {env.versions}")
  ceilings = {"read_tbps": None, "copy_tbps": None, "matmul_fp16_tflops": None}
  ceil_detail = {}
  if env.on_gpu and not args.no_ceilings:
    ceilings, ceil_detail = ba.measure_ceilings(env, 10)
    log(f"ceilings: {ceilings}")
  cases = shapes.get_cases(tiny=args.tiny)
  if args.tiny:
    args.cases = [c for c in cases][:1]
  records: List[dict] = []
  doc = dict(commit=commit, commit_dirty=dirty, gpu=env.gpu, date=date, dtype=args.dtype,
             ceilings=ceilings, ceilings_detail=ceil_detail, versions=env.versions,
             skipped_impls=env.why_not, records=records, launch_floor=[],
             args={k: v for k, v in vars(args).items()},
             xla_flags=os.environ.get("XLA_FLAGS", ""),
             method=dict(
                 unrolled="k_calls calls on distinct q / rotated cache sets in one jit; wall clock "
                          "around block_until_ready, median / k_calls",
                 fori="fori_loop of k_calls calls, each call's output the next call's q; one cache set",
                 device="ms_device: GPU busy time per call (union of kernel intervals, profiler trace)",
                 flaggems="CUDA-graph replay of k_calls calls over the same rotation (bench_attention)"))
  results = Path(args.results_dir) / f"{name}.json"
  results.parent.mkdir(parents=True, exist_ok=True)

  def save():
    add_peer_ratios(records)
    text = json.dumps(doc, indent=1, default=ba._json_default)
    results.write_text(text)
    if out_dir is not None:
      (out_dir / results.name).write_text(text)

  if env.on_gpu and "jva-triton" in args.impls and not args.no_floor and "jva-triton" not in env.why_not:
    doc["launch_floor"] = launch_floor(env, args)
  ref_cache: dict = {}
  for cname in ([] if args.floor_only else args.cases):
    case = cases[cname]
    cd = ba.CaseData(env, case, args, ref_cache)
    for lay in args.layouts:
      ld = ba.build_layout(env, cd, lay)
      for impl in args.impls:
        if impl in env.why_not:
          continue
        units = []
        if impl == "flaggems":
          units.append(("graph", lambda: dict(ba.flaggems_unit(env, cd, ld, args, ceilings), loop="graph")))
        else:
          for variant, kw in routes_for(impl):
            routed = impl in ("jva-triton", "harness-floor")
            if args.routes and routed and variant not in args.routes.split(","):
              continue
            if "unrolled" in args.loops:
              units.append((variant, lambda v=variant, kw=kw: unrolled_unit(
                  env, cd, ld, impl, v, kw, args, ceilings, jt)))
            if "stacked" in args.loops:
              units.append((variant, lambda v=variant, kw=kw: stacked_unit(
                  env, cd, ld, impl, v, kw, args, ceilings, jt)))
            if "fori" in args.loops and args.fori and impl != "harness-floor":
              units.append((variant, lambda v=variant, kw=kw: fori_unit(
                  env, cd, ld, impl, v, kw, args, ceilings, jt)))
        for variant, unit in units:
          try:
            rec = unit()
          except Exception as e:
            rec = dict(ba.base_record(cd, lay, impl, variant), status="error",
                       error=f"{type(e).__name__}: {str(e)[:300]}")
            log(traceback.format_exc(), quiet=True)
          records.append(rec)
          log(f"  {cname:18s} {lay:10s} {impl}:{rec.get('variant')} {rec.get('loop', '')} "
              f"us={_us(rec.get('ms'))} device={_us(rec.get('ms_device'))} {rec.get('status')} "
              f"{rec.get('error', '')[:120]}")
          ba.free_device(env)
      del ld
    del cd
    ba.free_device(env)
    save()
  save()
  log(f"wrote {results}")
  log(table(doc))
  return 0


if __name__ == "__main__":
  sys.exit(main())
