"""The Triton kernel: FlashAttention-2 style varlen attention over a paged (or packed) KV cache.

One program handles BLOCK_Q query tokens of one sequence for one kv head, together with the GROUP
q heads that share it: its tile has BLOCK_M = BLOCK_Q * GROUP rows (query token x q head), so each
K / V tile is read once per kv head, not once per q head. The grid is static:
((cdiv(total_q, BLOCK_Q) + batch) * num_kv_heads, 1, NUM_SPLITS), query programs x kv heads on one
axis; each program finds its sequence by binary search over `cu_seqlens_q`, and the programs past
the last sequence write the padding rows (zeros).

With NUM_SPLITS > 1 (split-KV, flash-decoding, for grids too small to fill the GPU) a third grid
axis divides each program's keys into NUM_SPLITS whole-tile ranges; each split writes a normalized
partial output and its LSE, and the launcher combines them (`launcher.combine_splits`).

With TAIL_PIECES > 1 (decode tiles of long-sequence batches: `config.tail_constexprs`) the grid
ends with TAIL_SLOTS helper programs: the items past the last whole round of resident programs
have their keys split into pieces, run by their own program and the helpers, each piece writing a
partial as a split does; the last piece to finish combines them (`_tail_plan`, `_combine_pieces`).

Keys are visited in three ranges: masked tiles at the start of a left window, unmasked tiles in the
middle, masked tiles at the causal / right-window / length boundary. Tiles above the causal
diagonal are never visited. The online-softmax step is `_attend_tile`, written once and called for
both kinds of tile.

Address specializations (all `tl.constexpr`, from the static KVCacheLayout):
  IS_PAGED=False       rows `cu_seqlens_k[b] + j` of k / v [total_k, Hk, D]
  IS_PAGED=True        any layout: PAGE_STRIDE / TOKEN_STRIDE / HEAD_STRIDE are constants
                       (row-id addressing and runtime strides measured no faster: NOTES.md)
  TABLE_AHEAD          a pipelined paged tile looks the next tile's pages up itself, so Triton's
                       pipeliner sees direct K / V loads (no stage of its own for the table)
  V_AT_LOAD            an fp8 V tile is converted where it is loaded (`_fp8_to_f16`), not in the
                       dot operand's layout
  V_PAIRS              an fp8 V tile is read as 16-bit pairs of adjacent dims and split into its
                       even and odd dims in the dot operand's layout (`_fp8_pairs_to_f16`): P @ V
                       becomes two half-width dots, acc (even dims) and acc_odd
  ROWS_AFTER_LOOP      the epilogue computes its rows' store addresses anew after the key loop
                       instead of keeping the prologue's live through it (fewer registers a
                       program on fp8 caches)
  ONE_KEY_LOOP         the unmasked middle range and the masked range after it are one masked
                       loop (one pipeline fill a program; fp16 / bf16 decode tiles)
The K / V offsets of a layout (k_offset, v_offset) are runtime arguments added once to the base
pointers (the kernel body says why), so a strided cache compiles to the contiguous cache's code but
for constants (tests/triton_compile_check.py checks the instruction counts match).

KV_FP8: the cache is fp8 (e4m3 / e5m2). Tiles are loaded as fp8 (half the bytes of fp16) and
converted to the compute dtype in registers, exactly (every fp8 value is an fp16 / bf16 / f32
value). The descales are per (sequence, kv head), so one program has one of each: k_descale folds
into the score scale (q.k * k_descale * scale, once per program), v_descale into the final
normalization (acc * v_descale / l, once per row): nothing is multiplied per element in the key
loop, and the result equals dequantizing first up to f32 rounding. Q_FP8: q is fp8 too; it is
converted to fp16 (the compute dtype), q_descale joins the score scale.
USE_SINKS: each row starts its online softmax from the sink: running max s_aux[h], running sum
exp(s_aux - s_aux) = 1 (0 for a -inf sink); no extra pass, no extra term in the loop.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in log2 units so the softmax uses exp2
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _find_sequence(cu_seqlens_q_ptr, pid, batch, total_q, BLOCK_Q: tl.constexpr, PROBES: tl.constexpr):
  """(b, cu_seqlens_q[b], end of b): the largest b in [0, batch] whose first program
  `cu_seqlens_q[b] // BLOCK_Q + b` is <= pid, with its query range.

  Sequence b owns programs [its first, the next sequence's first); b == batch is the padding region
  [cu_seqlens_q[batch], total_q). A PROBES-ary search: each round loads PROBES evenly spaced
  entries of the remaining range at once, so a program's path to its first K tile has
  ceil(log_{PROBES + 1}(batch + 1)) dependent loads (2 for 200 sequences at 32 probes), not a
  binary search's log2. The bounds come out of the probes' own loads (the last probe at or below
  the answer holds its start, the first above it the end of the answer): reloading them after the
  search put one more dependent global load on every program's path.
  """
  lo = pid * 0
  hi = pid * 0 + batch
  start = tl.load(cu_seqlens_q_ptr)  # cu_seqlens_q[lo]
  end = total_q + pid * 0  # end of sequence hi
  probe = tl.arange(0, PROBES) + 1  # [PROBES]
  while lo < hi:
    # Probes lo + step, ..., lo + PROBES * step (those <= hi): every gap between them, and from
    # the last to hi, is under step <= hi - lo, so the range shrinks each round.
    step = (hi - lo + PROBES) // (PROBES + 1)
    mid = lo + probe * step  # [PROBES], increasing
    valid = mid <= hi
    offset = tl.load(cu_seqlens_q_ptr + mid, mask=valid, other=0)
    at_or_below = valid & (offset // BLOCK_Q + mid <= pid)  # the answer is >= mid
    above = valid & ~at_or_below  # the answer is < mid
    # cu_seqlens_q is nondecreasing: the largest start below, the smallest end above.
    start = tl.maximum(start, tl.max(tl.where(at_or_below, offset, start), 0))
    end = tl.minimum(end, tl.min(tl.where(above, offset, end), 0))
    new_lo = tl.max(tl.where(at_or_below, mid, lo), 0)
    hi = tl.min(tl.where(above, mid - 1, hi), 0)
    lo = new_lo
  return lo, start, end


@triton.jit
def _working_blocks(cu_seqlens_q_ptr, batch, chunk, BLOCK_Q: tl.constexpr, BATCH_CHUNK: tl.constexpr):
  """(b, starts, ends, blocks), each i32[BATCH_CHUNK]: sequences b = chunk + [0, BATCH_CHUNK), their
  query ranges and working query blocks (0 past the batch)."""
  b = chunk + tl.arange(0, BATCH_CHUNK)
  real = b < batch
  starts = tl.load(cu_seqlens_q_ptr + b, mask=real, other=0)
  ends = tl.load(cu_seqlens_q_ptr + b + 1, mask=real, other=0)
  blocks = tl.where(real, (tl.maximum(ends - starts, 0) + BLOCK_Q - 1) // BLOCK_Q, 0)
  return b, starts, ends, blocks


@triton.jit
def _tail_plan(cu_seqlens_q_ptr, batch, seq, seq_start, q_end, first, kv_head, helper,
               NUM_KV_HEADS: tl.constexpr, BLOCK_Q: tl.constexpr, BATCH_CHUNK: tl.constexpr,
               TAIL_SLOTS: tl.constexpr, TAIL_PIECES: tl.constexpr):
  """Splits the grid's last items into pieces, so its last round fills the GPU (TAIL_PIECES > 1).

  An item is a working (query block, kv head) program. Programs start in about launch order, and
  the items past the last whole round of TAIL_SLOTS resident programs (the `tail` launched last)
  would otherwise run alone, one an SM, on an otherwise idle GPU: a few items then take about a
  third of a round's time (NOTES.md). Here each tail item's keys are divided into `pieces` whole-tile
  ranges (min(TAIL_PIECES, TAIL_SLOTS // tail); 1: no split); its own program takes piece 0 and
  helper programs, launched after every item (the grid's last TAIL_SLOTS programs), the others.

  Items are numbered in the order opposite to launch: g = (working query blocks of the sequences
  before this one + this block) * NUM_KV_HEADS + kv_head, so the tail is g < tail. The counts come
  from cu_seqlens_q read in vectors of BATCH_CHUNK sequences (one for batches under BATCH_CHUNK;
  a helper reads them twice: once for the tail, once for its item's sequence).

  seq, seq_start, q_end, first, kv_head: an item's program's own (from `_find_sequence`); helper:
  this program's index among the helpers (< 0 for an item's own program). Returns (seq, seq_start,
  q_end, first, kv_head, slot, piece, pieces): a helper's item (first = -1 for a helper without
  one, which then exits), slot (the tail item's index g, -1 outside the tail) and this program's
  piece of `pieces`.
  """
  total = batch * 0  # working blocks of the batch
  before = batch * 0  # of the sequences before `seq` (an item's own program)
  for chunk in range(0, batch, BATCH_CHUNK):
    b, _, _, blocks = _working_blocks(cu_seqlens_q_ptr, batch, chunk, BLOCK_Q, BATCH_CHUNK)
    total += tl.sum(blocks, 0)
    before += tl.sum(tl.where(b < seq, blocks, 0), 0)
  tail = total * NUM_KV_HEADS % TAIL_SLOTS
  pieces = tl.where(tail > 0, tl.minimum(TAIL_SLOTS // tl.maximum(tail, 1), TAIL_PIECES), 1)
  if helper >= 0:
    slot = helper // tl.maximum(pieces - 1, 1)
    piece = 1 + helper % tl.maximum(pieces - 1, 1)
    block = slot // NUM_KV_HEADS  # the item's working block, counted from sequence 0's first
    kv_head = slot % NUM_KV_HEADS
    # Its sequence: the one whose blocks [done, done + blocks) hold `block`.
    seq = batch * 0
    seq_start = batch * 0
    q_end = batch * 0
    before = batch * 0
    done = batch * 0
    for chunk in range(0, batch, BATCH_CHUNK):
      _, starts, ends, blocks = _working_blocks(cu_seqlens_q_ptr, batch, chunk, BLOCK_Q, BATCH_CHUNK)
      upto = done + tl.cumsum(blocks, 0)  # blocks up to and including each sequence
      wholly_before = upto <= block
      holds = ~wholly_before & (upto - blocks <= block)
      seq += tl.sum(tl.where(wholly_before, 1, 0), 0)
      before += tl.sum(tl.where(wholly_before, blocks, 0), 0)
      seq_start += tl.sum(tl.where(holds, starts, 0), 0)
      q_end += tl.sum(tl.where(holds, ends, 0), 0)
      done += tl.sum(blocks, 0)
    first = (block - before) * BLOCK_Q
    first = tl.where((pieces > 1) & (slot < tail), first, -1)
  else:
    slot = (before + first // BLOCK_Q) * NUM_KV_HEADS + kv_head
    piece = slot * 0
    slot = tl.where((pieces > 1) & (slot < tail) & (seq < batch), slot, -1)
    pieces = tl.where(slot >= 0, pieces, 1)
  return seq, seq_start, q_end, first, kv_head, slot, piece, pieces


@triton.jit
def _merge_piece(m, total, acc, part_ptr, part_lse_ptr, at, BLOCK_M: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
  """One piece's partial (slot `at`: normalized output f32[BLOCK_M, HEAD_DIM_PAD], LSE f32[BLOCK_M],
  -inf where it saw no key) merged into the running (row max m, weight total, weighted sum acc)."""
  rows = tl.arange(0, BLOCK_M)
  lse = tl.load(part_lse_ptr + at * BLOCK_M + rows, cache_modifier=".cg")
  part = tl.load(part_ptr + (at * BLOCK_M + rows)[:, None] * HEAD_DIM_PAD + tl.arange(0, HEAD_DIM_PAD)[None, :],
                 cache_modifier=".cg")
  m_new = tl.maximum(m, lse)
  m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
  alpha = tl.exp(m - m_ref)
  weight = tl.exp(lse - m_ref)
  return m_new, total * alpha + weight, acc * alpha[:, None] + weight[:, None] * part


@triton.jit
def _combine_pieces(part_ptr, part_lse_ptr, slot, pieces, BLOCK_M: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
  """(out f32[BLOCK_M, HEAD_DIM_PAD], lse f32[BLOCK_M] natural log, +inf for a row no piece saw) of
  one tail item from its pieces' partials (each normalized, LSE -inf where it saw no key), as
  `launcher.combine_splits` merges split-KV partials. Read past L1 (.cg): other programs wrote them."""
  m = tl.full([BLOCK_M], float("-inf"), tl.float32)
  total = tl.zeros([BLOCK_M], tl.float32)
  acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
  for p in range(0, pieces):
    m, total, acc = _merge_piece(m, total, acc, part_ptr, part_lse_ptr, slot * pieces + p, BLOCK_M, HEAD_DIM_PAD)
  seen = total > 0.0
  out = acc / tl.where(seen, total, 1.0)[:, None]
  return out, tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("inf"))


@triton.jit
def _tanh(x):
  # tanh through exp2: saturates cleanly to +-1 (exp2 -> inf gives 1 - 0), no inf / inf.
  return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _dequant_scales(q, q_descale_ptr, k_descale_ptr, v_descale_ptr, seq, kv_head, scale,
                    NUM_KV_HEADS: tl.constexpr, Q_FP8: tl.constexpr):
  """(qk_scale f32, v_scale f32, q) of an fp8 cache, for this program's (sequence, kv head).

  qk_scale = scale * |k_descale (* q_descale)|, kept positive: the unmasked tile takes the row max
  of the raw scores times qk_scale, which is the max of the scaled scores only for a positive
  factor. A negative descale product negates q instead (exact, once per program). An fp8 q becomes
  fp16, the compute dtype (exact).
  """
  idx = seq * NUM_KV_HEADS + kv_head
  descale = tl.load(k_descale_ptr + idx)
  if Q_FP8:
    q = q.to(tl.float16)
    descale *= tl.load(q_descale_ptr + idx)
  q = tl.where(descale < 0.0, -q, q)
  return scale * tl.abs(descale), tl.load(v_descale_ptr + idx), q


@triton.jit
def _sink_start(sinks_ptr, head, with_sink):
  """(m f32[BLOCK_M] in log2 units, l f32[BLOCK_M]): where each row's online softmax starts.

  A row `with_sink` starts from its head's sink: m = s_aux[head], l = exp2(m - m) = 1 (0 for a
  -inf sink, which is none); every other row from m = -inf, l = 0 (the empty softmax).
  """
  m = tl.load(sinks_ptr + head, mask=with_sink, other=float("-inf")) * LOG2E
  return m, tl.where(m > float("-inf"), 1.0, 0.0)


@triton.jit
def _lane_offsets(kv_head, IS_PAGED: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, TOKEN_STRIDE: tl.constexpr,
                  HEAD_STRIDE: tl.constexpr):
  """i32[BLOCK_N]: element offset of each key lane (kv_head, dim 0) from its tile's `_tile_offsets`.

  The same for every tile: every tile starts at a multiple of BLOCK_N (the kernel's key ranges are
  whole tiles), so a key's place in its page depends on its lane only. Kept apart from the tile's
  page offsets so each tile's addresses cost one wide multiply-add per pointer (about 10% fewer
  instructions).
  """
  lane = tl.arange(0, BLOCK_N)  # [BLOCK_N]
  if not IS_PAGED:
    return (lane * NUM_KV_HEADS + kv_head) * HEAD_DIM
  return (lane % PAGE_SIZE) * TOKEN_STRIDE + kv_head * HEAD_STRIDE


@triton.jit
def _tile_offsets(kv_index_ptr, seq, k_start, n_start, len_k,
                  MASKED: tl.constexpr, IS_PAGED: tl.constexpr, SINGLE_PAGE_TILE: tl.constexpr,
                  NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  PAGE_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, NUM_PAGES: tl.constexpr,
                  PAGE_STRIDE: tl.constexpr, TOKEN_STRIDE: tl.constexpr):
  """i64[BLOCK_N]: element offset of the pages holding keys [n_start, n_start + BLOCK_N) in a
  layer's K (or V): all that changes from tile to tile (the page-table lookup). MASKED tiles read
  the table only for keys below len_k. int64 even where int32 would hold every offset: int32
  measured slower on prefill (NOTES.md "Tile rules").
  """
  lane = tl.arange(0, BLOCK_N)  # [BLOCK_N]
  if not IS_PAGED:
    return (k_start + n_start).to(tl.int64) * (NUM_KV_HEADS * HEAD_DIM) + tl.zeros_like(lane).to(tl.int64)
  first_token = 0
  if SINGLE_PAGE_TILE:
    # The whole tile lies in one page: one scalar page lookup, and offsets the compiler sees as
    # contiguous. Where in its page the tile starts (BLOCK_N < PAGE_SIZE) moves with the tile.
    page = tl.load(kv_index_ptr + seq * MAX_BLOCKS + tl.minimum(n_start // PAGE_SIZE, MAX_BLOCKS - 1))
    page = page + tl.zeros_like(lane)  # [BLOCK_N], one value
    first_token = n_start % PAGE_SIZE
  else:
    offs_n = n_start + lane
    block = tl.minimum(offs_n // PAGE_SIZE, MAX_BLOCKS - 1)
    if MASKED:
      page = tl.load(kv_index_ptr + seq * MAX_BLOCKS + block, mask=offs_n < len_k, other=0)
    else:
      page = tl.load(kv_index_ptr + seq * MAX_BLOCKS + block)
  # A block-table entry out of range is clamped into the cache: never a read outside the buffer.
  page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1).to(tl.int64)
  return page * PAGE_STRIDE + first_token * TOKEN_STRIDE


@triton.jit
def _fp8_to_f16(x):
  """fp8 (e4m3 / e5m2) -> fp16 by the PTX conversion Triton itself emits (sm_89+), as opaque inline
  assembly: Triton then converts the tile in the layout it was loaded in and stages fp16 in shared
  memory for the dot's ldmatrix, instead of reading the fp8 bytes one at a time in the operand's
  layout (no 8-bit ldmatrix.trans for P @ V's B operand). Exact: every fp8 value is an fp16 value."""
  if x.dtype == tl.float8e5:
    return tl.inline_asm_elementwise(
        "{ .reg .b16 a<2>; mov.b32 {a0, a1}, $2; cvt.rn.f16x2.e5m2x2 $0, a0; cvt.rn.f16x2.e5m2x2 $1, a1; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)
  return tl.inline_asm_elementwise(
      "{ .reg .b16 a<2>; mov.b32 {a0, a1}, $2; cvt.rn.f16x2.e4m3x2 $0, a0; cvt.rn.f16x2.e4m3x2 $1, a1; }",
      "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _fp8_pairs_to_f16(x, E5M2: tl.constexpr):
  """(even, odd) f16[N, D / 2] from i16[N, D / 2], each element the fp8 values of dims 2j (low byte)
  and 2j + 1 (high byte).

  Pure elementwise PTX, so Triton moves it after the tile's 16-bit ldmatrix.trans in P @ V's
  operand layout (as for an fp16 tile) instead of reading fp8 bytes one at a time. Two elements a
  32-bit register: prmt gathers their low (high) bytes, one cvt converts the pair (an e5m2 byte is
  the high byte of its fp16, so prmt alone). Exact, NaN and subnormals included.
  """
  if E5M2:  # an e5m2 byte is the high byte of the fp16 of its value
    return tl.inline_asm_elementwise(
        "{ prmt.b32 $0, $2, 0, 0x2404; prmt.b32 $1, $2, 0, 0x3414; }",
        "=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
  return tl.inline_asm_elementwise(
      "{ .reg .b32 t<2>; .reg .b16 l<2>, h<2>; prmt.b32 t0, $2, 0, 0x0020; prmt.b32 t1, $2, 0, 0x0031; "
      "mov.b32 {l0, h0}, t0; mov.b32 {l1, h1}, t1; cvt.rn.f16x2.e4m3x2 $0, l0; cvt.rn.f16x2.e4m3x2 $1, l1; }",
      "=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def _attend_tile(acc, acc_odd, m_i, l_i, q, k_base, v_base, tile_off, fixed_off, n_start, len_k,
                 diag, key_lo, key_hi, slopes, qk_scale, softcap,
                 MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 KV_FP8: tl.constexpr, V_AT_LOAD: tl.constexpr, V_PAIRS: tl.constexpr,
                 V_E5M2: tl.constexpr):
  """One online-softmax step over keys [n_start, n_start + BLOCK_N).

  acc: f32[BLOCK_M, HEAD_DIM_PAD] (V_PAIRS: acc / acc_odd f32[BLOCK_M, HEAD_DIM_PAD / 2], the even /
  odd dims; else acc_odd is a placeholder passed through); m_i, l_i: f32[BLOCK_M] (log2 units);
  q: [BLOCK_M, HEAD_DIM_PAD]
  in the compute dtype (KV_FP8: K / V tiles are converted to it, exactly; their descales are the
  caller's: folded into qk_scale and the final normalization);
  tile_off: i64[BLOCK_N] the tile's page offsets (`_tile_offsets`), fixed_off: i32[BLOCK_N] its
  lanes' (`_lane_offsets`);
  diag: i32[BLOCK_M] key position of each row's query (i + len_k - len_q); key_lo, key_hi:
  i32[BLOCK_M] each row's allowed keys [key_lo, key_hi) (length, causal and window bounds);
  slopes: f32[BLOCK_M]. MASKED tiles apply key_lo / key_hi; unmasked tiles are wholly allowed.
  """
  offs_n = n_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
  offs_d = tl.arange(0, HEAD_DIM_PAD)  # [HEAD_DIM_PAD]
  key_ok = offs_n < len_k  # [BLOCK_N]
  # Loop-invariant part first (hoisted), the tile's page offsets last.
  k_ptrs = (k_base + fixed_off[None, :] + offs_d[:, None]) + tile_off[None, :]  # [D_PAD, BLOCK_N]
  if V_PAIRS:  # i16 pairs of adjacent dims (v_base is an i16 pointer): half the columns and offsets
    offs_v = tl.arange(0, HEAD_DIM_PAD // 2)
    v_ptrs = (v_base + (fixed_off >> 1)[:, None] + offs_v[None, :]) + (tile_off >> 1)[:, None]
    v_cols = HEAD_DIM // 2
    v_zero = 0
  else:
    offs_v = offs_d
    v_ptrs = (v_base + fixed_off[:, None] + offs_v[None, :]) + tile_off[:, None]  # [BLOCK_N, D_PAD]
    v_cols = HEAD_DIM
    v_zero = 0.0
  if MASKED:
    # Masked keys may be poison (the unused tail of a last page): other=0 keeps 0 * NaN out of P @ V.
    k = tl.load(k_ptrs, mask=key_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    v = tl.load(v_ptrs, mask=key_ok[:, None] & (offs_v[None, :] < v_cols), other=v_zero)
  elif HEAD_DIM == HEAD_DIM_PAD:
    k = tl.load(k_ptrs)
    v = tl.load(v_ptrs)
  else:
    k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    v = tl.load(v_ptrs, mask=offs_v[None, :] < v_cols, other=v_zero)
  if KV_FP8:  # fp8 from memory, the compute dtype in registers (exact: no rounding)
    k = k.to(q.dtype)
    if V_PAIRS:
      v, v_odd = _fp8_pairs_to_f16(v, V_E5M2)
    elif V_AT_LOAD:
      v = _fp8_to_f16(v).to(q.dtype)
    else:
      v = v.to(q.dtype)

  s = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] f32, raw q . k
  if not MASKED and not USE_SOFTCAP and not USE_ALIBI:
    # The hot tile of plain attention: the scale (positive: the API checks) commutes with the row
    # max, so each score costs one fused multiply-add (s * c - m) before exp2, not a multiply and a
    # subtract.
    m_new = tl.maximum(m_i, tl.max(s, 1) * (qk_scale * LOG2E))
    p = tl.math.exp2(s * (qk_scale * LOG2E) - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # m_i = -inf on a first tile: alpha = 0, acc and l_i are 0
  else:
    scale = 1.0  # s below is in log2 units already, or scaled by qk_scale * LOG2E with the FMA
    if USE_SOFTCAP:
      s = softcap * _tanh(s * (qk_scale / softcap)) * LOG2E
    elif USE_ALIBI:
      s = s * (qk_scale * LOG2E)
    else:
      scale = qk_scale * LOG2E
    if USE_ALIBI:
      rel = diag[:, None] - offs_n[None, :]  # [BLOCK_M, BLOCK_N]: (i + len_k - len_q) - j
      s = s - slopes[:, None] * tl.abs(rel).to(tl.float32) * LOG2E
    if MASKED:
      # key_lo / key_hi hold each row's allowed keys (length, causal / window bounds), one
      # compare per bound and score.
      allowed = offs_n[None, :] < key_hi[:, None]  # [BLOCK_M, BLOCK_N]
      if WINDOW_LEFT >= 0:
        allowed = allowed & (offs_n[None, :] >= key_lo[:, None])
      s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    m_ref = m_new
    if MASKED:
      # A row that has seen no allowed key yet has m = -inf: subtract 0 so exp2 gives 0, not NaN.
      m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * scale - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
  l_i = l_i * alpha + tl.sum(p, 1)
  # P @ V accumulates into the rescaled accumulator in place (the MMA's own accumulator operand).
  if V_PAIRS:  # even and odd dims of V, each half the width
    p = p.to(tl.float16)
    acc = tl.dot(p, v, acc * alpha[:, None])
    acc_odd = tl.dot(p, v_odd, acc_odd * alpha[:, None])
  else:
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
  return acc, acc_odd, m_new, l_i


@triton.jit
def _fresh_state(BLOCK_M: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, V_PAIRS: tl.constexpr):
  """(acc, acc_odd, m_i, l_i) of `_attend_tile` before a row's first key: zeros, and m = -inf. V_PAIRS:
  acc / acc_odd f32[BLOCK_M, HEAD_DIM_PAD / 2] (even / odd dims); else acc f32[BLOCK_M, HEAD_DIM_PAD]
  and acc_odd a placeholder _attend_tile passes through."""
  if V_PAIRS:
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD // 2], tl.float32)
    acc_odd = tl.zeros([BLOCK_M, HEAD_DIM_PAD // 2], tl.float32)
  else:
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    acc_odd = tl.zeros([1], tl.float32)
  return acc, acc_odd, tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)


@triton.jit
def _opaque_zero(x):
  """i32 zeros shaped like x that the compiler cannot see are zero, nor compute before x exists."""
  return tl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _tile_rows(offs_m, offs_d, first, len_q, q_start, kv_head, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr,
               NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
  """Rows of a program's tile. offs_m: i32[BLOCK_M] tile rows = (query token, q head in the group);
  offs_d: i32[HEAD_DIM_PAD].

  Returns q_idx (query index in the sequence), head (q head), row_ok, q_row (row of q / out),
  qo_off (element offset of the row's first dim in q / out), all [BLOCK_M], and io_mask
  [BLOCK_M, HEAD_DIM_PAD] (real rows, real dims).
  """
  q_idx = first + offs_m // GROUP
  head = kv_head * GROUP + offs_m % GROUP
  row_ok = (offs_m < BLOCK_Q * GROUP) & (q_idx < len_q)
  q_row = q_start + q_idx
  qo_off = (q_row * NUM_HEADS + head) * HEAD_DIM  # (launcher keeps q's size < 2**31)
  io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
  return q_idx, head, row_ok, q_row, qo_off, io_mask


@triton.jit
def varlen_attention_kernel(
    # inputs
    q_ptr,  # [total_q, NUM_HEADS, HEAD_DIM]
    k_ptr,  # flat K buffer (paged: as the layout says; non-paged: [total_k, Hk, HEAD_DIM])
    v_ptr,  # flat V buffer (the K buffer again when V is fused into it)
    cu_seqlens_q_ptr,  # i32[batch + 1]
    seqlens_k_ptr,  # i32[batch]
    kv_index_ptr,  # paged: block_table i32[batch, MAX_BLOCKS]; else cu_seqlens_k i32[batch + 1]
    alibi_ptr,  # f32[batch, NUM_HEADS] (USE_ALIBI)
    layer_ptr,  # i32[1] (IS_STACKED)
    q_descale_ptr,  # f32[batch, NUM_KV_HEADS] (Q_FP8)
    k_descale_ptr, v_descale_ptr,  # f32[batch, NUM_KV_HEADS] (KV_FP8)
    sinks_ptr,  # f32[NUM_HEADS] (USE_SINKS): s_aux
    k_offset, v_offset,  # elements from the buffers' starts to K's / V's page 0 (added once, below)
    scale,  # f32 softmax scale
    softcap,  # f32 (USE_SOFTCAP)
    batch,  # number of sequences
    total_q,  # rows of q (padding included)
    tail_in_ptr,  # i32[TAIL_SLOTS // 2] zeros (TAIL_PIECES > 1): tail_ptr's input, never read here
    # outputs
    tail_ptr,  # i32[TAIL_SLOTS // 2]: pieces of each tail item done (the same buffer as tail_in_ptr)
    out_ptr,  # [total_q, NUM_HEADS, HEAD_DIM] q's dtype; split-KV: f32[NUM_SPLITS, total_q, H, D]
    lse_ptr,  # f32[NUM_HEADS, total_q] (RETURN_LSE); split-KV: f32[NUM_SPLITS, NUM_HEADS, total_q]
    part_ptr,  # f32[TAIL_SLOTS, BLOCK_M, HEAD_DIM_PAD] (TAIL_PIECES > 1): the tail pieces' outputs
    part_lse_ptr,  # f32[TAIL_SLOTS, BLOCK_M]: and their LSEs
    # shape
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    # cache addressing
    IS_PAGED: tl.constexpr, SINGLE_PAGE_TILE: tl.constexpr, PAGE_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr,
    NUM_PAGES: tl.constexpr, KV_ROWS: tl.constexpr, PAGE_STRIDE: tl.constexpr,
    TOKEN_STRIDE: tl.constexpr, HEAD_STRIDE: tl.constexpr, OFFSET_MULTIPLE: tl.constexpr,
    IS_STACKED: tl.constexpr, NUM_LAYERS: tl.constexpr,
    LAYER_STRIDE: tl.constexpr,
    # semantics
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, Q_FP8: tl.constexpr, USE_SINKS: tl.constexpr,
    # pipeline
    TABLE_AHEAD: tl.constexpr, V_AT_LOAD: tl.constexpr, V_PAIRS: tl.constexpr, V_E5M2: tl.constexpr,
    ROWS_AFTER_LOOP: tl.constexpr, SEARCH_PROBES: tl.constexpr, ONE_KEY_LOOP: tl.constexpr,
    # the grid's last round (`_tail_plan`)
    TAIL_PIECES: tl.constexpr, TAIL_SLOTS: tl.constexpr, BATCH_CHUNK: tl.constexpr,
):
  # One grid axis of (query program, kv head) pairs, kv head fastest. The GPU starts programs in
  # about launch order, so query programs go from the last to the first: under a causal mask a
  # sequence's last query block sees the most keys, and launching the light ones first
  # (prefill_4x4096: 1 to 64 key tiles each) leaves the heaviest for a ragged last wave (NOTES.md).
  # With TAIL_PIECES > 1 the grid's last TAIL_SLOTS programs are helpers (`_tail_plan`).
  helper = tl.program_id(0) - (tl.num_programs(0) - (TAIL_SLOTS if TAIL_PIECES > 1 else 0))
  num_query_programs = (tl.num_programs(0) - (TAIL_SLOTS if TAIL_PIECES > 1 else 0)) // NUM_KV_HEADS
  kv_head = tl.program_id(0) % NUM_KV_HEADS
  pid = tl.maximum(num_query_programs - 1 - tl.program_id(0) // NUM_KV_HEADS, 0)
  seq, seq_start, q_end = _find_sequence(cu_seqlens_q_ptr, pid, batch, total_q, BLOCK_Q, SEARCH_PROBES)
  first = (pid - (seq_start // BLOCK_Q + seq)) * BLOCK_Q  # first query of this program in its sequence
  # Split-KV: split `split` of NUM_SPLITS writes its partial (normalized output, LSE) to its own
  # slice of out [NUM_SPLITS, total_q, H, D] f32 / lse [NUM_SPLITS, H, total_q]; the launcher
  # combines them. A row with no key in a split has LSE -inf there (weight 0 in the combine). A
  # tail item's pieces (`_tail_plan`) likewise, into part_ptr / part_lse_ptr, and the last piece
  # to finish combines them (`_combine_pieces`).
  split = tl.program_id(2)
  pieces = NUM_SPLITS
  slot = -1
  if TAIL_PIECES > 1:
    seq, seq_start, q_end, first, kv_head, slot, split, pieces = _tail_plan(
        cu_seqlens_q_ptr, batch, seq, seq_start, q_end, first, kv_head, helper, NUM_KV_HEADS, BLOCK_Q,
        BATCH_CHUNK, TAIL_SLOTS, TAIL_PIECES)
  q_start = tl.minimum(tl.maximum(seq_start, 0), total_q)
  q_end = tl.minimum(tl.maximum(q_end, q_start), total_q)
  len_q = q_end - q_start
  if (first >= len_q) | (first < 0):
    return

  offs_d = tl.arange(0, HEAD_DIM_PAD)  # [HEAD_DIM_PAD]
  q_idx, head, row_ok, q_row, qo_off, io_mask = _tile_rows(tl.arange(0, BLOCK_M), offs_d, first, len_q, q_start,
                                                           kv_head, GROUP, BLOCK_Q, NUM_HEADS, HEAD_DIM)

  if NUM_SPLITS > 1:
    out_ptr += split * (total_q * NUM_HEADS * HEAD_DIM)
    lse_ptr += split * (NUM_HEADS * total_q)
  EMPTY_LSE: tl.constexpr = float("inf") if NUM_SPLITS == 1 else float("-inf")

  if seq == batch:  # padding rows past cu_seqlens_q[-1]: a defined zero output
    tl.store(out_ptr + qo_off[:, None] + offs_d[None, :],
             tl.zeros([BLOCK_M, HEAD_DIM_PAD], out_ptr.dtype.element_ty), mask=io_mask)
    if RETURN_LSE or NUM_SPLITS > 1:
      tl.store(lse_ptr + head * total_q + q_row, tl.full([BLOCK_M], EMPTY_LSE, tl.float32),
               mask=row_ok)
    return

  q = tl.load(q_ptr + qo_off[:, None] + offs_d[None, :], mask=io_mask, other=0.0)  # [BLOCK_M, D_PAD]
  qk_scale = scale
  v_scale = 1.0
  if KV_FP8:
    qk_scale, v_scale, q = _dequant_scales(q, q_descale_ptr, k_descale_ptr, v_descale_ptr, seq, kv_head,
                                           scale, NUM_KV_HEADS, Q_FP8)

  # Keys of this sequence and where they live.
  len_k = tl.maximum(tl.load(seqlens_k_ptr + seq), 0)
  k_start = 0
  if IS_PAGED:
    len_k = tl.minimum(len_k, MAX_BLOCKS * PAGE_SIZE)
  else:
    k_start = tl.minimum(tl.maximum(tl.load(kv_index_ptr + seq), 0), KV_ROWS)
    len_k = tl.minimum(len_k, KV_ROWS - k_start)
  # K / V offsets are runtime values added to the scalar base pointers once per program. As
  # constants they were split off again by the compiler (LLVM moves constant offsets outward, for
  # addressing-mode immediates that the cp.async loads cannot take) and re-added per pointer per
  # tile: one more 64-bit add per loaded vector than a contiguous cache (offset 0), and the
  # strided / contiguous gap of the small seed cases (sm_90 SASS, seed2: 2983 vs 2503
  # instructions).
  # The layout keeps them non-negative multiples of HEAD_DIM. `x // M * M` (the identity for
  # M = OFFSET_MULTIPLE, HEAD_DIM's power-of-two factor) tells the compiler so: without it (an
  # unknown base alignment) it gave up 16-byte loads and their cp.async pipeline. (tl.multiple_of
  # has no effect on a scalar argument.)
  k_base = k_ptr + k_offset // OFFSET_MULTIPLE * OFFSET_MULTIPLE
  v_base = v_ptr + v_offset // OFFSET_MULTIPLE * OFFSET_MULTIPLE
  if IS_STACKED:
    # The layer is data (a traced scalar): its offset is added here, never by slicing the cache.
    layer = tl.minimum(tl.maximum(tl.load(layer_ptr), 0), NUM_LAYERS - 1).to(tl.int64)
    k_base += layer * LAYER_STRIDE
    v_base += layer * LAYER_STRIDE

  shift = len_k - len_q  # bottom-right alignment: query i sits at key position i + shift
  diag = q_idx + shift  # [BLOCK_M]
  diag_lo = first + shift
  diag_hi = tl.minimum(first + BLOCK_Q, len_q) - 1 + shift
  key_hi = tl.zeros_like(diag) + len_k  # [BLOCK_M]: allowed keys of each row are [key_lo, key_hi)
  if WINDOW_RIGHT >= 0:
    key_hi = tl.minimum(key_hi, diag + (WINDOW_RIGHT + 1))
  key_lo = diag - WINDOW_LEFT  # [BLOCK_M], used only if WINDOW_LEFT >= 0
  slopes = tl.zeros([BLOCK_M], tl.float32)
  if USE_ALIBI:
    slopes = tl.load(alibi_ptr + seq * NUM_HEADS + head, mask=row_ok, other=0.0)

  # Key ranges: [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked.
  hi = len_k
  full_hi = len_k
  if WINDOW_RIGHT >= 0:  # causal sets WINDOW_RIGHT = 0: tiles above the diagonal are skipped
    hi = tl.minimum(len_k, diag_hi + WINDOW_RIGHT + 1)
    full_hi = tl.minimum(len_k, diag_lo + WINDOW_RIGHT + 1)
  lo = 0
  full_lo = 0
  if WINDOW_LEFT >= 0:
    lo = tl.maximum(diag_lo - WINDOW_LEFT, 0) // BLOCK_N * BLOCK_N
    full_lo = (tl.maximum(diag_hi - WINDOW_LEFT, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
  hi = tl.maximum(hi, lo)
  full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
  full_hi = tl.maximum(tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N, full_lo)
  full_hi = tl.minimum(full_hi, tl.maximum(hi // BLOCK_N * BLOCK_N, full_lo))
  # This split's keys: [split_lo, split_hi), whole tiles from lo (so tile starts stay aligned).
  split_lo = lo
  split_hi = hi
  if NUM_SPLITS > 1 or TAIL_PIECES > 1:
    per_split = ((hi - lo + pieces - 1) // pieces + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    split_lo = lo + split * per_split
    split_hi = tl.minimum(hi, split_lo + per_split)

  fixed_off = _lane_offsets(kv_head, IS_PAGED, NUM_KV_HEADS, HEAD_DIM, BLOCK_N, PAGE_SIZE, TOKEN_STRIDE,
                            HEAD_STRIDE)  # [BLOCK_N]
  if V_PAIRS:
    v_base = v_base.to(tl.pointer_type(tl.int16))
  acc, acc_odd, m_i, l_i = _fresh_state(BLOCK_M, HEAD_DIM_PAD, V_PAIRS)
  if USE_SINKS:
    # Split-KV: the sink joins split 0's partial only, so the combine counts it once.
    m_i, l_i = _sink_start(sinks_ptr, head, row_ok & (tl.zeros_like(head) + split == 0))
  if ONE_KEY_LOOP:
    # (fp16 / bf16 decode tiles) the middle range joins the masked one after it, so a sequence
    # whose length is no multiple of BLOCK_N runs one pipelined loop, not a second one (and its
    # fill) for its last partial tile.
    full_hi = full_lo
  for phase in tl.static_range(3 - ONE_KEY_LOOP):
    # phase 0: [lo, full_lo) masked; 1: [full_lo, full_hi) unmasked; 2: [full_hi, hi) masked
    # (ONE_KEY_LOOP: phase 1 is the masked [full_lo, hi)).
    if phase == 0:
      start, stop = lo, full_lo
    elif phase == 1 and not ONE_KEY_LOOP:
      start, stop = full_lo, full_hi
    else:
      start, stop = full_hi, hi
    n_lo = tl.maximum(start, split_lo)
    if TABLE_AHEAD:
      ahead = _tile_offsets(kv_index_ptr, seq, k_start, n_lo, len_k, True, IS_PAGED, SINGLE_PAGE_TILE,
                            NUM_KV_HEADS, HEAD_DIM, BLOCK_N, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES,
                            PAGE_STRIDE, TOKEN_STRIDE)
    masked = phase != 1 or ONE_KEY_LOOP
    for n in range(n_lo, tl.minimum(stop, split_hi), BLOCK_N):
      if TABLE_AHEAD:
        # The next tile's pages are looked up now, a tile before its K / V copies need them.
        tile_off = ahead
        ahead = _tile_offsets(kv_index_ptr, seq, k_start, n + BLOCK_N, len_k, True, IS_PAGED,
                              SINGLE_PAGE_TILE, NUM_KV_HEADS, HEAD_DIM, BLOCK_N, PAGE_SIZE, MAX_BLOCKS,
                              NUM_PAGES, PAGE_STRIDE, TOKEN_STRIDE)
      else:
        tile_off = _tile_offsets(kv_index_ptr, seq, k_start, n, len_k, masked, IS_PAGED,
                                 SINGLE_PAGE_TILE, NUM_KV_HEADS, HEAD_DIM, BLOCK_N, PAGE_SIZE, MAX_BLOCKS,
                                 NUM_PAGES, PAGE_STRIDE, TOKEN_STRIDE)
      acc, acc_odd, m_i, l_i = _attend_tile(
          acc, acc_odd, m_i, l_i, q, k_base, v_base, tile_off, fixed_off, n, len_k, diag, key_lo, key_hi, slopes,
          qk_scale, softcap, masked, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT,
          USE_SOFTCAP, USE_ALIBI, DOT_PRECISION, KV_FP8, V_AT_LOAD, V_PAIRS, V_E5M2)

  # Rows that saw no allowed key (nor a sink) output zeros and LSE +inf (-inf in a split); a row
  # with a sink has l_i > 0 (a row that saw no key: acc = 0, l_i = 1: zeros and LSE = s_aux).
  seen = l_i > 0.0
  if ROWS_AFTER_LOOP:
    # The rows' store addresses again, from a zero the compiler cannot hoist above the loop: kept
    # from before it, they stay live through every tile (registers measured: Config.constexprs).
    _, head, row_ok, q_row, qo_off, io_mask = _tile_rows(tl.arange(0, BLOCK_M) + _opaque_zero(l_i), offs_d,
                                                         first, len_q, q_start, kv_head, GROUP, BLOCK_Q,
                                                         NUM_HEADS, HEAD_DIM)
  if V_PAIRS:  # dims back in order: 2j from acc, 2j + 1 from acc_odd
    acc = tl.reshape(tl.join(acc, acc_odd), [BLOCK_M, HEAD_DIM_PAD])
  if KV_FP8:  # v_descale applied once per row, with the normalization
    out = acc * (v_scale / tl.where(seen, l_i, 1.0))[:, None]
  else:
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
  lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, EMPTY_LSE)
  if TAIL_PIECES > 1:
    if slot >= 0:  # a tail item's piece: its partial, then the last piece to finish combines
      at = slot * pieces + split
      tile_row = tl.arange(0, BLOCK_M)
      tl.store(part_ptr + (at * BLOCK_M + tile_row)[:, None] * HEAD_DIM_PAD + offs_d[None, :], out)
      tl.store(part_lse_ptr + at * BLOCK_M + tile_row, tl.where(seen, lse, float("-inf")))
      tl.debug_barrier()  # every thread's partial is written before the count says so (release)
      done = tl.atomic_add(tail_ptr + slot, 1, sem="acq_rel", scope="gpu")
      if done == pieces - 1:
        out, lse = _combine_pieces(part_ptr, part_lse_ptr, slot, pieces, BLOCK_M, HEAD_DIM_PAD)
      # Row-shaped, not a scalar `&` (which Triton's interpreter turns into int32).
      row_ok = row_ok & (tl.zeros_like(row_ok.to(tl.int32)) + done == pieces - 1)
      io_mask = io_mask & row_ok[:, None]
  tl.store(out_ptr + qo_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)
  if RETURN_LSE or NUM_SPLITS > 1:
    tl.store(lse_ptr + head * total_q + q_row, lse, mask=row_ok)
