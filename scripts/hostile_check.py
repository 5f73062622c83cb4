"""Hostile inputs on a backend: every layout with garbage index arrays, run twice, compared bitwise.

Meant to run under compute-sanitizer on the GPU machine (see scripts/sanitize.sh), where an
out-of-bounds read of any kernel launch is reported; on its own it checks that nothing crashes and
that repeated runs are bitwise identical (no atomics-dependent results).

  python scripts/hostile_check.py [--backend triton]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_varlen_attn import flash_attn_varlen_func  # noqa: E402
from tests.problems import LAYOUTS, Problem, make_problem  # noqa: E402


def hostile_variants(kwargs, rng):
  """(name, kwargs) pairs, each breaking index values a different way."""
  total_q = kwargs["q"].shape[0]
  cu = np.asarray(kwargs["cu_seqlens_q"])
  used = np.asarray(kwargs["seqused_k"])
  out = []
  if "block_table" in kwargs:
    bt = np.asarray(kwargs["block_table"])
    cap = bt.shape[1] * 16
    garbage = rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, bt.shape, dtype=np.int64)
    out.append(("garbage_block_table", dict(block_table=jnp.asarray(garbage.astype(np.int32)))))
    out.append(("seqused_at_capacity", dict(seqused_k=jnp.full_like(used, cap))))
    out.append(("seqused_past_capacity", dict(seqused_k=jnp.full_like(used, cap + 1))))
    if "layer" in kwargs:
      out.append(("layer_out_of_range", dict(layer=jnp.int32(10**6))))
      out.append(("layer_negative", dict(layer=jnp.int32(-5))))
  else:
    cu_k = np.asarray(kwargs["cu_seqlens_k"])
    out.append(("cu_seqlens_k_past_end", dict(cu_seqlens_k=jnp.asarray(cu_k + 10**6))))
  out.append(("seqused_huge", dict(seqused_k=jnp.full_like(used, 2**31 - 1))))
  out.append(("seqused_negative", dict(seqused_k=jnp.full_like(used, -(2**31)))))
  out.append(("cu_q_past_total", dict(cu_seqlens_q=jnp.asarray(cu + total_q))))
  out.append(("cu_q_decreasing", dict(cu_seqlens_q=jnp.asarray(cu[::-1].copy()))))
  out.append(("cu_q_garbage", dict(cu_seqlens_q=jnp.asarray(
      rng.integers(-(10**9), 10**9, cu.shape).astype(np.int32)))))
  return out


def configs(backend):
  """The kernel paths to exercise: the default, and for triton the split-KV path forced on."""
  out = [("default", None)]
  if backend == "triton":
    from jax_varlen_attn.backends.triton import Config
    out.append(("split-kv", Config(block_n=16, num_splits=3)))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--backend", default="triton")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  runs = nondeterministic = 0
  for layout in LAYOUTS + ("non_paged",):
    p = Problem(layout=layout if layout != "non_paged" else "NHD", paged=layout != "non_paged",
                causal=True, seed=int(rng.integers(2**31)))
    kwargs, _ = make_problem(p)
    for name, change in hostile_variants(kwargs, rng):
      for config_name, config in configs(args.backend):
        call = {**kwargs, **change, "config": config}
        first = jax.block_until_ready(flash_attn_varlen_func(**call, backend=args.backend))
        second = jax.block_until_ready(flash_attn_varlen_func(**call, backend=args.backend))
        runs += 1
        same = all(np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
                   for a, b in zip(first, second))
        if not same:
          nondeterministic += 1
          print(f"NOT bitwise identical: {layout} {name} {config_name}")
  print(f"hostile runs: {runs} on backend={args.backend}, not bitwise identical: {nondeterministic}")
  return 1 if nondeterministic else 0


if __name__ == "__main__":
  sys.exit(main())
