#!/usr/bin/env python3
"""Checks, then times, every implementation of varlen paged attention on the named cases, in one process.

For each case x cache layout x implementation: the output is first compared with a float32 reference
(precision HIGHEST, on the same inputs); a record over the tolerance (fp16 4e-3, bf16 1.6e-2) gets
"status": "wrong" and no time. Then it is timed:
  - JAX implementations: one jitted function applying the op to K input sets (K distinct q; caches
    rotated over S distinct sets so that the bytes brought through L2 exceed 4x its 50 MB where memory
    allows), unrolled in Python inside the jit; wall clock around block_until_ready; median of many
    repeats, divided by K. `ms_wall`: one plain (eager) call, launch cost included.
    `ms_device`: the GPU's own busy time per call (kernel timestamps from jax.profiler; see
    device_time.py), the like-for-like partner of a CUDA-graph replay where XLA's host-side launch
    cost exceeds a small kernel's time; `ms_device_span` adds the gaps the GPU waited for the host.
  - torch peers (FlagGems): CUDA-graph replay of K calls over the same rotation, CUDA events, median,
    divided by K. `ms_wall`: one plain Python call timed with events, launch cost included.
Ceilings measured in the same run: read TB/s (Triton sum kernel / torch.sum / jnp.sum over 4 GiB),
copy TB/s (bytes read + written), fp16 8192^3 matmul TFLOP/s (torch / jnp).

KV variants (ours only): `--kv-dtype float16,float8_e4m3fn` runs every case again on an fp8 cache
(each set quantized with per-kv-head scales amax / fp8 max, passed as k_descale / v_descale), and
`--sinks` each kv dtype once more with random s_aux. Records carry `kv_dtype` and `sinks`; `bytes`
(and so TB/s and % of the read ceiling) count the cache in its own dtype; `rel_err` is against the
reference on the inputs the kernel read (the dequantized cache), `rel_err_unquantized` against the
reference on the fp16 cache before quantization (the quantization error). `kv_answers` compares
the kv variants of each implementation side by side.
Score options (ours only): `--softcap C` and / or `--alibi` (slopes 2^(-8h/H)) apply to every call
and reference of the run; records carry `softcap` and `alibi`. Run once without them for the
baseline (e.g. `--impls jva-triton,jva-pallas --variants default,mosaic --softcap 30`).

Writes benchmarks/results/<name>.json (docs/contract.md's "Benchmark results" schema, plus extra
fields) and, when $OUT is set, a copy, the PNG plot and a log there. Prints a compact table last.

CPU dry run of the plumbing:  python benchmarks/bench_attention.py --tiny
GPU run: see benchmarks/README.md. The pieces, by job: bench_env.py (GPU env defaults, log, budget,
setup, timing, ceilings), bench_inputs.py (case data, layouts, record helpers), bench_peers.py
(naive XLA, JAX's paged_attention, FlagGems), bench_report.py (ratios, answers, JSON, table); this
file holds our implementations' units, the work list and main.
"""

from __future__ import annotations

import bench_env  # noqa: F401,E402  (first: sets the GPU env defaults before jax is imported)
import argparse
import contextlib
import datetime
import gc
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
  if p not in sys.path:
    sys.path.insert(0, p)


import shapes  # noqa: E402  (benchmarks/shapes.py)
# The pieces, by job (re-exported here: bench_loop, kernel_times and tune_triton use them as ba.*).
from bench_env import (Budget, Env, apply_ceilings, config_constant, git_commit, log,  # noqa: E402,F401
                       measure_ceilings, merge_ceilings, setup_env, time_chained, time_jax)
from bench_inputs import (ALL_IMPLS, ALL_LAYOUTS, CaseData, LayoutData, base_record,  # noqa: E402,F401
                          build_layout, check, finish_timing, kv_tag, kv_variant, run_jax_unit)
from bench_peers import DENSE_PEERS, dense_ok, dense_unit, flaggems_unit, naive_unit, paged_unit  # noqa: E402
from bench_report import (_fmt, _json_default, add_ratios, answers, kv_answers, table,  # noqa: E402,F401
                          write_results)

# Passes: what matters most runs first, so a budget cut drops the least important work.
# 0: ours (every layout) and FlagGems: the main peer; 1: JAX's paged_attention and the ffi-launch
# variant; 2: our Pallas backend; 3: the XLA ones.
PASS_OF = {("jva-triton", "default"): 0,
           ("flaggems", "default"): 0, ("jax-pallas-paged", "default"): 1,
           ("jva-triton", "ffi-launch"): 1,
           ("jva-pallas", "default"): 2,
           ("jva-xla", "default"): 3, ("xla-naive", "default"): 3}



def parse_config_variant(variant: str, prefix: str = "cfg:") -> dict:
  """Config kwargs of a `cfg:key=value;key=value` variant ({} for any other variant); `prefix`
  "mosaic-tiles:" reads a Mosaic tile variant's fields the same way."""
  if not variant.startswith(prefix):
    return {}
  kwargs = {}
  for item in filter(None, variant[len(prefix):].split(";")):
    key, _, value = item.partition("=")
    value = value.strip()
    flags = {"true": True, "false": False}  # a bool field: key=true / key=false
    kwargs[key.strip()] = (int(value) if value.lstrip("-").isdigit()
                           else flags.get(value.lower(), value))  # launch=xla
  return kwargs


def case_call(cd: CaseData, ld: LayoutData, backend: str, config) -> Callable:
  """one(q, kv, meta) -> out: flash_attn_varlen_func as the case calls it (kv: (k, v) or (kv,))."""
  from jax_varlen_attn import flash_attn_varlen_func
  case = cd.case

  def one(q, kv, meta):
    k, v = (kv[0], None) if len(kv) == 1 else kv
    return flash_attn_varlen_func(
        q, k, v, max_seqlen_q=case.max_seqlen_q, cu_seqlens_q=meta["cu_seqlens_q"],
        max_seqlen_k=case.max_seqlen_k, seqused_k=meta["seqused_k"], softmax_scale=cd.scale,
        causal=case.causal, block_table=meta["block_table"], kv_layout=ld.kv_layout,
        layer=meta.get("layer"), backend=backend, config=config, k_descale=meta.get("k_descale"),
        v_descale=meta.get("v_descale"), s_aux=meta.get("s_aux"), softcap=cd.softcap,
        alibi_slopes=meta.get("alibi_slopes"))

  return one


def jva_unit(env: Env, cd: CaseData, ld: LayoutData, impl: str, variant: str, args, ceilings) -> dict:
  rec = base_record(cd, ld.name, impl, variant)
  backend = impl.split("-", 1)[1]
  config = None
  if impl == "jva-triton" and variant != "default":
    Config = env.triton_config
    if variant == "ffi-launch":  # the default kernel through jax-triton's typed-FFI call
      config = Config(launch="ffi")
    elif variant.startswith("cfg:"):  # a sweep point: cfg:num_splits=2;block_n=32
      config = Config(**parse_config_variant(variant))
    elif variant.startswith(CONFIG_CONSTANT):  # the default kernel, another rule constant
      config = Config()
    else:
      raise ValueError(f"unknown jva-triton variant {variant!r}")
    rec["config"] = {**parse_config_variant(variant), "launch": config.launch}
  if impl == "jva-triton" and variant == "default":
    rec["variant"] = "page-stride-constexpr"  # the default address on every layout
  if impl == "jva-pallas" and is_mosaic_variant(variant):  # the Mosaic GPU kernel (pallas/mosaic.py)
    from jax_varlen_attn import PallasConfig
    config = PallasConfig(kernel="mosaic")
    if variant.startswith(MOSAIC_TILES):
      rec["config"] = parse_config_variant(variant, MOSAIC_TILES)
  layer = env.jnp.asarray(1, env.jnp.int32) if ld.stacked else None
  extra = [dict(layer=layer) for _ in range(cd.sets)] if ld.stacked else None
  if ld.meta_sets is not None:
    extra = [dict(extra[s] if extra else {}, **ld.meta_sets[s]) for s in range(cd.sets)]

  one = case_call(cd, ld, backend, config)
  # ms_wall: the public function called eagerly (argument checks and dispatch included)
  with (_mosaic_copies(impl == "jva-pallas" and variant == "mosaic-copies"), _mosaic_tiles(variant),
        _config_constant(variant)):
    run_jax_unit(env, cd, rec, one, ld.kv_sets, extra, cd.calls_for(impl), args, ceilings,
                 wall_fn=one)
  if ld.note:
    rec["note"] = (ld.note + " " + rec.get("note", "")).strip()
  return rec



# jva-pallas variants: "mosaic" the Mosaic GPU kernel as users get it; "mosaic-copies" the same
# kernel with q and the output through XLA's padded copies (as before it read / wrote them in place).
# "mosaic-tiles:block_kv=64;stages=3" the kernel with other MosaicTiles (a sweep point).
MOSAIC_VARIANTS = ("mosaic", "mosaic-copies")
MOSAIC_TILES = "mosaic-tiles:"


def is_mosaic_variant(variant: str) -> bool:
  return variant in MOSAIC_VARIANTS or variant.startswith(MOSAIC_TILES)


@contextlib.contextmanager
def _mosaic_tiles(variant: str):
  """A Mosaic tile sweep point, here rather than in the kernel: MosaicTiles.get_default returns
  the variant's tiles (the rest as the default's) while it lasts."""
  fields = parse_config_variant(variant, MOSAIC_TILES)
  if not fields:
    yield
    return
  import dataclasses
  import jax
  from jax_varlen_attn.backends.pallas import mosaic
  keep = mosaic.MosaicTiles.__dict__["get_default"]
  mosaic.MosaicTiles.get_default = classmethod(
      lambda cls, head_dim: dataclasses.replace(keep.__func__(cls, head_dim), **fields))
  jax.clear_caches()
  try:
    yield
  finally:
    mosaic.MosaicTiles.get_default = keep
    jax.clear_caches()


# jva-triton "const:NAME=V": the default kernel with the Triton backend's config.py constant NAME
# set to the integer V (const:SEARCH_PROBES=1: a binary sequence search; const:TAIL_PIECES=1: no
# tail plan).
CONFIG_CONSTANT = "const:"


@contextlib.contextmanager
def _config_constant(variant: str):
  """A rule-constant sweep point, here rather than in the kernel: the Triton backend's config.py
  constant is the variant's while it lasts (every jitted trace made under it rebuilt)."""
  if not variant.startswith(CONFIG_CONSTANT):
    yield
    return
  name, value = variant[len(CONFIG_CONSTANT):].split("=")
  with config_constant(name, int(value)):
    yield


@contextlib.contextmanager
def _mosaic_copies(on: bool):
  """An experiment, here rather than in the kernel: mosaic.direct_rows says no while it lasts."""
  if not on:
    yield
    return
  import jax
  from jax_varlen_attn.backends.pallas import mosaic
  keep = mosaic.direct_rows
  mosaic.direct_rows = lambda *a, **k: False
  jax.clear_caches()  # the pallas backend's jitted pieces were traced with the real rule
  try:
    yield
  finally:
    mosaic.direct_rows = keep
    jax.clear_caches()


# ---- work list -------------------------------------------------------------------------------------

def units_for(env: Env, case: shapes.Case, layout: str, impls, variants,
              default_kv: bool = True) -> List[Tuple[str, str]]:
  """(impl, variant) pairs to run; default_kv False (an fp8 cache or sinks): ours only."""
  out = []
  for impl in impls:
    if impl in env.why_not or (not default_kv and not impl.startswith("jva-")):
      continue
    if impl == "jva-triton":
      for var in variants:
        if var != "default" and env.triton_config is None:
          continue
        if (var == "ffi-launch" or var.startswith("cfg:")) and layout != "contiguous":
          continue
        if is_mosaic_variant(var):  # jva-pallas's
          continue
        out.append((impl, var))
    elif impl == "flaggems":
      if layout in ("contiguous", "strided", "contiguous_2x"):
        out.append((impl, "default"))
    elif impl == "jax-pallas-paged":
      if case.decode_only and layout == "contiguous":
        out.append((impl, "default"))
    elif impl == "xla-naive":
      if layout in ("contiguous", "strided"):
        out.append((impl, "default"))
    elif impl in DENSE_PEERS:
      if layout == "contiguous" and dense_ok(case):
        out.append((impl, "default"))
    elif impl == "jva-pallas":
      out.append((impl, "default"))
      out.extend((impl, var) for var in variants if is_mosaic_variant(var))
    else:
      out.append((impl, "default"))
  return out


def pass_of(impl: str, variant: str) -> int:
  return PASS_OF.get((impl, variant), PASS_OF.get((impl, "default"), 2))


def run_unit(env, cd, ld, impl, variant, args, ceilings) -> dict:
  if impl.startswith("jva-"):
    return jva_unit(env, cd, ld, impl, variant, args, ceilings)
  if impl == "flaggems":
    return flaggems_unit(env, cd, ld, args, ceilings)
  if impl == "jax-pallas-paged":
    return paged_unit(env, cd, ld, args, ceilings)
  if impl == "xla-naive":
    return naive_unit(env, cd, ld, args, ceilings)
  if impl in DENSE_PEERS:
    return dense_unit(env, cd, ld, impl, args, ceilings)
  raise ValueError(impl)


def free_device(env: Env):
  gc.collect()
  if env.torch is not None:
    try:
      env.torch.cuda.synchronize()
      env.torch.cuda.empty_cache()
    except Exception:
      pass



# ---- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", default="all", help="comma list of " + ",".join(shapes.CASE_NAMES) +
                 " or decode_<B>x<K> (B one-query sequences over K keys each; decode_<B>x<K>r<R>: lengths"
                 " spread over K +- R, same total)")
  p.add_argument("--impls", default=None, help="comma list of " + ",".join(ALL_IMPLS) +
                 " (default: all; --tiny: jva-xla,xla-naive)")
  p.add_argument("--layouts", default="contiguous,strided", help="comma list of " + ",".join(ALL_LAYOUTS))
  p.add_argument("--variants", default="default,ffi-launch",
                 help="jva-triton variants (default, ffi-launch, cfg:k=v;...), and \"mosaic\" / "
                      "\"mosaic-copies\": jva-pallas with PallasConfig(kernel=\"mosaic\") beside its "
                      "default (-copies: q and out through XLA's padded copies)")
  p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
  p.add_argument("--kv-dtype", default=None,
                 help="comma list of cache dtypes to run each case with: --dtype's (the default) and / or "
                      "float8_e4m3fn, float8_e5m2 (ours only; per-kv-head descales)")
  p.add_argument("--sinks", action="store_true",
                 help="also run every kv dtype with attention sinks (random s_aux; ours only)")
  p.add_argument("--softcap", type=float, default=0.0,
                 help="every call of the run with this softcap (> 0; ours only: the peers skip)")
  p.add_argument("--alibi", action="store_true",
                 help="every call of the run with ALiBi (slopes 2^(-8h/H); ours only)")
  p.add_argument("--reps", type=int, default=50, help="timed repeats per record (at most)")
  p.add_argument("--unit-time-s", type=float, default=1.0, help="stop repeating after this long")
  p.add_argument("--out", default=None, help="results name: benchmarks/results/<name>.json")
  p.add_argument("--results-dir", default=str(HERE / "results"),
                 help="where <name>.json / .png go (copies, and the .log, in $OUT when set)")
  p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny shapes, jva-xla + xla-naive")
  p.add_argument("--budget-s", type=float, default=0.0, help="skip remaining work after this many s")
  p.add_argument("--reserve-s", type=float, default=15.0, help="kept for writing results at the end")
  p.add_argument("--max-sets", type=int, default=48, help="distinct cache sets per case, at most")
  p.add_argument("--min-calls", type=int, default=32,
                 help="calls per jitted function, at least (amortizes the executable's dispatch, ~tens of us)")
  p.add_argument("--mem-gb", type=float, default=24.0, help="device memory for cache sets")
  p.add_argument("--naive-mem-gb", type=float, default=20.0, help="xla-naive skipped above this")
  p.add_argument("--strided-parity", type=int, default=1, choices=(0, 1),
                 help="real pages at even (0) or odd (1) slots of the strided storage")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-ceilings", action="store_true")
  p.add_argument("--interpret", action="store_true",
                 help="CPU plumbing test only: allow jva-triton (needs TRITON_INTERPRET=1), jva-pallas "
                      "and jax-pallas-paged in interpreter modes")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--device-time", type=int, default=1, choices=(0, 1),
                 help="also read each JAX record's device time from a profiler trace (GPU only)")
  args = p.parse_args(argv)
  args.cases = list(shapes.CASE_NAMES) if args.cases == "all" else args.cases.split(",")
  for c in args.cases:
    if not shapes.is_case(c):
      p.error(f"unknown case {c!r}")
  if args.impls is None:
    args.impls = "jva-xla,xla-naive" if args.tiny else ",".join(ALL_IMPLS)
  args.impls = args.impls.split(",")
  for i in args.impls:
    if i not in ALL_IMPLS:
      p.error(f"unknown impl {i!r}")
  args.layouts = args.layouts.split(",")
  for lay in args.layouts:
    if lay not in ALL_LAYOUTS:
      p.error(f"unknown layout {lay!r}")
  args.variants = args.variants.split(",")
  kv_dtypes = [args.dtype] if args.kv_dtype is None else args.kv_dtype.split(",")
  for kv in kv_dtypes:
    if kv not in (args.dtype, "float8_e4m3fn", "float8_e5m2"):
      p.error(f"--kv-dtype {kv!r}: {args.dtype} (--dtype) or float8_e4m3fn / float8_e5m2")
  args.kv_variants = [(kv, s) for kv in kv_dtypes for s in ((False, True) if args.sinks else (False,))]
  if args.tiny:
    args.reps = min(args.reps, 5)
    args.max_sets = min(args.max_sets, 4)
    args.min_calls = min(args.min_calls, 2)
    args.unit_time_s = min(args.unit_time_s, 0.5)
  return args


def run_layouts(env: Env, cd: CaseData, wanted: Dict[str, List[Tuple[str, str]]], args, ceilings,
                budget: Budget, records: List[dict]):
  """Runs the units `wanted` ({layout: [(impl, variant)]}) of one case's kv variant `cd`, appending
  a record per unit (skipped past the budget, an error record where a layout or a unit fails)."""
  for lay, us in wanted.items():
    if not us:
      continue
    if budget.over(reserve=args.reserve_s):
      for impl, var in us:
        records.append(dict(base_record(cd, lay, impl, var), status="skipped", note="budget"))
      continue
    try:
      ld = build_layout(env, cd, lay)
    except Exception as e:
      log(f"  layout {lay}: build failed: {type(e).__name__}: {e}")
      for impl, var in us:
        records.append(dict(base_record(cd, lay, impl, var), status="error",
                            error=f"layout build: {type(e).__name__}: {str(e)[:200]}"))
      continue
    for impl, var in us:
      if budget.over(reserve=args.reserve_s):
        records.append(dict(base_record(cd, lay, impl, var), status="skipped", note="budget"))
        continue
      t1 = time.perf_counter()
      try:
        rec = run_unit(env, cd, ld, impl, var, args, ceilings)
      except Exception as e:
        rec = base_record(cd, lay, impl, var)
        rec["status"] = "error"
        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"  {lay} {impl} {var}: ERROR {rec['error']}")
        log(traceback.format_exc(), quiet=True)
      rec["unit_s"] = round(time.perf_counter() - t1, 1)
      records.append(rec)
      log(f"  {lay:10s} {impl:16s} {kv_tag(cd.kv_dtype, cd.sinks):10s} {rec['variant'][:40]:22s} "
          f"ms={_fmt(rec.get('ms'), 4)} wall={_fmt(rec.get('ms_wall'), 4)} rel_err={rec.get('rel_err')} "
          f"{rec['status']} ({rec['unit_s']} s, t={budget.elapsed():.0f} s)")
      free_device(env)
    del ld
    free_device(env)


def main(argv=None) -> int:
  args = parse_args(argv)
  budget = Budget(args.budget_s)
  args.budget = budget
  out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
  date = datetime.date.today().isoformat()

  env_holder = {}
  import jax
  if args.tiny:
    jax.config.update("jax_platforms", "cpu")
  name = args.out
  if name is None:
    devs = [d for d in jax.devices() if d.platform == "gpu"]
    kind = devs[0].device_kind.split() if devs else []
    tag = "tiny_cpu" if args.tiny or not devs else (kind[1] if len(kind) > 1 else "gpu").lower()
    name = f"{tag}_{date}"
  if out_dir is not None:
    log.open(out_dir / f"{name}.log")
  log(f"bench_attention: {' '.join(sys.argv[1:])}")
  env = setup_env(args)
  env_holder["env"] = env
  commit, dirty = git_commit()
  log(f"gpu: {env.gpu}; commit {commit}{' (dirty)' if dirty else ''}; versions {env.versions}")

  ceilings, ceil_detail = {"read_tbps": None, "copy_tbps": None, "matmul_fp16_tflops": None}, {}
  if env.on_gpu and not args.tiny and not args.no_ceilings:
    t0 = time.perf_counter()
    ceilings, ceil_detail = measure_ceilings(env, 20)
    log(f"ceilings ({time.perf_counter() - t0:.1f} s): {ceilings} detail {ceil_detail}")

  cases = shapes.cases_for(args.cases, tiny=args.tiny)
  records: List[dict] = []
  results_path = Path(args.results_dir) / f"{name}.json"
  results_path.parent.mkdir(parents=True, exist_ok=True)
  doc = dict(commit=commit, gpu=env.gpu, date=date, dtype=args.dtype, ceilings=ceilings,
             ceilings_detail=ceil_detail, records=records,
             answers=None, commit_dirty=dirty, versions=env.versions,
             xla_flags=os.environ.get("XLA_FLAGS", ""),
             skipped_impls=env.why_not,
             args={k: v for k, v in vars(args).items() if k != "budget"},
             cases={n: cases[n].summary(args.dtype) for n in args.cases},
             method=dict(
                 jax="one jitted function applying the op to k_calls input sets (distinct q; caches "
                     "rotated over `sets` sets), wall clock around block_until_ready, median / k_calls; "
                     "ms_wall: one eager call (jva: the public function) incl. dispatch",
                 torch="CUDA-graph replay of k_calls calls over the same rotation, CUDA events, median / "
                       "k_calls; ms_wall: one plain Python call between CUDA events",
                 reference="float32, precision HIGHEST, dense masked softmax per sequence",
                 bytes="sum(seqused_k)*Hk*D*2*itemsize + q + out", flops="4*D*H*allowed causal pairs"))

  def save():
    doc["answers"] = answers(records, args.cases)
    doc["kv_answers"] = kv_answers(records)
    write_results(results_path, doc)
    if out_dir is not None:
      write_results(out_dir / f"{name}.json", doc)

  ref_cache: dict = {}
  passes = sorted(set(PASS_OF.values()))
  for pass_no in passes:
    for cname in args.cases:
      case = cases[cname]
      plain = not (args.softcap or args.alibi)  # score options: ours only, as sinks
      wanted_kv = {kvv: {lay: [u for u in units_for(env, case, lay, args.impls, args.variants,
                                                     default_kv=plain and kvv == (args.dtype, False))
                               if pass_of(*u) == pass_no] for lay in args.layouts}
                   for kvv in args.kv_variants}
      if not any(us for by_layout in wanted_kv.values() for us in by_layout.values()):
        continue
      if budget.over(reserve=args.reserve_s):
        for (kv, sinks), by_layout in wanted_kv.items():
          for lay, us in by_layout.items():
            for impl, var in us:
              records.append(dict(case=cname, layout=lay, impl=impl, variant=var, dtype=args.dtype,
                                  kv_dtype=kv, sinks=sinks, status="skipped", note="budget",
                                  bound="flops" if case.flop_bound else "bytes"))
        continue
      t0 = time.perf_counter()
      try:
        base_cd = CaseData(env, case, args, ref_cache)
      except Exception as e:
        log(f"case {cname}: input build failed: {type(e).__name__}: {e}")
        log(traceback.format_exc(), quiet=True)
        free_device(env)
        continue
      log(f"[pass {pass_no}] {cname}: sets {base_cd.sets}, calls {base_cd.calls}, touched/set "
          f"{base_cd.touched / 1e6:.1f} MB, inputs {time.perf_counter() - t0:.1f} s, "
          f"t={budget.elapsed():.0f} s")
      for (kv, sinks), wanted in wanted_kv.items():
        if not any(wanted.values()):
          continue
        try:
          cd = kv_variant(env, base_cd, kv, sinks, args, ref_cache)
        except Exception as e:
          log(f"case {cname} {kv_tag(kv, sinks)}: input build failed: {type(e).__name__}: {e}")
          log(traceback.format_exc(), quiet=True)
          continue
        if cd is not base_cd:
          log(f"  kv variant {kv_tag(kv, sinks)}: touched/set {cd.touched / 1e6:.1f} MB")
        run_layouts(env, cd, wanted, args, ceilings, budget, records)
        del cd
        free_device(env)
      del base_cd
      free_device(env)
      add_ratios(records)
      save()

  if ceil_detail and not budget.over(reserve=args.reserve_s / 2):
    # Measured again at the end, the best of both kept (merge_ceilings says why); every record's
    # % of the ceiling follows.
    t0 = time.perf_counter()
    end_ceilings, end_detail = measure_ceilings(env, 20)
    log(f"ceilings at the end ({time.perf_counter() - t0:.1f} s): {end_ceilings}")
    doc["ceilings_start"] = dict(ceilings)
    doc["ceilings_end"] = end_ceilings
    ceilings.update(merge_ceilings(ceilings, end_ceilings))
    ceil_detail.update({k + "_end": v for k, v in end_detail.items()})
    apply_ceilings(records, ceilings)
  order = {n: i for i, n in enumerate(args.cases)}
  lorder = {n: i for i, n in enumerate(ALL_LAYOUTS)}
  iorder = {n: i for i, n in enumerate(ALL_IMPLS)}
  records.sort(key=lambda r: (order.get(r["case"], 99), lorder.get(r["layout"], 9),
                              iorder.get(r["impl"], 9)))
  add_ratios(records)
  save()
  png = None
  if not args.no_plot:
    try:
      import plot
      png = results_path.with_suffix(".png")
      plot.plot(doc, png)
      if out_dir is not None and (out_dir / png.name).resolve() != png.resolve():
        shutil.copy(png, out_dir / png.name)
    except ImportError as e:
      log(f"no plot: {e}")
    except Exception as e:
      log(f"plot failed: {type(e).__name__}: {e}")
  log(f"wrote {results_path}" + (f" and {png}" if png else "") +
      (f"; copies in {out_dir}" if out_dir else "") + f"; total {budget.elapsed():.0f} s")
  for impl, why in env.why_not.items():
    log(f"not run: {impl}: {why[:100]}")
  a = doc["answers"]
  if a and a.get("per_case"):
    log(f"Q: {a['question']}\nA: {a['verdict']}")
    log("  case            contig ms  strided ms  strided/contig (device, /contig_2x device)")
    for r in a["per_case"]:
      log(f"  {r['case'][:15]:15s} {_fmt(r['contiguous_ms'], 4):>9s} {_fmt(r['strided_ms'], 4):>11s} "
          f"{_fmt(r['strided_over_contiguous'], 3):>6s} ({_fmt(r['strided_over_contiguous_device'], 3)}, "
          f"{_fmt(r['strided_over_contiguous_2x_device'], 3)})")
  log(table(doc))
  return 0


if __name__ == "__main__":
  sys.exit(main())
