"""Variants of the Mosaic prefill kernel side by side, with cuDNN dense, in one process (device time).

    python3 benchmarks/mosaic_ab.py --kernels tree,base=ab/mosaic_base.py \
        --cases prefill_8x1024,prefill_4x4096,prefill_2x8192 --rounds 3 --json $OUT/ab.json

An experiment's harness (bench_attention times what lands; this times what might): each
`--kernels` entry is `tree` (the package's `backends/pallas/mosaic.py`) or `name=path`, a copy of
that module with one change, loaded as a module of its own, so every variant runs in the same
process on the same inputs. Per case (causal fp16, 16 q / 8 kv heads, head dim 128, pages of 16, or
P for a `prefill_<B>x<L>p<P>` case, shuffled, `mosaic_profile.problem`; `--sets` input sets, one
call each, so consecutive kernels read different caches and no two calls are alike: XLA merged equal
cuDNN calls, which read prefill_8x1024 at 0.035 ms against 0.094 ms for distinct calls in session
29): each variant's output is checked against the first kernel's (max |difference|, and no NaN /
inf), then the variants and cuDNN dense (`jax.nn.dot_product_attention(implementation="cudnn")` on
[B, S, H, D] arrays of the same sizes) are timed by device time (`device_time.measure`) in
`--rounds` rounds, the order rotated each round. Prints median device ms, TFLOP/s and the ratio to
cuDNN's median. Needs a Hopper GPU.

Its earlier form (two input sets, four passes a timed call) died with CUDA_ERROR_LAUNCH_FAILED at
its first timed call of main's own kernel with XLA's command buffers on (session 29), where the
same calls in other sequences ran (benchmarks/NOTES.md, session 29 item 1). With
XLA_FLAGS=--xla_gpu_enable_command_buffer= it ran (the JSON records XLA_FLAGS); device time is the
kernels' busy time either way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDNN = "cudnn-dense"


def parse_kernels(text: str) -> list:
  """'tree,name=path,...' -> [(name, path or None)]; names unique, `cudnn-dense` reserved."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, path = item.partition("=")
    if name == "tree" and path:
      raise ValueError("'tree' is the package's own module: give no path")
    if name != "tree" and not path:
      raise ValueError(f"{item!r}: give a variant as name=path (or 'tree')")
    if name == CUDNN or name in [n for n, _ in out]:
      raise ValueError(f"kernel name {name!r} is reserved or repeated")
    out.append((name, path or None))
  if not out:
    raise ValueError("no kernels given")
  return out


def load_kernel(name: str, path):
  """The `mosaic` module of the package, or a copy of it at `path` loaded under its own name."""
  if path is None:
    from jax_varlen_attn.backends.pallas import mosaic
    return mosaic
  spec = importlib.util.spec_from_file_location(f"mosaic_variant_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def rotations(names: list, rounds: int) -> list:
  """Round r times names rotated by r (each variant takes each place in the order)."""
  return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--kernels", default="tree")
  ap.add_argument("--cases", default="prefill_8x1024,prefill_4x4096,prefill_2x8192")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--sets", type=int, default=8,
                  help="input sets, one call each, a timed call (XLA merges equal calls)")
  ap.add_argument("--breakdown", action="store_true",
                  help="print and record each kernel's device us a call (the last round's run)")
  ap.add_argument("--json")
  args = ap.parse_args(argv)
  if args.sets < 1 or args.rounds < 1:
    ap.error("--sets and --rounds must be positive")
  try:
    kernels = parse_kernels(args.kernels)
  except ValueError as e:
    ap.error(str(e))
  import jax

  import bench_env
  import device_time
  import mosaic_profile
  import shapes

  if jax.default_backend() != "gpu":
    ap.error("needs a Hopper GPU")
  mods = {name: load_kernel(name, path) for name, path in kernels}
  records = []
  for cname, case in shapes.cases_for(args.cases.split(",")).items():
    sets = [mosaic_profile.problem(case, case.block_size, seed=s) for s in range(args.sets)]
    spec = sets[0][0]
    arrays = [a for _, a in sets]
    calls = len(arrays)
    fns, ref = {}, None
    for name, mod in mods.items():
      one = jax.jit(lambda a, mod=mod: mod.attention(spec, a)[0])
      out = np.asarray(one(arrays[0]), np.float32)
      finite = bool(np.isfinite(out).all())
      ref = out if ref is None else ref
      diff = float(np.abs(out - ref).max())
      print(f"{cname} {name}: max |out - {kernels[0][0]}| {diff:.3g}, finite {finite}", flush=True)
      fns[name] = jax.jit(lambda sets_, mod=mod: [mod.attention(spec, a)[0] for a in sets_])
      records.append(dict(case=cname, kernel=name, max_abs_diff_vs_first=diff, finite=finite))
    try:  # cuDNN beside, on dense arrays of the same sizes (one per input set)
      dense = [mosaic_profile.dense_problem(case, seed=1 + i) for i in range(len(arrays))]
      fns[CUDNN] = jax.jit(lambda ds: [mosaic_profile.cudnn_causal(*d) for d in ds])
    except ValueError as e:
      print(f"{cname}: no cuDNN beside ({e})")
    inputs = {name: (dense if name == CUDNN else arrays) for name in fns}
    for name, fn in fns.items():
      jax.block_until_ready(fn(inputs[name]))  # compile
    times = {name: [] for name in fns}
    kernels_of = {}
    for order in rotations(list(fns), args.rounds):
      for name in order:
        m = device_time.measure(jax, fns[name], (inputs[name],), calls, runs=2,
                                breakdown=args.breakdown)
        times[name].append(m["busy_ms"] if m else float("nan"))
        if m and args.breakdown:
          kernels_of[name] = dict(kernels_per_call=m["kernels_per_call"], rows=m["per_kernel"])
    flops = case.flops()
    base = float(np.median(times[CUDNN])) if CUDNN in times else float("nan")
    print(f"\n{cname}: device ms a call, {args.rounds} rounds (median, all); TFLOP/s; / cuDNN")
    for name, ts in times.items():
      med = float(np.median(ts))
      print(f"  {name:<14} {med:8.4f}  [{', '.join(f'{t:.4f}' for t in ts)}]  "
            f"{flops / med / 1e9:6.1f}  {med / base:6.3f}", flush=True)
      rec = next((r for r in records if r["case"] == cname and r["kernel"] == name), None)
      if rec is None:
        rec = dict(case=cname, kernel=name)
        records.append(rec)
      rec.update(ms_device=med, ms_device_rounds=ts, tflops_device=flops / med / 1e9,
                 vs_cudnn_dense_device=med / base, flops=flops)
      if name in kernels_of:
        rec["per_kernel"] = kernels_of[name]
    for name, k in kernels_of.items():
      print(f"  {name}: {k['kernels_per_call']} kernels a call; us a call by kernel:")
      for row in k["rows"]:
        print(f"    {row['us_per_call']:9.3f}  x{row['count_per_call']:<5} {row['name']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(commit=bench_env.git_commit()[0], gpu=jax.devices()[0].device_kind,
                     jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
                     date=time.strftime("%Y-%m-%d"), kernels=dict(kernels), rounds=args.rounds,
                     method="device busy time a call (device_time.measure), rounds rotated",
                     records=records), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
