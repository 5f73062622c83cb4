"""Sustained prefill under the GPU's power cap: ms a call, SM clock and power, ours against cuDNN.

    python3 benchmarks/power_sample.py --case prefill_4x4096 --seconds 5

Runs each implementation back to back for --seconds (calls queued without host syncs, one sync
every 20 calls) while `nvidia-smi` samples the SM clock, the instantaneous power and the clock-event
reasons every 20 ms, and prints per implementation: ms a call over the sustained stretch (wall over
calls, so it includes nothing but the GPU's queue once it is full), the median clock and power,
and the share of samples with the SW power cap reason (0x4) set. The Mosaic kernel runs through
`mosaic.attention` (causal fp16, 16 q / 8 kv heads, head dim 128, pages of 16 shuffled); cuDNN
through `jax.nn.dot_product_attention(implementation="cudnn")` on the same problem as dense
[B, S, H, D] arrays. Needs a Hopper GPU and nvidia-smi.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))



def _fields() -> str:
  """nvidia-smi's query: the instantaneous power where the driver has it, else the averaged one."""
  probe = subprocess.run(["nvidia-smi", "--query-gpu=power.draw.instant", "--format=csv,noheader"],
                         capture_output=True, text=True)
  power = "power.draw.instant" if probe.returncode == 0 and "W" in probe.stdout else "power.draw"
  return f"timestamp,clocks.sm,{power},clocks_event_reasons.active"


def _sustain(fn, seconds: float) -> tuple:
  """(calls, wall s, first and last wall clock) of running fn back to back for `seconds`."""
  import jax
  jax.block_until_ready(fn())
  calls, t0 = 0, time.time()
  while time.time() - t0 < seconds:
    outs = [fn() for _ in range(20)]
    jax.block_until_ready(outs[-1])
    calls += 20
  t1 = time.time()
  return calls, t1 - t0, t0, t1


def _samples(path: str, t0: float, t1: float):
  out = []
  for row in csv.reader(open(path)):
    try:
      ts = time.mktime(time.strptime(row[0].strip()[:19], "%Y/%m/%d %H:%M:%S")) + float(
          "0" + row[0].strip()[19:])
      out.append((ts, float(row[1].split()[0]), float(row[2].split()[0]), int(row[3], 16)))
    except (ValueError, IndexError):
      continue
  # The middle of the stretch (the first and last half second are ramps).
  return [s for s in out if t0 + 0.5 <= s[0] <= t1 - 0.5]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--case", default="prefill_4x4096")
  ap.add_argument("--seconds", type=float, default=5.0)
  ap.add_argument("--json", help="write the rows here (with the GPU, jax version and JVA_COMMIT)")
  args = ap.parse_args(argv)
  import jax

  import mosaic_profile
  import shapes
  from jax_varlen_attn.backends.pallas import mosaic

  case = shapes.cases_for([args.case])[args.case]
  spec, arrays = mosaic_profile.problem(case, 16)
  ours = jax.jit(lambda a: mosaic.attention(spec, a)[0])
  try:
    dense = mosaic_profile.dense_problem(case)
  except ValueError as e:
    ap.error(str(e))
  cudnn = jax.jit(mosaic_profile.cudnn_causal)
  runs = {"ours (Mosaic)": lambda: ours(arrays), "cuDNN dense": lambda: cudnn(*dense)}
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "smi.csv")
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={_fields()}", "--format=csv,noheader",
                            "-lms", "20"], stdout=open(path, "w"))
    try:
      spans = {name: _sustain(fn, args.seconds) for name, fn in runs.items()}
    finally:
      smi.terminate()
      smi.wait()
    print(f"{args.case}: sustained {args.seconds:.0f} s each, nvidia-smi every 20 ms")
    print(f"{'impl':<15} {'ms a call':>9} {'MHz':>6} {'W':>6} {'power cap':>9} {'samples':>7}")
    rows = []
    for name, (calls, wall, t0, t1) in spans.items():
      smp = _samples(path, t0, t1)
      mhz = float(np.median([x[1] for x in smp])) if smp else float("nan")
      watts = float(np.median([x[2] for x in smp])) if smp else float("nan")
      capped = float(np.mean([bool(x[3] & 0x4) for x in smp])) if smp else float("nan")
      ms = 1e3 * wall / calls
      rows.append(dict(impl=name, case=args.case, calls=calls, ms_per_call=ms, sm_mhz=mhz,
                       watts=watts, power_capped_share=capped, samples=len(smp),
                       kcycles_per_call=ms * mhz, joules_per_call=ms * watts / 1e3))
      print(f"{name:<15} {ms:>9.4f} {mhz:>6.0f} {watts:>6.0f} {capped:>8.0%} {len(smp):>7}")
  if args.json:
    import json
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    with open(args.json, "w") as f:
      json.dump(dict(commit=os.environ.get("JVA_COMMIT", ""), gpu=gpu, jax=jax.__version__,
                     date=time.strftime("%Y-%m-%d"), seconds=args.seconds, records=rows), f,
                indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
