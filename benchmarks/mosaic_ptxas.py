"""ptxas's report on the Mosaic GPU prefill kernel: registers, spills, and wgmma serialization.

    python3 benchmarks/mosaic_ptxas.py                     # prefill 4 x 4096, 16 / 8 heads, D 128
    python3 benchmarks/mosaic_ptxas.py --seqlen 1024 --batch 8 --head-dim 64

Runs one causal prefill call through `PallasConfig(kernel="mosaic")` on the GPU, in a child process
with MOSAIC_GPU_DUMP_PTXAS=1 (Mosaic then prints ptxas's verbose report while it compiles), and
prints the report's lines that matter. Exit status 3 when ptxas says it serialized wgmmas
(C7513: a non-wgmma instruction wrote a wgmma's input registers inside its pipeline stage; the
tensor cores then wait on every wgmma, benchmarks/NOTES.md session 15 item 1), 0 otherwise.
Needs a Hopper GPU and JAX's CUDA plugin.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

_KEEP = re.compile(r"C75\d\d|spill|Used \d+ registers|error", re.IGNORECASE)


def _call(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, page: int) -> None:
  """One prefill call (uniform lengths, distinct pages) with the Mosaic kernel."""
  import jax.numpy as jnp

  from jax_varlen_attn import PallasConfig, flash_attn_varlen_func

  total = batch * seqlen
  pages = total // page
  q = jnp.full((total, heads, head_dim), 0.01, jnp.float16)
  cache = jnp.full((pages, page, kv_heads, head_dim), 0.01, jnp.float16)
  cu = jnp.arange(batch + 1, dtype=jnp.int32) * seqlen
  out = flash_attn_varlen_func(
      q, cache, cache, cu_seqlens_q=cu, max_seqlen_q=seqlen,
      seqused_k=jnp.full((batch,), seqlen, jnp.int32), max_seqlen_k=seqlen,
      block_table=jnp.arange(pages, dtype=jnp.int32).reshape(batch, seqlen // page), causal=True,
      backend="pallas", config=PallasConfig(kernel="mosaic"))
  out.block_until_ready()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seqlen", type=int, default=4096)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--page", type=int, default=16)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.seqlen % args.page:
    p.error(f"--seqlen {args.seqlen} must be a multiple of --page {args.page}")
  import jax
  if jax.default_backend() != "gpu":
    p.error(f"needs a CUDA GPU (JAX's backend here: {jax.default_backend()}); off the GPU the "
            "pallas backend interprets its Triton-lowered kernel, and ptxas never runs")
  if args.child:
    _call(args.batch, args.seqlen, args.heads, args.kv_heads, args.head_dim, args.page)
    return 0
  env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1")
  cmd = [sys.executable, os.path.abspath(__file__), "--child"] + (argv if argv is not None
                                                                   else sys.argv[1:])
  run = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace")
  report = sorted({line.strip()[:200] for line in (run.stdout + run.stderr).splitlines()
                   if _KEEP.search(line)})
  print("\n".join(report) or "(no ptxas report: is this a GPU with JAX's CUDA plugin?)")
  if run.returncode:
    print(f"the call failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return run.returncode
  if any("C7513" in line for line in report):
    print("ptxas serialized the kernel's wgmmas (C7513)")
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
