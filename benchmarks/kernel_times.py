"""Kernel durations (device time of the kernel alone, from Nsight Compute) of ours and FlagGems.

bench_attention.py times a jitted function of K calls by wall clock, which includes the executable's
dispatch; FlagGems is timed by CUDA-graph replay. For the small seed cases (8-40 us) that difference
matters, so this script lets `ncu` read each kernel's `gpu__time_duration` instead:

    bash benchmarks/kernel_times.sh seed1_prefill512,seed2_small_mixed   # on the GPU machine

It builds the case (benchmarks/shapes.py; fp16, NHD contiguous cache), runs each implementation
--warmup times (compiles, autotunes), then --reps more inside cudaProfilerStart/Stop so ncu profiles
only those. With --configs it runs a list of Triton configs (a sweep) instead of the default one;
the summary lines name each config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import shapes  # noqa: E402


def build(case: shapes.Case, seed: int = 0, strided: bool = False):
  """Inputs of `case`; strided: every cache is every other page of a storage twice as large (the
  real pages at odd slots), as in benchmarks/shapes.py's strided layout."""
  rng = np.random.default_rng(seed)
  h, hk, d, bs = case.num_heads, case.num_kv_heads, case.head_dim, case.block_size
  q = rng.standard_normal((case.total_q, h, d)).astype(np.float16)
  pages = case.num_blocks * (2 if strided else 1)
  k = rng.standard_normal((pages, bs, hk, d)).astype(np.float16)
  v = rng.standard_normal((pages, bs, hk, d)).astype(np.float16)
  return dict(q=q, k=k, v=v, cu=np.asarray(case.cu_seqlens_q, np.int32),
              used=np.asarray(case.seqused_k, np.int32), table=case.block_table(seed))


def ours(case: shapes.Case, data: dict, config_kwargs: dict, strided: bool = False,
         wide_contiguous: bool = False, kv_dtype: str = "float16"):
  """wide_contiguous: the strided storage read as a plain NHD cache through block table 2p+1 (the
  very addresses the strided layout reads, with contiguous addressing). kv_dtype float8_e4m3fn /
  float8_e5m2: the cache cast to fp8, with unit descales per (sequence, kv head)."""
  import jax
  import jax.numpy as jnp
  from jax_varlen_attn import flash_attn_varlen_func
  from jax_varlen_attn.backends.triton import Config

  from jax_varlen_attn.layout import KVCacheLayout

  config = Config(**config_kwargs)
  layout = "NHD"
  if strided:
    span = case.block_size * case.num_kv_heads * case.head_dim
    layout = KVCacheLayout(block_size=case.block_size, num_kv_heads=case.num_kv_heads,
                           head_dim=case.head_dim, page_stride=2 * span, k_offset=span,
                           v_offset=span)
  descales = {}
  if kv_dtype != "float16":
    ones = jnp.ones((case.batch, case.num_kv_heads), jnp.float32)
    descales = dict(k_descale=ones, v_descale=ones)
  fn = jax.jit(lambda q, k, v, cu, used, table: flash_attn_varlen_func(
      q, k, v, max_seqlen_q=case.max_seqlen_q, cu_seqlens_q=cu, max_seqlen_k=case.max_seqlen_k,
      seqused_k=used, block_table=table, causal=case.causal, kv_layout=layout, backend="triton",
      config=config, **descales))
  args = [jnp.asarray(data[n]) for n in ("q", "k", "v", "cu", "used", "table")]
  args[1], args[2] = args[1].astype(kv_dtype), args[2].astype(kv_dtype)
  if wide_contiguous:
    args[5] = 2 * args[5] + 1
  return lambda: jax.block_until_ready(fn(*args))


def flaggems(case: shapes.Case, data: dict):
  import torch
  from flag_gems.ops import flash_attn_varlen_func as fg

  t = {n: torch.from_numpy(a).cuda() for n, a in data.items()}
  scale = 1.0 / np.sqrt(case.head_dim)

  def run():
    fg(t["q"], t["k"], t["v"], case.max_seqlen_q, t["cu"], case.max_seqlen_k, seqused_k=t["used"],
       softmax_scale=scale, causal=case.causal, block_table=t["table"], fa_version=2)
    torch.cuda.synchronize()
  return run


def summarize(csv_path: str, log_path: str, reps: int) -> list:
  """ncu's CSV (--print-units base: ns) + our log's PROFILE lines -> one row per profiled block:
  (label, {kernel name: median us}). Kernels are attributed to blocks in launch order; a block holds
  `reps` runs, each launching the same kernels, so its share is reps x (kernels of one run)."""
  import csv
  import statistics
  labels = [line.split(" ", 1)[1].strip() for line in open(log_path) if line.startswith("PROFILE ")]
  lines = open(csv_path).read().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
  kernels = [(r["Kernel Name"], float(r["Metric Value"].replace(",", "")) / 1e3)
             for r in csv.DictReader(lines[start:]) if r["Metric Name"] == "gpu__time_duration.sum"]
  if not labels or len(kernels) % (len(labels) * reps):
    return [("unattributed", {"kernels": len(kernels), "blocks": len(labels)})]
  per_block = len(kernels) // len(labels)
  rows = []
  for i, label in enumerate(labels):
    block = kernels[i * per_block:(i + 1) * per_block]
    by_name = {}
    for name, us in block:
      by_name.setdefault(name.split("(")[0][:60], []).append(us)
    rows.append((label, {n: round(statistics.median(v), 2) for n, v in by_name.items()}))
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--summarize", nargs=2, metavar=("NCU_CSV", "LOG"),
                 help="print the kernel medians of a finished ncu run, one line per block")
  p.add_argument("--case")
  p.add_argument("--impl", choices=("ours", "flaggems"))
  p.add_argument("--configs", default="[{}]", help="JSON list of Config kwargs (ours only)")
  p.add_argument("--strided", action="store_true", help="strided cache (ours only: FlagGems "
                 "5.0.2 reads a strided cache wrongly)")
  p.add_argument("--contiguous-2x", action="store_true", help="the strided storage read as a "
                 "contiguous cache (block table 2p+1): same addresses as --strided (ours only)")
  p.add_argument("--kv-dtype", default="float16", choices=("float16", "float8_e4m3fn", "float8_e5m2"),
                 help="the cache's dtype (ours only; fp8 with unit descales)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args(argv)
  if args.summarize:
    for label, kernels in summarize(*args.summarize, args.reps):
      total = round(sum(v for v in kernels.values() if isinstance(v, float)), 2)
      print(f"KERNEL_US {label}: total {total} | " + ", ".join(f"{n} {v}" for n, v in kernels.items()))
    return 0
  if not (args.case and args.impl):
    p.error("--case and --impl are required (or --summarize)")
  import torch  # for cudaProfilerStart/Stop (ncu --profile-from-start off)
  case = shapes.cases_for([args.case])[args.case]  # named, decode_<B>x<K> or prefill_<B>x<L>
  if (args.strided or args.contiguous_2x) and args.impl != "ours":
    p.error("--strided / --contiguous-2x are for --impl ours")
  if args.kv_dtype != "float16" and args.impl != "ours":
    p.error("--kv-dtype is for --impl ours")
  if args.strided and args.contiguous_2x:
    p.error("--strided or --contiguous-2x, not both")
  data = build(case, strided=args.strided or args.contiguous_2x)
  configs = json.loads(args.configs)
  tag = " strided" if args.strided else " contiguous_2x" if args.contiguous_2x else ""
  if args.kv_dtype != "float16":
    tag += " " + args.kv_dtype
  runs = ([(json.dumps(c, sort_keys=True) + tag,
            ours(case, data, c, args.strided, wide_contiguous=args.contiguous_2x, kv_dtype=args.kv_dtype))
           for c in configs]
          if args.impl == "ours" else [("flaggems", flaggems(case, data))])
  ready = []
  for label, run in runs:
    try:
      for _ in range(args.warmup):
        run()
      ready.append((label, run))
    except Exception as e:  # a config that does not fit (registers, shared memory) is reported
      print(f"SKIP {args.case} {args.impl} {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
  for label, run in ready:  # one profiled block per config, in order: the summary labels them
    print(f"PROFILE {args.case} {args.impl} {label}", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(args.reps):
      run()
    torch.cuda.cudart().cudaProfilerStop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
