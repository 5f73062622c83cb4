"""Executed instructions of the Mosaic prefill kernel against cuDNN's, one launch each, under ncu.

    python3 benchmarks/inst_mix.py --case prefill_4x4096 --out /tmp/mix

Under the power cap a kernel's speed is set by the work it does per tile (benchmarks/NOTES.md,
session 26 item 4), so this counts that work: Nsight Compute profiles one warm launch of each
implementation on the same problem (ours: `mosaic.attention`, causal fp16, 16 q / 8 kv heads, head
dim 128, pages of 16; cuDNN: `jax.nn.dot_product_attention(implementation="cudnn")` on the dense
[B, S, H, D] form) and prints, for each one's largest kernel, its duration, cycles, warp
instructions executed by pipe and by opcode (InstructionStats), issue activity and stall reasons
(WarpStateStats / SchedulerStats), each also per HGMMA instruction (both kernels do the same
matmuls, so non-tensor instructions per HGMMA compare their per-tile overhead). Clocks are left as
the GPU runs them and caches are flushed (ncu's defaults but clock control). The raw CSVs are
kept in --out. Needs a Hopper GPU, ncu and torch (for cudaProfilerStart / Stop).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SECTIONS = ("SpeedOfLight", "InstructionStats", "WarpStateStats", "SchedulerStats",
            "ComputeWorkloadAnalysis", "LaunchStats")
IMPLS = ("ours", "cudnn")
# Scalar metrics kept, side by side (raw names; those a given ncu lacks are skipped): these, the stall
# ratios and the per-pipe instruction rates (`_kept`).
SHOWN = ("gpu__time_duration.sum", "sm__cycles_active.avg", "smsp__inst_executed.sum",
         "smsp__issue_active.avg.pct_of_peak_sustained_active",
         "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
         "launch__registers_per_thread", "launch__grid_size", "launch__shared_mem_per_block")
_PAIR = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)\s*[:=]\s*([0-9][0-9.,eE+]*)")


def parse_raw(text: str) -> list:
  """ncu's `--page raw --csv` output -> one dict per kernel (metric name -> cell text); ncu's
  own log lines before the header are skipped."""
  lines = text.splitlines()
  start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
  if start is None:
    return []
  rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
  header, body = rows[0], rows[2:]  # rows[1]: units
  return [dict(zip(header, r)) for r in body if len(r) == len(header)]


def number(cell: str) -> float:
  try:
    return float(cell.replace(",", ""))
  except (AttributeError, ValueError):
    return float("nan")


def instances(cell: str) -> dict:
  """An instanced metric's cell (`--print-metric-instances details`: "KEY: value; ...") ->
  {key: value}."""
  return {k: number(v) for k, v in _PAIR.findall(cell or "")}


def largest(kernels: list) -> dict:
  return max(kernels, key=lambda k: number(k.get("gpu__time_duration.sum", "nan")))


def _child(case_name: str, impl: str) -> None:
  import jax
  import torch

  import mosaic_profile
  import shapes
  from jax_varlen_attn.backends.pallas import mosaic

  case = shapes.cases_for([case_name])[case_name]
  if impl == "ours":
    spec, arrays = mosaic_profile.problem(case, 16)
    f = jax.jit(lambda a: mosaic.attention(spec, a)[0])
    call = lambda: f(arrays)
  else:
    dense = mosaic_profile.dense_problem(case)
    g = jax.jit(mosaic_profile.cudnn_causal)
    call = lambda: g(*dense)
  for _ in range(2):
    jax.block_until_ready(call())
  torch.cuda.cudart().cudaProfilerStart()
  jax.block_until_ready(call())
  torch.cuda.cudart().cudaProfilerStop()


def _kept(metric: str) -> bool:
  return (metric in SHOWN
          or metric.startswith("smsp__average_warps_issue_stalled") and metric.endswith("ratio")
          or metric.startswith("sm__inst_executed_pipe_")
          and metric.endswith(".avg.pct_of_peak_sustained_active"))


def summary(picked: dict, top: int = 40) -> dict:
  """{impl: {kernel, metrics (SHOWN + stall ratios), opcodes (warp instructions), per_hgmma}}."""
  out = {}
  for name, k in picked.items():
    ops = instances(k.get("sass__inst_executed_per_opcode", ""))
    hgmma = ops.get("HGMMA") or float("nan")
    # A launch value reads "N (0: N)": its first figure.
    metrics = {m: number(v.split(" (")[0]) for m, v in k.items() if _kept(m)}
    metrics = {m: v for m, v in metrics.items() if v == v}
    keys = sorted(ops, key=lambda o: -ops[o])[:top]
    out[name] = dict(kernel=k.get("Kernel Name", ""), gpu=k.get("device__attribute_display_name", ""),
                     metrics=metrics,
                     opcodes={o: ops[o] for o in keys},
                     per_hgmma={o: round(ops[o] / hgmma, 3) for o in keys},
                     all=sum(ops.values()), all_per_hgmma=round(sum(ops.values()) / hgmma, 3))
  return out


def print_summary(case: str, s: dict, top: int) -> None:
  names = list(s)
  print(f"\n{case}: one launch each, ncu (clocks as run, caches flushed)")
  print(f"{'metric':<72} " + " ".join(f"{n:>14}" for n in names))
  metrics = [m for m in s[names[0]]["metrics"] if all(m in s[n]["metrics"] for n in names)]
  for m in metrics:
    print(f"{m[:72]:<72} " + " ".join(f"{s[n]['metrics'][m]:>14.6g}" for n in names))
  print("\nwarp instructions by opcode (and per HGMMA)")
  print(f"{'opcode':<14} " + " ".join(f"{n:>14} {'/HGMMA':>8}" for n in names))
  print(f"{'(all)':<14} " + " ".join(f"{s[n]['all']:>14.6g} "
                                      f"{s[n]['all_per_hgmma']:>8.2f}" for n in names))
  keys = sorted(set().union(*(s[n]["opcodes"] for n in names)),
                key=lambda o: -max(s[n]["opcodes"].get(o, 0) for n in names))
  for o in keys[:top]:
    print(f"{o:<14} " + " ".join(f"{s[n]['opcodes'].get(o, 0):>14.6g} "
                                 f"{s[n]['per_hgmma'].get(o, 0):>8.2f}" for n in names))


def csv_path(out: str, case: str, impl: str) -> str:
  return os.path.join(out, f"ncu_mix_{case}_{impl}.csv")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--case", default="prefill_4x4096")
  ap.add_argument("--out", default="/tmp", help="where the raw ncu CSVs go")
  ap.add_argument("--from-csv", action="store_true",
                  help="summarize the CSVs already in --out (no GPU, no ncu)")
  ap.add_argument("--json", help="write the summary here (with ncu's GPU name and $JVA_COMMIT)")
  ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
  ap.add_argument("--top", type=int, default=24, help="opcodes shown")
  args = ap.parse_args(argv)
  if args.child:
    _child(args.case, args.child)
    return 0
  os.makedirs(args.out, exist_ok=True)
  picked = {}
  for impl in IMPLS:
    path = csv_path(args.out, args.case, impl)
    if args.from_csv:
      text, rc, err = open(path).read(), 0, ""
    else:
      cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page",
             "raw", "--print-units", "base", "--print-metric-instances", "details"]
      for sec in SECTIONS:
        cmd += ["--section", sec]
      cmd += [sys.executable, os.path.abspath(__file__), "--case", args.case, "--child", impl]
      run = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
      text, rc, err = run.stdout, run.returncode, run.stderr
      with open(path, "w") as f:
        f.write(text)
    kernels = parse_raw(text)
    if rc or not kernels:
      print(f"{impl}: ncu exit {rc}, {len(kernels)} kernels\n{err[-1500:]}")
      continue
    picked[impl] = largest(kernels)
    print(f"{impl}: {len(kernels)} kernels profiled; largest: {picked[impl].get('Kernel Name', '?')[:90]}")
  if len(picked) < 2:
    return 1
  s = summary(picked)
  print_summary(args.case, s, args.top)
  if args.json:
    import json
    import time
    with open(args.json, "w") as f:
      json.dump(dict(commit=os.environ.get("JVA_COMMIT", ""), gpu=s[IMPLS[0]]["gpu"],
                     date=time.strftime("%Y-%m-%d"), case=args.case,
                     method="ncu, one warm launch each, --clock-control none, caches flushed; "
                            "sections " + ", ".join(SECTIONS), impls=s), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
