"""bench_attention's inputs: a case's data (K distinct q, S rotated cache sets, metadata, the float32
reference; fp8 / sink variants), its cache layouts, and the record helpers every unit shares
(base_record, finish_timing, check, timing a jitted JAX unit)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
  if p not in sys.path:
    sys.path.insert(0, p)

import numpy as np  # noqa: E402

import device_time  # noqa: E402  (benchmarks/device_time.py)
import shapes  # noqa: E402  (benchmarks/shapes.py)
from bench_env import Env, log, time_jax  # noqa: E402

ALL_IMPLS = ("jva-triton", "jva-pallas", "jva-xla", "flaggems", "jax-pallas-paged", "xla-naive", "cudnn-dense",
             "jax-mgpu-dense")
PEERS = ("flaggems", "jax-pallas-paged", "xla-naive", "cudnn-dense", "jax-mgpu-dense")
ALL_LAYOUTS = ("contiguous", "strided", "contiguous_2x", "hnd", "fused", "stacked")
TOLERANCE = {"float16": 4e-3, "bfloat16": 1.6e-2}
QUESTION = "with the page stride specialized, does a strided cache cost anything over a contiguous one?"
# Unrolled calls per jitted function, at most, for implementations whose compile grows with K or
# whose time makes launch cost irrelevant.
MAX_CALLS = {"jva-pallas": 8, "jva-xla": 8, "xla-naive": 8, "jax-pallas-paged": 8}


# ---- inputs ----------------------------------------------------------------------------------------

def np_dtype(dtype):
  import ml_dtypes
  return {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]


class CaseData:
  """Inputs of one case: K distinct q, S cache sets (logical NHD pages), per-set metadata, reference.

  kv_dtype / sinks: the kv variant (`kv_variant` derives the others from the default one);
  ref_unquantized: for an fp8 variant, the reference on the cache before quantization.
  """

  def __init__(self, env: Env, case: shapes.Case, args, ref_cache: dict):
    jax, jnp = env.jax, env.jnp
    self.case = case
    self.dtype = args.dtype
    self.kv_dtype = args.dtype
    self.sinks = False
    self.ref_unquantized = None
    # Score options of the whole run (--softcap, --alibi): every call and reference takes them.
    self.softcap = float(getattr(args, "softcap", 0.0) or 0.0)
    self.alibi = (None if not getattr(args, "alibi", False)
                  else alibi_slopes(case.num_heads))
    self.jdtype = jnp.dtype(args.dtype)
    self.scale = case.head_dim ** -0.5
    self.parity = args.strided_parity
    # The 2x storage of the strided layout, kept for contiguous_2x to read the very same buffers
    # (same allocation, same addresses) when both layouts run.
    self.keep_wide = "strided" in args.layouts and "contiguous_2x" in args.layouts
    self.wide_sets = None
    table0 = case.block_table(seed=args.seed * 1000)
    touched = case.touched_bytes(table0, args.dtype)
    self.touched = touched
    want_sets = max(1, math.ceil(4 * shapes.L2_BYTES / touched))
    # logical cache + the largest layout storage (strided: 2x) of every set must fit the budget
    per_set = 3 * case.cache_bytes(args.dtype)
    mem_sets = max(1, int(args.mem_gb * 1e9 // per_set))
    self.sets = min(want_sets, args.max_sets, mem_sets)
    self.calls = max(self.sets, args.min_calls)
    self.tables_np = [table0] + [case.block_table(seed=args.seed * 1000 + s)
                                 for s in range(1, self.sets)]
    key = jax.random.key(args.seed)
    T, H, D = case.total_q, case.num_heads, case.head_dim
    Hk, bs, N = case.num_kv_heads, case.block_size, case.num_blocks
    keys = jax.random.split(key, self.calls + 3 * self.sets)
    self.qs = [jax.random.normal(keys[i], (T, H, D), self.jdtype) for i in range(self.calls)]
    self.kv = []
    for s in range(self.sets):
      k = jax.random.normal(keys[self.calls + 3 * s], (N, bs, Hk, D), self.jdtype)
      v = jax.random.normal(keys[self.calls + 3 * s + 1], (N, bs, Hk, D), self.jdtype)
      self.kv.append((k, v))
    self.garbage_keys = [keys[self.calls + 3 * s + 2] for s in range(self.sets)]
    cu = jnp.asarray(np.array(case.cu_seqlens_q, np.int32))
    used = jnp.asarray(np.array(case.seqused_k, np.int32))
    extra = {} if self.alibi is None else dict(alibi_slopes=jnp.asarray(self.alibi))
    self.metas = [dict(cu_seqlens_q=cu, seqused_k=used, block_table=jnp.asarray(t), **extra)
                  for t in self.tables_np]
    jax.block_until_ready((self.qs, self.kv, self.metas))
    ref_key = (case.name, args.dtype, args.seed)
    if ref_key not in ref_cache:
      t0 = time.perf_counter()
      ref_cache[ref_key] = reference(env, case, self.qs[0], self.kv[0][0], self.kv[0][1],
                                     self.tables_np[0], self.scale, **self.score_options())
      log(f"  reference ({case.name}): {time.perf_counter() - t0:.1f} s")
    self.ref = ref_cache[ref_key]
    self.ref_norm = float(np.linalg.norm(self.ref.astype(np.float64)))

  def score_options(self) -> dict:
    """The run's softcap / ALiBi as `reference`'s keyword arguments."""
    return dict(softcap=self.softcap, alibi_slopes=self.alibi)

  def calls_for(self, impl: str) -> int:
    return min(self.calls, MAX_CALLS.get(impl, self.calls))

  def rotation_mb(self, calls: int) -> float:
    return round(min(self.sets, calls) * self.touched / 1e6, 1)

  def rel_err(self, out, ref=None) -> float:
    ref = self.ref if ref is None else ref
    out = np.asarray(out, dtype=np.float64)
    if out.shape != ref.shape:
      raise ValueError(f"output shape {out.shape} != reference {ref.shape}")
    err = float(np.linalg.norm(out - ref.astype(np.float64)))
    norm = self.ref_norm if ref is self.ref else float(np.linalg.norm(ref.astype(np.float64)))
    return err / max(norm, 1e-30) if np.isfinite(err) else float("nan")


KV_DTYPES = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def kv_tag(kv_dtype: str, sinks: bool) -> str:
  """Short name of a kv variant: fp16, bf16, e4m3, e5m2, with +sinks."""
  short = {"float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}
  return short.get(kv_dtype, kv_dtype) + ("+sinks" if sinks else "")


def kv_variant(env: Env, cd: CaseData, kv_dtype: str, sinks: bool, args, ref_cache: dict) -> CaseData:
  """`cd` (the default variant: a cache in q's dtype, no sinks) on an fp8 cache and / or with sinks.

  fp8: every set quantized with per-kv-head descales (amax over the set / the format's max),
  passed as k_descale / v_descale [batch, Hk]; the reference is computed on the dequantized cache,
  ref_unquantized on cd's own. Sinks: s_aux ~ N(0, 1) per q head (seeded). q, block tables and
  lengths are cd's own.
  """
  if kv_dtype == cd.dtype and not sinks:
    return cd
  jax, jnp = env.jax, env.jnp
  case = cd.case
  out = copy.copy(cd)
  out.kv_dtype, out.sinks = kv_dtype, sinks
  extra = [{} for _ in cd.metas]
  s_aux = None
  if sinks:
    s_aux = jax.random.normal(jax.random.key(args.seed + 7), (case.num_heads,), jnp.float32)
    for e in extra:
      e["s_aux"] = s_aux
  descales = [(None, None)] * cd.sets
  if kv_dtype != cd.dtype:
    fp8 = jnp.dtype(kv_dtype)
    fmax = float(jnp.finfo(fp8).max)

    @jax.jit
    def quantize(x):  # [N, bs, Hk, D] -> (fp8 pages, descale f32[Hk])
      amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=(0, 1, 3))
      descale = jnp.where(amax > 0, amax / fmax, 1.0)
      return (x.astype(jnp.float32) / descale[:, None]).astype(fp8), descale

    kv, descales = [], []
    for s, (k, v) in enumerate(cd.kv):
      (k8, kd), (v8, vd) = quantize(k), quantize(v)
      kv.append((k8, v8))
      kd, vd = (jnp.broadcast_to(d, (case.batch, case.num_kv_heads)) for d in (kd, vd))
      descales.append((kd, vd))
      extra[s].update(k_descale=kd, v_descale=vd)
    jax.block_until_ready(kv)
    out.kv = kv
    out.wide_sets = None  # the strided storage is rebuilt from the fp8 pages
    out.touched = case.touched_bytes(cd.tables_np[0], cd.dtype, kv_dtype)
  out.metas = [dict(m, **e) for m, e in zip(cd.metas, extra)]
  key = (case.name, cd.dtype, args.seed, kv_dtype, sinks)
  if key not in ref_cache:
    t0 = time.perf_counter()
    k_descale, v_descale = descales[0]
    ref_cache[key] = reference(env, case, cd.qs[0], out.kv[0][0], out.kv[0][1], cd.tables_np[0], cd.scale,
                               k_descale=k_descale, v_descale=v_descale, s_aux=s_aux,
                               **cd.score_options())
    log(f"  reference ({case.name}, {kv_tag(kv_dtype, sinks)}): {time.perf_counter() - t0:.1f} s")
  out.ref = ref_cache[key]
  out.ref_norm = float(np.linalg.norm(out.ref.astype(np.float64)))
  if kv_dtype != cd.dtype:  # the quantization error: against the unquantized cache's reference
    unq = (case.name, cd.dtype, args.seed, cd.dtype, sinks)
    if unq not in ref_cache:
      ref_cache[unq] = cd.ref if not sinks else reference(
          env, case, cd.qs[0], cd.kv[0][0], cd.kv[0][1], cd.tables_np[0], cd.scale, s_aux=s_aux,
          **cd.score_options())
    out.ref_unquantized = ref_cache[unq]
  return out


@functools.lru_cache(maxsize=None)
def _ref_kernel(group: int, scale: float, softcap: float = 0.0):
  import jax
  import jax.numpy as jnp

  hi = jax.lax.Precision.HIGHEST

  @jax.jit
  def kernel(q, kflat, vflat, qi, ki, sq, sk, kd, vd, sink, slopes):
    """kd, vd: f32[n, Hk] descales of each row's sequence (ones for a cache in q's dtype); sink:
    f32[H] logits in every row's denominator (-inf: none); slopes: f32[H] ALiBi slopes (zeros:
    none); softcap > 0: scores capped as softcap * tanh(s / softcap)."""
    f32 = jnp.float32
    qb = q[qi].astype(f32)  # [n, SQ, H, D]
    kb = kflat[ki].astype(f32) * kd[:, None, :, None]  # [n, SK, Hk, D], dequantized
    vb = vflat[ki].astype(f32) * vd[:, None, :, None]
    n, SQ, H, D = qb.shape
    SK, Hk = kb.shape[1], kb.shape[2]
    qb = qb.reshape(n, SQ, Hk, group, D)
    s = jnp.einsum("nqhgd,nkhd->nhgqk", qb, kb, precision=hi) * scale
    if softcap > 0:
      s = softcap * jnp.tanh(s / softcap)
    i = jnp.arange(SQ)[None, :, None]
    j = jnp.arange(SK)[None, None, :]
    sq3, sk3 = sq[:, None, None], sk[:, None, None]
    diag = i + sk3 - sq3  # bottom-right aligned position of query i among the keys
    s = s - slopes.reshape(1, Hk, group, 1, 1) * jnp.abs(diag - j).astype(f32)[:, None, None]
    allowed = (i < sq3) & (j < sk3) & (j <= diag)  # causal
    allowed = allowed[:, None, None]
    s = jnp.where(allowed, s, -jnp.inf)
    sink = sink.reshape(1, Hk, group, 1, 1)
    m = jnp.maximum(s.max(-1, keepdims=True), sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(allowed, jnp.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True) + jnp.exp(sink - m)
    p = p / jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("nhgqk,nkhd->nqhgd", p, vb, precision=hi)
    return o.reshape(n, SQ, H, D)

  return kernel


def alibi_slopes(num_heads: int) -> np.ndarray:
  """f32[H]: the ALiBi paper's geometric slopes 2^(-8 (h + 1) / H) (for a power-of-two H)."""
  return (2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)).astype(np.float32)


def _pow2(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))


def reference(env: Env, case: shapes.Case, q, k, v, table: np.ndarray, scale: float, k_descale=None,
              v_descale=None, s_aux=None, softcap: float = 0.0, alibi_slopes=None) -> np.ndarray:
  """float32 (precision HIGHEST) attention of one input set, sequences bucketed by padded shape.
  An fp8 cache is dequantized with k_descale / v_descale [batch, Hk]; s_aux [H] joins every row's
  softmax denominator; softcap and alibi_slopes [H] as flash_attn_varlen_func's."""
  jnp = env.jnp
  T, H, D = case.total_q, case.num_heads, case.head_dim
  Hk, bs = case.num_kv_heads, case.block_size
  ones = np.ones((case.batch, Hk), np.float32)
  kd_all = ones if k_descale is None else np.asarray(k_descale, np.float32)
  vd_all = ones if v_descale is None else np.asarray(v_descale, np.float32)
  sink = jnp.asarray(np.full((H,), -np.inf, np.float32) if s_aux is None else np.asarray(s_aux, np.float32))
  kflat = k.reshape(-1, Hk, D)
  vflat = v.reshape(-1, Hk, D)
  cu = case.cu_seqlens_q
  out = np.zeros((T, H, D), np.float32)
  buckets: Dict[Tuple[int, int], List[int]] = {}
  for b, (sq, sk) in enumerate(zip(case.seqlens_q, case.seqused_k)):
    if sq > 0 and sk > 0:
      buckets.setdefault((_pow2(sq), _pow2(sk, 16)), []).append(b)
  kernel = _ref_kernel(case.group, scale, float(softcap))
  slopes = jnp.asarray(np.zeros((H,), np.float32) if alibi_slopes is None
                       else np.asarray(alibi_slopes, np.float32))
  for (SQ, SK), members in sorted(buckets.items()):
    chunk = max(1, min(len(members), (1 << 27) // (H * SQ * SK), (1 << 29) // (SK * Hk * D * 8),
                       (1 << 29) // (SQ * H * D * 4)))
    for start in range(0, len(members), chunk):
      group = members[start:start + chunk]
      qi = np.zeros((chunk, SQ), np.int32)
      ki = np.zeros((chunk, SK), np.int32)
      sqa = np.zeros((chunk,), np.int32)
      ska = np.zeros((chunk,), np.int32)
      for r, b in enumerate(group):
        sq, sk = case.seqlens_q[b], case.seqused_k[b]
        qi[r] = cu[b] + np.minimum(np.arange(SQ), sq - 1)
        j = np.minimum(np.arange(SK), sk - 1)
        ki[r] = table[b, j // bs] * bs + j % bs
        sqa[r], ska[r] = sq, sk
      rows = np.array(group + [group[-1]] * (chunk - len(group)))  # padding rows: any sequence
      res = np.asarray(kernel(q, kflat, vflat, jnp.asarray(qi), jnp.asarray(ki), jnp.asarray(sqa),
                              jnp.asarray(ska), jnp.asarray(kd_all[rows]), jnp.asarray(vd_all[rows]), sink,
                              slopes))
      for r, b in enumerate(group):
        sq = case.seqlens_q[b]
        out[cu[b]:cu[b] + sq] = res[r, :sq]
  return out


# ---- layouts ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class LayoutData:
  name: str
  kv_sets: List[tuple]  # per set: (k, v) or (kv,) for fused
  kv_layout: Any  # what flash_attn_varlen_func takes as kv_layout
  stacked: bool = False
  note: str = ""
  # per set: arrays replacing the case's own (contiguous_2x: its block table), or None
  meta_sets: Optional[List[dict]] = None


def wide_sets(env: Env, cd: CaseData) -> List[tuple]:
  """Per set: (k, v) storages of 2N pages, the case's pages at the parity slots and random pages
  at the others (reading those gives wrong numbers). Kept on `cd` when both strided and
  contiguous_2x run, so that both read the very same buffers."""
  if cd.wide_sets is not None:
    return cd.wide_sets
  jax, jnp = env.jax, env.jnp
  case = cd.case
  Hk, D, bs, N = case.num_kv_heads, case.head_dim, case.block_size, case.num_blocks
  sets = []
  for s, (k, v) in enumerate(cd.kv):
    gk, gv = jax.random.split(cd.garbage_keys[s])
    pair = []
    for x, g in ((k, gk), (v, gv)):
      junk = jax.random.normal(g, x.shape, jnp.float16).astype(x.dtype)  # (fp8 has no random.normal)
      both = (junk, x) if cd.parity else (x, junk)
      pair.append(jnp.stack(both, axis=1).reshape(2 * N, bs, Hk, D))
      del junk
    sets.append(tuple(pair))
    jax.block_until_ready(sets[-1])
  if cd.keep_wide:
    cd.wide_sets = sets
  return sets


def build_layout(env: Env, cd: CaseData, name: str) -> LayoutData:
  jax, jnp = env.jax, env.jnp
  case = cd.case
  Hk, D, bs, N = case.num_kv_heads, case.head_dim, case.block_size, case.num_blocks
  if name == "contiguous":
    return LayoutData(name, list(cd.kv), "NHD")
  if name in ("strided", "contiguous_2x"):
    from jax_varlen_attn import KVCacheLayout
    page = bs * Hk * D
    sets = wide_sets(env, cd)
    if name == "contiguous_2x":
      # The strided run's very storage and addresses, read as a plain contiguous cache whose block
      # table names the real (odd or even) slots: what strided / contiguous costs beyond touching
      # twice the memory (a larger footprint, more TLB reach) is strided / contiguous_2x.
      metas = [dict(block_table=2 * m["block_table"] + cd.parity) for m in cd.metas]
      return LayoutData(name, sets, "NHD", meta_sets=metas,
                        note=f"[{2 * N}, {bs}, {Hk}, {D}] NHD cache, block table 2p+{cd.parity}")
    layout = KVCacheLayout(block_size=bs, num_kv_heads=Hk, head_dim=D, page_stride=2 * page,
                           k_offset=cd.parity * page, v_offset=cd.parity * page)
    return LayoutData(name, sets, layout,
                      note=f"every other page of a [{2 * N}, {bs}, {Hk}, {D}] storage, real pages at "
                           f"{'odd' if cd.parity else 'even'} slots")
  if name == "hnd":
    sets = [tuple(jnp.transpose(x, (0, 2, 1, 3)) for x in kv) for kv in cd.kv]
    return LayoutData(name, sets, "HND")
  if name == "fused":
    sets = [(jnp.stack(kv, axis=1),) for kv in cd.kv]
    return LayoutData(name, sets, "fused_page_major", note="[N, 2, bs, Hk, D], v=None")
  if name == "stacked":
    sets = []
    for s, kv in enumerate(cd.kv):
      g = jax.random.split(cd.garbage_keys[s])
      sets.append(tuple(jnp.stack([jax.random.normal(gi, x.shape, jnp.float16).astype(x.dtype), x])
                        for gi, x in zip(g, kv)))
    return LayoutData(name, sets, "NHD", stacked=True, note="[2, N, bs, Hk, D], layer=1 (traced)")
  raise ValueError(f"unknown layout {name!r}")


# ---- implementations -------------------------------------------------------------------------------

def base_record(cd: CaseData, layout: str, impl: str, variant: str) -> dict:
  case = cd.case
  return dict(case=case.name, layout=layout, impl=impl, variant=variant, dtype=cd.dtype,
              kv_dtype=cd.kv_dtype, sinks=cd.sinks, softcap=cd.softcap, alibi=cd.alibi is not None,
              ms=None,
              ms_wall=None, tbps=None, tflops=None, pct_of_ceiling=None, rel_err=None, status=None,
              tolerance=TOLERANCE[cd.dtype], bytes=case.bytes_moved(cd.dtype, cd.kv_dtype),
              flops=case.flops(), bound="flops" if case.flop_bound else "bytes")


def finish_timing(rec: dict, cd: CaseData, ms: float, ceilings: dict, suffix: str = ""):
  """ms and the figures derived from it (suffix "_device": from the device busy time)."""
  rec["ms" + suffix] = round(ms, 5)
  sec = ms / 1e3
  rec["tbps" + suffix] = float(f"{rec['bytes'] / sec / 1e12:.4g}")
  rec["tflops" + suffix] = float(f"{rec['flops'] / sec / 1e12:.4g}")
  ceil = ceilings.get("matmul_fp16_tflops") if cd.case.flop_bound else ceilings.get("read_tbps")
  value = rec["tflops" + suffix] if cd.case.flop_bound else rec["tbps" + suffix]
  rec["pct_of_ceiling" + suffix] = round(100 * value / ceil, 1) if ceil else None


def check(rec: dict, cd: CaseData, out) -> bool:
  err = cd.rel_err(out)
  rec["rel_err"] = float(f"{err:.3e}") if np.isfinite(err) else None
  if cd.ref_unquantized is not None:  # fp8: what quantizing the cache costs, on top
    unq = cd.rel_err(out, cd.ref_unquantized)
    rec["rel_err_unquantized"] = float(f"{unq:.3e}") if np.isfinite(unq) else None
  ok = bool(np.isfinite(err) and err <= TOLERANCE[cd.dtype])
  if not ok:
    rec["status"] = "wrong"
    if not np.isfinite(err):
      rec["note"] = (rec.get("note", "") + " non-finite output").strip()
  return ok


def run_jax_unit(env: Env, cd: CaseData, rec: dict, one: Callable, per_set: List[tuple],
                 extra_meta: Optional[List[dict]], calls: int, args, ceilings, wall_fn=None,
                 wall: bool = True):
  """Times `one(q, kv_tuple, meta) -> out` applied to `calls` input sets inside one jit."""
  jax = env.jax
  sets_used = min(cd.sets, calls)
  metas = [dict(m, **(extra_meta[s] if extra_meta else {})) for s, m in enumerate(cd.metas[:sets_used])]

  def many(qs, kvs, ms):
    return tuple(one(qs[i], kvs[i % sets_used], ms[i % sets_used]) for i in range(calls))

  fn = jax.jit(many)
  fargs = (tuple(cd.qs[:calls]), tuple(per_set[:sets_used]), tuple(metas))
  t0 = time.perf_counter()
  outs = fn(*fargs)
  jax.block_until_ready(outs)
  rec["compile_s"] = round(time.perf_counter() - t0, 2)
  rec["k_calls"], rec["sets"], rec["rotation_mb"] = calls, sets_used, cd.rotation_mb(calls)
  ok = check(rec, cd, outs[0])
  del outs
  if not ok:
    return
  sec, spread, n = time_jax(jax, fn, fargs, args.reps, args.unit_time_s)
  finish_timing(rec, cd, sec * 1e3 / calls, ceilings)
  rec["spread"], rec["reps"] = round(spread, 3), n
  rec["status"] = "ok"
  if env.on_gpu and args.device_time:
    dev = device_time.measure(jax, fn, fargs, calls)
    if dev is None:
      rec["note"] = (rec.get("note", "") + " no device time (trace held no GPU stream)").strip()
    else:
      finish_timing(rec, cd, dev["busy_ms"], ceilings, suffix="_device")
      rec["ms_device_span"] = round(dev["span_ms"], 5)
      rec["kernels_per_call"] = dev["kernels_per_call"]
  if wall:
    rec["ms_wall"] = time_wall(env, one if wall_fn is None else wall_fn, cd, per_set, metas, args,
                               jit=wall_fn is None)


def time_wall(env: Env, one: Callable, cd: CaseData, per_set, metas, args, jit: bool) -> float:
  """ms of one plain call on set 0 (jit=True: of `one` jitted alone), dispatch included."""
  fn = env.jax.jit(one) if jit else one
  w, _, _ = time_jax(env.jax, fn, (cd.qs[0], per_set[0], metas[0]), min(args.reps, 30),
                     min(0.5, args.unit_time_s))
  return round(w * 1e3, 5)
