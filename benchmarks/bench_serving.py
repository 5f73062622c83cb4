"""Decode speed of the jitted serving loop (jax_varlen_attn.serving.Engine): one step per call vs many.

    python benchmarks/bench_serving.py --out h200_serving                  # on the GPU machine
    python benchmarks/bench_serving.py --backends auto --mixed --profile   # + mixed workload, kernel mix
    python benchmarks/bench_serving.py --tiny                              # CPU dry run of the plumbing

Decode records (per attention backend x batch size x mode). The same model (same seed, so the same
weights) runs with attention by `flash_attn_varlen_func` (backend "auto": the Triton kernel on a GPU)
and by `jax_varlen_attn.reference.naive_paged_attention` (plain XLA gathers). B prompts of
--prompt-len random tokens are prefilled (chunks of --max-tokens-per-step), then every sequence
decodes 1 + steps_per_call * (--chunks + 1) tokens (greedy unless --sampling):
  mode "step":  one jitted `serving_step` per token. decode_step_ms = median wall time of a step
                that decodes all B sequences (schedule on the host, transfer, the step, reading the
                tokens back); the first two decode steps (compile) are not timed.
  mode "multi": `Engine.decode_chunk`: up to --steps-per-call steps in one jitted loop
                (`decode.decode_loop`) with the Engine's defaults: a loop of static length that
                returns to Python once enqueued (check_every=NEVER; "multi/N": checking for finished
                sequences every N steps, so the call returns when done), each call dispatched before
                the last one's tokens are read (overlap; "multi-serial[/N]": after).
                decode_step_ms = median over calls of (wall time of
                `Engine.advance` returning the call's tokens, incl. its host work: reserving pages,
                building and sending the batch, dispatching the next call, reading the tokens back,
                appending them) / steps it ran; the first call (compile) is not timed.
--sampling T,K,P samples every request (temperature, top-k, top-p) instead of greedy decoding.
bound_ms = (weight bytes + K/V bytes the step's attention reads at the timed window's mean context)
/ the read ceiling, measured in the same run: a jitted jnp.sum over a --ceiling-mib bf16 array (2 GiB
by default), median of 7 runs, bytes / seconds. `same_tokens_as_step` compares each multi record's
tokens with the step record's.

--mixed (first backend): a workload of --mixed-requests prompts arriving as a seeded Poisson process
(--mixed-rate per second) with lengths uniform in --mixed-prompt and generation lengths uniform in
--mixed-gen; the host admits arrivals before every call. Per mode: time to first token (arrival -> first token
back on the host), inter-token latency (gaps between a request's token arrivals; tokens of one
multi-step call arrive together, so its gaps inside a call are 0), time per output token per
request, all p50 / p90 / p99, and tokens/s. The workload runs once untimed first (compiles);
`new_compiles` counts compiles during the timed run (each inflates the tail).

--profile: one decode call per batch size (first backend, multi mode) under `jax.profiler.trace`; the
GPU's kernel time per step grouped by category (attention, matmul / gemm, cache write, sampling,
copies / slices, norm / rope / elementwise fusions, other) plus while-loop gaps (span - busy: the
GPU idle inside the call), and the top kernels by time. None on a CPU (no GPU stream in the trace).

Writes $OUT/<name>.json (or benchmarks/results/ without $OUT) with the git commit, the device, each
record, the read ceiling and the ratios; prints a table last.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import device_time  # noqa: E402
from bench_env import config_constant, git_commit  # noqa: E402
from jax_varlen_attn import decode  # noqa: E402
from jax_varlen_attn.nn import DecoderLM, ModelConfig, preset  # noqa: E402
from jax_varlen_attn.serving import ChunkOutput, Engine, serving_step  # noqa: E402

UNTIMED_DECODE_STEPS = 2  # the first decode step compiles the decode bucket; one more to settle
UNTIMED_CHUNKS = 1  # the first multi-step call compiles the decode loop
CEILING_RUNS = 7
PERCENTILES = (50, 90, 99)


def package_versions() -> dict:
  """Installed versions of the packages a decode step's launches depend on (None: not installed)."""
  import importlib.metadata
  out = {}
  for name in ("jax", "jaxlib", "jax-triton", "triton", "flax"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


# ---- the byte bound ---------------------------------------------------------------------------------
def read_ceiling(mib: int, runs: int = CEILING_RUNS) -> dict:
  """Bytes / second of a jitted jnp.sum over a `mib` MiB bf16 array, from the GPU's busy time of
  the reduction (profiler; the best of `runs // 2` traces), else wall clock (median of `runs`).

  Wall clock includes the call's dispatch and measured 3.43 TB/s on an H200 where bench_attention's
  Triton sum read 4.50 (NOTES.md session 6); the device time does not include it.
  """
  n = mib * 2**20 // 2  # bf16: 2 bytes per element
  x = jnp.ones((n,), jnp.bfloat16)
  fn = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - t0)
  wall = statistics.median(times)
  dev = device_time.measure(jax, fn, (x,), 1, runs=max(1, runs // 2))
  del x
  sec, method = (dev["busy_ms"] / 1e3, "device busy time") if dev else (wall, "wall clock")
  return dict(read_gbps=round(2 * n / sec / 1e9, 1), method=method, bytes=2 * n, runs=runs,
              median_ms=round(sec * 1e3, 4), wall_read_gbps=round(2 * n / wall / 1e9, 1))


def step_bytes(cfg: ModelConfig, batch: int, context: float) -> Tuple[int, int]:
  """(weight bytes, K/V bytes) one decode step reads: every weight once, and each of the batch's
  sequences' `context` keys and values in every layer."""
  weights = cfg.num_params() * jnp.dtype(cfg.weight_dtype).itemsize
  per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
  kv = batch * context * per_token
  return int(weights), int(kv)


# ---- decode records ---------------------------------------------------------------------------------
def is_multi(mode: str) -> bool:
  return mode.startswith("multi")


def check_every(mode: str) -> int:
  """"multi/N" and "multi-serial/N" -> N; "multi" and "multi-serial" -> the engine's default
  (`decode.NEVER`: a loop of static length); "step" -> 1."""
  if "/" in mode:
    return int(mode.split("/")[1])
  return decode.NEVER if is_multi(mode) else 1


def loop_options(mode: str, args) -> dict:
  """The Engine's steps_per_call, check_every and overlap for a mode ("-serial": overlap off)."""
  return dict(steps_per_call=args.steps_per_call if is_multi(mode) else 1, check_every=check_every(mode),
              overlap="-serial" not in mode)


def make_engine(model: DecoderLM, args, max_seqs: int, mode: str, **overrides) -> Engine:
  options = {**loop_options(mode, args), **overrides}
  return Engine(model, num_blocks=args.num_blocks, block_size=args.block_size,
                max_tokens_per_step=args.max_tokens_per_step, max_seqs=max(max_seqs, 4),
                max_model_len=args.max_model_len, min_seq_bucket=args.min_seq_bucket, **options)


def timed_decode(engine: Engine, batch: int, mode: str) -> List[Tuple[float, int, dict]]:
  """(wall seconds, steps, `Engine.chunk_seconds` (multi modes; else {})) of every call that decodes
  all `batch` sequences, untimed ones dropped."""
  calls = []
  while engine.has_work:
    t0 = time.perf_counter()
    out = engine.advance()
    elapsed = time.perf_counter() - t0
    if isinstance(out, ChunkOutput):
      if len(out.chunk.scheduled) == batch and out.counts.max() > 0:
        calls.append((elapsed, int(out.counts.max()), dict(engine.chunk_seconds)))
    elif len(out.step.scheduled) == batch and all(n == 1 for _, _, n, _ in out.step.scheduled):
      calls.append((elapsed, 1, {}))
  return calls[UNTIMED_CHUNKS if is_multi(mode) else UNTIMED_DECODE_STEPS:]


def run_batch(model: DecoderLM, batch: int, mode: str, args, ceiling: dict) -> Tuple[dict, Engine]:
  """Prefills `batch` prompts, then times the decode calls of `mode`; returns (record, engine)."""
  rng = np.random.default_rng(batch)
  engine = make_engine(model, args, batch, mode)
  seqs = [engine.add(rng.integers(0, model.config.vocab_size, args.prompt_len).tolist(), args.gen,
                     sampling=args.sampling) for _ in range(batch)]
  t0 = time.perf_counter()
  prefill_steps = 0
  while any(s.in_prefill for s in seqs):
    engine.step()
    prefill_steps += 1
  prefill_s = time.perf_counter() - t0
  calls = timed_decode(engine, batch, mode)
  if len(calls) < (2 if is_multi(mode) else 3):
    raise ValueError(f"{len(calls)} timed {mode} calls; use more --chunks")
  per_step = [s / n for s, n, _ in calls]
  med = statistics.median(per_step)
  steps = sum(n for _, n, _ in calls)
  # Where a multi-step call's time went, ms a step (medians over the timed calls): the host before
  # the jitted call, the call until its tokens are back, the host after it.
  parts = {k: round(statistics.median(c[k] / n for _, n, c in calls) * 1e3, 4)
           for k in ("schedule", "call", "update") if all(k in c for _, _, c in calls)}
  first = args.prompt_len + args.gen - steps  # context of the first timed step
  context = first + (steps - 1) / 2
  weights, kv = step_bytes(model.config, batch, context)
  rec = dict(batch=batch, mode=mode, steps_per_call=engine.steps_per_call, check_every=engine.check_every,
             overlap=engine.overlap if is_multi(mode) else None,
             decode_build=getattr(engine, "decode_build", None),  # decode.loop_for's choice, multi modes
             sampling=args.sampling_text,
             prompt_len=args.prompt_len,
             generated=args.gen, context=[first, args.prompt_len + args.gen - 1], prefill_steps=prefill_steps,
             prefill_s_incl_compile=round(prefill_s, 3), decode_calls_timed=len(calls),
             decode_steps_timed=steps, decode_step_ms=round(med * 1e3, 3),
             decode_step_ms_min=round(min(per_step) * 1e3, 3),
             spread=round(float(np.quantile(per_step, 0.9) / np.quantile(per_step, 0.1) - 1), 3),
             tokens_per_s=round(batch / med, 1), weight_bytes=weights, kv_bytes_per_step=kv,
             bound_ms=round((weights + kv) / (ceiling["read_gbps"] * 1e9) * 1e3, 4))
  rec.update({f"{k}_ms_per_step": v for k, v in parts.items()})
  rec["pct_of_bound"] = round(100 * rec["bound_ms"] / rec["decode_step_ms"], 1)
  rec["_tokens"] = [list(s.generated) for s in seqs]
  return rec, engine


# ---- the kernel mix of one decode call --------------------------------------------------------------
CATEGORIES = ("attention", "matmul/gemm", "cache write", "sampling", "copies/slices", "norm/rope/elementwise",
              "other")
_GEMM = ("gemm", "gemv", "xmma", "nvjet", "cutlass", "cublas", "matmul", "__cublas")
_SAMPLING_OPS = ("jit(_sample)", "threefry", "random_bits", "random_fold_in", "random_wrap", "sort", "argmax")
_XLA_ATTENTION = ("bqhgd,bkhd", "bhgqk,bkhd")  # the xla backend's two einsums (scores, then values)
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\((.*)$")


def hlo_op_names(hlo: str) -> Dict[str, str]:
  """Instruction name -> its opcode and the JAX op names (metadata op_name) it and, for a fusion or a
  call, the computation it calls, carry: what each kernel of the executable computes."""
  own, calls, comp_ops, current = {}, {}, collections.defaultdict(list), None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      words = line.split()
      current = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode, rest = m.groups()
    ops = re.findall(r'op_name="([^"]+)"', rest)
    own[name] = opcode + " " + " ".join(ops)
    comp_ops[current].extend(ops)
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    if called:
      calls[name] = called.group(1)
  return {n: text + " " + " ".join(comp_ops.get(calls.get(n), [])) for n, text in own.items()}


def category(kernel: str, ops: str) -> str:
  """The category of a GPU event from its kernel name and the HLO it runs (`hlo_op_names`)."""
  k, o = kernel.lower(), ops.lower()
  if "write_kv" in k:
    return "cache write"
  if "attention" in k or "naive_paged_attention" in o or any(w in o for w in _XLA_ATTENTION):
    return "attention"
  if any(w in k for w in ("sort", "radix")) or any(w in o for w in _SAMPLING_OPS):
    return "sampling"
  if any(w in k for w in _GEMM) or o.startswith("custom-call") or "dot_general" in o:
    return "matmul/gemm"
  if "scatter" in o:
    return "cache write"
  if any(w in k for w in ("memcpy", "memset", "copy", "transpose", "dynamic_slice", "dynamic-slice")) or \
      o.startswith(("copy", "transpose", "dynamic-slice", "slice")) or "dynamic_slice" in o:
    return "copies/slices"
  if "fusion" in k or "fusion" in o or o.strip():
    return "norm/rope/elementwise"
  return "other"


def _event_ops(event: dict, ops: Dict[str, str]) -> str:
  """The HLO op text of a trace event: from whichever of its args names an instruction (hlo_op...)."""
  args = event.get("args") or {}
  for value in [v for v in args.values() if isinstance(v, str)] + [str(event.get("name", ""))]:
    name = value.split(":")[-1].strip().lstrip("%")
    # Kernel names spell a fusion's "name.3" as "name_3".
    for candidate in (name, re.sub(r"_(\d+)$", r".\1", name)):
      if candidate in ops:
        return ops[candidate]
  return ""


def kernel_mix(trace: dict, hlo: str, steps: int, top: int = 15) -> Optional[dict]:
  """Per-step GPU time by category of a traced decode call (None without GPU stream events)."""
  events, _ = device_time.stream_events(trace)
  if not events:
    return None
  ops = hlo_op_names(hlo)
  by_cat: Dict[str, float] = collections.defaultdict(float)
  by_name: Dict[str, List[float]] = collections.defaultdict(list)
  op_text: Dict[str, str] = {}  # kernel name -> the HLO it runs, for the idle-before rows
  for e in events:
    name = str(e.get("name", ""))
    text = _event_ops(e, ops)
    by_cat[category(name, text)] += float(e["dur"])
    by_name[name[:90]].append(float(e["dur"]))
    op_text.setdefault(name[:70], " ".join(text.split())[:240])
  s = device_time.summarize(events)
  per = lambda us: round(us / steps, 2)  # noqa: E731
  kernels = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
  return dict(steps=steps, busy_us_per_step=per(s["busy_us"]), span_us_per_step=per(s["span_us"]),
              while_loop_gaps_us_per_step=per(s["span_us"] - s["busy_us"]),
              kernels_per_step=round(len(events) / steps, 1),
              us_per_step={c: per(by_cat.get(c, 0.0)) for c in CATEGORIES},
              top_kernels=[dict(name=n, us_per_step=per(sum(d)), count_per_step=round(len(d) / steps, 2))
                           for n, d in kernels],
              gaps_before=[dict(g, ops=op_text.get(g["name"], ""), after_ops=op_text.get(g["after"], ""))
                           for g in device_time.gaps_before(events, steps)])


def profile_call(engine: Engine) -> Optional[dict]:
  """Traces the engine's next decode call (its decode loop already compiled) and returns its kernel mix."""
  chunk = engine.scheduler.schedule_decode(engine.steps_per_call)
  if chunk is None:
    return None
  args = engine.decode_args(chunk)
  kw = dict(steps=chunk.steps, mode=chunk.mode, check_every=engine.check_every)
  loop = decode.loop_for(args[4].tokens.shape[0])
  hlo = loop.lower(*args, **kw).compile().as_text()
  with tempfile.TemporaryDirectory(prefix="jva-serving-trace-") as d:
    with jax.profiler.trace(d):
      out = jax.block_until_ready(loop(*args, **kw))
    try:
      trace = device_time.load_trace(d)
    except FileNotFoundError:
      trace = {"traceEvents": []}
  tokens, counts, engine.k_cache, engine.v_cache = out
  counts = np.asarray(counts)
  engine.scheduler.update_decode(chunk, np.asarray(tokens), counts)
  return kernel_mix(trace, hlo, int(counts.max()))


def run_profile(model: DecoderLM, batch: int, args) -> Optional[dict]:
  """Prefills `batch` prompts, runs one (compiling) decode call, then profiles the next one."""
  rng = np.random.default_rng(batch)
  engine = make_engine(model, args, batch, args.profile_mode, overlap=False)  # profile_call schedules itself
  for _ in range(batch):
    engine.add(rng.integers(0, model.config.vocab_size, args.prompt_len).tolist(), args.gen,
               sampling=args.sampling)
  while engine.scheduler.waiting or any(s.in_prefill for s in engine.scheduler.running):
    engine.step()
  engine.decode_chunk()
  mix = profile_call(engine)
  return None if mix is None else dict(batch=batch, **mix)


# ---- mixed workload ---------------------------------------------------------------------------------
def _span(text: str) -> Tuple[int, int]:
  lo, hi = (int(x) for x in text.split(","))
  if not 1 <= lo <= hi:
    raise ValueError(f"a range must be 'lo,hi' with 1 <= lo <= hi, got {text!r}")
  return lo, hi


def mixed_requests(args) -> List[Tuple[float, List[int], int]]:
  """(arrival seconds, prompt, max_new_tokens) per request: seeded Poisson arrivals, uniform lengths."""
  rng = np.random.default_rng(args.mixed_seed)
  (p_lo, p_hi), (g_lo, g_hi) = _span(args.mixed_prompt), _span(args.mixed_gen)
  arrivals = np.cumsum(rng.exponential(1.0 / args.mixed_rate, args.mixed_requests))
  arrivals -= arrivals[0]  # the first request at t = 0
  return [(float(t), rng.integers(0, args.vocab, int(rng.integers(p_lo, p_hi + 1))).tolist(),
           int(rng.integers(g_lo, g_hi + 1))) for t in arrivals]


def serve(model: DecoderLM, requests, mode: str, args) -> dict:
  """Runs the workload in real time; returns per-request token arrival times and the wall span."""
  max_len = -(-max(len(p) + g for _, p, g in requests) // args.block_size) * args.block_size
  num_blocks = sum(-(-(len(p) + g) // args.block_size) for _, p, g in requests)  # no preemption
  if num_blocks <= args.num_blocks and max_len <= args.max_model_len:
    # The decode records' cache and table shapes where they suffice: their compiled programs serve.
    num_blocks, max_len = args.num_blocks, args.max_model_len
  engine = Engine(model, num_blocks=num_blocks, block_size=args.block_size,
                  max_tokens_per_step=args.max_tokens_per_step, max_seqs=args.mixed_max_seqs,
                  max_model_len=max_len, min_seq_bucket=args.min_seq_bucket, **loop_options(mode, args))
  arrivals, times, live = {}, {}, []
  t0, i = time.perf_counter(), 0
  while i < len(requests) or engine.has_work:
    now = time.perf_counter() - t0
    while i < len(requests) and requests[i][0] <= now:
      arrival, prompt, gen = requests[i]
      seq = engine.add(prompt, gen, sampling=args.sampling)
      arrivals[seq.seq_id], times[seq.seq_id] = arrival, []
      live.append(seq)
      i += 1
    if not engine.has_work:
      time.sleep(max(0.0, requests[i][0] - now))
      continue
    engine.advance()
    now = time.perf_counter() - t0
    for seq in live:
      times[seq.seq_id] += [now] * (len(seq.generated) - len(times[seq.seq_id]))
    live = [s for s in live if not s.finished]
  return dict(arrivals=arrivals, times=times, wall_s=time.perf_counter() - t0)


def _percentiles(values, name: str) -> dict:
  values = np.asarray(values, np.float64) * 1e3
  return {f"{name}_ms_p{q}": round(float(np.percentile(values, q)), 3) if values.size else None
          for q in PERCENTILES}


def loop_compiles() -> int:
  """Programs compiled so far by both builds of the decode loop (`decode.loop_for`)."""
  return decode.decode_loop._cache_size() + decode.decode_loop_cublas._cache_size()


def run_mixed(model: DecoderLM, mode: str, args) -> dict:
  requests = mixed_requests(args)
  serve(model, requests, mode, args)  # untimed: compiles the buckets this workload reaches
  compiles = serving_step._cache_size() + loop_compiles()
  run = serve(model, requests, mode, args)
  ttft, itl, tpot = [], [], []
  for seq_id, t in run["times"].items():
    ttft.append(t[0] - run["arrivals"][seq_id])
    itl += list(np.diff(t))
    if len(t) > 1:
      tpot.append((t[-1] - t[0]) / (len(t) - 1))
  tokens = sum(len(t) for t in run["times"].values())
  return dict(mode=mode, **loop_options(mode, args),
              requests=len(requests), rate_per_s=args.mixed_rate, prompt=args.mixed_prompt,
              gen=args.mixed_gen, seed=args.mixed_seed, tokens=tokens, wall_s=round(run["wall_s"], 3),
              tokens_per_s=round(tokens / run["wall_s"], 1), **_percentiles(ttft, "ttft"),
              **_percentiles(itl, "itl"), **_percentiles(tpot, "tpot"),
              new_compiles=serving_step._cache_size() + loop_compiles() - compiles)


# ---- main -------------------------------------------------------------------------------------------
def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="qwen3_1_7b_like")
  p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
  p.add_argument("--batches", default="1,16,64")
  p.add_argument("--backends", default="auto,naive",
                 help="attention backends, one model each; a name may end in @NAME=V: the Triton backend's "
                      "config.py constant NAME is V while that model runs (an A/B of a rule, e.g. "
                      "auto,auto@MIN_TILES_PER_SPLIT=2)")
  p.add_argument("--modes", default="step,multi", help="step (one token per call), multi (many, the "
                 "Engine's defaults: a loop of static length, calls overlapped), multi/N (checking for "
                 "finished sequences every N steps; N divides --steps-per-call; 0: never, the default), "
                 "multi-serial[/N]: the same with Engine(overlap=False) (each call dispatched after the "
                 "last one's tokens are read)")
  p.add_argument("--steps-per-call", type=int, default=32)
  p.add_argument("--chunks", type=int, default=4, help="timed multi-step calls per batch; the decode "
                 "length is 1 + steps_per_call * (chunks + 1) tokens in both modes")
  p.add_argument("--prompt-len", type=int, default=512)
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--static-unroll", type=int, default=None,
                 help="experiment: steps an iteration of the static decode loop runs for the whole run "
                      "(decode.STATIC_LOOP_UNROLL; default: the library's)")
  p.add_argument("--min-seq-bucket", type=int, default=4,
                 help="the Engine's smallest sequence bucket (rows a decode step computes at batch 1)")
  p.add_argument("--max-tokens-per-step", type=int, default=2048)
  p.add_argument("--ceiling-mib", type=int, default=2048, help="size of the read-ceiling array")
  p.add_argument("--mixed", action="store_true", help="also run the mixed workload (first backend)")
  p.add_argument("--mixed-requests", type=int, default=64)
  p.add_argument("--mixed-rate", type=float, default=16.0, help="mean arrivals per second")
  p.add_argument("--mixed-prompt", default="32,1024", help="prompt lengths lo,hi (uniform)")
  p.add_argument("--mixed-gen", default="16,256", help="generation lengths lo,hi (uniform)")
  p.add_argument("--mixed-max-seqs", type=int, default=64)
  p.add_argument("--mixed-seed", type=int, default=0)
  p.add_argument("--profile", action="store_true", help="kernel mix of one decode call per batch size")
  p.add_argument("--sampling", default=None, help="temperature,top_k,top_p for every request (e.g. "
                 "0.8,50,0.95; top-k / top-p sort the vocabulary every step); default greedy")
  p.add_argument("--launch", default=None, choices=("xla", "ffi", "legacy"),
                 help="the Triton backend's launch route for the whole run (attention and write_kv; "
                      "$JAX_VARLEN_ATTN_LAUNCH); default: jax-triton's")
  p.add_argument("--min-split-tiles", type=int, default=None,
                 help="experiment: the Triton split-KV rule's MIN_TILES_PER_SPLIT for the whole run "
                      "(backends/triton/config.py; default: the library's)")
  p.add_argument("--write-launch", default=None, choices=("xla", "ffi", "legacy"),
                 help="experiment: the launch route of write_kv's Triton kernel alone (attention keeps "
                      "the default or --launch); e.g. xla: fewer custom calls splitting XLA's command "
                      "buffers")
  p.add_argument("--no-fuse-rope-write", action="store_true",
                 help="q / k norms, RoPE and write_kv as separate ops (ModelConfig.fuse_rope_write=False)")
  p.add_argument("--no-fuse-add-norm", action="store_true",
                 help="residual adds and RMSNorms as XLA's ops (ModelConfig.fuse_add_norm=False)")
  p.add_argument("--out", default="serving")
  p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, short prompts")
  args = p.parse_args(argv)
  if args.tiny:
    args.preset, args.batches, args.prompt_len, args.max_tokens_per_step = "tiny", "1,4", 24, 64
    args.steps_per_call, args.chunks, args.ceiling_mib = 4, 2, 64
    # small enough for the decode records' cache (13 pages of 16, 48 tokens a sequence): no new compiles
    args.mixed_requests, args.mixed_rate, args.mixed_prompt, args.mixed_gen = 6, 200.0, "4,30", "2,12"
    args.mixed_max_seqs = 4
  if args.steps_per_call < 1 or args.chunks < 2:
    raise ValueError("--steps-per-call must be >= 1 and --chunks >= 2")
  args.gen = 1 + args.steps_per_call * (args.chunks + UNTIMED_CHUNKS)
  args.sampling_text = args.sampling or "greedy"
  if args.sampling:
    t, k, top_p = args.sampling.split(",")
    args.sampling = decode.Sampling(temperature=float(t), top_k=int(k), top_p=float(top_p))
  args.modes = args.modes.split(",")
  for mode in args.modes:
    n = check_every(mode) if re.fullmatch(r"step|multi(-serial)?(/\d+)?", mode) else -1
    if n < 0 or (n and args.steps_per_call % n):
      raise ValueError(f"--modes: step, multi[-serial] or multi[-serial]/N with N 0 or dividing "
                       f"--steps-per-call, got {mode!r}")
  multi = [m for m in args.modes if is_multi(m)]
  args.profile_mode = multi[-1] if multi else "multi"
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.static_unroll is not None:  # a patch of the library's loop, for this run only
    decode.STATIC_LOOP_UNROLL = args.static_unroll
  if args.min_split_tiles is not None:  # a patch of the library's rule, for this run only
    from jax_varlen_attn.backends.triton import config as triton_config
    triton_config.MIN_TILES_PER_SPLIT = args.min_split_tiles
  if args.write_launch:  # a patch for this run only: write_kv's launches take this route
    from jax_varlen_attn.backends.triton import write_kernel
    launch = write_kernel.launch
    write_kernel.launch = lambda *a, route=None, **k: launch(*a, route=args.write_launch, **k)
  if args.launch:  # read when the model's calls are traced: before the first one
    from jax_varlen_attn.backends.triton import call
    os.environ[call.LAUNCH_ENV] = args.launch
  overrides = {} if args.layers is None else dict(num_layers=args.layers)
  if args.no_fuse_rope_write:
    overrides["fuse_rope_write"] = False
  if args.no_fuse_add_norm:
    overrides["fuse_add_norm"] = False
  base: ModelConfig = preset(args.preset, **overrides)
  args.vocab = base.vocab_size
  batches = [int(b) for b in args.batches.split(",")]
  # One cache size for every batch size (enough for the largest): the compiled programs are shared.
  pages = -(-(args.prompt_len + args.gen) // args.block_size)
  args.num_blocks, args.max_model_len = max(batches) * pages + 1, pages * args.block_size
  device = jax.devices()[0]
  ceiling = read_ceiling(args.ceiling_mib)
  commit, dirty = git_commit()
  doc = dict(benchmark="serving decode: one step vs many per call", commit=commit,
             commit_dirty=dirty, device=device.device_kind, platform=device.platform,
             jax=jax.__version__,
             model=dataclasses.asdict(base), params=base.num_params(), read_ceiling=ceiling,
             steps_per_call=args.steps_per_call, min_seq_bucket=args.min_seq_bucket,
             static_loop_unroll=decode.STATIC_LOOP_UNROLL,
             launch=args.launch or "default",
             min_split_tiles=args.min_split_tiles or "default",
             write_launch=args.write_launch or "default", records=[], mixed=[],
             profile=[], versions=package_versions(), xla_flags=os.environ.get("XLA_FLAGS", ""))
  print(f"{device.device_kind}: {args.preset} ({base.num_params() / 1e9:.2f}e9 params), prompt "
        f"{args.prompt_len}, +{args.gen} tokens; read ceiling {ceiling['read_gbps']} GB/s", flush=True)
  tokens = {}
  names = args.backends.split(",")
  for name in names:
    with model_rule(name):
      run_backend(name, base, batches, args, ceiling, tokens, doc, names)
  doc["ratios"] = ratios(doc["records"], names, batches, args.modes, tokens)
  out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{args.out}.json"
  path.write_text(json.dumps(doc, indent=1))
  print(f"wrote {path}")
  print_table(doc, names)
  return 0


def run_backend(backend: str, base: ModelConfig, batches, args, ceiling, tokens, doc, names):
  """The decode records (and profile / mixed workload, first backend) of one --backends entry."""
  model = DecoderLM(dataclasses.replace(base, backend=backend.partition("@")[0]), rngs=nnx.Rngs(0))
  for batch in batches:
    for mode in args.modes:
      rec, _ = run_batch(model, batch, mode, args, ceiling)
      tokens[(backend, batch, mode)] = rec.pop("_tokens")
      rec["backend"] = backend
      if is_multi(mode) and (backend, batch, "step") in tokens:
        same = [x == y for a, b in zip(tokens[(backend, batch, "step")], tokens[(backend, batch, mode)])
                for x, y in zip(a, b)]
        rec["same_tokens_as_step"] = round(float(np.mean(same)), 3)
      doc["records"].append(rec)
      print(f"  {backend:6s} batch {batch:3d} {mode:7s}: {rec['decode_step_ms']:8.3f} ms/step "
            f"{rec['tokens_per_s']:9.1f} tok/s  bound {rec['bound_ms']:.3f} ms ({rec['pct_of_bound']}%)"
            + ("".join(f", {k} {rec[k + '_ms_per_step']:.4f}" for k in ("schedule", "call", "update")
                       if k + "_ms_per_step" in rec)), flush=True)
    if args.profile and backend == names[0]:
      mix = run_profile(model, batch, args)
      doc["profile"].append(mix or dict(batch=batch, note="no GPU stream in the trace"))
      if mix is not None:
        cats = ", ".join(f"{c} {us:.1f}" for c, us in mix["us_per_step"].items())
        print(f"  profile batch {batch}: {cats}, gaps {mix['while_loop_gaps_us_per_step']:.1f} us/step",
              flush=True)
        waits = "; ".join(f"{g['name'][:40]} {g['gap_us_per_call']:.1f} (x{g['count_per_call']}, after "
                          f"{g['after'][:40]})" for g in mix["gaps_before"][:6])
        print(f"  idle before (us/step): {waits}", flush=True)
  if args.mixed and backend == names[0]:
    for mode in args.modes:
      rec = dict(backend=backend, **run_mixed(model, mode, args))
      doc["mixed"].append(rec)
      print(f"  mixed {mode:5s}: ttft p50/p99 {rec['ttft_ms_p50']}/{rec['ttft_ms_p99']} ms, itl p50/p99 "
            f"{rec['itl_ms_p50']}/{rec['itl_ms_p99']} ms, {rec['tokens_per_s']} tok/s", flush=True)
  del model


@contextlib.contextmanager
def model_rule(name: str):
  """A --backends entry's "@NAME=V": the Triton backend's config.py constant NAME is V meanwhile."""
  _, _, rule = name.partition("@")
  if not rule:
    yield
    return
  const, _, value = rule.partition("=")
  with config_constant(const, int(value)):
    yield


def first_difference(a: List[List[int]], b: List[List[int]]) -> float:
  """Median over sequences of the first generated position where two runs' tokens differ (the
  length where none does): a flip at the first few tokens, then everything after it differing, is
  how two sums in another order meet a random-weight model's near-tied logits."""
  firsts = []
  for ta, tb in zip(a, b):
    n = min(len(ta), len(tb))
    firsts.append(next((i for i in range(n) if ta[i] != tb[i]), n))
  return float(np.median(firsts)) if firsts else 0.0


def ratios(records, names, batches, modes, tokens) -> List[dict]:
  """Per batch (and mode): backend a vs b tokens/s and greedy-token agreement; multi vs step per backend."""
  by = {(r["backend"], r["batch"], r["mode"]): r for r in records}
  out = []
  for mode in modes:
    if len(names) != 2:
      break
    a, b = names
    for batch in batches:
      ra, rb = by[(a, batch, mode)], by[(b, batch, mode)]
      same = np.mean([x == y for ta, tb in zip(tokens[(a, batch, mode)], tokens[(b, batch, mode)])
                      for x, y in zip(ta, tb)])
      out.append(dict(batch=batch, mode=mode, speedup=round(ra["tokens_per_s"] / rb["tokens_per_s"], 3),
                      **{f"{a}_tokens_per_s": ra["tokens_per_s"], f"{b}_tokens_per_s": rb["tokens_per_s"]},
                      same_greedy_tokens=round(float(same), 3),
                      first_difference=first_difference(tokens[(a, batch, mode)], tokens[(b, batch, mode)])))
  if set(modes) == {"step", "multi"}:
    for backend in names:
      for batch in batches:
        out.append(dict(batch=batch, backend=backend, multi_over_step=round(
            by[(backend, batch, "multi")]["tokens_per_s"] / by[(backend, batch, "step")]["tokens_per_s"], 3)))
  return out


def print_table(doc, names):
  print(f"{'backend':>7s} {'batch':>5s} {'mode':>12s} {'ms/step':>9s} {'bound ms':>9s} {'% bound':>8s} "
        f"{'tok/s':>10s}")
  for r in doc["records"]:
    print(f"{r['backend']:>7s} {r['batch']:5d} {r['mode']:>12s} {r['decode_step_ms']:9.3f} "
          f"{r['bound_ms']:9.4f} {r['pct_of_bound']:8.1f} {r['tokens_per_s']:10.1f}")
  for row in doc["ratios"]:
    if "speedup" in row:
      print(f"batch {row['batch']} {row['mode']}: {names[0]} / {names[1]} speedup {row['speedup']:.3f}, "
            f"same-tokens {row['same_greedy_tokens']:.3f} (first difference at token {row['first_difference']:g})")
    else:
      print(f"batch {row['batch']} {row['backend']}: multi / step {row['multi_over_step']:.3f}")


if __name__ == "__main__":
  sys.exit(main())
