"""A Mosaic GPU (Hopper) kernel for varlen attention over a paged KV cache, for long prefill.

`backend="auto"` and `PallasConfig(kernel=None)` choose it where `preferred` says it measured faster
(an H100 / H200, a call it covers, long prefill); elsewhere it runs when asked for::

    from jax_varlen_attn import flash_attn_varlen_func, PallasConfig
    out = flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q,
                                 max_seqlen_q=max_seqlen_q, seqused_k=seqused_k,
                                 max_seqlen_k=max_seqlen_k, block_table=block_table, causal=True,
                                 backend="pallas", config=PallasConfig(kernel="mosaic"))

The schedule is FlashAttention-3's (as in JAX's dense `attention_mgpu.py` example), written anew for
the paged, ragged contract: a CTA holds 2 x block_q query rows of one sequence for one q head, in
three warpgroups. Two compute warpgroups own block_q rows each and run QK^T and PV on wgmma with
their softmax interleaved (a shared "schedule" barrier alternates their tensor-core phases); the
third streams K / V tiles of block_kv keys into a `stages`-deep ring of shared-memory slots by TMA,
one copy per page of a tile (a page is `block_size` rows of one kv head, wherever the layout puts
them), so the cache is read in place and never gathered.

What differs from the dense kernel, and why:
- Ragged q. A program's (sequence, first row) come from `program_table` (from cu_seqlens_q, the
  rule every backend uses: sequence b owns programs
  [cu_q[b] // (2 block_q) + b, cu_q[b+1] // (2 block_q) + b + 1)); `work_table` adds the
  heaviest-first order beside it (three small XLA kernels; one Triton launch measured slower). A TMA box into a tiled,
  swizzled tile must start at a multiple of 8 rows (Mosaic splits the row index into tile and row
  within it), and a whole-tile store would overwrite the next sequence's rows. So each warpgroup
  reads its q rows by TMA into an unswizzled staging tile (any first row) and copies them into the
  swizzled one through registers, and writes its output back through the same staging tile: whole
  tiles in one TMA store, a sequence's last partial tile in power-of-two pieces (`_store_rows`).
  The programs after the last sequence's zero the padding rows. That is `direct_rows`; where the
  staging tiles do not fit in shared memory (head_dim 256) or q is shorter than one program, q and
  the output go through XLA's padded copies instead (`padded_rows`, `compact_rows`), which measured
  slower (benchmarks/NOTES.md, "the Mosaic kernel in place").
- Persistent CTAs, q a work item ahead. One CTA per SM runs work items (a program's 2 x block_q
  rows of one q head) back to back, heaviest first (a sequence's last query rows see the most
  keys), in rounds that alternate direction so the CTAs' loads even out. The loader warpgroup
  streams the K / V tiles of a CTA's items through the ring (its warp 0 K's copies, its warp 1
  V's) and loads the next item's q into the staging tiles while the current item runs, so an
  item's start waits for neither its q nor its first tiles (a CTA per program paid both, and its
  exit, every time).
- Masks. Keys run over the band the CTA needs (causal bottom-right, sliding window, the sequence's
  length), split per warpgroup into masked edges and an unmasked middle (`key_ranges`), so the
  middle pays no mask.
- Score options: softcap (tanh), ALiBi (minus slope x the distance from the row's diagonal, on
  every tile, masked or not), sinks (each row's online softmax starts from its head's s_aux: m =
  s_aux, l = 1), as the other backends. All three pass the GPU suite (H200) and `preferred` takes
  them: sinks cost nothing measurable, softcap and ALiBi run 1.2-1.6x faster than on the Triton
  kernel (benchmarks/NOTES.md, "Softcap and ALiBi on the Mosaic kernel, timed").
- Poisoned cache rows. Rows past seqlens_k inside the last page, and pages a padded block-table
  entry names, may hold anything (NaN included). K's masked scores become -inf; V's rows would
  still meet P = 0 in the PV product (0 x NaN = NaN), so the tile holding the sequence's last key
  has its rows past the end zeroed in shared memory before PV. A page id out of range is clamped
  into [0, num_pages): such a page holds only keys past the end or a hostile table's own
  sequence's, and nothing outside the buffer is read.

Not covered (`unsupported_reason` says why; with kernel=None the pallas backend then runs its
Triton-lowered kernel, with kernel="mosaic" the call raises ValueError before any launch):
fp8, float32, non-paged k / v, head_dim not in (64, 128, 256), pages of
fewer than 8 rows or not dividing / divided by block_kv, layouts whose pages are not a 2-D box of a
row-major view of the buffer. GQA is not packed into the tile: each q head's CTA reads its kv head's
tiles (K / V reads grow by the group size; prefill is bound by the tensor cores, not by them).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_varlen_attn.backends.pallas.kernel import LN2, LOG2E, key_ranges
from jax_varlen_attn.layout import KVCacheLayout
from jax_varlen_attn.spec import AttentionArrays, AttentionSpec

COMPUTE_WGS = 2  # compute warpgroups per CTA; the third warpgroup loads K / V
HEAD_DIMS = (64, 128, 256)
DTYPES = ("float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
  """block_q: query rows per compute warpgroup (a multiple of 64: wgmma's M); block_kv: keys per
  K / V tile (a multiple of 64); stages: K / V tiles in flight (>= 2)."""

  block_q: int = 64
  block_kv: int = 128
  stages: int = 2

  @classmethod
  def get_default(cls, head_dim: int) -> "MosaicTiles":
    # FlashAttention-3's tiles for head_dim <= 128 (JAX's example: block_kv 128, 2 stages); at 256
    # two 128-key stages of K and V would not fit in shared memory beside q, so 64 keys.
    return cls(block_q=64, block_kv=128 if head_dim <= 128 else 64, stages=2)

  @property
  def rows_per_program(self) -> int:
    return COMPUTE_WGS * self.block_q


@dataclasses.dataclass(frozen=True)
class KVView:
  """A page of one kv head as a [rows, D] box of the buffer viewed as [size // width, width].

  Row of (layer, page, head) = layer * layer_rows + page * page_rows + head * head_rows + offset
  rows (k_rows / v_rows); column = head * head_cols. Tokens of a page are consecutive rows.
  """

  width: int  # elements per view row (the layout's token stride)
  page_rows: int
  layer_rows: int
  head_rows: int
  head_cols: int
  k_rows: int
  v_rows: int


def kv_view(layout: KVCacheLayout) -> Tuple[Optional[KVView], str]:
  """The 2-D view TMA reads `layout`'s pages through, or (None, why it has none)."""
  d, ts, hs = layout.head_dim, layout.token_stride, layout.head_stride
  if ts % d or ts == 0:
    return None, f"token stride {ts} is not a positive multiple of head_dim"
  for name in ("page_stride", "layer_stride", "k_offset", "v_offset"):
    if getattr(layout, name) % ts:
      return None, f"{name}={getattr(layout, name)} is not a multiple of the token stride {ts}"
  if (layout.num_kv_heads - 1) * hs + d <= ts:  # heads side by side in a row (NHD; any one head)
    head_rows, head_cols = 0, hs
  elif hs % ts == 0:  # heads in rows of their own (HND)
    head_rows, head_cols = hs // ts, 0
  else:
    return None, "a kv head's rows are neither whole view rows nor columns of one"
  return KVView(width=ts, page_rows=layout.page_stride // ts, layer_rows=layout.layer_stride // ts,
                head_rows=head_rows, head_cols=head_cols, k_rows=layout.k_offset // ts,
                v_rows=layout.v_offset // ts), ""


def unsupported_reason(spec: AttentionSpec, tiles: Optional[MosaicTiles] = None,
                       k_size: Optional[int] = None, v_size: Optional[int] = None) -> Optional[str]:
  """Why this kernel cannot run `spec` (None: it can); k_size / v_size: the cache buffers' element
  counts, where known."""
  if not spec.paged:
    return "k / v are not a paged cache (the kernel reads pages by TMA)"
  if spec.dtype not in DTYPES or spec.kv_fp8:
    return f"dtype {spec.dtype} / kv {spec.kv_dtype}: only float16 / bfloat16 q and cache"
  if spec.head_dim not in HEAD_DIMS:
    return f"head_dim {spec.head_dim} not in {HEAD_DIMS}"
  tiles = tiles or MosaicTiles.get_default(spec.head_dim)
  bs = spec.layout.block_size
  rows = min(bs, tiles.block_kv)
  if rows % 8 or (tiles.block_kv % bs and bs % tiles.block_kv):
    return (f"page size {bs}: a page must hold a multiple of 8 rows and divide, or be divided by, "
            f"block_kv={tiles.block_kv}")
  view, why = kv_view(spec.layout)
  if view is None:
    return f"layout {spec.layout.name}: {why}"
  # TMA reads a tiled view: 8-row tiles of 128 bytes (64 fp16 columns), boxes starting on them.
  cols = 128 // 2
  rows = (view.page_rows, view.layer_rows, view.head_rows, view.k_rows, view.v_rows)
  if view.width % cols or view.head_cols % cols or any(r % 8 for r in rows):
    return (f"layout {spec.layout.name}: a page of one kv head does not start on a tile of 8 rows "
            "x 64 columns of the cache viewed as rows of its token stride")
  for name, size in (("k", k_size), ("v", v_size)):
    if size is not None and (size % view.width or (size // view.width) % 8):
      return (f"{name} has {size} elements: not a whole number of 8-row tiles of {view.width} "
              "columns")
  return None


# Mean query tokens per sequence from which the pallas backend (kernel=None) and backend="auto" run
# this kernel: the crossover with the Triton kernel measured on an H200 (benchmarks/NOTES.md, "the
# Mosaic kernel in place"; short single prompts and decode fill its 128-row tiles badly).
MIN_QUERIES = 1024
# Query tokens in the call from which it runs: the smallest call measured faster (8 x 1024 and 16 x
# 512 tokens); a single 512-token prompt (4 programs a head) measured 2x slower.
MIN_TOTAL_QUERIES = 8192


# Whether `backend="auto"` and `PallasConfig(kernel=None)` may choose this kernel at all: the switch
# that takes it out of the defaults if it is found unsafe again (the q_free deadlock: NOTES.md).
BY_DEFAULT = True

KNOWN_HANG = ("switched off as unsafe (mosaic.BY_DEFAULT; it once deadlocked an H200): not chosen "
              "by default; PallasConfig(kernel='mosaic') runs it")


def preferred(spec: AttentionSpec, k_size: Optional[int] = None,
              v_size: Optional[int] = None) -> bool:
  """Whether the default choice is this kernel for `spec` here: `BY_DEFAULT`, a Hopper GPU, a call
  it covers, and long prefill (MIN_QUERIES a sequence, MIN_TOTAL_QUERIES in all: where it measured
  faster). Every score option it covers is included: sinks, softcap and ALiBi each measured faster
  here than on the Triton kernel (benchmarks/NOTES.md, "Softcap and ALiBi on the Mosaic kernel,
  timed")."""
  from jax_varlen_attn.backends import device
  return (BY_DEFAULT and spec.mean_queries_per_sequence >= MIN_QUERIES
          and spec.total_q >= MIN_TOTAL_QUERIES and device.is_hopper()
          and unsupported_reason(spec, k_size=k_size, v_size=v_size) is None)


# ---- index arithmetic shared by the kernel and XLA (tested on the CPU against the oracle) ----------

def _program_starts(cu: jax.Array, rows_per_program: int) -> jax.Array:
  """i32[batch]: sequence b's first program, cu_q[b] // R + b (AttentionSpec.query_programs' rule)."""
  batch = cu.shape[0] - 1
  return cu[:-1] // rows_per_program + jnp.arange(batch, dtype=jnp.int32)


def _sequence_of(starts: jax.Array, x: jax.Array, batch: int) -> jax.Array:
  """i32[len(x)]: for each x, the last b with starts[b] <= x, clipped into [0, batch).

  compare_all: one fused compare-and-count (len(x) x len(starts)), where the default binary search
  is an XLA while loop of some twenty tiny kernels a call on the GPU (benchmarks/NOTES.md)."""
  b = jnp.searchsorted(starts, x, side="right", method="compare_all").astype(jnp.int32)
  return jnp.clip(b - 1, 0, batch - 1)


def program_table(cu_seqlens_q: jax.Array, num_programs: int, rows_per_program: int) -> jax.Array:
  """i32[num_programs, 2]: (sequence, first query row within it) of each program.

  Sequence b owns programs from start_b = cu_q[b] // R + b on; program p belongs to the last b with
  start_b <= p and covers its rows [(p - start_b) R, (p - start_b + 1) R). Rows past the sequence's
  end (and whole programs past it) are the kernel's to skip.
  """
  cu = cu_seqlens_q.astype(jnp.int32)
  batch = cu.shape[0] - 1
  starts = _program_starts(cu, rows_per_program)
  p = jnp.arange(num_programs, dtype=jnp.int32)
  seq = _sequence_of(starts, p, batch)
  return jnp.stack([seq, (p - starts[seq]) * rows_per_program], axis=1)


def heaviest_first(table: jax.Array, cu_seqlens_q: jax.Array, seqlens_k: jax.Array,
                   rows_per_program: int, window_left: int, window_right: int,
                   block_kv: int) -> jax.Array:
  """i32[num_programs]: the programs of `program_table` by their key tiles, most first (programs
  without rows last), so the persistent CTAs take the longest items first and finish together."""
  cu = cu_seqlens_q.astype(jnp.int32)
  seq, q_lo = table[:, 0], table[:, 1]
  q_len = cu[seq + 1] - cu[seq]
  kv_len = seqlens_k.astype(jnp.int32)[seq]
  lo, _, _, hi = key_ranges(q_lo, jnp.minimum(q_lo + rows_per_program, q_len) - 1, q_len, kv_len,
                            window_left, window_right, block_kv)
  weight = jnp.where(q_lo < q_len, hi - lo, -1)
  return descending_order(weight)


def descending_order(w: jax.Array) -> jax.Array:
  """i32[n]: the stable descending argsort of i32[n] w (ties keep their index order).

  Two fused compare-and-count passes (each item's rank, then the item of each rank), n x n
  compares each: cheaper than XLA's sort kernel at a call's program counts (NOTES.md)."""
  i = jnp.arange(w.shape[0], dtype=jnp.int32)
  ahead = (w[None, :] > w[:, None]) | ((w[None, :] == w[:, None]) & (i[None, :] < i[:, None]))
  rank = jnp.sum(ahead, axis=1, dtype=jnp.int32)
  return jnp.sum(jnp.where(rank[None, :] == i[:, None], i[None, :], 0), axis=1, dtype=jnp.int32)


def work_table(cu_seqlens_q: jax.Array, seqlens_k: jax.Array, num_programs: int,
               rows_per_program: int, window_left: int, window_right: int,
               block_kv: int) -> jax.Array:
  """i32[num_programs, 3]: the kernel's table: row p holds `program_table`'s (sequence, q_lo) of
  program p and, in column 2, `heaviest_first`'s program of rank p."""
  table = program_table(cu_seqlens_q, num_programs, rows_per_program)
  order = heaviest_first(table, cu_seqlens_q, seqlens_k, rows_per_program, window_left,
                         window_right, block_kv)
  return jnp.concatenate([table, order[:, None]], axis=1)


def padded_rows(table: jax.Array, cu_seqlens_q: jax.Array, total_q: int,
                rows_per_program: int) -> jax.Array:
  """i32[num_programs * R]: the q token of each padded row (program p's row i is token
  cu_q[seq_p] + q_lo_p + i, clipped into [0, total_q); rows past a sequence are discarded later)."""
  cu = cu_seqlens_q.astype(jnp.int32)
  first = cu[table[:, 0]] + table[:, 1]
  rows = first[:, None] + jnp.arange(rows_per_program, dtype=jnp.int32)[None, :]
  return jnp.clip(rows.reshape(-1), 0, total_q - 1)


def compact_rows(padded: jax.Array, cu_seqlens_q: jax.Array, total_q: int, rows_per_program: int,
                 axis: int, fill) -> jax.Array:
  """Token t of sequence b from the padded per-program rows: row start_b * R + (t - cu_q[b]).

  Rows past cu_seqlens_q[-1] get `fill` (zeros for out, +inf for the LSE, as every backend).
  """
  cu = cu_seqlens_q.astype(jnp.int32)
  batch = cu.shape[0] - 1
  t = jnp.arange(total_q, dtype=jnp.int32)
  b = _sequence_of(cu, t, batch)
  src = _program_starts(cu, rows_per_program)[b] * rows_per_program + (t - cu[b])
  rows = jnp.take(padded, src, axis=axis, mode="clip")
  live = t < cu[-1]
  shape = [1] * rows.ndim
  shape[axis] = total_q
  return jnp.where(live.reshape(shape), rows, jnp.asarray(fill, rows.dtype))


# ---- the kernel -----------------------------------------------------------------------------------

SMEM_BYTES = 227 * 1024  # shared memory a Hopper CTA may opt into
PROFILE_EVENTS = 16  # named regions a warpgroup may enter an item with `profile_dir` (it enters <= 5)


def direct_rows(tiles: MosaicTiles, head_dim: int, itemsize: int) -> bool:
  """Whether q is read and the output written in place, through a staging tile per warpgroup.

  TMA into the swizzled q tile must start on an 8-row boundary and a whole-tile store would spill
  into the next sequence, so ragged rows go through an unswizzled staging tile (any first row, and
  partial stores in power-of-two pieces). It costs a second q tile of shared memory: where that
  does not fit (head_dim 256), q and the output take XLA's padded copies instead.
  """
  q_tiles = COMPUTE_WGS * tiles.block_q * head_dim * itemsize
  kv_tiles = 2 * tiles.stages * tiles.block_kv * head_dim * itemsize
  lse = COMPUTE_WGS * tiles.block_q * 4
  return 2 * q_tiles + kv_tiles + lse + 1024 <= SMEM_BYTES  # 1 KiB for barriers and alignment


def _store_rows(src, out_ref, row, head, n, rows: int, interpret: bool):
  """TMA-store src's rows [0, n) to out_ref[row:row + n, head] (n a traced count in [0, rows]):
  the whole tile in one copy, else one copy per set bit of n (power-of-two boxes, none past n).
  interpret: each copy under pl.when (the interpreter takes no copy predicate)."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  def copy(src_rows, dst_rows, predicate):
    if interpret:
      pl.when(predicate)(lambda: plgpu.copy_smem_to_gmem(src_rows, dst_rows))
    else:
      plgpu.copy_smem_to_gmem(src_rows, dst_rows, predicate=predicate)

  copy(src, out_ref.at[pl.ds(row, rows), head], n == rows)
  size = rows // 2
  while size:
    first = n & -(2 * size)  # the rows the larger pieces cover
    copy(src.at[pl.ds(first, size)], out_ref.at[pl.ds(row + first, size), head],
         (n < rows) & ((n & size) != 0))
    size //= 2


@dataclasses.dataclass(frozen=True)
class _Params:
  num_heads: int
  group: int
  head_dim: int
  block_size: int
  max_blocks: int
  num_pages: int
  scale: float
  window_left: int
  window_right: int
  softcap: float  # 0: off
  has_alibi: bool
  has_sinks: bool
  dtype: str
  tiles: MosaicTiles
  view: KVView
  batch: int
  total_q: int
  num_programs: int
  num_ctas: int  # persistent CTAs, each running work items back to back (`_kernel`'s `work`)
  direct: bool  # q read and out written in place (`direct_rows`); else the padded copies
  return_lse: bool
  interpret: bool  # under Mosaic GPU's interpreter on the CPU (`attention`)


def _dot(a, b, contract_b: int):
  """a @ b (contract_b 0) or a @ b.T (1) in f32: the interpreter's stand-in for wgmma."""
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _kernel(p: _Params, table_ref, cu_q_ref, seqk_ref, bt_ref, layer_ref, alibi_ref, sinks_ref,
            q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  t, view = p.tiles, p.view
  bq, bkv, stages, d = t.block_q, t.block_kv, t.stages, p.head_dim
  rows_per_copy = min(p.block_size, bkv)
  copies = bkv // rows_per_copy  # TMA copies (pages) per K or V tile
  dtype = jnp.dtype(p.dtype)
  ((qo_smem2, k_smem, v_smem, lse_smem2, *stage_smem2), (k_bars, v_bars, q_bars), consumed, sched,
   q_free) = scoped
  k_consumed, v_consumed = consumed
  # Where the loader puts q (`q_bars`): in place, the staging tiles, one item ahead; else the
  # swizzled q tiles themselves.
  q_dst2 = stage_smem2[0] if p.direct else qo_smem2
  R = COMPUTE_WGS * bq
  cta = lax.axis_index("cta")
  wg = lax.axis_index("wg")
  layer = layer_ref[0]
  num_items = p.num_heads * p.num_programs
  rounds = -(-num_items // p.num_ctas)
  # Rows past cu_q[-1] are zero (the contract); in place, the programs after the last sequence's
  # own (there are enough: AttentionSpec.query_programs) write them, R rows each.
  q_end = cu_q_ref[p.batch]
  first_tail = q_end // R + p.batch

  def work(r):
    """This CTA's work item of round r: (valid, program, q head). Items run heaviest program first
    (table column 2, `heaviest_first`), a program's q heads side by side; round r
    takes items [r C, (r + 1) C) of the C CTAs, in reverse on odd rounds (the loads even out)."""
    pos = jnp.where(lax.rem(r, 2) == 0, cta, p.num_ctas - 1 - cta)
    item = r * p.num_ctas + pos
    k = jnp.clip(lax.div(item, jnp.int32(p.num_heads)), 0, p.num_programs - 1)
    return item < num_items, table_ref[k, 2], lax.rem(item, p.num_heads)

  def bounds(prog):
    """(seq, q_lo, q_start, q_len, kv_len, lo, hi, live) of a program: its sequence, first row,
    the key tiles [lo, hi) its rows need, whether it has rows (where not, hi = lo)."""
    seq = table_ref[prog, 0]
    q_lo = table_ref[prog, 1]
    q_start = cu_q_ref[seq]
    q_len = cu_q_ref[seq + 1] - q_start
    kv_len = seqk_ref[seq]
    r_last = jnp.minimum(q_lo + R, q_len) - 1
    lo, _, _, hi = key_ranges(q_lo, r_last, q_len, kv_len, p.window_left, p.window_right, bkv)
    live = q_lo < q_len
    return seq, q_lo, q_start, q_len, kv_len, lo, jnp.where(live, hi, lo), live

  def padded_row(prog, w):
    # No pl.multiple_of: warp-level code (the loader's q copies) has no lowering for it.
    return prog * R + w * bq

  def tail_row(prog, w):
    """In place, warpgroup w's first padding row of a program past the last sequence's."""
    return q_end + (prog - first_tail) * R + w * bq

  def q_row(prog, w):
    """Warpgroup w's first row of q (and out) for `prog`: in place, its sequence's row, or for a
    program without rows its padding row clipped into q; else the padded row."""
    if not p.direct:
      return padded_row(prog, w)
    _, q_lo, q_start, _, _, _, _, live = bounds(prog)
    return jnp.where(live, q_start + q_lo + w * bq,
                     jnp.clip(tail_row(prog, w), 0, p.total_q - bq))

  def wgmma_layout(x, reduced: bool = False):
    """x in the registers' WGMMA layout (rows of it: reduced); the interpreter has no layouts."""
    if p.interpret:
      return x
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1) if reduced else plgpu.Layout.WGMMA)

  def iota(shape, dim: int):
    if p.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

  def schedule_barrier():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  # A CTA's items run back to back. Their K / V tiles are one stream through the ring (the n-th
  # tile the CTA reads sits in slot n % stages), so the loader fetches an item's first tiles while
  # the compute warpgroups finish the one before. q lands in q_dst2 once the compute warpgroups
  # free it (`q_free`): in place, an item ahead (the next item's q moves from the staging tile into
  # the swizzled one before this item's output leaves through the staging tile); else after the
  # previous item's output left the q tile.
  # Every q_free arrival has a loader wait behind it (in place: only where a next item's q lands):
  # a barrier completing twice unobserved leaves its waiter's parity a phase behind, waiting forever.

  def attend(prog, head, seq, q_lo, q_start, q_len, kv_len, lo, hi, n0, take_q):
    """One compute warpgroup's rows of a program with rows: its K / V tiles are the stream's n0,
    n0 + 1, ...; its output (and LSE) stored; take_q() moves the next item's q in on the way."""
    qo_smem = qo_smem2.at[wg]
    lse_smem = lse_smem2.at[wg]
    r0 = q_lo + wg * bq
    r1 = jnp.maximum(jnp.minimum(r0 + bq, q_len) - 1, r0)
    _, full_lo, full_hi, _ = key_ranges(r0, r1, q_len, kv_len, p.window_left, p.window_right, bkv)
    # Both warpgroups walk the program's tiles [lo, hi) (every tile's barriers expect both); a
    # warpgroup's own unmasked middle is clipped into them (rows past q_len have none of their own).
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)

    # Each row's online softmax starts from its head's sink (m = s_aux, l = 1; none for -inf) or
    # from nothing (m = -inf, l = 0).
    m_i = wgmma_layout(jnp.full((bq,), -jnp.inf, jnp.float32), reduced=True)
    l_i = wgmma_layout(jnp.full((bq,), 0, jnp.float32), reduced=True)
    if p.has_sinks:
      m_i = l_i + sinks_ref[head] * LOG2E
      l_i = jnp.where(m_i == -jnp.inf, l_i, l_i + 1.0)
    slope = alibi_ref[seq, head] * LOG2E if p.has_alibi else None
    acc = wgmma_layout(jnp.full((bq, d), 0, jnp.float32))

    def slot_of(j):
      return lax.rem(n0 + j - lo, stages)

    @pl.when(hi > lo)
    @jax.named_scope("first_k")
    def _():
      plgpu.barrier_wait(k_bars.at[slot_of(lo)])

    pl.when(wg == 1)(schedule_barrier)
    qk_scale = p.scale * LOG2E

    def step(j, carry, masked: bool):
      acc, m_i, l_i = carry
      slot = slot_of(j)

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
        schedule_barrier()
        return acc_ref[...]

      if p.interpret:
        s = _dot(qo_smem[...], k_smem.at[slot][...], contract_b=1)
        schedule_barrier()
      else:
        s = pl.run_scoped(compute_qk, plgpu.ACC((bq, bkv), jnp.float32))
      plgpu.barrier_arrive(k_consumed.at[slot])
      # c: what still scales s into log2 units (None: nothing). Plain scores stay raw: the scale
      # (positive) commutes with the row max, so each score costs one multiply-add (s c - m).
      c = None
      if p.softcap > 0:
        s = jnp.tanh(s * (p.scale / p.softcap)) * (p.softcap * LOG2E)
      elif p.has_alibi:
        s = s * qk_scale
      else:
        c = qk_scale
      if masked or p.has_alibi:
        rows = iota((bq, bkv), 0) + r0
        keys = iota((bq, bkv), 1) + j * bkv
        off = kv_len - q_len
      if p.has_alibi:  # ALiBi: minus slope x the distance from the row's diagonal
        s = s - slope * jnp.abs((rows + off - keys).astype(jnp.float32))
      if masked:  # the band's edges and the sequence's end: -inf where a key is not allowed
        ok = keys < kv_len
        if p.window_right >= 0:
          ok = ok & (keys <= rows + off + p.window_right)
        if p.window_left >= 0:
          ok = ok & (keys >= rows + off - p.window_left)
        s = jnp.where(ok, s, -jnp.inf)
      row_max = s.max(axis=1)
      m_new = jnp.maximum(m_i, row_max if c is None else row_max * c)
      # A row with no allowed key yet keeps m = -inf: subtract 0 instead (exp2(-inf) = 0, no NaN).
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m_i - m_use)
      pmat = jnp.exp2((s if c is None else s * c) - lax.broadcast_in_dim(m_use, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_i = l_i * alpha + pmat.sum(axis=1)
      p16 = pmat.astype(dtype)
      plgpu.barrier_arrive(sched)  # softmax done
      plgpu.barrier_wait(v_bars.at[slot])
      if masked:
        # Rows past the sequence's last key may hold NaN (poison): P = 0 would not cancel it.
        @pl.when((j + 1) * bkv > kv_len)
        def _():
          vrows = iota((bkv, d), 0)
          vt = v_smem.at[slot][...]
          v_smem.at[slot][...] = jnp.where(vrows + j * bkv < kv_len, vt, jnp.zeros_like(vt))
          plgpu.commit_smem()
      plgpu.barrier_wait(sched)  # the tensor cores are ours

      def wait_next_k():
        @pl.when(j + 1 < hi)
        def _():
          plgpu.barrier_wait(k_bars.at[slot_of(j + 1)])

      def compute_pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        wait_next_k()  # while P V runs

      if p.interpret:
        acc = acc + _dot(p16, v_smem.at[slot][...], contract_b=0)
        wait_next_k()
      else:
        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_consumed.at[slot])
      return acc, m_new, l_i

    with jax.named_scope("loop"):
      carry = (acc, m_i, l_i)
      carry = lax.fori_loop(lo, full_lo, lambda j, c: step(j, c, True), carry)
      carry = lax.fori_loop(full_lo, full_hi, lambda j, c: step(j, c, False), carry)
      acc, m_i, l_i = lax.fori_loop(full_hi, hi, lambda j, c: step(j, c, True), carry)
      pl.when(wg == 0)(schedule_barrier)

    with jax.named_scope("out"):
      seen = l_i > 0
      inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)
      o = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
      if p.return_lse:  # into shared memory first: the output's commit_smem covers it
        lse_smem[...] = jnp.where(seen, m_i * LN2 + jnp.log(jnp.where(seen, l_i, 1.0)), jnp.inf)
      take_q()
      if p.direct:
        stage = stage_smem2[0].at[wg]
        stage[...] = o
        plgpu.commit_smem()
        _store_rows(stage, out_ref, q_start + r0, head, jnp.clip(q_len - r0, 0, bq), bq,
                    p.interpret)
      else:
        qo_smem[...] = o
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[pl.ds(padded_row(prog, wg), bq), head])
      if p.return_lse:
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[head, pl.ds(padded_row(prog, wg), bq)])

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    # All the registers the loader leaves (2 x 128 x 240 + 128 x 24 <= 64K); 232 spilled more.
    plgpu.set_max_registers(240, action="increase")

    def take_q():
      """In place: the next item's q rows, staged by the loader, into the swizzled q tile."""
      plgpu.barrier_wait(q_bars.at[wg])
      stage = stage_smem2[0].at[wg]
      qo_smem2.at[wg][...] = (stage[...] if p.interpret
                              else plgpu.load(stage, (), layout=plgpu.Layout.WGMMA,
                                              optimized=False))
      plgpu.commit_smem()

    def release_q(r):
      """The landing tile is free for what the loader lands in its round r: in place, item r + 1's
      q (no arrival where there is none: nothing would wait for it); else item r's."""
      if p.direct:
        pl.when(work(r + 1)[0])(lambda: plgpu.barrier_arrive(q_free))
      else:
        plgpu.barrier_arrive(q_free)

    if p.direct:
      with jax.named_scope("q"):
        take_q()  # the first item's (every CTA has one: C <= items)
    release_q(0)

    def item(r, n0):
      valid, prog, head = work(r)
      seq, q_lo, q_start, q_len, kv_len, lo, hi, live = bounds(prog)
      has_next = work(r + 1)[0]
      take_next = (lambda: pl.when(has_next)(take_q)) if p.direct else (lambda: None)

      @pl.when(valid)
      def _():
        if not p.direct:
          with jax.named_scope("q"):
            plgpu.barrier_wait(q_bars.at[wg])
        pl.when(live)(lambda: attend(prog, head, seq, q_lo, q_start, q_len, kv_len, lo, hi, n0,
                                     take_next))

        @pl.when(~live)
        def _():
          take_next()
          if p.direct:
            @pl.when(prog >= first_tail)
            def _zero_tail():
              stage = stage_smem2[0].at[wg]
              stage[...] = jnp.zeros((bq, d), dtype)
              plgpu.commit_smem()
              row = tail_row(prog, wg)
              _store_rows(stage, out_ref, row, head, jnp.clip(p.total_q - row, 0, bq), bq,
                          p.interpret)

        # The landing tile is the next item's once the TMA engine has read this item's output.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        release_q(r + 1)

      return n0 + jnp.where(valid, hi - lo, 0)

    lax.fori_loop(0, rounds, item, jnp.int32(0))

  @pl.when(wg >= COMPUTE_WGS)
  @jax.named_scope("load")
  def _load():
    plgpu.set_max_registers(24, action="decrease")

    def load_q(prog, head):
      for w in range(COMPUTE_WGS):
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_row(prog, w), bq), head], q_dst2.at[w],
                                q_bars.at[w])

    def stream(kv):
      """The CTA's K tiles and its items' q (kv "k"), or its V tiles ("v"), in its items' order."""
      do_k, do_v = kv == "k", kv == "v"
      if do_k and p.direct:  # the first item's q; each item loads the next one's
        _, prog0, head0 = work(0)
        load_q(prog0, head0)

      def item(r, n0):
        valid, prog, head = work(r)
        seq, _, _, _, _, lo, hi, _ = bounds(prog)
        count = jnp.where(valid, hi - lo, 0)
        kv_head = lax.div(head, jnp.int32(p.group))
        base = layer * view.layer_rows + kv_head * view.head_rows
        col = kv_head * view.head_cols

        def page_rows(j):
          """The row of each page of key tile j (one TMA copy a page), K's and V's alike. Integer
          division as lax.div / rem (all >= 0): warp-level code has no lowering for jnp's `sign`."""
          rows = []
          for c in range(copies):
            key = j * bkv + c * rows_per_copy
            page = jnp.clip(bt_ref[seq, jnp.minimum(lax.div(key, jnp.int32(p.block_size)),
                                                    p.max_blocks - 1)], 0, p.num_pages - 1)
            rows.append(base + page * view.page_rows + lax.rem(key, jnp.int32(p.block_size)))
          return rows

        def issue(rows, slot, src_ref, dst_smem, first_row, bars):
          for c, row in enumerate(rows):
            plgpu.copy_gmem_to_smem(
                src_ref.at[pl.ds(row + first_row, rows_per_copy), pl.ds(col, d)],
                dst_smem.at[slot, pl.ds(c * rows_per_copy, rows_per_copy)], bars.at[slot])

        def tile(i):
          n = n0 + i  # the tile's place in the CTA's stream; the slot's previous tile is n - stages
          slot = lax.rem(n, stages)
          rows = page_rows(lo + i)
          if do_k:
            @pl.when(n >= stages)
            def _():
              plgpu.barrier_wait(k_consumed.at[slot])
            issue(rows, slot, k_ref, k_smem, view.k_rows, k_bars)
          if do_v:
            @pl.when(n >= stages)
            def _():
              plgpu.barrier_wait(v_consumed.at[slot])
            issue(rows, slot, v_ref, v_smem, view.v_rows, v_bars)

        # The item's first tiles go out before its q (they only wait for the ring), the rest after.
        first = jnp.minimum(count, stages)
        pl.loop(0, first)(tile)
        if do_k:
          # The q this round lands, once release_q(r) frees its tile: in place the next item's (if
          # any), else this item's.
          lands, q_prog, q_head = work(r + 1) if p.direct else (valid, prog, head)

          @pl.when(lands)
          def _():
            plgpu.barrier_wait(q_free)
            load_q(q_prog, q_head)

        pl.loop(first, count)(tile)
        return n0 + count

      total = lax.fori_loop(0, rounds, item, jnp.int32(0))
      # Observe the last `stages` tiles' releases (and, with copies, the last item's release of q's
      # tile): each barrier's every phase is waited on once, as Mosaic GPU's interpreter checks.
      if do_k and not p.direct:
        plgpu.barrier_wait(q_free)

      @pl.loop(jnp.maximum(total - stages, 0), total)
      def _(n):
        if do_k:
          plgpu.barrier_wait(k_consumed.at[lax.rem(n, stages)])
        if do_v:
          plgpu.barrier_wait(v_consumed.at[lax.rem(n, stages)])

    # K's copies (and q's) from one thread, V's from another: a tile's page copies (16 at pages of
    # 16) go out two at a time (measured faster: NOTES.md). On the GPU the loader warpgroup's
    # warps 0 and 1; the interpreter has no warp-level code, so there two loader threads
    # (`attention`'s num_threads), whose barrier waits it checks as the GPU's would run.
    if p.interpret:
      pl.when(wg == COMPUTE_WGS)(lambda: stream("k"))
      pl.when(wg == COMPUTE_WGS + 1)(lambda: stream("v"))
    else:
      @pl.core_map(plgpu.WarpMesh(axis_name="warp"))
      def _():
        w = lax.axis_index("warp")
        pl.when(w == 0)(lambda: stream("k"))
        pl.when(w == 1)(lambda: stream("v"))


def _interpret_params():
  """Mosaic GPU's interpreter settings (a private module in JAX 0.10-0.11: ImportError if moved)."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


# CTAs of the interpreter's persistent grid: a few, so the CPU tests run several work items a CTA
# (rounds in both directions) in little time.
INTERPRET_CTAS = 3


def attention(spec: AttentionSpec, arrays: AttentionArrays, tiles: Optional[MosaicTiles] = None,
              interpret: bool = False, profile_dir: Optional[str] = None,
              ctas: Optional[int] = None):
  """Varlen paged attention with the Mosaic GPU kernel (CUDA, sm_90a).

  Args:
    spec: the call's static description; `unsupported_reason(spec)` must be None.
    arrays: q [T, H, D]; k / v the caller's cache buffers; cu_seqlens_q i32[B + 1]; seqlens_k i32[B];
      kv_index = block_table i32[B, max_blocks]; layer i32[] or None.
    tiles: MosaicTiles (default `MosaicTiles.get_default(head_dim)`).
    interpret: run the kernel under Mosaic GPU's interpreter, on the CPU (tests: it simulates the
      warpgroups, barriers and TMA copies). The two matmuls are then f32 `dot_general`s on the
      shared-memory tiles instead of wgmma (the interpreter takes no transposed operand and no
      `run_state`), and registers carry no layouts.
    profile_dir: write Mosaic GPU's trace of each call (per CTA and warpgroup, the clock at the
      start and end of the kernel's named regions: q, first_k, loop, out, load) there, a
      `*-trace.json` file per kernel (JAX keeps the first call's; `benchmarks/mosaic_profile.py`
      summarizes it). GPU only.
    ctas: CTAs of the persistent grid (default: one per SM, `INTERPRET_CTAS` interpreted; at most
      one per work item).

  Returns:
    (out [T, H, D] in q's dtype, lse f32[H, T] or None).
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  tiles = tiles or MosaicTiles.get_default(spec.head_dim)
  why = unsupported_reason(spec, tiles, arrays.k.size, arrays.v.size)
  if why is not None:
    raise ValueError(f"the Mosaic GPU kernel cannot run this call: {why}")
  view, _ = kv_view(spec.layout)
  T, H, D = spec.total_q, spec.num_heads, spec.head_dim
  R = tiles.rows_per_program
  num_programs = spec.query_programs(R)
  if ctas is not None and (isinstance(ctas, bool) or not isinstance(ctas, int) or ctas < 1):
    raise ValueError(f"ctas must be a positive int, got {ctas!r}")
  from jax_varlen_attn.backends import device
  ctas = min(ctas or (INTERPRET_CTAS if interpret else device.num_sms()), H * num_programs)
  dtype = jnp.dtype(spec.dtype)
  # In place needs the staging tiles' shared memory, and a q at least one program tall (a TMA box
  # may not be larger than its array).
  direct = direct_rows(tiles, D, dtype.itemsize) and T >= R
  p = _Params(num_heads=H, group=spec.group_size, head_dim=D, block_size=spec.layout.block_size,
              max_blocks=spec.max_blocks, num_pages=spec.layout.num_pages, scale=spec.scale,
              window_left=spec.window_left, window_right=spec.window_right, softcap=spec.softcap,
              has_alibi=spec.has_alibi, has_sinks=spec.has_sinks, dtype=spec.dtype,
              tiles=tiles, view=view, batch=spec.batch, total_q=T, num_programs=num_programs,
              num_ctas=ctas, direct=direct, return_lse=spec.return_lse, interpret=interpret)
  table = work_table(arrays.cu_seqlens_q, arrays.seqlens_k, num_programs, R, spec.window_left,
                     spec.window_right, tiles.block_kv)
  q_in = (arrays.q if direct
          else jnp.take(arrays.q, padded_rows(table, arrays.cu_seqlens_q, T, R), axis=0))
  layer = (jnp.zeros((1,), jnp.int32) if arrays.layer is None
           else jnp.reshape(arrays.layer, (1,)).astype(jnp.int32))
  # Slopes f32[B, H] and s_aux f32[H]; one-element stand-ins where the call has none.
  alibi = (arrays.alibi.astype(jnp.float32) if spec.has_alibi else jnp.zeros((1, 1), jnp.float32))
  sinks = (arrays.s_aux.astype(jnp.float32) if spec.has_sinks else jnp.zeros((1,), jnp.float32))
  k2d = arrays.k.reshape(-1, view.width)  # row-major: a bitcast, the cache is read in place
  v2d = arrays.v.reshape(-1, view.width)
  swizzle = plgpu.SwizzleTransform(128)
  tiling = plgpu.TilingTransform((8, 128 // dtype.itemsize))

  def entry(table_ref, cu_q_ref, seqk_ref, bt_ref, layer_ref, alibi_ref, sinks_ref, q_ref, k_ref,
            v_ref, out_ref, lse_ref):
    scratch = (
        plgpu.SMEM((COMPUTE_WGS, tiles.block_q, D), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((tiles.stages, tiles.block_kv, D), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((tiles.stages, tiles.block_kv, D), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((COMPUTE_WGS, tiles.block_q), jnp.float32),
    ) + ((plgpu.SMEM((COMPUTE_WGS, tiles.block_q, D), dtype),) if direct else ())
    copies = tiles.block_kv // min(spec.layout.block_size, tiles.block_kv)
    bars = (plgpu.Barrier(num_arrivals=copies, num_barriers=tiles.stages),
            plgpu.Barrier(num_arrivals=copies, num_barriers=tiles.stages),
            plgpu.Barrier(num_barriers=COMPUTE_WGS))
    consumed = (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=tiles.stages),) * 2
    pl.run_scoped(
        lambda *scoped: _kernel(p, table_ref, cu_q_ref, seqk_ref, bt_ref, layer_ref, alibi_ref,
                                sinks_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped),
        scratch, bars, consumed, plgpu.Barrier(num_arrivals=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS), collective_axes="wg")

  out_pad, lse_pad = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((T if direct else num_programs * R, H, D), dtype),
                jax.ShapeDtypeStruct((H, num_programs * R), jnp.float32)),
      grid=(ctas,), grid_names=("cta",),
      num_threads=COMPUTE_WGS + (2 if interpret else 1), thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True, **(dict(profile_space=PROFILE_EVENTS * -(-H * num_programs // ctas),
                                    profile_dir=profile_dir)
                               if profile_dir else {})),
      **({"interpret": _interpret_params()} if interpret else {}),
  )(table, arrays.cu_seqlens_q.astype(jnp.int32), arrays.seqlens_k.astype(jnp.int32),
    arrays.kv_index.astype(jnp.int32), layer, alibi, sinks, q_in, k2d, v2d)
  out = out_pad if direct else compact_rows(out_pad, arrays.cu_seqlens_q, T, R, axis=0, fill=0)
  lse = compact_rows(lse_pad, arrays.cu_seqlens_q, T, R, axis=1, fill=jnp.inf) if spec.return_lse else None
  return out, lse
