#!/usr/bin/env python3
"""Experiment (issue 15): a decode step's matmuls alone, as XLA builds them: the floor they set.

A decode step of bench_serving's model runs, per layer, four matmuls (q|k|v, o, gate|up, down) and,
once, the tied LM head. This times steps that hold only those matmuls, at the model's shapes, with
every layer's weights distinct (they come from HBM, as the model's do), plus the least elementwise
glue that keeps every output column live and feeds each step into the next:

    h = x @ w_qkv;  a = tanh(q + (k|v) folded onto q's columns)   (stands for RoPE, cache write, attention)
    x = a @ w_o;    g = x @ w_gate_up;  x = (silu(gate) * up) @ w_down
    after the last layer: token = argmax(x @ embed^T);  x = embed[token]

No attention, norms, RoPE, cache write, residual adds or sampling: whatever the model adds to a
step can only add time, so a step here is a lower bound on the model's step with these matmuls.
(Without norms, silu(gate) * up squares the scale each layer; the tanh, in an elementwise kernel
the chain has anyway, and w_o at twice the usual scale hold the values near 1 over 28 layers.)
Rows a step are the decode loop's sequence bucket (at least `SchedulerConfig.min_seq_bucket`, 4):
batch 1 runs 4 rows, as in bench_serving (XLA builds a 1-row product as a slower reduction).
Per batch size (rows a step) and build, XLA's default GEMMs and cuBLAS (`decode.CUBLAS_GEMMS`, what
`decode.loop_for` takes from 64 rows):

  ms a step    wall time of one jitted call running `--steps` steps in a lax.fori_loop (best of
               `--calls` calls); `--loops fori,while` also in a while_loop whose condition reads
               each step's output, as the decode loop's does (what a step's end costs when only
               the device knows whether another step follows)
  busy / span  device time a step from a profiler trace (kernels' busy time; first to last kernel)
  kernels      kernels a step
  bound        weight bytes a step (the layers' matmuls and the head) over the read ceiling
               measured in the same run; beside it the model's step target of issue 15 (1.5 ms at
               batch 1; 2x the model's bound, weights + K / V at `--context` keys, at 16 and 64)

  python benchmarks/gemm_floor.py --batches 1,16,64        # GPU: <gpu>_<date>_gemm_floor.json
  python benchmarks/gemm_floor.py --preset tiny --batches 1,4 --steps 2 --calls 1   # CPU plumbing
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import device_time  # noqa: E402  (benchmarks/)
from jax_varlen_attn import decode  # noqa: E402
from jax_varlen_attn.nn import ModelConfig, preset  # noqa: E402
from jax_varlen_attn.serving import SchedulerConfig, bucket  # noqa: E402

# Issue 15's batch-1 target (ms a step); other batch sizes: at least 50% of the model's bound.
BATCH1_TARGET_MS = 1.5


def make_weights(cfg: ModelConfig, seed: int = 0) -> dict:
  """The model's matmul weights, per layer distinct, N(0, 1 / fan_in) (w_o: N(0, 4 / fan_in)):
  qkv [L, hidden, (H + 2 Hk) D], o [L, H D, hidden], gate_up [L, hidden, 2 I], down [L, I, hidden],
  embed [vocab, hidden] (tied: the head is embed^T)."""
  h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  shapes = dict(qkv=(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d), o=(cfg.num_heads * d, h),
                gate_up=(h, 2 * inter), down=(inter, h))
  dtype = jnp.dtype(cfg.weight_dtype)
  keys = iter(jax.random.split(jax.random.key(seed), 4 * cfg.num_layers + 1))
  gain = dict(o=2.0)  # with the tanh in `step`: values near 1 through the layers (module docstring)
  out = {name: [jax.random.normal(next(keys), shape, dtype) * (gain.get(name, 1.0) * shape[0] ** -0.5)
                for _ in range(cfg.num_layers)] for name, shape in shapes.items()}
  out["embed"] = jax.random.normal(next(keys), (cfg.vocab_size, h), dtype)
  return out


def weight_bytes(weights: dict) -> int:
  """Bytes a step reads of the weights: every matmul weight once, the embedding once (the head)."""
  return sum(w.size * w.dtype.itemsize for name, ws in weights.items() if name != "embed" for w in ws) + \
      weights["embed"].size * weights["embed"].dtype.itemsize


def step(cfg: ModelConfig, weights: dict, x, head: bool = True):
  """One step of the chain (module docstring): x [rows, hidden] -> the next step's x (head=False:
  the last layer's output, the head's input)."""
  q_cols = cfg.num_heads * cfg.head_dim
  for layer in range(cfg.num_layers):
    h = x @ weights["qkv"][layer]
    q, kv = h[:, :q_cols], h[:, q_cols:]
    width = min(q_cols, kv.shape[1])
    a = jnp.tanh(q.at[:, :width].add(kv[:, :width]))
    x = a @ weights["o"][layer]
    gate, up = jnp.split(x @ weights["gate_up"][layer], 2, axis=-1)
    x = (jax.nn.silu(gate) * up) @ weights["down"][layer]
  if not head:
    return x
  token = jnp.argmax(x @ weights["embed"].T, axis=-1)
  return weights["embed"][token]


def as_float64(weights: dict) -> dict:
  """The layers' weights as float64 NumPy (`step_reference`'s input)."""
  return {name: [np.asarray(w, np.float64) for w in ws] for name, ws in weights.items() if name != "embed"}


def step_reference(cfg: ModelConfig, f64: dict, x) -> np.ndarray:
  """float64 NumPy of `step`'s layers (the matmul chain up to the head's input) over `as_float64`'s
  weights: [rows, hidden]."""
  x = np.asarray(x, np.float64)
  q_cols = cfg.num_heads * cfg.head_dim
  for layer in range(cfg.num_layers):
    h = x @ f64["qkv"][layer]
    a, kv = h[:, :q_cols].copy(), h[:, q_cols:]
    width = min(q_cols, kv.shape[1])
    a[:, :width] += kv[:, :width]
    x = np.tanh(a) @ f64["o"][layer]
    gate, up = np.split(x @ f64["gate_up"][layer], 2, axis=-1)
    x = gate / (1 + np.exp(-gate)) * up @ f64["down"][layer]
  return x


# Layers the float64 check runs: bf16 rounding grows ~2x a layer through the chain (0.6% after one,
# 4% after four on the real shapes), so the check takes the first two, where zeros or garbage stand
# out by two orders of magnitude.
CHECK_LAYERS = 2


def check_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` cut to the layers the float64 check runs (`step` and `step_reference` read the first ones)."""
  return dataclasses.replace(cfg, num_layers=min(cfg.num_layers, CHECK_LAYERS))


def layers_error(cfg: ModelConfig, weights: dict, x, want: np.ndarray, cublas: bool = False) -> float:
  """Max error of the layers' chain (built as `build` builds it) against `want` (`step_reference`
  over the same cfg), relative to the largest |value|: the timed matmuls compute the product, not
  zeros or garbage. Pass `check_config(cfg)`: the whole chain amplifies bf16 rounding."""
  head_in = jax.jit(lambda w, x: step(cfg, w, x, head=False), compiler_options=decode.CUBLAS_GEMMS if cublas else None)
  got = np.asarray(head_in(weights, x), np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


LOOPS = ("fori", "while")


def build(cfg: ModelConfig, steps: int, cublas: bool, loop: str = "fori"):
  """A jitted call running `steps` steps: (weights, x) -> (steps run, x). loop "fori": a static trip count;
  "while": `decode.decode_loop`'s form, a `lax.while_loop` whose condition reads the step's output
  (here always true, which XLA cannot know), so each step's end is known only on the device."""
  if loop not in LOOPS:
    raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")

  def fori(weights, x):
    return jnp.int32(steps), jax.lax.fori_loop(0, steps, lambda _, x: step(cfg, weights, x), x)

  def while_(weights, x):
    def cond(c):
      i, x = c
      return (i < steps) & jnp.all(jnp.isfinite(x[:, 0]))

    return jax.lax.while_loop(cond, lambda c: (c[0] + 1, step(cfg, weights, c[1])), (jnp.int32(0), x))
  return jax.jit(fori if loop == "fori" else while_, compiler_options=decode.CUBLAS_GEMMS if cublas else None)


def time_build(fn, weights, x, steps: int, calls: int) -> dict:
  """ms a step (best of `calls` calls, wall) and, on a GPU, device busy / span and kernels a step."""
  ran = int(jax.block_until_ready(fn(weights, x))[0])  # compile and warm up
  if ran != steps:  # the while loop stopped early: its time would be of fewer steps
    raise ValueError(f"the loop ran {ran} of {steps} steps")
  walls = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(weights, x))
    walls.append(time.perf_counter() - t0)
  rec = dict(step_ms=round(min(walls) / steps * 1e3, 4),
             step_ms_median=round(sorted(walls)[len(walls) // 2] / steps * 1e3, 4))
  dev = device_time.measure(jax, fn, (weights, x), steps, runs=2)
  if dev:
    rec.update(busy_ms=round(dev["busy_ms"], 4), span_ms=round(dev["span_ms"], 4),
               kernels_per_step=dev["kernels_per_call"])
  return rec


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="qwen3_1_7b_like")
  p.add_argument("--batches", default="1,16,64", help="rows a step")
  p.add_argument("--steps", type=int, default=32, help="steps a jitted call (bench_serving's default)")
  p.add_argument("--calls", type=int, default=5, help="timed calls a build (the best is kept)")
  p.add_argument("--context", type=float, default=608.0,
                 help="keys a sequence for the model's bound (bench_serving's runs average ~608)")
  p.add_argument("--builds", default="xla,cublas", help="xla (XLA's default GEMMs), cublas")
  p.add_argument("--loops", default="fori", help=f"comma list of {LOOPS} (build's docstring)")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  builds = [b for b in args.builds.split(",") if b]
  unknown = set(builds) - {"xla", "cublas"}
  if unknown:
    p.error(f"--builds: unknown {sorted(unknown)} (xla, cublas)")
  loops = [x for x in args.loops.split(",") if x]
  if not loops or set(loops) - set(LOOPS):
    p.error(f"--loops: a comma list of {LOOPS}")
  cfg = preset(args.preset)
  on_gpu = any(d.platform == "gpu" for d in jax.devices())
  from bench_serving import read_ceiling, step_bytes
  ceiling = read_ceiling(2048 if on_gpu else 8)
  weights = make_weights(cfg)
  w_bytes = weight_bytes(weights)
  f64 = as_float64({name: ws[:CHECK_LAYERS] for name, ws in weights.items() if name != "embed"})
  gbps = ceiling["read_gbps"]
  records = []
  min_rows = SchedulerConfig.min_seq_bucket
  for batch in (int(b) for b in args.batches.split(",")):
    rows = bucket(batch, min_rows, max(batch, min_rows))
    x = jax.random.normal(jax.random.key(batch), (rows, cfg.hidden_size), jnp.dtype(cfg.weight_dtype))
    model_w, model_kv = step_bytes(cfg, batch, args.context)
    model_bound_ms = (model_w + model_kv) / (gbps * 1e9) * 1e3
    target_ms = BATCH1_TARGET_MS if batch == 1 else 2 * model_bound_ms
    want = step_reference(check_config(cfg), f64, x)
    for b, loop in ((b, loop) for b in builds for loop in loops):
      rec = dict(batch=batch, rows=rows, build=b, loop=loop, steps_per_call=args.steps, weight_bytes=w_bytes,
                 bound_ms=round(w_bytes / (gbps * 1e9) * 1e3, 4), model_bound_ms=round(model_bound_ms, 4),
                 model_target_ms=round(target_ms, 4))
      try:
        rec["rel_err"] = layers_error(check_config(cfg), weights, x, want, b == "cublas")
        if not rec["rel_err"] <= 0.05:  # NaN too  # bf16 products over 4 matmuls a layer; zeros or garbage give ~1
          raise ValueError(f"the chain does not compute its product (rel. error {rec['rel_err']:.3g})")
        rec.update(time_build(build(cfg, args.steps, b == "cublas", loop), weights, x, args.steps, args.calls))
        rec["pct_of_bound"] = round(100 * rec["bound_ms"] / rec["step_ms"], 1)
        rec["of_model_target"] = round(rec["step_ms"] / target_ms, 3)
        rec["status"] = "ok"
      except Exception as e:  # a build that fails is a record, not the end of the run
        rec["status"], rec["error"] = "error", f"{type(e).__name__}: {str(e)[:300]}"
      records.append(rec)
      print(rec, flush=True)
  gpu = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  out = args.out or f"{gpu.lower().replace(' ', '_').replace('nvidia_', '')}_{date}_gemm_floor"
  out_dir = Path(os.environ.get("OUT") or HERE / "results")
  out_dir.mkdir(parents=True, exist_ok=True)
  doc = dict(benchmark="a decode step's matmuls alone (gemm_floor.py)", commit=os.environ.get("JVA_COMMIT", "unknown"),
             gpu=gpu, date=date, preset=args.preset, context=args.context, read_ceiling=ceiling,
             jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""), records=records)
  (out_dir / f"{out}.json").write_text(json.dumps(doc, indent=1))
  print(f"{'batch':>5s} {'build':6s} {'loop':5s} {'ms/step':>8s} {'busy':>7s} {'span':>7s} {'kern':>6s} {'bound':>7s} "
        f"{'%bound':>6s} {'model target':>12s} {'of target':>9s}")
  for r in records:
    if r["status"] != "ok":
      print(f"{r['batch']:5d} {r['build']:6s} {r['loop']:5s} {r['status']}: {r.get('error', '')}")
      continue
    print(f"{r['batch']:5d} {r['build']:6s} {r['loop']:5s} {r['step_ms']:8.4f} {r.get('busy_ms', '-'):>7} "
          f"{r.get('span_ms', '-'):>7} "
          f"{r.get('kernels_per_step', '-'):>6} {r['bound_ms']:7.4f} {r['pct_of_bound']:6.1f} "
          f"{r['model_target_ms']:12.4f} {r['of_model_target']:9.3f}")
  return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
  sys.exit(main())
