#!/usr/bin/env python3
"""Experiment (issue 16): a persistent, stream-K decode grid against our Triton decode kernel.

NOTES session 24 item 3 measured what a round of resident decode programs costs: the same bytes
read in 3 rounds of e4m3 programs take 0.2397 ms (88.3% of the read ceiling), in 1 round 0.2270
(93.1%): ~6.4 us a round, the start and end of 4 programs an SM that run in step. seed4_distinct
runs 3.1 rounds (86.4%). This kernel removes the rounds: one program per resident slot (SMs x
programs an SM), each taking an equal share of all the key tiles of the batch, in one flat loop
whose software pipeline runs on from one (sequence, kv head) item into the next, so a program pays
its start once. An item cut by a share's edge is finished in pieces (each a normalized partial and
its LSE, as split-KV writes); the last piece to finish combines them.

What it covers: decode only (one query per sequence), a paged NHD cache, fp16 or fp8
(e4m3 / e5m2 with per-(sequence, kv head) descales, V read as 16-bit pairs as the library's fp8
decode tile does), no window / softcap / ALiBi / sinks / LSE output. The online-softmax step and
the tile addressing are the library's (`kernel._attend_tile`, `_tile_offsets`, `_lane_offsets`, `_merge_piece`).
Not used by the library: a measurement.

  python benchmarks/decode_stream_k.py --cases seed4,198x2336,16x600 --sets 2

prints, per case and kv dtype, this kernel's device time and our Triton kernel's
(flash_attn_varlen_func) on the same cache, each checked against `reference` (the semantics in f32
on the GPU) and given as % of the read ceiling measured in the same run. CPU:
`TRITON_INTERPRET=1 python benchmarks/decode_stream_k.py --tiny` checks correctness only.

Timed in session 25 (benchmarks/NOTES.md): slower than our kernel, fp16 by 1.5%, e4m3 at half
speed (Triton 3.6 left its V loads unpipelined).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from jax_varlen_attn.backends.triton.call import launch  # noqa: E402
from jax_varlen_attn.backends.triton.kernel import (LN2, _attend_tile, _fresh_state, _lane_offsets,  # noqa: E402
                                                     _merge_piece, _opaque_zero, _tile_offsets)
from jax_varlen_attn.spec import next_pow2  # noqa: E402

PAGE = 16


@triton.jit
def _program_of(t, total, P):
  """The program whose share [p * total // P, (p + 1) * total // P) holds flat tile t."""
  return (((t + 1).to(tl.int64) * P - 1) // total).to(tl.int32)


@triton.jit
def _tiles_of(len_k, BLOCK_N: tl.constexpr):
  """Key tiles of an item: at least one (an empty sequence's item writes zeros)."""
  return tl.maximum((len_k + BLOCK_N - 1) // BLOCK_N, 1)


@triton.jit
def _rows(anchor, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
          HEAD_DIM_PAD: tl.constexpr, OPAQUE: tl.constexpr):
  """(rows, offs_d, io_mask) of a tile, derived from `anchor` (a value of this iteration) so the
  compiler keeps none of them live through the loop (triton 3.6, e4m3: 192 -> 162 registers, 2 ->
  3 programs an SM). OPAQUE False (Triton's interpreter: no inline PTX): plain."""
  zero = 0
  if OPAQUE:
    zero = tl.sum(_opaque_zero(anchor), 0)
  rows = tl.arange(0, BLOCK_M) + zero
  offs_d = tl.arange(0, HEAD_DIM_PAD) + zero
  return rows, offs_d, (rows < GROUP)[:, None] & (offs_d[None, :] < HEAD_DIM)


@triton.jit
def stream_k_decode_kernel(
    q_ptr,  # [batch, NUM_HEADS, HEAD_DIM]
    k_ptr, v_ptr,  # [NUM_PAGES, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM]
    seqlens_ptr,  # i32[batch]
    table_ptr,  # i32[batch, MAX_BLOCKS]
    k_descale_ptr, v_descale_ptr,  # f32[batch, NUM_KV_HEADS] (KV_FP8)
    count_in_ptr,  # i32[P] zeros: count_ptr's input
    scale,  # f32
    batch,
    count_ptr,  # i32[P]: pieces done of the split item that starts in program p
    out_ptr,  # [batch, NUM_HEADS, HEAD_DIM]
    part_ptr,  # f32[2 P, BLOCK_M, HEAD_DIM_PAD]: pieces' normalized outputs
    part_lse_ptr,  # f32[2 P, BLOCK_M]: and their LSEs
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    MAX_BLOCKS: tl.constexpr, NUM_PAGES: tl.constexpr, KV_FP8: tl.constexpr, V_PAIRS: tl.constexpr,
    V_E5M2: tl.constexpr, BATCH_CHUNK: tl.constexpr, OPAQUE: tl.constexpr,
):
  TOKEN_STRIDE: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
  PAGE_STRIDE: tl.constexpr = PAGE_SIZE * TOKEN_STRIDE
  P = tl.num_programs(0)
  pid = tl.program_id(0)
  # Items are (sequence b, kv head h), h fastest; item (b, h) holds tiles_b flat tiles. The batch's
  # total, then the sequence holding this program's first tile (cu_seqlens in vectors).
  total = batch * 0
  for chunk in range(0, batch, BATCH_CHUNK):
    b = chunk + tl.arange(0, BATCH_CHUNK)
    lens = tl.load(seqlens_ptr + b, mask=b < batch, other=0)
    lens = tl.minimum(tl.maximum(lens, 0), MAX_BLOCKS * PAGE_SIZE)
    total += tl.sum(tl.where(b < batch, _tiles_of(lens, BLOCK_N), 0) * NUM_KV_HEADS, 0)
  t0 = ((pid.to(tl.int64) * total) // P).to(tl.int32)
  t1 = (((pid + 1).to(tl.int64) * total) // P).to(tl.int32)
  seq = batch * 0
  before = batch * 0  # flat tiles before `seq`
  done = batch * 0
  for chunk in range(0, batch, BATCH_CHUNK):
    b = chunk + tl.arange(0, BATCH_CHUNK)
    lens = tl.load(seqlens_ptr + b, mask=b < batch, other=0)
    lens = tl.minimum(tl.maximum(lens, 0), MAX_BLOCKS * PAGE_SIZE)
    tiles = tl.where(b < batch, _tiles_of(lens, BLOCK_N), 0) * NUM_KV_HEADS
    wholly_before = done + tl.cumsum(tiles, 0) <= t0
    seq += tl.sum(wholly_before.to(tl.int32), 0)
    before += tl.sum(tl.where(wholly_before, tiles, 0), 0)
    done += tl.sum(tiles, 0)
  seq = tl.minimum(seq, batch - 1)
  len_k = tl.minimum(tl.maximum(tl.load(seqlens_ptr + seq), 0), MAX_BLOCKS * PAGE_SIZE)
  n_tiles = _tiles_of(len_k, BLOCK_N)
  kv_head = (t0 - before) // n_tiles
  j = (t0 - before) % n_tiles  # tile within the item
  piece_j = j  # where this program's piece of the item starts

  rows = tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, HEAD_DIM_PAD)
  row_ok = rows < GROUP
  io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
  q_off = (seq * NUM_HEADS + kv_head * GROUP + rows) * HEAD_DIM
  q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=io_mask, other=0.0)
  qk_scale = scale
  v_scale = 1.0
  if KV_FP8:
    qk_scale = scale * tl.load(k_descale_ptr + seq * NUM_KV_HEADS + kv_head)
    v_scale = tl.load(v_descale_ptr + seq * NUM_KV_HEADS + kv_head)
  v_base = v_ptr
  if V_PAIRS:
    v_base = v_ptr.to(tl.pointer_type(tl.int16))
  acc, acc_odd, m_i, l_i = _fresh_state(BLOCK_M, HEAD_DIM_PAD, V_PAIRS)
  zero_rows = tl.zeros([BLOCK_M], tl.int32)
  slopes = tl.zeros([BLOCK_M], tl.float32)
  ahead = _tile_offsets(table_ptr, seq, 0, j * BLOCK_N, len_k, True, True, False, NUM_KV_HEADS, HEAD_DIM,
                        BLOCK_N, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, PAGE_STRIDE, TOKEN_STRIDE)
  a_lo = pid * 0 - 1  # split pieces of this program: none yet
  a_hi = a_lo
  a_item = a_lo
  b_lo = a_lo
  b_hi = a_lo
  b_item = a_lo
  # No loop nested in this one: Triton pipelines innermost loops only (the combine comes after).
  for t in range(t0, t1):
    tile_off = ahead
    fixed_off = _lane_offsets(kv_head, True, NUM_KV_HEADS, HEAD_DIM, BLOCK_N, PAGE_SIZE, TOKEN_STRIDE, HEAD_DIM)
    key_hi = zero_rows + len_k
    acc, acc_odd, m_i, l_i = _attend_tile(
        acc, acc_odd, m_i, l_i, q, k_ptr, v_base, tile_off, fixed_off, j * BLOCK_N, len_k, key_hi, key_hi,
        key_hi, slopes, qk_scale, 0.0, True, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, -1, -1, False, False, "tf32",
        KV_FP8, False, V_PAIRS, V_E5M2)
    item_end = j == n_tiles - 1
    if item_end | (t == t1 - 1):  # this piece of the item is done
      rows, offs_d, io_mask = _rows(l_i, GROUP, HEAD_DIM, BLOCK_M, HEAD_DIM_PAD, OPAQUE)
      seen = l_i > 0.0
      if V_PAIRS:
        out = tl.reshape(tl.join(acc, acc_odd), [BLOCK_M, HEAD_DIM_PAD])
      else:
        out = acc
      out = out * (v_scale / tl.where(seen, l_i, 1.0))[:, None]
      # The whole item: its output; else a piece: a partial, combined after the loop. (Row-shaped:
      # Triton's interpreter makes a scalar `&` an int32, no mask.)
      whole = (zero_rows + piece_j == 0) & (zero_rows + j == n_tiles - 1)
      o_off = (seq * NUM_HEADS + kv_head * GROUP + rows) * HEAD_DIM
      tl.store(out_ptr + o_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
               mask=io_mask & whole[:, None])
      first = t - j  # the item's first flat tile
      p_a = _program_of(first, total, P)
      slot = tl.where(pid == p_a, P + p_a, pid)
      lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
      tl.store(part_ptr + (slot * BLOCK_M + rows)[:, None] * HEAD_DIM_PAD + offs_d[None, :], out,
               mask=~whole[:, None] & (offs_d[None, :] < HEAD_DIM_PAD))
      tl.store(part_lse_ptr + slot * BLOCK_M + rows, lse, mask=~whole)
      # A program holds at most two pieces: its first (an item begun before t0) and its last (one
      # going on past t1). Kept for after the loop: (first program, last program, sequence, head).
      p_z = _program_of(first + n_tiles - 1, total, P)
      split = ~((piece_j == 0) & item_end)
      is_first = t - j + piece_j == t0
      keep_a = split & is_first
      keep_b = split & ~is_first
      a_lo = tl.where(keep_a, p_a, a_lo)
      a_hi = tl.where(keep_a, p_z, a_hi)
      a_item = tl.where(keep_a, seq * NUM_KV_HEADS + kv_head, a_item)
      b_lo = tl.where(keep_b, p_a, b_lo)
      b_hi = tl.where(keep_b, p_z, b_hi)
      b_item = tl.where(keep_b, seq * NUM_KV_HEADS + kv_head, b_item)
      acc, acc_odd, m_i, l_i = _fresh_state(BLOCK_M, HEAD_DIM_PAD, V_PAIRS)
    # The next flat tile: the next tile of this item, or the first of the next (kv head, then
    # sequence); its q, descales and pages are read now, a tile before the loop needs them.
    if item_end:
      j = j * 0
      piece_j = j
      kv_head += 1
      if kv_head == NUM_KV_HEADS:
        kv_head = kv_head * 0
        seq = tl.minimum(seq + 1, batch - 1)
        len_k = tl.minimum(tl.maximum(tl.load(seqlens_ptr + seq), 0), MAX_BLOCKS * PAGE_SIZE)
        n_tiles = _tiles_of(len_k, BLOCK_N)
      rows, offs_d, io_mask = _rows(l_i, GROUP, HEAD_DIM, BLOCK_M, HEAD_DIM_PAD, OPAQUE)
      q_off = (seq * NUM_HEADS + kv_head * GROUP + rows) * HEAD_DIM
      q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=io_mask, other=0.0)
      if KV_FP8:
        qk_scale = scale * tl.load(k_descale_ptr + seq * NUM_KV_HEADS + kv_head)
        v_scale = tl.load(v_descale_ptr + seq * NUM_KV_HEADS + kv_head)
    else:
      j += 1
    ahead = _tile_offsets(table_ptr, seq, 0, j * BLOCK_N, len_k, True, True, False, NUM_KV_HEADS, HEAD_DIM,
                          BLOCK_N, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, PAGE_STRIDE, TOKEN_STRIDE)

  rows, offs_d, io_mask = _rows(l_i, GROUP, HEAD_DIM, BLOCK_M, HEAD_DIM_PAD, OPAQUE)
  tl.debug_barrier()  # every thread's partials are written before a count says so
  for which in tl.static_range(2):
    lo = a_lo if which == 0 else b_lo
    hi = a_hi if which == 0 else b_hi
    item = a_item if which == 0 else b_item
    if lo >= 0:
      arrived = tl.atomic_add(count_ptr + lo, 1, sem="acq_rel", scope="gpu")
      if arrived == hi - lo:  # the item's last piece to finish: combine them all
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        wsum = tl.zeros([BLOCK_M], tl.float32)
        comb = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        for p in range(lo, hi + 1):
          m, wsum, comb = _merge_piece(m, wsum, comb, part_ptr, part_lse_ptr, tl.where(p == lo, P + lo, p),
                                       BLOCK_M, HEAD_DIM_PAD)
        comb = comb / tl.where(wsum > 0.0, wsum, 1.0)[:, None]
        o_off = ((item // NUM_KV_HEADS) * NUM_HEADS + (item % NUM_KV_HEADS) * GROUP + rows) * HEAD_DIM
        tl.store(out_ptr + o_off[:, None] + offs_d[None, :], comb.to(out_ptr.dtype.element_ty), mask=io_mask)


def stream_k_decode(q, k_cache, v_cache, seqlens, table, k_descale, v_descale, *, programs: int,
                    block_n: int, num_warps: int, num_stages: int):
  """q [B, H, D] (one query per sequence), NHD paged caches [pages, PAGE, Hk, D] -> [B, H, D].
  k_descale / v_descale: f32[B, Hk] (fp8 caches; else ignored). Positive descales assumed."""
  batch, heads, d = q.shape
  num_pages, page, hk, _ = k_cache.shape
  group = heads // hk
  kv_fp8 = jnp.dtype(k_cache.dtype).itemsize == 1
  block_m = max(16, next_pow2(group))
  d_pad = next_pow2(d)
  inputs = dict(q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, seqlens_ptr=seqlens, table_ptr=table,
                k_descale_ptr=k_descale, v_descale_ptr=v_descale,
                count_in_ptr=jnp.zeros((programs,), jnp.int32), scale=np.float32(d ** -0.5), batch=batch)
  outputs = [jax.ShapeDtypeStruct((programs,), jnp.int32), jax.ShapeDtypeStruct(q.shape, q.dtype),
             jax.ShapeDtypeStruct((2 * programs, block_m, d_pad), jnp.float32),
             jax.ShapeDtypeStruct((2 * programs, block_m), jnp.float32)]
  interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # no inline PTX there
  consts = dict(OPAQUE=not interpreting, NUM_HEADS=heads, NUM_KV_HEADS=hk, GROUP=group, HEAD_DIM=d, HEAD_DIM_PAD=d_pad, BLOCK_M=block_m,
                BLOCK_N=block_n, PAGE_SIZE=page, MAX_BLOCKS=table.shape[1], NUM_PAGES=num_pages,
                KV_FP8=kv_fp8, V_PAIRS=kv_fp8 and not interpreting,
                V_E5M2=jnp.dtype(k_cache.dtype) == jnp.float8_e5m2,
                BATCH_CHUNK=min(256, max(2, next_pow2(batch + 1))))
  _, out, _, _ = launch(stream_k_decode_kernel, inputs, outputs, (programs,), num_warps, num_stages, consts,
                        input_output_aliases={"count_in_ptr": 0})
  return out


def make_case(name: str, key, kv_dtype, hk=8, group=2, d=128):
  """(q, k_cache, v_cache, seqlens, table, k_descale, v_descale) on the default device: B x K
  decode, or seed4_distinct's lengths (each as one query), distinct pages in shuffled order, poison
  (NaN) past each length in its last page and in every page no sequence uses."""
  if name == "seed4":
    import shapes
    lens = np.array(shapes.get_cases()["seed4_distinct"].seqused_k, np.int32)
  elif name == "tiny":
    lens = np.array([5, 0, 37, 16, 1, 64, 23, 40, 9], np.int32)
  else:
    b, k = (int(x) for x in name.split("x"))
    lens = np.full(b, k, np.int32)
  batch = len(lens)
  pages_of = -(-np.maximum(lens, 1) // PAGE)
  max_blocks = int(pages_of.max())
  num_pages = int(pages_of.sum()) + 3
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  perm = rng.permutation(num_pages)
  table = np.full((batch, max_blocks), 10**6, np.int32)  # padded entries out of range: never read
  used = 0
  poison = np.zeros((num_pages, PAGE), bool)
  for i, n in enumerate(pages_of):
    table[i, :n] = perm[used:used + n]
    used += n
    last, r = table[i, max(lens[i] - 1, 0) // PAGE], lens[i] % PAGE
    if lens[i] == 0 or r:
      poison[last, r:] = True
  poison[perm[used:]] = True
  kk, kv_, kq, kd = jax.random.split(key, 4)
  bad = jnp.asarray(poison)[:, :, None, None]
  kv = jnp.dtype(kv_dtype)
  k = jnp.where(bad, jnp.nan, jax.random.normal(kk, (num_pages, PAGE, hk, d)) * 0.5).astype(kv)
  v = jnp.where(bad, jnp.nan, jax.random.normal(kv_, (num_pages, PAGE, hk, d)) * 0.5).astype(kv)
  q = (jax.random.normal(kq, (batch, hk * group, d)) * 0.5).astype(jnp.float16)
  kd_, vd_ = jax.random.split(kd)
  return (q, k, v, jnp.asarray(lens), jnp.asarray(table), 0.5 + jax.random.uniform(kd_, (batch, hk)),
          0.5 + jax.random.uniform(vd_, (batch, hk)))


def reference(q, k_cache, v_cache, seqlens, table, k_descale, v_descale, fp8: bool):
  """[B, H, D] float64 from the semantics (dequantize, attend to keys [0, len)), computed in f32
  on the device (float64 where the device is a CPU), one sequence at a time."""
  hi = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  lens, table = np.asarray(seqlens), np.asarray(table)
  batch, heads, d = q.shape
  hk = k_cache.shape[2]
  group = heads // hk
  outs = []
  for b in range(batch):
    n = int(lens[b])
    if n == 0:
      outs.append(np.zeros((heads, d)))
      continue
    pages = jnp.asarray(table[b, :-(-n // PAGE)])
    k = k_cache[pages].astype(hi).reshape(-1, hk, d)[:n]
    v = v_cache[pages].astype(hi).reshape(-1, hk, d)[:n]
    if fp8:
      k, v = k * k_descale[b].astype(hi)[None, :, None], v * v_descale[b].astype(hi)[None, :, None]
    qb = q[b].astype(hi).reshape(hk, group, d)
    s = jnp.einsum("hgd,nhd->hgn", qb, k, precision="highest") / np.sqrt(d)
    o = jnp.einsum("hgn,nhd->hgd", jax.nn.softmax(s, axis=-1), v, precision="highest")
    outs.append(np.asarray(o.reshape(heads, d), np.float64))
  return np.stack(outs)


def write(args, records, ceiling):
  """The results so far, as JSON (after every record: a call cut short keeps what it measured)."""
  if args.tiny:
    return
  gpu = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  doc = dict(benchmark="decode: a persistent stream-K grid vs our Triton decode kernel",
             commit=os.environ.get("JVA_COMMIT", "unknown"), gpu=gpu, date=date, read_ceiling=ceiling,
             sets=args.sets, programs_per_sm=args.programs_per_sm, block_n=args.block_n, stages=args.stages,
             versions=dict(jax=jax.__version__, triton=triton.__version__), records=records)
  out = args.out or f"{gpu.lower().replace(' ', '_').replace('nvidia_', '')}_{date}_decode_stream_k"
  out_dir = Path(os.environ.get("OUT") or HERE / "results")
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"{out.removesuffix('.json')}.json").write_text(json.dumps(doc, indent=1))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", default="seed4,198x2336,16x600,64x600")
  p.add_argument("--kv-dtype", default="float8_e4m3fn,float16")
  p.add_argument("--programs-per-sm", default="3,2", help="resident programs an SM, per kv dtype above "
                 "(triton 3.6's sm_90 builds: 162 registers for e4m3, 187 for fp16)")
  p.add_argument("--block-n", default="64,128", help="keys a tile, per kv dtype above (the library's)")
  p.add_argument("--stages", default="3,2", help="num_stages, per kv dtype above (the library's)")
  p.add_argument("--sets", type=int, default=2, help="rotated caches (bytes from HBM, not L2)")
  p.add_argument("--tiny", action="store_true", help="CPU: the interpreter, a small case, correctness only")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  on_gpu = any(dev.platform == "gpu" for dev in jax.devices())
  if args.tiny:  # 16-key tiles: items of several tiles, cut by the shares of 7 and 50 programs
    args.cases, args.sets, args.block_n = "tiny", 1, "16,16"
  elif not on_gpu:
    p.error("no GPU: use --tiny under TRITON_INTERPRET=1")
  kv_dtypes = args.kv_dtype.split(",")
  per_sm = dict(zip(kv_dtypes, (int(x) for x in args.programs_per_sm.split(","))))
  block_n = dict(zip(kv_dtypes, (int(x) for x in args.block_n.split(","))))
  stages = dict(zip(kv_dtypes, (int(x) for x in args.stages.split(","))))
  sms = getattr(jax.devices()[0], "core_count", 132) if on_gpu else 132
  ceiling = None
  if on_gpu:
    import device_time
    from bench_serving import read_ceiling
    ceiling = read_ceiling(2048)
  from jax_varlen_attn import flash_attn_varlen_func

  records = []
  key = jax.random.PRNGKey(0)
  for case in args.cases.split(","):
    for kv in kv_dtypes:
      fp8 = jnp.dtype(kv).itemsize == 1
      sets = [make_case(case, jax.random.fold_in(key, i), kv) for i in range(args.sets)]
      q, k, v, lens, table, kd, vd = sets[0]
      kv_bytes = int(np.asarray(lens).sum()) * 2 * k.shape[2] * k.shape[3] * jnp.dtype(kv).itemsize
      ref = reference(*sets[0], fp8)
      counts = (7, 50) if args.tiny else (sms * per_sm[kv],)

      def ours(q, k, v, lens, table, kd, vd, programs, kv=kv):
        return stream_k_decode(q, k, v, lens, table, kd, vd, programs=programs, block_n=block_n[kv],
                               num_warps=4, num_stages=stages[kv])

      def lib(q, k, v, lens, table, kd, vd, fp8=fp8):
        extra = dict(k_descale=kd, v_descale=vd) if fp8 else {}
        return flash_attn_varlen_func(q, k, v, max_seqlen_q=1, cu_seqlens_q=jnp.arange(q.shape[0] + 1, dtype=jnp.int32),
                                      max_seqlen_k=table.shape[1] * PAGE, seqused_k=lens, block_table=table,
                                      causal=True, backend="triton", **extra)

      runs = [("stream-k", functools.partial(ours, programs=n), n) for n in counts] + [("jva-triton", lib, None)]
      for impl, fn, programs in runs:
        rec = dict(case=case, kv_dtype=jnp.dtype(kv).name, impl=impl, kv_bytes=kv_bytes, programs=programs)
        try:
          one = jax.jit(fn)
          got = np.asarray(one(*sets[0]), np.float64)
          err = float(np.abs(got - ref).max() / np.abs(ref).max())
          rec["max_rel_err"] = err
          rec["status"] = "ok" if np.isfinite(got).all() and err < 2e-2 else "WRONG"
          if on_gpu:
            many = jax.jit(lambda *xs, one=one: [one(*xs[7 * i:7 * i + 7]) for i in range(len(xs) // 7)])
            flat = tuple(a for s in sets for a in s)
            jax.block_until_ready(many(*flat))
            dev = device_time.measure(jax, many, flat, len(sets), runs=2)
            rec["device_us"] = round(dev["busy_ms"] * 1e3, 2)
            rec["kernels_per_call"] = dev["kernels_per_call"]
            rec["pct_ceiling"] = round(100 * kv_bytes / (dev["busy_ms"] * 1e-3) / 1e9 / ceiling["read_gbps"], 1)
        except Exception as e:  # a point that does not build is a record
          rec["status"], rec["error"] = "error", f"{type(e).__name__}: {str(e)[:600]}"
        records.append(rec)
        print(rec, flush=True)
        write(args, records, ceiling)
  write(args, records, ceiling)
  print(f"{'case':9s} {'kv':14s} {'impl':11s} {'us':>9s} {'%ceil':>6s} {'err':>9s} status")
  for r in records:
    print(f"{r['case']:9s} {r['kv_dtype']:14s} {r['impl']:11s} {r.get('device_us', '-'):>9} "
          f"{r.get('pct_ceiling', '-'):>6} {r.get('max_rel_err', float('nan')):9.2e} {r['status']}")
  return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
  sys.exit(main())
