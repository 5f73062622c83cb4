"""bench_attention's peers, each checked and timed like ours: the naive XLA gather (`xla-naive`),
JAX's Pallas paged_attention (`jax-pallas-paged`, decode only) and FlagGems (CUDA-graph replay)."""

from __future__ import annotations

import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
  if p not in sys.path:
    sys.path.insert(0, p)

import numpy as np  # noqa: E402

import shapes  # noqa: E402  (benchmarks/shapes.py)
from bench_env import Env, log, time_torch_events  # noqa: E402
from bench_inputs import (CaseData, LayoutData, base_record, check, finish_timing, run_jax_unit,  # noqa: E402
                          time_wall)


def naive_memory(cd: CaseData) -> int:
  c = cd.case
  it = shapes.ITEMSIZE[cd.dtype]
  maxk = c.max_blocks * c.block_size
  scores = c.batch * c.num_heads * c.max_seqlen_q * maxk * 4
  kv = 2 * c.batch * maxk * c.num_kv_heads * c.head_dim * it
  qo = c.batch * c.max_seqlen_q * c.num_heads * c.head_dim * (it + 4)
  return 3 * scores + kv + qo


def naive_unit(env: Env, cd: CaseData, ld: LayoutData, args, ceilings) -> dict:
  """The dense JAX a user writes first: gather each sequence's pages, pad, masked softmax."""
  jnp = env.jnp
  rec = base_record(cd, ld.name, "xla-naive", "default")
  need = naive_memory(cd)
  rec["est_memory_gb"] = round(need / 1e9, 2)
  if need > args.naive_mem_gb * 1e9:
    rec["status"] = "skipped"
    rec["note"] = f"would need ~{need / 1e9:.0f} GB (> {args.naive_mem_gb} GB)"
    return rec
  case = cd.case
  B, H, Hk, D, G, bs = (case.batch, case.num_heads, case.num_kv_heads, case.head_dim, case.group,
                        case.block_size)
  MQ, MB = case.max_seqlen_q, case.max_blocks
  MK = MB * bs
  cu = np.array(case.cu_seqlens_q)
  sql = np.array(case.seqlens_q)
  q_idx = np.zeros((B, MQ), np.int32)
  for b in range(B):
    q_idx[b] = cu[b] + np.minimum(np.arange(MQ), max(sql[b] - 1, 0))
  row_b = np.repeat(np.arange(B), sql).astype(np.int32)
  row_i = np.concatenate([np.arange(s) for s in sql]).astype(np.int32)
  consts = dict(q_idx=jnp.asarray(q_idx), row_b=jnp.asarray(row_b), row_i=jnp.asarray(row_i))
  strided, parity = ld.name == "strided", cd.parity
  scale = cd.scale

  def one(q, kv, meta):
    k, v = kv
    pages = meta["block_table"]
    if strided:
      pages = 2 * pages + parity
    kg = jnp.take(k, pages, axis=0).reshape(B, MK, Hk, D)
    vg = jnp.take(v, pages, axis=0).reshape(B, MK, Hk, D)
    qp = jnp.take(q, meta["q_idx"], axis=0).reshape(B, MQ, Hk, G, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qp, kg, preferred_element_type=jnp.float32) * scale
    cuq = meta["cu_seqlens_q"]
    sq = (cuq[1:] - cuq[:-1])[:, None, None]
    sk = meta["seqused_k"][:, None, None]
    i = jnp.arange(MQ)[None, :, None]
    j = jnp.arange(MK)[None, None, :]
    allowed = ((i < sq) & (j < sk) & (j <= i + sk - sq))[:, None, None]
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(q.dtype), vg, preferred_element_type=jnp.float32)
    o = o / jnp.where(l > 0, l, 1.0).transpose(0, 3, 1, 2)[..., None]
    o = o.reshape(B, MQ, H, D)
    return o[meta["row_b"], meta["row_i"]].astype(q.dtype)

  calls = max(1, min(cd.calls_for("xla-naive"), int(args.naive_mem_gb * 1e9 // max(need, 1))))
  extra = [consts] * cd.sets
  run_jax_unit(env, cd, rec, one, ld.kv_sets, extra, calls, args, ceilings)
  return rec


PAGED_CONFIGS = (  # (pages_per_compute_block, k_splits, num_warps, num_stages); block_h = 16
    (8, 16, 4, 2), (8, 16, 8, 2), (16, 16, 4, 2), (4, 16, 4, 2), (8, 32, 4, 2), (8, 8, 4, 2))


def paged_unit(env: Env, cd: CaseData, ld: LayoutData, args, ceilings) -> dict:
  """JAX's Pallas paged_attention (decode only): pages [Hk, N, bs, D] (copied once, untimed); no
  softmax scale of its own, so q is scaled inside the timed function. Best of a few configs."""
  jax, jnp = env.jax, env.jnp
  rec = base_record(cd, ld.name, "jax-pallas-paged", "default")
  case = cd.case
  configs = list(PAGED_CONFIGS)
  if case.max_blocks >= 1024:
    configs[-1] = (8, 64, 4, 2)
  pages = [tuple(jnp.transpose(x, (2, 0, 1, 3)) for x in kv) for kv in cd.kv]  # own layout
  jax.block_until_ready(pages)
  scale = cd.scale
  results, best, best_call = {}, None, None
  for cfg in configs:
    budget = getattr(args, "budget", None)
    if budget is not None and budget.over(reserve=args.reserve_s):
      results[str(cfg)] = "skipped (budget)"
      continue
    ppcb, splits, warps, stages = cfg
    tag = f"block_h=16,ppcb={ppcb},k_splits={splits},warps={warps},stages={stages}"
    width = -(-case.max_blocks // (ppcb * splits)) * ppcb * splits
    extra = []
    for t in cd.tables_np:
      padded = np.zeros((case.batch, width), np.int32)  # padding: page 0, masked by length
      padded[:, :case.max_blocks] = t
      extra.append(dict(padded_table=jnp.asarray(padded)))

    def one(q, kv, meta, ppcb=ppcb, splits=splits, warps=warps, stages=stages):
      qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
      return env.paged_attention(qs, kv[0], kv[1], meta["padded_table"], meta["seqused_k"],
                                 block_h=16, pages_per_compute_block=ppcb, k_splits=splits,
                                 num_warps=warps, num_stages=stages, interpret=not env.on_gpu)

    sub = dict(rec)
    try:
      run_jax_unit(env, cd, sub, one, pages, extra, cd.calls_for("jax-pallas-paged"), args, ceilings,
                   wall=False)
    except Exception as e:
      results[tag] = f"error: {type(e).__name__}: {str(e)[:120]}"
      log(f"    {tag}: error {type(e).__name__}: {str(e)[:200]}")
      continue
    results[tag] = sub["ms"] if sub["status"] == "ok" else f"wrong (rel_err {sub['rel_err']})"
    log(f"    {tag}: {results[tag]}")
    if sub["status"] == "ok" and (best is None or sub["ms"] < best["ms"]):
      best = dict(sub, variant=tag)
      best_call = (one, extra)
    elif best is None and sub["status"] == "wrong":
      rec.update(rel_err=sub["rel_err"], status="wrong", variant=tag)
  if best is not None:
    rec = best
    one, extra = best_call
    metas = [dict(m, **extra[s]) for s, m in enumerate(cd.metas[:1])]
    rec["ms_wall"] = time_wall(env, one, cd, pages, metas, args, jit=True)
  elif rec["status"] is None:
    rec["status"] = "error"
  del pages
  rec["configs"] = results
  rec["note"] = "own layout [Hk, pages, page, D] (a copy of the contiguous cache, untimed); q scaled in the timed function"
  return rec


def flaggems_unit(env: Env, cd: CaseData, ld: LayoutData, args, ceilings) -> dict:
  """FlagGems 5.0.2 flash_attn_varlen_func on the same buffers (dlpack, no copy)."""
  torch = env.torch
  rec = base_record(cd, ld.name, "flaggems", "cuda-graph")
  case = cd.case
  calls = cd.calls_for("flaggems")
  sets_used = min(cd.sets, calls)

  def to_torch(x):
    try:
      return torch.from_dlpack(x)
    except Exception:
      return torch.from_numpy(np.asarray(x)).cuda()

  qs = [to_torch(q) for q in cd.qs[:calls]]
  kvs = []
  for kv in ld.kv_sets[:sets_used]:
    k, v = (to_torch(x) for x in kv)
    if ld.name == "strided":  # a view: every other page, starting at the parity slot
      k, v = k[cd.parity::2], v[cd.parity::2]
    kvs.append((k, v))
  metas = [{n: to_torch(a) for n, a in dict(m, **(ld.meta_sets[s] if ld.meta_sets else {})).items()}
           for s, m in enumerate(cd.metas[:sets_used])]
  fn = env.flaggems_fn

  def call(i):
    k, v = kvs[i % sets_used]
    m = metas[i % sets_used]
    return fn(qs[i], k, v, case.max_seqlen_q, m["cu_seqlens_q"], case.max_seqlen_k,
              seqused_k=m["seqused_k"], softmax_scale=cd.scale, causal=case.causal,
              block_table=m["block_table"], fa_version=2)

  t0 = time.perf_counter()
  first = call(0)  # compiles, autotunes: every call once before any capture
  for i in range(1, calls):
    call(i)
  torch.cuda.synchronize()
  rec["compile_s"] = round(time.perf_counter() - t0, 2)
  rec["k_calls"], rec["sets"], rec["rotation_mb"] = calls, sets_used, cd.rotation_mb(calls)
  if not check(rec, cd, first.float().cpu().numpy()):
    if ld.name == "strided":
      rec["note"] = "FlagGems 5.0.2 ignores the page stride of a strided cache"
    return rec
  del first
  # plain calls: Python launch cost included
  w, _, _ = time_torch_events(torch, lambda: call(0), min(args.reps, 30), min(0.5, args.unit_time_s))
  rec["ms_wall"] = round(w * 1e3, 5)
  try:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
      for i in range(calls):
        call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
      outs = [call(i) for i in range(calls)]
    graph.replay()
    torch.cuda.synchronize()
    if not check(rec, cd, outs[0].float().cpu().numpy()):
      rec["note"] = "wrong under CUDA-graph replay"
      return rec
    sec, spread, n = time_torch_events(torch, graph.replay, args.reps, args.unit_time_s)
    finish_timing(rec, cd, sec * 1e3 / calls, ceilings)
    rec["spread"], rec["reps"] = round(spread, 3), n
    del graph, outs
  except Exception as e:  # no graph: events around K plain calls
    log(f"    flaggems: CUDA graph failed ({type(e).__name__}: {e}); timing plain calls")
    rec["variant"] = "plain-calls"

    def k_calls():
      for i in range(calls):
        call(i)

    sec, spread, n = time_torch_events(torch, k_calls, args.reps, args.unit_time_s)
    finish_timing(rec, cd, sec * 1e3 / calls, ceilings)
    rec["spread"], rec["reps"] = round(spread, 3), n
  rec["status"] = "ok"
  return rec  # the torch views die with this frame; free_device() empties torch's cache


DENSE_PEERS = ("cudnn-dense", "jax-mgpu-dense")


def dense_ok(case: shapes.Case) -> bool:
  """Dense peers run uniform causal prefill only (every sequence S queries over the same S keys,
  S a multiple of 128: JAX's Mosaic example tiles q by 2 x 64 and keys by 128)."""
  lens = set(case.seqlens_q) | set(case.seqused_k)
  return (case.causal and len(lens) == 1 and next(iter(lens)) % 128 == 0
          and case.total_q == case.batch * case.max_seqlen_q)


def dense_unit(env: Env, cd: CaseData, ld: LayoutData, impl: str, args, ceilings) -> dict:
  """A dense attention on the same problem, K / V gathered from the pages beforehand (untimed):
  `cudnn-dense` = jax.nn.dot_product_attention(implementation="cudnn"); `jax-mgpu-dense` = JAX's
  Mosaic GPU FlashAttention-3 example (jax.experimental.pallas.ops.gpu.attention_mgpu), block_q
  64, block_kv 128, 2 stages. q [B, S, H, D] is a free reshape of ours; the output is reshaped back."""
  jax, jnp = env.jax, env.jnp
  rec = base_record(cd, ld.name, impl, "default")
  case = cd.case
  B, S, H, Hk, D = case.batch, case.max_seqlen_q, case.num_heads, case.num_kv_heads, case.head_dim
  dense_sets = []
  for (k, v), meta in zip(ld.kv_sets, cd.metas):
    pages = meta["block_table"]
    gather = lambda x: jnp.take(x, pages, axis=0).reshape(B, -1, Hk, D)[:, :S]
    dense_sets.append((gather(k), gather(v)))
  if impl == "cudnn-dense":
    def attend(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, scale=cd.scale, is_causal=True,
                                          implementation="cudnn")
  else:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
    cfg = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)

    def attend(q, k, v):  # the example has no scale argument: scale q
      return mgpu.attention((q * cd.scale).astype(q.dtype), k, v, cfg)

  def one(q, kv, meta):
    return attend(q.reshape(B, S, H, D), *kv).reshape(B * S, H, D)

  run_jax_unit(env, cd, rec, one, dense_sets, None, cd.calls_for(impl), args, ceilings)
  return rec
