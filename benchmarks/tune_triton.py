"""Sweeps the Triton kernel's tile options per (head_dim, page size, GQA group, regime); writes the table.

    python benchmarks/tune_triton.py --out tuned                 # GPU machine: ~5 min
    python benchmarks/tune_triton.py --tiny --out tuned_tiny     # CPU, TRITON_INTERPRET=1: plumbing

For every combination it builds one problem (fp16, causal, 8 kv heads, num_heads = 8 x group):
  decode:  64 sequences, 1 query each, 4096 keys each, distinct pages (bound by KV bytes);
  prefill: 2 sequences of 2048 queries over 2048 keys (bound by FLOPs; page size 16 only: the
           page size changes the K/V addressing, which prefill hides behind its matmuls).
It times the default config and each candidate (block_n, num_warps, num_stages, and for narrow
prefill block_m; elsewhere block_m stays the heuristic's: it follows the queries per sequence and
the group) as one jitted function of --calls calls (the GPU's busy time per call from a profiler
trace; median wall time of --reps runs without one), after checking the candidate's output against
the default config's.
Writes $OUT/<out>.json (else benchmarks/results/) with every time and, per combination, the best
candidate where it beats the default by more than --min-gain consistently (see build_table); `--rebuild
SWEEP_JSON` turns a committed sweep into jax_varlen_attn/backends/triton/tuned.json, the table
`Config.resolved` reads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jax_varlen_attn import flash_attn_varlen_func  # noqa: E402
from jax_varlen_attn.backends.triton import Config  # noqa: E402
from jax_varlen_attn.backends.triton.tuned import key_of  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import device_time  # noqa: E402  (benchmarks/device_time.py)

NUM_KV_HEADS = 8
SWEEP_GROUPS = (1, 2, 4, 8)
# (block_m or None, block_n, num_warps, num_stages) tried per regime (None: the heuristic's rows,
# which follow the queries per sequence and the group); wide heads get narrower key tiles. On a
# paged fp16 cache 5 stages are two K / V buffers, 2-4 one (config.stages_for_buffers).
CANDIDATES = {
    ("decode", "narrow"): [(None, 32, 4, 2), (None, 64, 4, 2), (None, 128, 4, 2), (None, 64, 4, 3),
                           (None, 128, 4, 5)],
    ("prefill", "narrow"): [(256, 64, 8, 3), (256, 64, 8, 2), (128, 64, 4, 3), (256, 32, 8, 3),
                            (128, 128, 8, 3), (256, 64, 8, 5), (128, 64, 4, 5)],
    ("decode", "wide"): [(None, 16, 4, 2), (None, 32, 4, 2), (None, 64, 4, 1), (None, 32, 8, 2)],
    ("prefill", "wide"): [(None, 16, 4, 2), (None, 32, 4, 2), (None, 32, 4, 1), (None, 32, 8, 2)],
}


def label_of(block_m, block_n, num_warps, num_stages) -> str:
  return (f"m{block_m}_" if block_m else "") + f"n{block_n}_w{num_warps}_s{num_stages}"


def fields_of(label: str) -> dict:
  """Config fields of a candidate label (m256_n64_w8_s3 -> block_m, block_n, num_warps, num_stages)."""
  names = dict(m="block_m", n="block_n", w="num_warps", s="num_stages")
  return {names[tok[0]]: int(tok[1:]) for tok in label.split("_")}


# The candidate equal to what the heuristic picks for the sweep's problems (none latency-bound).
# (Decode: config._default_block_n's choice for the sweep's 4096-key sequences; prefill: 256-row
# tiles on 8 warps for 64 < head_dim <= 128, 128 rows on 4 warps for head_dim <= 64.)
def default_equivalent(regime: str, head_dim: int) -> str:
  if head_dim > 128:
    return "n16_w4_s2" if regime == "decode" else "n32_w4_s2"
  if regime == "decode":
    return "n128_w4_s2"
  return "m256_n64_w8_s3" if head_dim > 64 else "m128_n64_w4_s3"


def build_table(entries, min_gain: float) -> dict:
  """{key: tiles}: per (regime, head_dim, page) class, the candidate with the lowest geometric mean
  of time / default over the class's GQA groups, written for every group of the class where it
  beats the default by more than min_gain in at least 3/4 of them (and at least 2); the groups of
  SWEEP_GROUPS it did not measure get the class's choice too (marked "extrapolated").

  "The default" is the faster of the default's own timing and the candidate equal to it (a slow
  first timing alone is no win). One choice per class rather than per entry: the wall-timed sweep
  of 2026-11-26 saw repeats of one config differ by up to 10%, and even with device time (repeats
  within 1%) near-ties between candidates swap winners from group to group.
  """
  classes = {}
  for e in entries:
    cands = {k: r["us"] for k, r in e.get("candidates", {}).items() if "us" in r}
    if not cands or "default_us" not in e:
      continue
    base = min(e["default_us"], cands.get(default_equivalent(e["regime"], e["head_dim"]), float("inf")))
    classes.setdefault((e["regime"], e["head_dim"], e["page"]), []).append((e, cands, base))
  table = {}
  for rows in classes.values():
    common = set.intersection(*(set(c) for _, c, _ in rows))
    if not common:
      continue
    geo = {k: math.exp(sum(math.log(c[k] / base) for _, c, base in rows) / len(rows)) for k in common}
    best = min(sorted(common), key=geo.get)
    wins = sum(1 for _, c, base in rows if 1 - c[best] / base > min_gain)
    if wins < max(2, -(-3 * len(rows) // 4)):
      continue
    for e, c, base in rows:
      table[e["key"]] = dict(fields_of(best), us=c[best], default_us=round(base, 2))
    # The class's choice also for its GQA groups the sweep did not reach (a budget cut).
    regime, d, page = rows[0][0]["regime"], rows[0][0]["head_dim"], rows[0][0]["page"]
    for g in SWEEP_GROUPS:
      table.setdefault(key_of(regime, d, page, g), dict(fields_of(best), extrapolated=True))
  return table


def problem(regime: str, head_dim: int, page: int, group: int, tiny: bool, rng):
  if regime == "decode":
    batch, q_len, k_len = (4, 1, 64) if tiny else (64, 1, 4096)
  else:
    batch, q_len, k_len = (1, 32, 32) if tiny else (2, 2048, 2048)
  heads, kv_heads = NUM_KV_HEADS * group, NUM_KV_HEADS
  if tiny:
    heads, kv_heads = 2 * group, 2
  pages_per_seq = -(-k_len // page)
  num_pages = batch * pages_per_seq
  q = jnp.asarray(rng.standard_normal((batch * q_len, heads, head_dim)), jnp.float16)
  k = jnp.asarray(rng.standard_normal((num_pages, page, kv_heads, head_dim)), jnp.float16)
  v = jnp.asarray(rng.standard_normal((num_pages, page, kv_heads, head_dim)), jnp.float16)
  table = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq), jnp.int32)
  cu = jnp.arange(batch + 1, dtype=jnp.int32) * q_len
  used = jnp.full((batch,), k_len, jnp.int32)
  return dict(q=q, k=k, v=v, cu=cu, used=used, table=table, q_len=q_len, k_len=k_len,
              bytes=2 * batch * k_len * kv_heads * head_dim * 2,
              flops=4 * head_dim * heads * batch * (q_len * (k_len - q_len) + q_len * (q_len + 1) // 2))


def timed(p: dict, config: Config, calls: int, reps: int):
  """(seconds per call, output of the first call): the GPU's busy time per call read from a
  profiler trace (device_time.py) where there is one, else the median wall time of `reps` runs.

  Device time because wall time of a few calls carried XLA's per-launch host cost and its noise:
  repeats of one config differed by up to 10% in the wall-timed sweep of 2026-11-26."""
  def one(q, k, v, cu, used, table):
    return flash_attn_varlen_func(q, k, v, max_seqlen_q=p["q_len"], cu_seqlens_q=cu,
                                  max_seqlen_k=p["k_len"], seqused_k=used, block_table=table,
                                  causal=True, backend="triton", config=config)

  # Different q per call (nothing cached between calls); the cache is shared: decode's is > L2.
  qs = [p["q"] * (1 + 0.01 * i) for i in range(calls)]
  fn = jax.jit(lambda qs, k, v, cu, used, table: [one(q, k, v, cu, used, table) for q in qs])
  args = (qs, p["k"], p["v"], p["cu"], p["used"], p["table"])
  outs = jax.block_until_ready(fn(*args))
  if jax.devices()[0].platform == "gpu":
    dev = device_time.measure(jax, fn, args, calls, runs=2)
    if dev is not None:
      return dev["busy_ms"] / 1e3, np.asarray(outs[0], np.float32)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) / calls, np.asarray(outs[0], np.float32)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="tuned")
  ap.add_argument("--head-dims", default="64,128,256")
  ap.add_argument("--pages", default="16,32,64")
  ap.add_argument("--groups", default=",".join(map(str, SWEEP_GROUPS)))
  ap.add_argument("--regimes", default="prefill,decode")
  ap.add_argument("--calls", type=int, default=8)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--min-gain", type=float, default=0.02, help="keep a candidate only if this much faster")
  ap.add_argument("--rebuild", metavar="SWEEP_JSON[,SWEEP_JSON...]",
                  help="no sweep: rebuild the table of a finished sweep's JSON (with --min-gain) and "
                       "write it as jax_varlen_attn/backends/triton/tuned.json")
  ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new combinations after this")
  ap.add_argument("--tiny", action="store_true")
  args = ap.parse_args(argv)
  if args.rebuild:
    # Several sweeps: a later file's entry replaces an earlier one's of the same key.
    sweeps = [json.loads(Path(p).read_text()) for p in args.rebuild.split(",")]
    entries = {e["key"]: e for sw in sweeps for e in sw["entries"]}
    kinds = sorted({sw["gpu"] for sw in sweeps})
    if len(kinds) != 1:
      raise SystemExit(f"--rebuild takes sweeps of one GPU kind (the table is keyed by it), got {kinds}")
    one = dict(commit=[sw["commit"] for sw in sweeps], source=args.rebuild.split(","),
               min_gain=args.min_gain, table=build_table(list(entries.values()), args.min_gain))
    # The other kinds' tables, same_as and without_gpu stay as the file has them.
    path = REPO / "jax_varlen_attn" / "backends" / "triton" / "tuned.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc.setdefault("devices", {})[kinds[0]] = one
    doc.setdefault("without_gpu", kinds[0])
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}: {len(one['table'])} entries for {kinds[0]}")
    return 0
  if args.tiny:
    args.head_dims, args.pages, args.groups, args.calls, args.reps = "64", "16", "1,2", 1, 1
  start = time.perf_counter()
  out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")

  def write(doc) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.out}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path

  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  doc = dict(benchmark="tile sweep of the Triton kernel", gpu=device.device_kind,
             commit=os.environ.get("JVA_COMMIT", "unknown"), jax=jax.__version__, dtype="float16",
             num_kv_heads=NUM_KV_HEADS, candidates={f"{r}/{w}": c for (r, w), c in CANDIDATES.items()},
             entries=[], table={})
  combos = []
  for regime in args.regimes.split(","):
    pages = args.pages.split(",") if regime == "decode" else ["16"]
    for d, page, g in itertools.product(args.head_dims.split(","), pages, args.groups.split(",")):
      combos.append((regime, int(d), int(page), int(g)))
  for regime, d, page, g in combos:
    if time.perf_counter() - start > args.budget_s:
      print(f"budget: stopped before {regime} d{d} p{page} g{g}", flush=True)
      break
    p = problem(regime, d, page, g, args.tiny, rng)
    entry = dict(regime=regime, head_dim=d, page=page, group=g, key=key_of(regime, d, page, g))
    try:
      # Timed twice, the faster kept: the first timing in a process ran up to 15% slow.
      base_s, base_out = timed(p, Config(), args.calls, args.reps)
      base_s = min(base_s, timed(p, Config(), args.calls, args.reps)[0])
    except Exception as e:
      entry["error"] = f"default: {type(e).__name__}: {str(e)[:200]}"
      doc["entries"].append(entry)
      continue
    entry["default_us"] = round(base_s * 1e6, 2)
    results = {}
    for cand in CANDIDATES[(regime, "wide" if d > 128 else "narrow")]:
      label = label_of(*cand)
      try:
        s, out = timed(p, Config(**fields_of(label)), args.calls, args.reps)
        err = float(np.linalg.norm(out - base_out) / max(np.linalg.norm(base_out), 1e-30))
        results[label] = dict(us=round(s * 1e6, 2), rel_diff=err) if err < 2e-2 else dict(wrong=err)
      except Exception as e:  # out of registers / shared memory: recorded, not fatal
        results[label] = dict(error=f"{type(e).__name__}: {str(e)[:120]}")
    entry["candidates"] = results
    ok = {k: r["us"] for k, r in results.items() if "us" in r}
    if ok:
      best = min(ok, key=ok.get)
      entry["best"], entry["best_us"] = best, ok[best]
      entry["gain"] = round(1 - ok[best] / entry["default_us"], 3)
    doc["entries"].append(entry)
    doc["table"] = build_table(doc["entries"], args.min_gain)
    write(doc)  # after every combination: a run cut short keeps what it measured
    print(f"{entry['key']:22s} default {entry['default_us']:9.2f} us  best {entry.get('best')} "
          f"{entry.get('best_us')} ({100 * entry.get('gain', 0):+.1f}%)", flush=True)
  path = write(doc)
  print(f"wrote {path}: {len(doc['table'])} table entries of {len(doc['entries'])} combinations")
  return 0


if __name__ == "__main__":
  sys.exit(main())
