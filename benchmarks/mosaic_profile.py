"""Where a Mosaic prefill CTA's time goes: its named regions, timed on the GPU by Mosaic's profiler.

    python3 benchmarks/mosaic_profile.py --cases prefill_8x1024,prefill_4x4096 --json out.json

Runs `mosaic.attention(..., profile_dir=...)` on each case (causal, fp16, 16 q / 8 kv heads, head
dim 128, pages of 16 in a shuffled order, random inputs), reads the trace Mosaic GPU writes (per CTA
and warpgroup, the SM clock at each named region's start and end) and prints, per case:

- each region's mean length in SM cycles, for the compute warpgroups and the loader (setup: the
  program's table reads; q: q into shared memory; first_k: waiting for the first K tile; loop: the
  key tiles; out: normalizing and storing the output; load: the loader's whole stream);
- the CTA's span (its first event to its last, cycles) and how it splits into prologue (setup to
  the loop), loop and epilogue;
- the SM clock (--sm-ghz, else estimated from CTAs that follow each other on an SM: cycles of the
  first over the globaltimer ns between their starts, the 90th percentile, which reads low when
  every pair has a gap) and the median gap between a CTA's end and the next CTA's start on its
  SM, in ns (inflated by the profiler's own barrier and trace write at each CTA's end).

The profiler adds a few instructions a region and a barrier at each CTA's end, so time the kernel
with bench_attention, not here; this says where a CTA's cycles go. Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from collections import defaultdict
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WARPGROUPS = 3  # two compute warpgroups and the loader (mosaic.COMPUTE_WGS + 1)


def problem(case, page: int, seed: int = 0):
  """(spec, arrays) of a causal fp16 prefill over a paged cache with shuffled distinct pages."""
  import jax.numpy as jnp

  from jax_varlen_attn.validation import AttentionArgs, validate

  rng = np.random.default_rng(seed)
  heads, kv_heads, d = 16, 8, 128
  lens_k = np.asarray(case.seqused_k)
  blocks = -(-lens_k // page)
  width = int(blocks.max())
  pages = int(blocks.sum())
  order = rng.permutation(pages)
  table = np.zeros((len(lens_k), width), np.int32)
  start = 0
  for b, n in enumerate(blocks):
    table[b, :n] = order[start:start + n]
    start += n
  total_q = int(case.cu_seqlens_q[-1])
  q = jnp.asarray(rng.standard_normal((total_q, heads, d)), jnp.float16)
  k = jnp.asarray(rng.standard_normal((pages, page, kv_heads, d)), jnp.float16)
  v = jnp.asarray(rng.standard_normal((pages, page, kv_heads, d)), jnp.float16)
  cu = np.asarray(case.cu_seqlens_q, np.int32)
  args = AttentionArgs(q=q, k=k, v=v, cu_seqlens_q=jnp.asarray(cu),
                       max_seqlen_q=int(np.diff(cu).max()), seqused_k=jnp.asarray(lens_k, jnp.int32),
                       max_seqlen_k=int(lens_k.max()), block_table=jnp.asarray(table), causal=True)
  return validate(args)


def dense_problem(case, seed: int = 1):
  """(q, k, v) as cuDNN's dense [B, S, H, D] fp16 arrays of `problem`'s sizes (16 q / 8 kv heads,
  head dim 128); ValueError unless the case's sequences share one length."""
  import jax.numpy as jnp

  lens = np.diff(np.asarray(case.cu_seqlens_q))
  if len(set(lens.tolist())) != 1:
    raise ValueError(f"cuDNN's dense form needs sequences of one length, not {sorted(set(lens.tolist()))}")
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((len(lens), int(lens[0]), h, 128)), jnp.float16)
               for h in (16, 8, 8))


def cudnn_causal(q, k, v):
  """cuDNN's causal attention (`jax.nn.dot_product_attention(implementation="cudnn")`)."""
  import jax
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def summarize(trace: dict, sm_ghz: float = 0.0) -> dict:
  """Per-region mean cycles, CTA spans and the SM's CTA-to-CTA gaps from a Mosaic GPU trace
  (sm_ghz: the SM clock to convert cycles with; 0: estimated from the trace)."""
  by_trace: Dict[int, list] = defaultdict(list)
  for ev in trace["traceEvents"]:
    by_trace[ev["tid"]].append(ev)
  regions: Dict[str, List[float]] = defaultdict(list)
  ctas: Dict[int, dict] = {}
  for tid, evs in by_trace.items():
    block, wg = divmod(tid - 1, WARPGROUPS)
    role = "compute" if wg < WARPGROUPS - 1 else "loader"
    open_at: Dict[str, float] = {}
    marks: Dict[str, tuple] = {}
    for ev in evs:  # ts: (globaltimer ns at the CTA's start + cycles since the first event) / 1e3
      t = ev["ts"] * 1e3
      if ev["ph"] == "B":
        open_at[ev["name"]] = t
      elif ev["name"] in open_at:
        t0 = open_at.pop(ev["name"])
        regions[f"{role}:{ev['name']}"].append(t - t0)
        marks[ev["name"]] = (t0, t)
    if not marks:
      continue
    first = min(m[0] for m in marks.values())
    cta = ctas.setdefault(block, dict(sm=evs[0]["pid"], start=first, wgs={}))
    cta["start"] = min(cta["start"], first)
    cta["wgs"][wg] = marks
  spans, prologue, loop, epilogue = [], [], [], []
  for cta in ctas.values():
    starts = [min(m[0] for m in marks.values()) for marks in cta["wgs"].values()]
    ends = [max(m[1] for m in marks.values()) for marks in cta["wgs"].values()]
    cta["span"] = max(e - s for s, e in zip(starts, ends))  # cycles (each warpgroup's own clock base)
    spans.append(cta["span"])
    for wg, marks in cta["wgs"].items():
      if wg < WARPGROUPS - 1 and "loop" in marks and "setup" in marks:
        prologue.append(marks["loop"][0] - marks["setup"][0])
        loop.append(marks["loop"][1] - marks["loop"][0])
        if "out" in marks:
          epilogue.append(marks["out"][1] - marks["loop"][1])
  # The SM clock and the gaps between CTAs that follow each other on an SM.
  per_sm: Dict[int, list] = defaultdict(list)
  for cta in ctas.values():
    per_sm[cta["sm"]].append(cta)
  ratios, pairs = [], []
  for seq in per_sm.values():
    seq.sort(key=lambda c: c["start"])
    for a, b in zip(seq, seq[1:]):
      dt = b["start"] - a["start"]  # the starts are globaltimer ns
      if dt > 0:
        ratios.append(a["span"] / dt)
        pairs.append((a["span"], dt))
  ghz = sm_ghz or (float(np.percentile(ratios, 90)) if ratios else float("nan"))
  gaps = [dt - span / ghz for span, dt in pairs] if ratios else []
  mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
  return dict(
      ctas=len(ctas), sm_clock_ghz_est=ghz,
      regions_cycles={k: mean(v) for k, v in sorted(regions.items())},
      cta_span_cycles=mean(spans), prologue_cycles=mean(prologue), loop_cycles=mean(loop),
      epilogue_cycles=mean(epilogue), gap_ns_mean=mean(gaps),
      gap_ns_median=float(np.median(gaps)) if gaps else float("nan"))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", default="prefill_8x1024,prefill_4x4096")
  ap.add_argument("--page", type=int, default=16)
  ap.add_argument("--sm-ghz", type=float, default=0.0,
                  help="the SM clock under this load (nvidia-smi; benchmarks/power_sample.py)")
  ap.add_argument("--json", help="write the summaries here")
  args = ap.parse_args(argv)
  import jax

  import shapes
  from jax_varlen_attn.backends.pallas import mosaic

  if jax.default_backend() != "gpu":
    ap.error("needs a Hopper GPU (Mosaic GPU's profiler runs in the kernel)")
  results = {}
  for name, case in shapes.cases_for(args.cases.split(",")).items():
    spec, arrays = problem(case, args.page)
    with tempfile.TemporaryDirectory() as d:
      fn = jax.jit(lambda a: mosaic.attention(spec, a, profile_dir=d)[0])
      jax.block_until_ready(fn(arrays))  # JAX writes the first call's trace (later ones: a warning)
      jax.effects_barrier()
      files = sorted(glob.glob(os.path.join(d, "*-trace.json")))
      if not files:
        print(f"{name}: no trace written")
        continue
      with open(files[-1]) as f:
        results[name] = summarize(json.load(f), args.sm_ghz)
  print(f"{'case':<16} {'ctas':>5} {'span':>7} {'prolog':>7} {'loop':>7} {'epilog':>7} "
        f"{'GHz':>5} {'gap ns':>7}  (cycles unless named)")
  for name, r in results.items():
    print(f"{name:<16} {r['ctas']:>5} {r['cta_span_cycles']:>7.0f} {r['prologue_cycles']:>7.0f} "
          f"{r['loop_cycles']:>7.0f} {r['epilogue_cycles']:>7.0f} {r['sm_clock_ghz_est']:>5.2f} "
          f"{r['gap_ns_median']:>7.0f}")
    print("   " + ", ".join(f"{k} {v:.0f}" for k, v in r["regions_cycles"].items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
