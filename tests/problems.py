"""Random attention problems with poisoned padding, in every cache layout, built without the library.

`make_problem` draws fresh inputs: logical pages of K / V (NaN in every slot no real key uses: unused
pages, the tail of each sequence's last page), a block table whose padded entries are out of range or
point at poisoned pages, NaN in padded q rows; then lays the pages out physically the way the named
layout says (this file's own code, independent of `jax_varlen_attn.layout`). It returns the keyword
arguments for `flash_attn_varlen_func` and the per-sequence keys / values the oracle needs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_varlen_attn import KVCacheLayout

LAYOUTS = ("NHD", "HND", "fused_page_major", "fused_kv_major", "strided", "stacked_NHD",
           "stacked_fused_kv_major", "stacked_strided")

NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
             "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}
FP8 = ("float8_e4m3fn", "float8_e5m2")
# docs/contract.md, "Accuracy": relative error bounds against the float64 oracle, by output dtype.
TOLERANCE = {"float16": 4e-3, "bfloat16": 1.6e-2, "float32": 1e-4}


@dataclasses.dataclass
class Problem:
  seqlens_q: Sequence[int] = (5, 1, 17, 0)
  seqlens_k: Sequence[int] = (40, 23, 17, 9)
  pad_q: int = 3  # padding rows after the last sequence
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  dtype: str = "float16"  # q's (fp8 needs an fp8 kv_dtype; the output is then bf16)
  kv_dtype: Optional[str] = None  # None: q's dtype; an fp8 name: the cache is quantized
  # fp8 tensors' descales: "seq_head" (f32[B, Hk], random magnitudes and signs), "scalar" (f32[]),
  # "none" (not passed: 1.0).
  descale: str = "seq_head"
  sinks: bool = False  # s_aux f32[H] (the last head's sink is -inf: none)
  paged: bool = True
  layout: str = "NHD"
  block_size: int = 16
  extra_blocks: int = 2  # block-table columns beyond what the longest sequence needs (padding)
  spare_pages: int = 5  # pages no sequence references (poisoned)
  causal: bool = False
  window: Tuple[int, int] = (-1, -1)
  softcap: float = 0.0
  alibi: Optional[str] = None  # None, "head" ([H]) or "batch" ([B, H])
  softmax_scale: Optional[float] = None
  return_lse: bool = True
  num_layers: int = 3  # stacked layouts only
  seed: int = 0


def _poison(dtype):
  return np.array(np.nan, dtype)


def out_dtype(p: Problem) -> str:
  """The output dtype of a problem: q's, bf16 for an fp8 q (docs/contract.md, "fp8")."""
  return "bfloat16" if p.dtype in FP8 else p.dtype


def _descales(p: Problem, rng, B: int, Hk: int, signs: bool):
  """(descale f64[B, Hk] used to quantize, the argument to pass or None) for one fp8 tensor."""
  if p.descale == "none":
    return np.ones((B, Hk)), None
  if p.descale == "scalar":
    value = np.float32(rng.uniform(0.02, 0.2))
    return np.full((B, Hk), value, np.float64), value
  # Magnitudes that put N(0, 1) data at 5..50 (e4m3 max 448, e5m2 57344); random signs (applied as
  # given: a negative scale flips the tensor).
  scale = rng.uniform(0.02, 0.2, (B, Hk)).astype(np.float32)
  if signs:
    scale *= rng.choice(np.array([-1, 1], np.float32), (B, Hk))
  return scale.astype(np.float64), scale


def _quantize(x, scale_b, dt):
  """x [n, Hk, D] (float) of one sequence / x / scale_b[Hk] rounded to fp8 `dt` (ml_dtypes: RNE)."""
  return (np.asarray(x, np.float32) / scale_b.astype(np.float32)[None, :, None]).astype(dt)


def make_problem(p: Problem):
  """Returns (kwargs for flash_attn_varlen_func, oracle dict)."""
  rng = np.random.default_rng(p.seed)
  q_dt = NP_DTYPES[p.dtype]
  kv_name = p.kv_dtype or p.dtype
  if p.dtype in FP8 and kv_name not in FP8:
    raise ValueError(f"an fp8 q needs an fp8 kv_dtype: {p}")
  dt = NP_DTYPES[kv_name]  # the cache's dtype
  kv_fp8 = kv_name in FP8
  B = len(p.seqlens_q)
  H, Hk, D, bs = p.num_heads, p.num_kv_heads, p.head_dim, p.block_size
  cu_q = np.concatenate([[0], np.cumsum(p.seqlens_q)]).astype(np.int32)
  T = int(cu_q[-1]) + p.pad_q
  kwargs = dict(cu_seqlens_q=cu_q, causal=p.causal, window_size=p.window, softcap=p.softcap,
                softmax_scale=p.softmax_scale, return_softmax_lse=p.return_lse)
  oracle_scales = {}
  if p.dtype in FP8:
    q_scale, q_arg = _descales(p, rng, B, Hk, signs=False)
    q = np.empty((T, H, D), q_dt)
    for b in range(B):
      rows = rng.standard_normal((p.seqlens_q[b], H, D)).reshape(-1, Hk, (H // Hk) * D)
      q[cu_q[b]:cu_q[b + 1]] = _quantize(rows, q_scale[b], q_dt).reshape(-1, H, D)
    kwargs["q_descale"] = q_arg
    oracle_scales["q_descale"] = q_scale
  else:
    q = rng.standard_normal((T, H, D)).astype(q_dt)
  q[cu_q[-1]:] = _poison(q_dt)
  kwargs["q"] = q
  if kv_fp8:
    k_scale, k_arg = _descales(p, rng, B, Hk, signs=True)
    v_scale, v_arg = _descales(p, rng, B, Hk, signs=True)
    kwargs.update(k_descale=k_arg, v_descale=v_arg)
    oracle_scales.update(k_descale=k_scale, v_descale=v_scale)

  def draw(b, n):
    """Keys and values of sequence b: N(0, 1), quantized with its descales for an fp8 cache."""
    kb, vb = (rng.standard_normal((n, Hk, D)) for _ in range(2))
    if kv_fp8:
      return _quantize(kb, k_scale[b], dt), _quantize(vb, v_scale[b], dt)
    return kb.astype(dt), vb.astype(dt)

  keys, values = [], []
  if p.sinks:
    s_aux = rng.uniform(-3.0, 3.0, (H,)).astype(np.float32)
    if H > 1:
      s_aux[-1] = -np.inf  # no sink for that head
    kwargs["s_aux"] = s_aux
    oracle_scales["s_aux"] = s_aux
  if p.alibi == "head":
    slopes = rng.uniform(0.05, 0.5, (H,)).astype(np.float32)
    kwargs["alibi_slopes"] = slopes
    slopes = np.broadcast_to(slopes, (B, H))
  elif p.alibi == "batch":
    slopes = rng.uniform(0.05, 0.5, (B, H)).astype(np.float32)
    kwargs["alibi_slopes"] = slopes
  else:
    slopes = None

  if not p.paged:
    seqlens_k = np.asarray(p.seqlens_k)
    # Each sequence gets its keys plus 2 poisoned rows past them (seqused_k says where to stop).
    alloc = seqlens_k + 2
    cu_k = np.concatenate([[0], np.cumsum(alloc)]).astype(np.int32)
    k = np.full((int(cu_k[-1]) + 1, Hk, D), np.nan, dt)
    v = np.full_like(k, np.nan)
    for b in range(B):
      kb, vb = draw(b, seqlens_k[b])
      k[cu_k[b]:cu_k[b] + seqlens_k[b]] = kb
      v[cu_k[b]:cu_k[b] + seqlens_k[b]] = vb
      keys.append(kb)
      values.append(vb)
    kwargs.update(k=k, v=v, cu_seqlens_k=cu_k, seqused_k=seqlens_k.astype(np.int32))
  else:
    pages_needed = [-(-sk // bs) for sk in p.seqlens_k]
    max_blocks = max(pages_needed) + p.extra_blocks
    P = sum(pages_needed) + p.spare_pages
    K = np.full((P, bs, Hk, D), np.nan, dt)  # logical pages; NaN wherever no real key lives
    V = np.full_like(K, np.nan)
    perm = rng.permutation(P)
    block_table = np.empty((B, max_blocks), np.int32)
    used = 0
    for b in range(B):
      n, sk = pages_needed[b], p.seqlens_k[b]
      pages = perm[used:used + n]
      used += n
      kb, vb = draw(b, sk)
      for t in range(sk):
        K[pages[t // bs], t % bs] = kb[t]
        V[pages[t // bs], t % bs] = vb[t]
      keys.append(kb)
      values.append(vb)
      # Padded entries: out of range both ways, or a poisoned spare page.
      junk = rng.choice([10**6, -7, P, int(perm[-1])], size=max_blocks - n)
      block_table[b] = np.concatenate([pages, junk]).astype(np.int32)
    k_arg, v_arg, layout = _physical(p, K, V, rng)
    kwargs.update(k=k_arg, v=v_arg, block_table=block_table,
                  seqused_k=np.asarray(p.seqlens_k, np.int32), kv_layout=layout)
    if p.layout.startswith("stacked"):
      kwargs["layer"] = np.int32(p.num_layers // 2)

  scale = p.softmax_scale if p.softmax_scale is not None else 1.0 / np.sqrt(D)
  oracle = dict(q=q, keys=keys, values=values, cu_seqlens_q=cu_q, scale=scale, causal=p.causal,
                window=p.window, softcap=p.softcap, alibi=slopes, **oracle_scales)
  kwargs = {k: (jnp.asarray(v) if isinstance(v, (np.ndarray, np.float32)) else v)
            for k, v in kwargs.items()}
  return kwargs, oracle


def _physical(p: Problem, K, V, rng):
  """Lays logical pages [P, bs, Hk, D] out as p.layout says: (k, v, kv_layout)."""
  name = p.layout
  stacked = name.startswith("stacked_")
  inner = name[len("stacked_"):] if stacked else name
  P, bs, Hk, D = K.shape
  if inner == "NHD":
    k, v, layout = K, V, "NHD"
  elif inner == "HND":
    k, v, layout = K.transpose(0, 2, 1, 3), V.transpose(0, 2, 1, 3), "HND"
  elif inner == "fused_page_major":
    k, v, layout = np.stack([K, V], axis=1), None, "fused_page_major"
  elif inner == "fused_kv_major":
    k, v, layout = np.stack([K, V], axis=0), None, "fused_kv_major"
  elif inner == "strided":
    # Every other page of a storage twice as large, starting at the second: page p is slot 2p+1.
    k = np.full((2 * P, bs, Hk, D), np.nan, K.dtype)
    v = np.full_like(k, np.nan)
    k[1::2], v[1::2] = K, V
    span = bs * Hk * D
    layout = KVCacheLayout(block_size=bs, num_kv_heads=Hk, head_dim=D, page_stride=2 * span,
                           k_offset=span, v_offset=span)
  else:
    raise ValueError(name)
  if stacked:
    # The real layer sits in the middle; every other layer is poison.
    def stack(x):
      if x is None:
        return None
      out = np.full((p.num_layers,) + x.shape, np.nan, x.dtype)
      out[p.num_layers // 2] = x
      return out
    k, v = stack(k), stack(v)
  return k, v, layout


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def static_spec(batch: int, pages: int, *, q_per_seq: int = 1, max_seqlen_k: Optional[int] = None,
                head_dim: int = 128, heads: int = 16, kv_heads: int = 8, page: int = 16):
  """The AttentionSpec of a paged NHD call: `batch` sequences of `q_per_seq` queries over `pages`
  pages each (zeros for data): what a backend chooses from static shapes alone (tiles, splits).
  max_seqlen_k None: the block table's reach, pages * page."""
  from jax_varlen_attn.validation import AttentionArgs, validate
  q = jnp.zeros((batch * q_per_seq, heads, head_dim), jnp.float16)
  cache = jnp.zeros((batch * pages, page, kv_heads, head_dim), jnp.float16)
  cu = jnp.arange(batch + 1, dtype=jnp.int32) * q_per_seq
  spec, _ = validate(AttentionArgs(q, cache, cache, q_per_seq, cu, max_seqlen_k, None,
                                   jnp.zeros((batch,), jnp.int32), None, True, (-1, -1), 0.0, None,
                                   jnp.zeros((batch, pages), jnp.int32), False, "NHD", None))
  return spec
