"""The Pallas kernel: FlashAttention-2 style varlen attention over a paged (or packed) KV cache.

The algorithm is the Triton backend's. One program handles `block_q` query tokens of one sequence
for one kv head, together with the `group` q heads sharing it: its tile has block_m rows (query token
x q head, GQA packed into M), so each K / V tile is read once per kv head. The grid is static,
(cdiv(total_q, block_q) + batch, num_kv_heads); each program finds its sequence by binary search over
`cu_seqlens_q`, and programs past `cu_seqlens_q[-1]` are the padding region (zeros, LSE +inf).

Keys are visited in three ranges: masked tiles where a left window starts, unmasked tiles in the
middle, masked tiles at the causal / right-window / length boundary (tiles above the causal diagonal
are never visited). `_attend_tile` is the online-softmax step, written once for both kinds of tile.
Scores are kept in log2 units (scaled by log2(e)) so the softmax uses exp2.

Every ref is a whole caller buffer viewed as rows of head_dim elements (a free reshape): the kernel
gathers the rows it needs with addresses computed from the static layout, so the cache is read in
place. All strides are Python ints baked into the kernel (the layout is static to `jax.jit`).

An fp8 cache is read as fp8 and converted to the compute dtype in registers (exact); its descales,
one per (sequence, kv head) and so one per program, fold into the score scale (k_descale, and
q_descale for an fp8 q, which computes in fp16) and the final normalization (v_descale), as in the
Triton kernel. Sinks start each row's running max at s_aux[h] and its running sum at 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jax_varlen_attn.backends.pallas import lowering

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Everything static the kernel body needs (from AttentionSpec, the layout and the Config)."""

  batch: int
  total_q: int
  num_heads: int
  num_kv_heads: int
  group: int  # q heads per kv head
  head_dim: int
  head_dim_pad: int  # head_dim rounded up to a power of two (tile width); extra columns masked
  block_q: int  # query tokens per program
  block_m: int  # tile rows, >= block_q * group
  block_k: int  # keys per step
  scale: float
  softcap: float  # 0: off
  window_left: int  # -1: unbounded
  window_right: int  # -1: unbounded (0 under causal)
  has_alibi: bool
  return_lse: bool
  kv_fp8: bool  # an fp8 cache, with k / v descales
  q_fp8: bool  # an fp8 q, with q descales (computes in fp16)
  has_sinks: bool
  # Cache addressing, in rows of head_dim elements.
  paged: bool
  max_blocks: int  # block-table width (paged)
  block_size: int  # tokens per page (paged)
  num_pages: int  # pages a block-table entry may name; entries are clamped into [0, num_pages)
  page_rows: int
  token_rows: int
  head_rows: int
  k_offset_rows: int
  v_offset_rows: int
  fused: bool  # V lives in the K buffer: one ref serves both
  stacked: bool
  num_layers: int
  layer_rows: int
  total_k: int  # rows of the non-paged k / v (tokens)

  @property
  def single_page_tile(self) -> bool:
    """Every key tile lies inside one page: one scalar block-table lookup per tile."""
    return self.paged and self.block_size % self.block_k == 0


def _div(a, b):
  """Integer division of non-negative int32 values (truncating lax.div: no sign fix-up code)."""
  return lax.div(a, jnp.int32(b) if isinstance(b, int) else b)


def _rem(a, b):
  return lax.rem(a, jnp.int32(b) if isinstance(b, int) else b)


def _cdiv(a, b: int):
  return _div(a + (b - 1), b)


def _find_sequence(cu_q_ref, pid, p: KernelParams):
  """Largest b in [0, batch] (i32[]) whose first program `cu_q[b] // block_q + b` is <= pid (i32[]).

  Sequence b owns programs [first(b), first(b + 1)); b == batch is the padding region
  [cu_q[batch], total_q). cu_q values are clamped into [0, total_q] first, so garbage never sends a
  program outside the output. A fixed number of halvings (ceil(log2(batch + 1))): no data-dependent
  trip count, and no loop at all in the lowered code.
  """
  def first_program(b):
    start = jnp.clip(cu_q_ref[b], 0, p.total_q)
    return _div(start, p.block_q) + b

  lo = jnp.int32(0)
  hi = jnp.int32(p.batch)
  for _ in range(max(1, math.ceil(math.log2(p.batch + 1)))):
    mid = _div(lo + hi + 1, 2)
    ok = first_program(mid) <= pid
    lo = jnp.where(ok, mid, lo)
    hi = jnp.where(ok, hi, mid - 1)
  return lo


def _tile_columns(p: KernelParams):
  """(cols i32[1, D_pad], col_ok bool[1, D_pad] or None): the head_dim columns of a row tile.

  A head_dim that is not a power of two (80, 96, 112, 192) is padded to the tile width; the extra
  columns are masked (loaded as zeros, never stored).
  """
  cols = lax.broadcasted_iota(jnp.int32, (1, p.head_dim_pad), 1)
  if p.head_dim_pad == p.head_dim:
    return cols, None
  return cols, cols < p.head_dim


def _and(a: Optional[jax.Array], b: Optional[jax.Array]) -> Optional[jax.Array]:
  if a is None:
    return b
  if b is None:
    return a
  return a & b


def _kv_rows(kv_index_ref, seq, n_start, pos, kv_head, layer_rows, k_start, p: KernelParams):
  """(k_rows, v_rows) i32[block_k]: rows of keys `pos` (i32[block_k], positions in the sequence).

  seq, n_start (the tile's first position), kv_head, layer_rows (the layer's first row), k_start
  (non-paged: cu_seqlens_k[seq]) are i32[] scalars; kv_index_ref is the block table
  i32[batch, max_blocks] (paged) or cu_seqlens_k i32[batch + 1].

  Paged: page = block_table[seq, pos // block_size] clamped into the cache (an out-of-range entry is
  never an out-of-buffer read), then page * page_rows + token * token_rows + head * head_rows
  (+ the layer's offset for a stacked cache). Non-paged: token rows cu_seqlens_k[seq] + pos.
  Always in range, also for positions past the sequence's keys (their loads are masked).
  """
  if not p.paged:
    token = jnp.minimum(k_start + pos, p.total_k - 1)
    rows = token * p.num_kv_heads + kv_head
    return rows, rows
  if p.single_page_tile:
    block = jnp.minimum(_div(n_start, p.block_size), p.max_blocks - 1)
    page = kv_index_ref[seq, block]  # scalar: the whole tile is in this page
  else:
    block = jnp.minimum(_div(pos, p.block_size), p.max_blocks - 1)
    page = lowering.load(kv_index_ref, (seq, block))
  page = jnp.clip(page, 0, p.num_pages - 1)
  base = (page * p.page_rows + _rem(pos, p.block_size) * p.token_rows + kv_head * p.head_rows
          + layer_rows)
  return base + p.k_offset_rows, base + p.v_offset_rows


def _attend_tile(carry, n_start, *, q, k_ref, v_ref, kv_index_ref, seq, kv_head, layer_rows,
                 k_start, len_k, diag, slopes, qk_scale, masked: bool, p: KernelParams):
  """One online-softmax step over keys [n_start, n_start + block_k) of the program's sequence.

  carry: (acc f32[M, D_pad], m f32[M], l f32[M]) with m in log2 units; q: [M, D_pad] in the compute
  dtype (fp8 K / V tiles are converted to it); diag: i32[M] key position of each row's query
  (i + len_k - len_q); slopes: f32[M] ALiBi slopes (or None); qk_scale: f32[] (or a Python float)
  the score scale, k_descale (and q_descale) included. `masked` tiles check key validity and the
  causal / window bounds; unmasked tiles lie wholly inside every row's allowed range (the caller's
  loop bounds guarantee it).
  """
  acc, m_i, l_i = carry
  pos = n_start + lax.broadcasted_iota(jnp.int32, (p.block_k,), 0)  # [BK]
  k_rows, v_rows = _kv_rows(kv_index_ref, seq, n_start, pos, kv_head, layer_rows, k_start, p)
  cols, col_ok = _tile_columns(p)
  key_ok = pos < len_k  # [BK]
  # Masked keys may be poison (the unused tail of a last page): loading them as 0 keeps 0 * NaN out
  # of P @ V (and skips their reads on the GPU).
  load_ok = _and(key_ok[:, None], col_ok) if masked else col_ok
  k = lowering.load(k_ref, (k_rows[:, None], cols), load_ok, 0.0)  # [BK, D_pad]
  v = lowering.load(v_ref, (v_rows[:, None], cols), load_ok, 0.0)  # [BK, D_pad]
  if p.kv_fp8:  # fp8 from memory, the compute dtype in registers (exact)
    k = k.astype(q.dtype)
    v = v.astype(q.dtype)

  # HIGHEST: fp32 inputs get exact (IEEE) products on the GPU instead of tf32; fp16 / bf16 unchanged.
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
  if p.softcap > 0:
    s = jnp.tanh(s * (qk_scale / p.softcap)) * (p.softcap * LOG2E)
  else:
    s = s * (qk_scale * LOG2E)
  if slopes is not None or masked:
    rel = diag[:, None] - pos[None, :]  # [M, BK] = (i + len_k - len_q) - j
  if slopes is not None:
    s = s - (slopes * LOG2E)[:, None] * jnp.abs(rel).astype(jnp.float32)
  if masked:
    allowed = key_ok[None, :]
    if p.window_right >= 0:  # causal is window_right == 0
      allowed = allowed & (rel >= -p.window_right)
    if p.window_left >= 0:
      allowed = allowed & (rel <= p.window_left)
    s = jnp.where(allowed, s, _NEG_INF)
  return online_softmax_step(acc, m_i, l_i, s, v, masked)


def online_softmax_step(acc, m_i, l_i, s, v, masked: bool):
  """Folds a tile of scores into the running softmax.

  acc: f32[M, D_pad]; m_i, l_i: f32[M] running max (log2 units) and sum; s: f32[M, BK] scores in
  log2 units, -inf where not allowed; v: [BK, D_pad] values (zero for masked keys).
  Returns the updated (acc, m_i, l_i).
  """
  m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
  m_ref = m_new
  if masked:
    # A row that has seen no allowed key yet has m = -inf: subtract 0 instead, so exp2 gives 0 and
    # not exp2(-inf - -inf) = NaN.
    m_ref = jnp.where(m_new == _NEG_INF, 0.0, m_new)
  p = jnp.exp2(s - m_ref[:, None])
  alpha = jnp.exp2(m_i - m_ref)
  l_i = l_i * alpha + jnp.sum(p, axis=1)
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                       precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return acc * alpha[:, None] + pv, m_new, l_i


def _dequant_scales(q, descale_refs, seq, kv_head, p: KernelParams):
  """(qk_scale f32[], v_scale f32[], q) of an fp8 cache for this program's (sequence, kv head):
  k_descale (times q_descale for an fp8 q, which becomes fp16, exactly) joins the score scale,
  v_descale the final normalization."""
  q_descale_ref, k_descale_ref, v_descale_ref = descale_refs
  descale = k_descale_ref[seq, kv_head]
  if p.q_fp8:
    q = q.astype(jnp.float16)
    descale = descale * q_descale_ref[seq, kv_head]
  return p.scale * descale, v_descale_ref[seq, kv_head], q


def _row_start(sinks_ref, head, with_sink, p: KernelParams):
  """(m f32[M] in log2 units, l f32[M]): where each row's online softmax starts.

  A row `with_sink` (bool[M]) starts from its head's (head: i32[M]) sink: m = s_aux[head], l =
  exp2(m - m) = 1 (0 for a -inf sink, which is none); every other row from m = -inf, l = 0.
  """
  if not p.has_sinks:
    return (jnp.full((p.block_m,), _NEG_INF, jnp.float32), jnp.zeros((p.block_m,), jnp.float32))
  m = lowering.load(sinks_ref, (head,), with_sink, _NEG_INF) * LOG2E
  return m, jnp.where(m > _NEG_INF, 1.0, 0.0).astype(jnp.float32)


def key_ranges(r0, r1, q_len, kv_len, window_left: int, window_right: int, block_k: int):
  """Key tiles rows [r0, r1] of a sequence (r1 >= r0) need, and which of them need no mask.

  Returns i32[] tile indices (lo, full_lo, full_hi, hi): tiles [lo, hi) hold every key some row is
  allowed; tiles [full_lo, full_hi) have every key allowed for every row (lo <= full_lo <= full_hi
  <= hi). Bottom-right alignment: row r sees keys [r + off - window_left, r + off + window_right]
  within [0, kv_len), off = kv_len - q_len; a window side of -1 is unbounded (static ints; under
  causal window_right is 0, so tiles above the diagonal are never visited). Shared by this kernel
  and the Mosaic GPU kernel (`mosaic.py`).
  """
  r0, r1, q_len, kv_len = (jnp.asarray(x, jnp.int32) for x in (r0, r1, q_len, kv_len))
  off = kv_len - q_len
  zero = jnp.int32(0)
  key_lo = jnp.maximum(r0 + off - window_left, 0) if window_left >= 0 else zero
  key_hi = jnp.minimum(r1 + off + window_right + 1, kv_len) if window_right >= 0 else kv_len
  lo = _div(key_lo, block_k)
  hi = jnp.where(key_hi > key_lo, jnp.maximum(_cdiv(jnp.maximum(key_hi, 0), block_k), lo), lo)
  # Every key of tile j is allowed for every row iff j * B >= r1 + off - window_left and
  # (j + 1) * B <= min(kv_len, r0 + off + window_right + 1).
  full_key_lo = jnp.maximum(r1 + off - window_left, 0) if window_left >= 0 else zero
  full_key_hi = jnp.minimum(r0 + off + window_right + 1, kv_len) if window_right >= 0 else kv_len
  full_lo = jnp.clip(_cdiv(full_key_lo, block_k), lo, hi)
  full_hi = jnp.clip(_div(jnp.maximum(full_key_hi, 0), block_k), full_lo, hi)
  return lo, full_lo, full_hi, hi


def _key_ranges(first, len_q, len_k, p: KernelParams):
  """The program's key ranges as (start, stop, masked) triples in keys: masked tiles where a left
  window starts, unmasked tiles, masked tiles at the causal / right-window / length boundary
  (`key_ranges` for its queries [first, min(first + block_q, len_q)), first < len_q)."""
  last = jnp.minimum(first + p.block_q, len_q) - 1
  lo, full_lo, full_hi, hi = (t * p.block_k for t in key_ranges(
      first, last, len_q, len_k, p.window_left, p.window_right, p.block_k))
  return ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True))


def varlen_attention_kernel(*refs, p: KernelParams):
  """The kernel body; `refs` are, in order (shapes with T = total_q, H = num_heads, D = head_dim):

  cu_q_ref      i32[batch + 1]        cu_seqlens_q
  seqlens_k_ref i32[batch]            keys per sequence
  kv_index_ref  paged: i32[batch, max_blocks] block table; else i32[batch + 1] cu_seqlens_k
  layer_ref     i32[1]                (stacked caches only) the layer, clamped into [0, L)
  alibi_ref     f32[batch, H]         (ALiBi only) slopes
  q_descale_ref f32[batch, Hk]        (fp8 q only)
  k_descale_ref, v_descale_ref f32[batch, Hk] (fp8 cache only)
  sinks_ref     f32[H]                (sinks only) s_aux
  q_ref         [T * H, D]            q as rows (token * H + head)
  k_ref         [rows, D]             the K buffer as rows (paged: the whole cache, as laid out)
  v_ref         [rows, D]             the V buffer as rows (absent when V is fused into k_ref)
  out_ref       [T * H, D]            output rows, q's dtype
  lse_ref       f32[H, T]             (return_lse only) natural-log LSE, +inf for rows seeing no key
  """
  it = iter(refs)
  cu_q_ref, seqlens_k_ref, kv_index_ref = next(it), next(it), next(it)
  layer_ref = next(it) if p.stacked else None
  alibi_ref = next(it) if p.has_alibi else None
  q_descale_ref = next(it) if p.q_fp8 else None
  k_descale_ref, v_descale_ref = (next(it), next(it)) if p.kv_fp8 else (None, None)
  sinks_ref = next(it) if p.has_sinks else None
  q_ref, k_ref = next(it), next(it)
  v_ref = k_ref if p.fused else next(it)
  out_ref = next(it)
  lse_ref = next(it) if p.return_lse else None

  pid = pl.program_id(0)
  kv_head = pl.program_id(1)
  seq = _find_sequence(cu_q_ref, pid, p)
  q_start = jnp.clip(cu_q_ref[seq], 0, p.total_q)
  first = (pid - (_div(q_start, p.block_q) + seq)) * p.block_q  # first query (in its sequence)
  q_end = jnp.where(seq < p.batch, cu_q_ref[jnp.minimum(seq + 1, p.batch)], p.total_q)
  len_q = jnp.clip(q_end, q_start, p.total_q) - q_start

  # Programs past their sequence's last query (the grid is a static upper bound) do nothing.
  @pl.when((first >= 0) & (first < len_q))
  def _():
    _program(seq, first, q_start, len_q, kv_head, kv_index_ref, seqlens_k_ref, layer_ref,
             alibi_ref, (q_descale_ref, k_descale_ref, v_descale_ref), sinks_ref, q_ref, k_ref, v_ref,
             out_ref, lse_ref, p)


def _program(seq, first, q_start, len_q, kv_head, kv_index_ref, seqlens_k_ref, layer_ref,
             alibi_ref, descale_refs, sinks_ref, q_ref, k_ref, v_ref, out_ref, lse_ref,
             p: KernelParams):
  """The work of one program that owns at least one query row.

  seq (in [0, batch]; batch = the padding region), first (its first query within the sequence),
  q_start (the sequence's first row of q), len_q, kv_head: i32[] scalars. Refs as described in
  `varlen_attention_kernel` (layer_ref, alibi_ref, sinks_ref, lse_ref and the (q, k, v)
  `descale_refs` are None when not used).
  """
  real = seq < p.batch  # False: the padding region, which sees no keys (zeros, LSE +inf)
  seq_c = jnp.minimum(seq, p.batch - 1)  # for lookups; padding programs use no looked-up value

  r = lax.broadcasted_iota(jnp.int32, (p.block_m,), 0)  # tile row = (query token, q head in group)
  q_idx = first + _div(r, p.group)  # [M] query index within the sequence
  head = kv_head * p.group + _rem(r, p.group)  # [M] q head
  row_ok = (r < p.block_q * p.group) & (q_idx < len_q)  # [M]
  token = q_start + q_idx  # [M] row of q / out
  q_row = token * p.num_heads + head  # [M]
  cols, col_ok = _tile_columns(p)
  io_ok = _and(row_ok[:, None], col_ok)  # [M, D_pad]
  q = lowering.load(q_ref, (jnp.where(row_ok, q_row, 0)[:, None], cols), io_ok, 0.0)
  qk_scale, v_scale = p.scale, None
  if p.kv_fp8:
    qk_scale, v_scale, q = _dequant_scales(q, descale_refs, seq_c, kv_head, p)

  # Keys of this sequence and where they live.
  len_k = jnp.where(real, jnp.maximum(seqlens_k_ref[seq_c], 0), 0)
  k_start = jnp.int32(0)
  if p.paged:
    len_k = jnp.minimum(len_k, p.max_blocks * p.block_size)  # the block table's capacity
  else:
    k_start = jnp.clip(kv_index_ref[seq_c], 0, p.total_k)
    len_k = jnp.minimum(len_k, p.total_k - k_start)
  layer_rows = jnp.int32(0)
  if p.stacked:
    # The layer is data (a traced scalar): its offset is added here, never by slicing the cache.
    layer_rows = jnp.clip(layer_ref[0], 0, p.num_layers - 1) * p.layer_rows

  shift = len_k - len_q  # bottom-right alignment: query i sits at key position i + shift
  diag = q_idx + shift  # [M]
  slopes = None
  if p.has_alibi:
    slopes = lowering.load(alibi_ref, (seq_c, head), row_ok, 0.0)  # f32[M]

  step = dict(q=q, k_ref=k_ref, v_ref=v_ref, kv_index_ref=kv_index_ref, seq=seq_c, kv_head=kv_head,
              layer_rows=layer_rows, k_start=k_start, len_k=len_k, diag=diag, slopes=slopes,
              qk_scale=qk_scale, p=p)
  carry = (jnp.zeros((p.block_m, p.head_dim_pad), jnp.float32),) + _row_start(
      sinks_ref, head, row_ok & real, p)
  for start, stop, masked in _key_ranges(first, len_q, len_k, p):
    num_tiles = _cdiv(jnp.maximum(stop - start, 0), p.block_k)

    def body(t, carry, start=start, masked=masked):
      return _attend_tile(carry, start + t * p.block_k, masked=masked, **step)

    carry = lax.fori_loop(0, num_tiles, body, carry)
  acc, m_i, l_i = carry

  # Rows that saw no allowed key (nor a sink) output zeros and LSE +inf; with a sink, zeros and
  # LSE = s_aux.
  seen = l_i > 0.0
  inv_l = 1.0 / jnp.where(seen, l_i, 1.0)
  if v_scale is not None:  # v_descale applied once per row, with the normalization
    inv_l = inv_l * v_scale
  out = (acc * inv_l[:, None]).astype(out_ref.dtype)
  # Masked-out lanes point past the end (see lowering.store).
  lowering.store(out_ref, (jnp.where(row_ok, q_row, p.total_q * p.num_heads)[:, None], cols), out,
                 io_ok)
  if p.return_lse:
    lse = jnp.where(seen, (m_i + jnp.log2(jnp.where(seen, l_i, 1.0))) * LN2, jnp.inf)
    lowering.store(lse_ref, (head, jnp.where(row_ok, token, p.total_q)), lse, row_ok)
