"""Decode tokens/s of the jitted serving loop (jax_varlen_attn.serving.Engine) per attention backend.

    python benchmarks/bench_serving.py --out h100_serving            # on the GPU machine
    python benchmarks/bench_serving.py --tiny                        # CPU dry run of the plumbing

The same model (same seed, so the same weights) is run by the same loop twice: attention by
`flash_attn_varlen_func` (backend "auto": the Triton kernel on a GPU) and by
`jax_varlen_attn.reference.naive_paged_attention` (plain XLA: every token gathers its sequence's whole
block-table range, then a masked softmax). For each batch size, B prompts of --prompt-len random
tokens are prefilled (chunks of --max-tokens-per-step), then every step decodes one token for each of
the B sequences; a decode step's wall time (schedule on the host, transfer, the jitted step, and
reading back the sampled tokens: the real loop) gives tokens/s = B / median step time. The first two
decode steps (compile of the decode bucket) are not timed.

Writes $OUT/<name>.json (or benchmarks/results/ without $OUT) with the git commit, the device, each
record and the ratio of the two backends per batch size; prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from jax_varlen_attn.nn import DecoderLM, ModelConfig, preset  # noqa: E402
from jax_varlen_attn.serving import Engine  # noqa: E402

UNTIMED_DECODE_STEPS = 2  # the first decode step compiles the decode bucket; one more to settle


def git_commit():
  """$JVA_COMMIT wins: the GPU machine's copy of the tree may carry a stale .git."""
  if os.environ.get("JVA_COMMIT"):
    return os.environ["JVA_COMMIT"]
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         timeout=10)
    if out.returncode == 0 and out.stdout.strip():
      return out.stdout.strip()
  except Exception:
    pass
  return os.environ.get("JVA_COMMIT", "unknown")


def run_batch(model: DecoderLM, batch: int, args) -> dict:
  """Prefills `batch` prompts, then times decode steps; returns one record."""
  rng = np.random.default_rng(batch)
  total = args.prompt_len + args.gen
  pages = -(-total // args.block_size)
  engine = Engine(model, num_blocks=batch * pages + 1, block_size=args.block_size,
                  max_tokens_per_step=args.max_tokens_per_step, max_seqs=max(batch, 4),
                  max_model_len=pages * args.block_size, min_seq_bucket=4)
  seqs = [engine.add(rng.integers(0, model.config.vocab_size, args.prompt_len).tolist(), args.gen)
          for _ in range(batch)]
  t0 = time.perf_counter()
  prefill_steps = 0
  while any(s.num_pending > 1 or not s.generated for s in seqs):
    engine.step()
    prefill_steps += 1
  prefill_s = time.perf_counter() - t0
  times = []  # steps that decode every sequence (ones that finished prefill early end early too)
  while engine.has_work:
    t0 = time.perf_counter()
    out = engine.step()
    elapsed = time.perf_counter() - t0
    if len(out.step.scheduled) == batch and all(n == 1 for _, _, n, _ in out.step.scheduled):
      times.append(elapsed)
  timed = times[UNTIMED_DECODE_STEPS:]
  if len(timed) < 3:
    raise ValueError(f"--gen {args.gen} leaves {len(timed)} timed decode steps; use more")
  med = statistics.median(timed)
  tokens = [list(s.generated) for s in seqs]
  return dict(batch=batch, prompt_len=args.prompt_len, generated=args.gen,
              context=[args.prompt_len + UNTIMED_DECODE_STEPS, total], prefill_steps=prefill_steps,
              prefill_s_incl_compile=round(prefill_s, 3), decode_steps_timed=len(timed),
              decode_step_ms=round(med * 1e3, 3),
              decode_step_ms_min=round(min(timed) * 1e3, 3),
              spread=round(float(np.quantile(timed, 0.9) / np.quantile(timed, 0.1) - 1), 3),
              tokens_per_s=round(batch / med, 1), _tokens=tokens)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="qwen3_1_7b_like")
  p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
  p.add_argument("--batches", default="1,16,64")
  p.add_argument("--backends", default="auto,naive")
  p.add_argument("--prompt-len", type=int, default=512)
  p.add_argument("--gen", type=int, default=40)
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--max-tokens-per-step", type=int, default=2048)
  p.add_argument("--out", default="serving")
  p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, short prompts")
  args = p.parse_args(argv)
  if args.tiny:
    args.preset, args.batches, args.prompt_len, args.gen = "tiny", "1,4", 24, 10
    args.max_tokens_per_step = 64
  overrides = {} if args.layers is None else dict(num_layers=args.layers)
  base: ModelConfig = preset(args.preset, **overrides)
  batches = [int(b) for b in args.batches.split(",")]
  device = jax.devices()[0]
  doc = dict(benchmark="serving decode tokens/s", commit=git_commit(), device=device.device_kind,
             platform=device.platform, jax=jax.__version__, model=dataclasses.asdict(base),
             params=base.num_params(), records=[])
  print(f"{device.device_kind}: {args.preset} ({base.num_params() / 1e9:.2f}e9 params), "
        f"prompt {args.prompt_len}, +{args.gen} tokens", flush=True)
  tokens = {}
  for backend in args.backends.split(","):
    model = DecoderLM(dataclasses.replace(base, backend=backend), rngs=nnx.Rngs(0))
    for batch in batches:
      rec = run_batch(model, batch, args)
      tokens[(backend, batch)] = rec.pop("_tokens")
      rec["backend"] = backend
      doc["records"].append(rec)
      print(f"  {backend:6s} batch {batch:3d}: {rec['decode_step_ms']:8.3f} ms/step "
            f"{rec['tokens_per_s']:9.1f} tok/s", flush=True)
    del model
  by = {(r["backend"], r["batch"]): r for r in doc["records"]}
  names = args.backends.split(",")
  doc["ratios"] = []
  if len(names) == 2:
    a, b = names
    for batch in batches:
      ra, rb = by[(a, batch)], by[(b, batch)]
      same = np.mean([x == y for ta, tb in zip(tokens[(a, batch)], tokens[(b, batch)])
                      for x, y in zip(ta, tb)])
      doc["ratios"].append(dict(batch=batch, speedup=round(ra["tokens_per_s"] / rb["tokens_per_s"], 3),
                                **{f"{a}_tokens_per_s": ra["tokens_per_s"],
                                   f"{b}_tokens_per_s": rb["tokens_per_s"]},
                                same_greedy_tokens=round(float(same), 3)))
  out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{args.out}.json"
  path.write_text(json.dumps(doc, indent=1))
  print(f"wrote {path}")
  print(f"{'batch':>5s} " + " ".join(f"{n + ' tok/s':>14s}" for n in names) + "   speedup  same-tokens")
  for row in doc["ratios"]:
    print(f"{row['batch']:5d} " + " ".join(f"{row[n + '_tokens_per_s']:14.1f}" for n in names)
          + f"   {row['speedup']:7.3f}  {row['same_greedy_tokens']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
