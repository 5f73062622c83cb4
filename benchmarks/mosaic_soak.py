"""Soak test of the Mosaic GPU prefill kernel: does it deadlock, and under which launch form?

Session 32 (benchmarks/NOTES.md) saw the kernel hang the GPU (100% utilization at ~120 W) in 3 of
11 bench_attention units, each after thousands of good calls. This runs one case through
`PallasConfig(kernel="mosaic")` for a fixed time per form, each form in its own process (a hang
there cannot stop the others), with a watchdog that reports the GPU's state when no call has
finished for --stall-s seconds. Forms:

- single: one call per jitted function (no command buffer of ours), blocking every 100 calls;
- chain: --chain dependent calls inside one jitted function, each output the next call's q (equal
  calls XLA would merge into one), replayed by XLA as a CUDA graph;
- either with --pad-q rows of q past cu_seqlens_q[-1] (>= 128: no q TMA box out of bounds),
- and under each of --flag-sets (XLA_FLAGS for the child, "|"-separated; empty: none), e.g.
  command buffers off, or PDL off.

  python3 benchmarks/mosaic_soak.py --case seed4_distinct --seconds 40 --forms single,chain \\
      --pad-q 0,128 --flag-sets "|--xla_gpu_enable_command_buffer=" --json $OUT/soak.json

Prints a table (form, pad, flags, calls, stalled, GPU state at the stall) last. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _gpu_state() -> str:
  try:
    return subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,power.draw,clocks.sm",
                           "--format=csv,noheader"], capture_output=True, text=True,
                          timeout=10).stdout.strip()
  except Exception as e:  # diagnostics only
    return f"nvidia-smi failed: {e}"


def _inputs(case_name: str, pad_q: int, tiny: bool, seed: int = 0):
  """(q, k, v, meta) of a case (its heads, head dim, page size), fp16, every page used by one
  sequence, in a shuffled order."""
  import jax.numpy as jnp
  import numpy as np
  sys.path.insert(0, str(HERE))
  import shapes
  case = shapes.get_cases(tiny=tiny)[case_name]
  cu = np.asarray(case.cu_seqlens_q, np.int32)
  seqk = np.asarray(case.seqused_k, np.int32)
  bs, heads, kv_heads, d = case.block_size, case.num_heads, case.num_kv_heads, case.head_dim
  blocks = -(-seqk // bs)
  rng = np.random.default_rng(seed)
  pages = rng.permutation(int(blocks.sum())).astype(np.int32)
  table = np.zeros((len(seqk), int(blocks.max())), np.int32)
  starts = np.concatenate([[0], np.cumsum(blocks)])
  for b, n in enumerate(blocks):
    table[b, :n] = pages[starts[b]:starts[b] + n]
  cache = lambda: jnp.asarray(rng.standard_normal((len(pages), bs, kv_heads, d)), jnp.float16)
  q = jnp.asarray(rng.standard_normal((int(cu[-1]) + pad_q, heads, d)), jnp.float16)
  meta = dict(cu_seqlens_q=jnp.asarray(cu), seqused_k=jnp.asarray(seqk),
              block_table=jnp.asarray(table), max_seqlen_q=int(np.diff(cu).max()),
              max_seqlen_k=int(seqk.max()), causal=case.causal)
  return q, cache(), cache(), meta


def child(args) -> int:
  """One form in this process; prints one JSON line ('RESULT {...}') unless the watchdog fires."""
  import jax
  from jax_varlen_attn import PallasConfig, flash_attn_varlen_func
  q, k, v, meta = _inputs(args.case, args.pad_q, args.tiny)
  config = PallasConfig(kernel="mosaic")
  one = lambda q, k, v: flash_attn_varlen_func(q, k, v, backend="pallas", config=config, **meta)
  chain = args.chain if args.form == "chain" else 1

  def calls(q, k, v):  # each call's output is the next one's q: XLA cannot merge equal calls
    for _ in range(chain):
      q = one(q, k, v)
    return q

  fn = jax.jit(calls)
  state = dict(calls=0, last=time.time(), phase="compile")

  def watchdog():
    while True:
      time.sleep(1)
      if time.time() - state["last"] > args.stall_s:
        print("RESULT " + json.dumps(dict(form=args.form, pad_q=args.pad_q, calls=state["calls"],
                                          stalled=True, phase=state["phase"], gpu=_gpu_state())),
              flush=True)
        os._exit(3)

  threading.Thread(target=watchdog, daemon=True).start()
  jax.block_until_ready(fn(q, k, v))
  state.update(last=time.time(), phase="calls")
  t0 = time.time()
  per_block = max(1, 100 // chain)
  while time.time() - t0 < args.seconds:
    for _ in range(per_block):
      out = fn(q, k, v)
    jax.block_until_ready(out)
    state["calls"] += per_block * chain
    state["last"] = time.time()
  print("RESULT " + json.dumps(dict(form=args.form, pad_q=args.pad_q, calls=state["calls"],
                                    stalled=False, seconds=round(time.time() - t0, 1))), flush=True)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--case", default="seed4_distinct")
  p.add_argument("--seconds", type=float, default=40.0, help="calling time per form")
  p.add_argument("--stall-s", type=float, default=20.0, help="no finished call this long: a hang")
  p.add_argument("--forms", default="single,chain")
  p.add_argument("--chain", type=int, default=32, help="calls in one jitted function (form chain)")
  p.add_argument("--pad-q", default="0", help="comma list of q rows past cu_seqlens_q[-1]")
  p.add_argument("--flag-sets", default="", help='"|"-separated XLA_FLAGS, one child each ("": none)')
  p.add_argument("--json", default=None)
  p.add_argument("--tiny", action="store_true", help="CPU plumbing check: the tiny shapes")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--form", default="single", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    args.pad_q = int(args.pad_q)
    return child(args)
  rows = []
  runs = [(form, int(pad), flags) for flags in args.flag_sets.split("|")
          for form in args.forms.split(",") for pad in args.pad_q.split(",")]
  for form, pad, flags in runs:
    cmd = [sys.executable, __file__, "--child", "--form", form, "--pad-q", str(pad),
           "--case", args.case, "--seconds", str(args.seconds), "--stall-s", str(args.stall_s),
           "--chain", str(args.chain)] + (["--tiny"] if args.tiny else [])
    env = dict(os.environ, XLA_FLAGS=" ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flags) if x))
    budget = args.seconds + args.stall_s + 180  # compile and inputs included
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=env).stdout
    except subprocess.TimeoutExpired as e:
      out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    found = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    rows.append(dict(found[-1] if found else dict(form=form, pad_q=pad, error="no result",
                                                  tail=out[-500:]), flags=flags))
    print(json.dumps(rows[-1]), flush=True)
  if args.json:
    from bench_env import git_commit
    commit, dirty = git_commit()
    Path(args.json).write_text(json.dumps(dict(case=args.case, commit=commit, commit_dirty=dirty,
                                               rows=rows), indent=1))
  print(f"{'form':8s} {'pad_q':>5s} {'flags':36s} {'calls':>8s} {'stalled':>8s}  gpu at the stall")
  for r in rows:
    print(f"{r.get('form', '?'):8s} {r.get('pad_q', '?'):>5} {r['flags'][:36]:36s} "
          f"{r.get('calls', '-'):>8} {str(r.get('stalled', r.get('error'))):>8s}  {r.get('gpu', '')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
