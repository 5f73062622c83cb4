"""Mosaic prefill calls replayed by XLA: N calls in one jit, run R times, each against the first.

    python3 benchmarks/mosaic_replay.py                         # 8 calls over 2 input sets, 5 runs
    python3 benchmarks/mosaic_replay.py --between cudnn --second-executable
    python3 benchmarks/mosaic_replay.py --kernel ab/variant.py --between fresh
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/mosaic_replay.py   # no graphs

With XLA's command buffers on (the default), XLA captures a jit's run of kernels into a CUDA graph
and replays it on later runs, as in a model's jitted step. This script makes one such sequence:
`--calls` Mosaic calls (`mosaic.attention`, the package's or a copy of `mosaic.py`) over `--sets`
input sets (`mosaic_profile.problem`, causal fp16 prefill), run `--runs` times, and between runs
optionally:

  fresh   every run gets new input buffers (copies), the old ones kept alive
  keep    every run's outputs are kept alive (the next run's land elsewhere)
  alloc   a growing allocation from another jit
  cudnn   a jit of cuDNN's dense attention runs

`--second-executable` first runs a one-call jit of the same kernel (two executables holding it).
Each run's outputs must equal the first run's exactly; it prints each run's max |difference|, then
OK (with device busy time a call and the custom calls in the compiled HLO) or FAIL and the error,
exit status 1. Why it exists: benchmarks/NOTES.md session 29 item 1 (a harness died in a replay
that none of these sequences reproduced). One configuration a process: a failed launch leaves the
CUDA context unusable. Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BETWEEN = ("none", "fresh", "keep", "alloc", "cudnn")


def parse(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--case", default="prefill_8x1024")
  ap.add_argument("--calls", type=int, default=8, help="Mosaic calls in the jit")
  ap.add_argument("--sets", type=int, default=2, help="input sets the calls cycle through")
  ap.add_argument("--runs", type=int, default=5, help="runs after the first (the reference)")
  ap.add_argument("--kernel", default=None, help="a copy of mosaic.py (default: the package's)")
  ap.add_argument("--between", default="none", choices=BETWEEN)
  ap.add_argument("--second-executable", action="store_true")
  args = ap.parse_args(argv)
  if min(args.calls, args.sets, args.runs) < 1:
    ap.error("--calls, --sets and --runs must be positive")
  return args


def main(argv=None) -> int:
  args = parse(argv)
  import jax
  import jax.numpy as jnp

  import device_time
  import mosaic_profile
  import shapes
  from mosaic_ab import load_kernel

  if jax.default_backend() != "gpu":
    print("needs a Hopper GPU")
    return 2
  case = shapes.cases_for([args.case])[args.case]
  mod = load_kernel("replayed", args.kernel)
  problems = [mosaic_profile.problem(case, 16, seed=s) for s in range(args.sets)]
  spec, sets = problems[0][0], [a for _, a in problems]
  fn = jax.jit(lambda ss: [mod.attention(spec, ss[i % len(ss)])[0] for i in range(args.calls)])
  tag = (f"{args.case} calls={args.calls} sets={args.sets} between={args.between} "
         f"second_executable={args.second_executable} "
         f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  try:
    if args.second_executable:
      jax.block_until_ready(jax.jit(lambda a: mod.attention(spec, a)[0])(sets[0]))
    ref = [np.asarray(o, np.float32) for o in fn(sets)]
    alive = []
    for r in range(args.runs):
      use = sets
      if args.between == "fresh":
        use = [jax.tree.map(jnp.copy, s) for s in sets]
        alive.append(use)
      elif args.between == "alloc":
        grow = jnp.ones(((r + 1) * 3_000_000,), jnp.float32)
        alive.append(jax.jit(lambda x: x * 2 + 1)(grow))
      elif args.between == "cudnn":
        dense = [mosaic_profile.dense_problem(case, seed=1 + i) for i in range(2)]
        cudnn = jax.jit(lambda ds: [mosaic_profile.cudnn_causal(*d) for d in ds])
        alive.append(jax.block_until_ready(cudnn(dense)))
      outs = jax.block_until_ready(fn(use))
      if args.between == "keep":
        alive.append(outs)
      diff = max(float(np.abs(np.asarray(o, np.float32) - x).max()) for o, x in zip(outs, ref))
      print(f"  run {r}: max |output - first run's| {diff:.3g}", flush=True)
      if diff != 0:
        print(f"FAIL {tag}: run {r} differs from the first")
        return 1
    m = device_time.measure(jax, fn, (sets,), args.calls, runs=2)
    calls = fn.lower(sets).compile().as_text().count("custom-call(")
    print(f"OK {tag}: {m['busy_ms']:.4f} ms busy a call, {m['kernels_per_call']} kernels a call, "
          f"{calls} custom calls in the HLO")
    return 0
  except Exception as e:  # the launch failure surfaces as a JaxRuntimeError at the next sync
    print(f"FAIL {tag}: {type(e).__name__}: {str(e)[:300]}")
    sys.stdout.flush()
    os._exit(1)  # the CUDA context is gone: skip jax's teardown (it logs pages of errors)


if __name__ == "__main__":
  sys.exit(main())
