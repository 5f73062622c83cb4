"""One serving step on a paged KV cache, checked against float64 NumPy: `python -m jax_varlen_attn.demo`.

The batch is what a continuous-batching engine runs: a few prefills (whole prompts, causal) and many
decodes (one new token each over a long history), packed into one q of `total_q` rows, with every
sequence's keys in pages of a shared NHD cache named by a random block table. The output is compared
with a float64 reference written here from the semantics (docs/contract.md, "Semantics"), then the jitted call
is timed: compile once, then the median of a few steady-state calls.

    python -m jax_varlen_attn.demo [--backend auto|xla|pallas|triton] [--seed N] [--decodes N] ...

Exits 1 when the relative error exceeds the tolerance of the dtype (fp16 4e-3, bf16 1.6e-2), 2 when the
backend cannot run here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_varlen_attn import backends
from jax_varlen_attn.api import flash_attn_varlen_func

# docs/contract.md, "Accuracy": relative error bounds against the float64 reference.
TOLERANCE = {"float16": 4e-3, "bfloat16": 1.6e-2}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jax_varlen_attn.demo", description=__doc__.split("\n")[0])
  p.add_argument("--backend", default="auto", help="auto (default: triton on a CUDA GPU, else xla), "
                 "xla, pallas or triton")
  p.add_argument("--seed", type=int, default=0, help="seed of the lengths, block table and values")
  p.add_argument("--prefill", type=int, nargs="*", default=[192, 256], metavar="LEN",
                 help="prompt length of each prefill sequence (default: 192 256)")
  p.add_argument("--decodes", type=int, default=30, help="decode sequences (one query each)")
  p.add_argument("--history", type=int, default=1000, help="mean keys of a decode sequence (+-10%%)")
  p.add_argument("--heads", type=int, nargs=2, default=[16, 8], metavar=("H", "HK"),
                 help="q heads and kv heads (GQA); default 16 8")
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--block-size", type=int, default=16, help="tokens per cache page")
  p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float16")
  p.add_argument("--repeats", type=int, default=3, help="timed steady-state calls (median reported)")
  p.add_argument("--rtol", type=float, default=None, help="relative error bound (default: the dtype's)")
  return p


def make_batch(rng, prefill, decodes, history, num_heads, num_kv_heads, head_dim, block_size, dtype):
  """A mixed batch over a paged NHD cache: (kwargs for flash_attn_varlen_func, per-sequence K / V)."""
  np_dtype = jnp.dtype(dtype)
  seqlens_q = list(prefill) + [1] * decodes
  # A prefill attends to its own prompt; a decode to its history plus the token it appends.
  lo, hi = max(1, int(history * 0.9)), max(1, int(history * 1.1))
  seqlens_k = list(prefill) + [int(n) for n in rng.integers(lo, hi + 1, size=decodes)]
  pages = [-(-n // block_size) for n in seqlens_k]
  # The cache holds more pages than the batch uses; every slot no real key occupies (spare pages,
  # the tail of each sequence's last page) is NaN, so a read of one would show in the error.
  num_pages = sum(pages) + 16
  shape = (num_pages, block_size, num_kv_heads, head_dim)
  k_cache = np.full(shape, np.nan, np_dtype)
  v_cache = np.full(shape, np.nan, np_dtype)
  block_table = np.zeros((len(seqlens_q), max(pages)), np.int32)  # past a sequence's pages: never read
  perm, used, keys, values = rng.permutation(num_pages), 0, [], []
  for b, (n, sk) in enumerate(zip(pages, seqlens_k)):
    block_table[b, :n] = perm[used:used + n]
    used += n
    kv = rng.standard_normal((2, sk, num_kv_heads, head_dim), dtype=np.float32).astype(np_dtype)
    for cache, x in ((k_cache, kv[0]), (v_cache, kv[1])):
      flat = cache[block_table[b, :n]].reshape(n * block_size, num_kv_heads, head_dim)
      flat[:sk] = x
      cache[block_table[b, :n]] = flat.reshape(n, block_size, num_kv_heads, head_dim)
    keys.append(kv[0])
    values.append(kv[1])
  cu_q = np.concatenate([[0], np.cumsum(seqlens_q)]).astype(np.int32)
  q = rng.standard_normal((int(cu_q[-1]), num_heads, head_dim), dtype=np.float32).astype(np_dtype)
  arrays = dict(q=q, k=k_cache, v=v_cache, cu_seqlens_q=cu_q,
                seqused_k=np.asarray(seqlens_k, np.int32), block_table=block_table)
  return arrays, keys, values


def reference(q, keys, values, cu_seqlens_q, scale):
  """Causal (bottom-right aligned) GQA attention in float64, one sequence at a time."""
  q = np.asarray(q, np.float64)
  out = np.zeros_like(q)
  group = q.shape[1] // keys[0].shape[1]
  for b in range(len(keys)):
    q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
    k = np.repeat(np.asarray(keys[b], np.float64), group, axis=1)  # q head h reads kv head h // group
    v = np.repeat(np.asarray(values[b], np.float64), group, axis=1)
    sq, sk = q1 - q0, k.shape[0]
    s = np.einsum("qhd,khd->hqk", q[q0:q1], k) * scale
    allowed = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[q0:q1] = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)
  return out


def _errors(out, ref):
  diff = np.abs(out - ref)
  return float(diff.max()), float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))


def main(argv=None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if not args.prefill and args.decodes < 1:
    parser.error("the batch is empty: give --prefill lengths or --decodes >= 1")
  if min(args.prefill + [args.history]) < 1 or args.decodes < 0:
    parser.error("lengths (--prefill, --history) must be >= 1 and --decodes >= 0")
  try:
    backend = backends.select(args.backend).name
  except (TypeError, ValueError) as e:
    print(f"demo: {e}", file=sys.stderr)
    return 2
  num_heads, num_kv_heads = args.heads
  rng = np.random.default_rng(args.seed)
  arrays, keys, values = make_batch(rng, args.prefill, args.decodes, args.history, num_heads, num_kv_heads,
                                    args.head_dim, args.block_size, args.dtype)
  scale = 1.0 / np.sqrt(args.head_dim)

  @jax.jit
  def step(q, k, v, cu_seqlens_q, seqused_k, block_table):
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k,
                                  block_table=block_table, causal=True, backend=backend)

  dev = {name: jax.device_put(x) for name, x in arrays.items()}
  t0 = time.perf_counter()
  compiled = step.lower(**dev).compile()
  compile_s = time.perf_counter() - t0
  out = np.asarray(jax.block_until_ready(compiled(**dev)), np.float64)
  times = []
  for _ in range(max(1, args.repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(**dev))
    times.append(time.perf_counter() - t0)

  ref = reference(arrays["q"], keys, values, arrays["cu_seqlens_q"], scale)
  rtol = TOLERANCE[args.dtype] if args.rtol is None else args.rtol
  n_pre = len(args.prefill)
  split = int(arrays["cu_seqlens_q"][n_pre])  # prefill rows come first
  seqlens_k = arrays["seqused_k"]
  pages = -(-seqlens_k // args.block_size)
  rows = [("prefill", slice(0, n_pre), slice(0, split)),
          ("decode", slice(n_pre, None), slice(split, None)),
          ("all", slice(None), slice(None))]
  print(f"jax_varlen_attn demo: backend={backend} (asked {args.backend!r}) on {jax.devices()[0].platform}, "
        f"{args.dtype}, causal, GQA {num_heads}/{num_kv_heads} heads, head_dim {args.head_dim}, "
        f"NHD cache of {arrays['k'].shape[0]} pages x {args.block_size} tokens, random block table")
  print(f"{'':8}{'seqs':>6}{'q tokens':>10}{'kv tokens':>11}{'pages':>7}{'max abs err':>13}{'rel err':>10}")
  worst = 0.0
  for name, seqs, qrows in rows:
    if out[qrows].size == 0:
      continue
    max_abs, rel = _errors(out[qrows], ref[qrows])
    worst = max(worst, rel) if not np.isnan(rel) else np.inf
    print(f"{name:8}{len(seqlens_k[seqs]):>6}{out[qrows].shape[0]:>10}{int(seqlens_k[seqs].sum()):>11}"
          f"{int(pages[seqs].sum()):>7}{max_abs:>13.2e}{rel:>10.2e}")
  print(f"compile {compile_s:.2f} s, steady state {statistics.median(times) * 1e3:.1f} ms "
        f"(median of {len(times)}, jit + block_until_ready)")
  ok = worst <= rtol
  print(f"{'OK' if ok else 'FAIL'}: rel err {worst:.2e} {'<=' if ok else '>'} tolerance {rtol:.1e}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
