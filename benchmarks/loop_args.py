#!/usr/bin/env python3
"""Experiment (issue 15): does a decode call pay for its arguments arriving in new device buffers?

Session 36 (benchmarks/NOTES.md, item 5) left ~0.15 ms a step, ~5 ms a 32-step call, of a decode
call above its kernels' busy time. The guess to test first: XLA's command buffers (CUDA graphs) of
the loop body hold the device addresses of the call's arguments, and the engine hands every call
new ones (its DecodeBatch / SamplingParams arrays), so each call updates its recorded graphs before
they run. This runs bench_serving's model through `decode.loop_for`'s loop on one chunk's
arguments, calls alternating between

  fresh   the chunk's host arrays put on the device anew for each call (what `Engine` does)
  same    one device copy of them, passed to every call

with the caches donated and carried from call to call either way (each call decodes the same
`--steps` steps from the same tokens, writing the same slots: its tokens must equal the first
call's, which is checked), and prints ms a call (wall, median of `--rounds`) and device busy a
call for both, and their difference.

  python benchmarks/loop_args.py --batches 1,16                  # GPU: <gpu>_<date>_loop_args.json
  python benchmarks/loop_args.py --preset tiny --batches 1 --rounds 2 --steps 4   # CPU dry run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import device_time  # noqa: E402  (benchmarks/)
from jax_varlen_attn import decode  # noqa: E402
from jax_varlen_attn.nn import DecoderLM, preset  # noqa: E402
from jax_varlen_attn.serving import Engine  # noqa: E402

FORMS = ("fresh", "same")


def prepared_engine(model: DecoderLM, batch: int, prompt_len: int, steps: int, calls: int) -> Engine:
  """An engine with `batch` prompts prefilled and pages for `calls` chunks of `steps` reserved."""
  gen = 2 + steps * (calls + 2)
  pages = -(-(prompt_len + gen) // 16)
  engine = Engine(model, num_blocks=batch * pages + 1, block_size=16, max_tokens_per_step=2048,
                  max_seqs=max(batch, 4), max_model_len=pages * 16, min_seq_bucket=4, steps_per_call=steps,
                  overlap=False)  # this schedules its own calls
  rng = np.random.default_rng(batch)
  for _ in range(batch):
    engine.add(rng.integers(0, model.config.vocab_size, prompt_len).tolist(), gen)
  while engine.scheduler.waiting or any(s.in_prefill for s in engine.scheduler.running):
    engine.step()
  engine.decode_chunk()  # compiles the loop for this bucket
  return engine


def run_batch(model: DecoderLM, batch: int, args) -> dict:
  engine = prepared_engine(model, batch, args.prompt_len, args.steps, args.rounds)
  chunk = engine.scheduler.schedule_decode(args.steps)
  if chunk is None:
    raise ValueError("no decode chunk could be scheduled")
  graphdef, state, k_cache, v_cache, host_batch, host_sampling = engine.decode_args(chunk)
  loop = decode.loop_for(host_batch.tokens.shape[0])
  caches = [k_cache, v_cache]
  kw = dict(steps=chunk.steps, mode=chunk.mode, check_every=1)
  kept = (jax.device_put(host_batch), jax.device_put(host_sampling))

  def call(form: str):
    dev = kept if form == "same" else (jax.device_put(host_batch), jax.device_put(host_sampling))
    tokens, counts, caches[0], caches[1] = loop(graphdef, state, caches[0], caches[1], *dev, **kw)
    return tokens, counts

  first = np.asarray(call("fresh")[0])
  walls = {f: [] for f in FORMS}
  for _ in range(args.rounds):
    for form in FORMS:
      t0 = time.perf_counter()
      tokens, _ = call(form)
      tokens = np.asarray(tokens)
      walls[form].append(time.perf_counter() - t0)
      if not np.array_equal(tokens, first):
        raise ValueError(f"{form}: a call's tokens differ from the first call's")
  rec = dict(batch=batch, rows=int(host_batch.tokens.shape[0]), steps=chunk.steps, rounds=args.rounds)
  for form in FORMS:
    rec[f"{form}_ms_per_call"] = round(statistics.median(walls[form]) * 1e3, 3)
    dev = device_time.measure(jax, lambda form=form: call(form), (), 1, runs=2)
    if dev:
      rec[f"{form}_busy_ms_per_call"] = round(dev["busy_ms"], 3)
      rec[f"{form}_span_ms_per_call"] = round(dev["span_ms"], 3)
  rec["fresh_minus_same_ms_per_call"] = round(rec["fresh_ms_per_call"] - rec["same_ms_per_call"], 3)
  return rec


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="qwen3_1_7b_like")
  p.add_argument("--batches", default="1,16")
  p.add_argument("--steps", type=int, default=32, help="steps a call (bench_serving's default)")
  p.add_argument("--rounds", type=int, default=6, help="calls of each form, alternating")
  p.add_argument("--prompt-len", type=int, default=512)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  model = DecoderLM(preset(args.preset), rngs=nnx.Rngs(0))
  records = []
  for batch in (int(b) for b in args.batches.split(",")):
    records.append(run_batch(model, batch, args))
    print(records[-1], flush=True)
  gpu = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  out = args.out or f"{gpu.lower().replace(' ', '_').replace('nvidia_', '')}_{date}_loop_args"
  out_dir = Path(os.environ.get("OUT") or HERE / "results")
  out_dir.mkdir(parents=True, exist_ok=True)
  doc = dict(benchmark="a decode call's arguments: new device buffers each call or the same (loop_args.py)",
             commit=os.environ.get("JVA_COMMIT", "unknown"), gpu=gpu, date=date, preset=args.preset,
             jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""), records=records)
  (out_dir / f"{out}.json").write_text(json.dumps(doc, indent=1))
  print(f"{'batch':>5s} {'fresh ms':>9s} {'same ms':>9s} {'diff ms':>8s} {'fresh busy':>10s} {'same busy':>10s}")
  for r in records:
    print(f"{r['batch']:5d} {r['fresh_ms_per_call']:9.3f} {r['same_ms_per_call']:9.3f} "
          f"{r['fresh_minus_same_ms_per_call']:8.3f} {r.get('fresh_busy_ms_per_call', '-'):>10} "
          f"{r.get('same_busy_ms_per_call', '-'):>10}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
