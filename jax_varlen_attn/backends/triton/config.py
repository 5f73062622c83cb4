"""Tile sizes of the Triton kernel, and the one place its constexprs are derived."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from jax_varlen_attn.backends import device, tile_rules, triton_interpreting
from jax_varlen_attn.backends.config_checks import check_int_range, check_launch_options, check_pow2
from jax_varlen_attn.backends.triton import tuned
from jax_varlen_attn.backends.triton.call import ROUTES, compute_capability
from jax_varlen_attn.spec import AttentionSpec, next_pow2

MAX_SPLITS = 64
# Key tiles a split-KV program gets at least (of the longest possible sequence): partials and their
# combine stay small next to the K / V reads (NOTES.md "Tile rules"; bench_serving varies it).
MIN_TILES_PER_SPLIT = 4
# Decode grids of at most this many programs an SM get double-buffered K / V tiles (_default_stages).
DOUBLE_BUFFER_PROGRAMS_PER_SM = 1.25
# How an fp8 V tile reaches P @ V (`Config.fp8_v`).
FP8_V_FORMS = ("operand", "load", "pairs")
# fp8 decode grids of at most this many programs an SM, each seeing at most V_AT_LOAD_MAX_TILES key
# tiles, convert V where it is loaded (`_default_fp8_v`).
V_AT_LOAD_PROGRAMS_PER_SM = 1.25
V_AT_LOAD_MAX_TILES = 12
# The grid's last round (kernel._tail_plan): at most this many pieces a tail item, where batches of
# under TAIL_MAX_BATCH sequences with a longest sequence of at least TAIL_MIN_KEYS keys (an item
# alone takes far longer than the plan's fixed cost: a memset and the helpers' exits) run decode
# tiles in at least one whole round of programs. A program reads cu_seqlens_q in vectors of at most
# TAIL_CHUNK entries: one 256- or 512-entry vector built the fp8 tile at 96 registers on triton
# 3.7.1 (5 programs an SM, not programs_per_sm's 4; 11-12% lost where the tail did not split), the
# chunked read at 128 (benchmarks/NOTES.md, "Tile rules").
TAIL_PIECES = 8
TAIL_MAX_BATCH = 1024
TAIL_CHUNK = 256
TAIL_MIN_KEYS = 1024
# fp16 / bf16 decode tiles visit their keys in one masked loop (kernel ONE_KEY_LOOP), not an
# unmasked loop and a second pipeline for the last partial tile: faster on short sequences
# (decode_16x600 -6%, 64x600 -2%), within 0.5% on long ones; fp8 tiles lost 0.5-8% (NOTES.md).
DECODE_ONE_LOOP = True
# cu_seqlens_q entries a program's sequence search loads at once (kernel._find_sequence): a warp's
# lanes, so 200 sequences take 2 rounds of dependent loads instead of 8.
SEARCH_PROBES = 32


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiles and launch options of the Triton kernel; None fields are chosen from the shapes.

  block_m: rows of a tile = query tokens x the q heads sharing one kv head (GQA packed into M).
  block_n: keys per tile.
  num_splits: split-KV (flash-decoding): each (query block, kv head) program's keys are divided
    among this many programs, whose partial outputs are combined by their LSEs. 1 = off.
  num_warps: warps a program.
  num_stages: Triton's software-pipeline stages over the key tiles: num_stages - 1 K / V buffers
    in shared memory on a non-paged or an fp8 paged cache; on an fp16 / bf16 / f32 paged cache
    (num_stages - 1) // 2 from 3 stages, since its page-table load takes a stage of its own (2
    stages: one buffer). `stages_for_buffers` states the mapping; 5 stages = two buffers there.
  fp8_v: how an fp8 cache's V tile reaches P @ V (K needs nothing: q . K reads it along the
    head dim, as it lies). "operand": Triton converts it in the dot operand's layout, reading the
    fp8 bytes from shared memory one at a time (no 8-bit ldmatrix.trans). "load": converted where
    it is loaded (inline PTX) and staged in shared memory again as fp16. "pairs": read as 16-bit
    pairs of adjacent head dims, so the operand comes by ldmatrix.trans as an fp16 tile does;
    each pair splits into an even-dim and an odd-dim fp16 value (inline PTX, exact) feeding two
    half-width dots, interleaved back once at the end. None: `_default_fp8_v`. "load" and
    "pairs" need sm_89+ and not Triton's interpreter (which runs no PTX), "pairs" also an fp16 /
    bf16 compute dtype and an even head dim of at least 32 padded (`pairs_apply`); elsewhere a
    tile takes "operand". Ignored without an fp8 cache.
  launch: how the kernel reaches XLA (backends/triton/call.py): "ffi" (jax-triton's typed-FFI
    call; the default on jax-triton 0.4), "legacy" (jax-triton 0.3's custom call; its default),
    "xla" (XLA's own Triton custom call: least host cost per call, a slower prefill kernel); None
    for the default: "xla" for calls over at most `call.SMALL_CALL_TOKENS` query rows (decode of
    a few sequences, where host cost decides), else jax-triton's (`call.route_for`).

  What is not here is the kernel's ABI (`constexprs`: shapes, layout strides, semantics), derived
  from the call, never tuned.
  """

  block_m: Optional[int] = None
  block_n: Optional[int] = None
  num_splits: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  fp8_v: Optional[str] = None
  launch: Optional[str] = None

  def __post_init__(self):
    check_pow2("block_m", self.block_m, 16)  # tl.dot needs M, N, K >= 16
    check_pow2("block_n", self.block_n, 16)
    check_int_range("num_splits", self.num_splits, 1, MAX_SPLITS)
    check_launch_options(self.num_warps, self.num_stages)
    if self.fp8_v is not None and self.fp8_v not in FP8_V_FORMS:
      raise ValueError(f"Config.fp8_v must be one of {FP8_V_FORMS} or None, got {self.fp8_v!r}")
    if self.launch is not None and self.launch not in ROUTES:
      raise ValueError(f"Config.launch must be one of {ROUTES} or None, got {self.launch!r}")

  @classmethod
  def get_default(cls, spec: AttentionSpec) -> "Config":
    return cls().resolved(spec)

  def resolved(self, spec: AttentionSpec) -> "Config":
    """This config with every None field chosen from the static shapes."""
    group = spec.group_size
    mean_q = spec.mean_queries_per_sequence  # query tokens a program should cover
    # The measured table first (tuned.py; fields the caller set always win), then the heuristics.
    tuned_entry = tuned.lookup(spec) or {}
    # Rows: the shared rule (tile_rules), except that prefill with 2-byte inputs and 64 < head_dim
    # <= 128 takes 256 rows on 8 warps (two warpgroups of 128 rows, each K / V tile feeding twice
    # the math; measured faster, NOTES.md "Tile rules"). Not fp32: its tiles would not fit in smem.
    max_m = tile_rules.max_rows(spec.head_dim, group)
    if 64 < spec.head_dim <= 128 and spec.dtype != "float32" and mean_q * group >= 256:
      max_m = max(max_m, 256)
    block_m = (self.block_m or tuned_entry.get("block_m")
               or tile_rules.rows_for_queries(mean_q, group, max_m))
    block_m = max(block_m, next_pow2(group))
    if self.block_m is None:
      # A small prefill (seed1: 512 queries, 8 kv heads) would leave SMs idle with 128-row tiles:
      # halve the tile until the grid has a program for every SM, or the tile is minimal.
      while (block_m > max(16, next_pow2(group))
             and spec.query_programs(block_m // group) * spec.num_kv_heads < device.num_sms()):
        block_m //= 2
    programs = spec.query_programs(block_m // group) * spec.num_kv_heads  # a split's grid
    fp8_pairs = self.fp8_v in (None, "pairs") and programs >= device.num_sms()  # no split-KV
    block_n = self.block_n or tuned_entry.get("block_n") or _default_block_n(spec, block_m, fp8_pairs)
    default_splits = self._default_splits(spec, block_m, block_n)
    num_splits = self.num_splits or default_splits
    if self.block_n is None and spec.head_dim <= 128 and num_splits == 1 and default_splits == 1:
      # A grid that fits on the GPU at once (seed1: 136 programs, seed2: 96) is latency-bound: the
      # longest program's chain of dependent tile steps (page lookup -> K load -> dot -> V) sets
      # the time, so halve the chain with 128-key tiles (NOTES.md "Tile rules"); seed3 (712
      # programs) is not latency-bound and stays at 64. Not where split-KV splits: splits already
      # shorten the chain. (Wider tiles never turn splits on: _default_splits only shrinks as
      # block_n grows.)
      if programs < 2 * device.num_sms():
        block_n = 128
    # 4 warps, 8 for 256-row tiles (one warpgroup per 128 rows). 8 for 128-row tiles is the usual
    # FlashAttention-2 choice, but 4 measured faster (NOTES.md "Tile rules").
    num_warps = self.num_warps or tuned_entry.get("num_warps") or (8 if block_m >= 256 else 4)
    num_stages = (self.num_stages or tuned_entry.get("num_stages")
                  or _default_stages(spec, block_m, block_n, num_splits, programs * num_splits))
    fp8_v = self.fp8_v or _default_fp8_v(spec, block_m, block_n, num_splits, programs * num_splits)
    if fp8_v != "operand" and not _ptx_conversion_applies(spec):
      fp8_v = "operand"
    if fp8_v == "pairs" and not pairs_apply(spec):
      fp8_v = "operand"
    return dataclasses.replace(self, block_m=block_m, block_n=block_n, num_splits=num_splits,
                               num_warps=num_warps, num_stages=num_stages, fp8_v=fp8_v)

  @staticmethod
  def _default_splits(spec: AttentionSpec, block_m: int, block_n: int) -> int:
    """Split-KV only where the grid cannot fill the GPU (few, long sequences: decode_8x32768).

    Aim at ~4 programs per SM, and give every split at least MIN_TILES_PER_SPLIT key tiles of the
    longest possible sequence (spec.max_seqlen_k, static) so partial writes and the combine stay
    small next to the K / V reads. Shapes only: lengths changing never changes the split count (no
    recompile).
    """
    programs = spec.query_programs(block_m // spec.group_size) * spec.num_kv_heads
    sms = device.num_sms()
    if programs >= sms:
      return 1
    by_fill = -(-4 * sms // programs)
    by_length = spec.max_seqlen_k // (MIN_TILES_PER_SPLIT * block_n)
    return max(1, min(by_fill, by_length, MAX_SPLITS))

  def constexprs(self, spec: AttentionSpec) -> dict:
    """Every tl.constexpr of `varlen_attention_kernel`, from the spec (shapes, layout, options)."""
    if self.block_m is None:
      raise ValueError("call Config.resolved(spec) before constexprs()")
    group = spec.group_size
    layout = spec.layout
    paged = layout is not None
    return dict(
        NUM_HEADS=spec.num_heads, NUM_KV_HEADS=spec.num_kv_heads, GROUP=group,
        HEAD_DIM=spec.head_dim, HEAD_DIM_PAD=max(16, next_pow2(spec.head_dim)),
        BLOCK_M=self.block_m, BLOCK_Q=self.block_m // group, BLOCK_N=self.block_n,
        NUM_SPLITS=self.num_splits, IS_PAGED=paged,
        # A tile inside one page looks its page up once (a scalar) instead of once per key.
        SINGLE_PAGE_TILE=paged and layout.block_size % self.block_n == 0,
        PAGE_SIZE=layout.block_size if paged else 1,
        MAX_BLOCKS=spec.max_blocks if paged else 1,
        NUM_PAGES=layout.num_pages if paged else 1,
        KV_ROWS=spec.total_k if not paged else 1,
        PAGE_STRIDE=layout.page_stride if paged else 0,
        TOKEN_STRIDE=layout.token_stride if paged else 0,
        HEAD_STRIDE=layout.head_stride if paged else 0,
        # k_offset / v_offset (runtime) are multiples of head_dim: of its power-of-two factor.
        OFFSET_MULTIPLE=spec.head_dim & -spec.head_dim,
        IS_STACKED=paged and layout.stacked,
        NUM_LAYERS=max(layout.num_layers, 1) if paged else 1,
        LAYER_STRIDE=layout.layer_stride if paged else 0,
        WINDOW_LEFT=spec.window_left, WINDOW_RIGHT=spec.window_right,
        USE_SOFTCAP=spec.softcap > 0, USE_ALIBI=spec.has_alibi, RETURN_LSE=spec.return_lse,
        # fp32 inputs get exact fp32 products (the user asked for fp32), not tf32.
        DOT_PRECISION="ieee" if spec.dtype == "float32" else "tf32",
        # fp8 cache: fp8 tiles converted in registers, descales folded into per-program scalars;
        # an fp8 q computes in fp16 (kernel.py's docstring).
        KV_FP8=spec.kv_fp8, Q_FP8=spec.q_fp8, USE_SINKS=spec.has_sinks,
        # A pipelined paged fp8 tile looks its pages up a tile ahead itself (`table_ahead`).
        TABLE_AHEAD=table_ahead(spec) and self.num_stages > 2,
        # How an fp8 V tile reaches P @ V (`resolved` keeps each form where it applies).
        V_AT_LOAD=spec.kv_fp8 and self.fp8_v == "load",
        V_PAIRS=spec.kv_fp8 and self.fp8_v == "pairs", V_E5M2=spec.kv_dtype == "float8_e5m2",
        # fp8 caches: the epilogue's row addresses computed after the key loop, not kept live
        # through it (sm_90: a split fp8 decode tile 154 -> 126 registers, 3 -> 4 programs an SM;
        # some fp16 / fp32 builds took more registers: NOTES.md "Tile rules"). Inline PTX: not
        # under Triton's interpreter.
        ROWS_AFTER_LOOP=spec.kv_fp8 and not triton_interpreting(),
        # Each program finds its sequence by a SEARCH_PROBES-ary search over cu_seqlens_q: one
        # round of dependent loads per factor of 33 in the batch, not per factor of 2.
        SEARCH_PROBES=SEARCH_PROBES,
        # fp16 / bf16 decode tiles: one masked key loop (DECODE_ONE_LOOP says why not fp8).
        ONE_KEY_LOOP=bool(DECODE_ONE_LOOP) and self.block_m <= tile_rules.MIN_ROWS and not spec.kv_fp8,
        **tail_constexprs(spec, self),
    )


def programs_per_sm(spec: AttentionSpec) -> int:
  """Decode-tile programs resident on an SM at once, as the sm_90 builds' registers allow: fp8
  caches 104-128 registers a thread (4), fp16 / bf16 214-222 (2) (triton 3.6-3.9; NOTES.md "Tile
  rules"). tests/triton_compile_check.py fails when the tail plan's tiles build otherwise."""
  return 4 if spec.kv_fp8 else 2


def tail_constexprs(spec: AttentionSpec, config: "Config") -> dict:
  """TAIL_PIECES / TAIL_SLOTS / BATCH_CHUNK of the grid's last round (kernel._tail_plan).

  On where a round of resident decode programs (TAIL_SLOTS = SMs x programs an SM) leaves the
  last items of a long-sequence batch alone on an idle GPU: decode tiles without split-KV, a
  static grid of at least one round, fewer than TAIL_MAX_BATCH sequences, at least TAIL_MIN_KEYS
  keys. Whether a call's tail is split is the kernel's (its lengths are data). Not under Triton's
  interpreter unless a test asks (`tail_slots`): its programs run one at a time.
  """
  slots = tail_slots(spec)
  programs = spec.query_programs(config.block_m // spec.group_size) * spec.num_kv_heads
  on = (slots > 0 and config.num_splits == 1 and config.block_m <= tile_rules.MIN_ROWS
        and spec.batch < TAIL_MAX_BATCH and spec.max_seqlen_k >= TAIL_MIN_KEYS and programs >= slots)
  return dict(TAIL_PIECES=TAIL_PIECES if on else 1, TAIL_SLOTS=slots if on else 0,
              BATCH_CHUNK=min(next_pow2(spec.batch + 1), TAIL_CHUNK) if on else 1)


def tail_slots(spec: AttentionSpec) -> int:
  """Resident decode programs in one round of the grid (0: no tail plan)."""
  if triton_interpreting():
    return 0
  return device.num_sms() * programs_per_sm(spec)


def _default_block_n(spec: AttentionSpec, block_m: int, fp8_pairs: bool = False) -> int:
  """Keys per tile where neither the caller nor the tuned table says.

  Decode-shaped tiles (block_m <= 16: a query or two x the GQA group) stream K / V and do little
  math per key; the tile size trades loads in flight per program (bigger tiles) against programs
  resident per SM (smaller tiles: fp16 D=128 K+V stages of 64 KB at 128 keys leave room for one).
  Long sequences want the former, short ones the latter: 128 keys where the longest sequence has
  at least 8 such tiles, else 64; 16 for head_dim 256. An fp8 cache read with V as pairs
  (`fp8_pairs`: the caller's form or the default, on a grid that needs no split-KV) takes 64 at
  any length: its tiles are half the bytes, and 64 measured faster on long sequences too (a split
  grid, decode_8x32768, measured slower with 64). Prefill-shaped tiles keep 64 keys (16 KB K /
  V tiles at D = 128; 32 for wide heads): 128 spilled registers. Measurements: NOTES.md "Tile
  rules".
  """
  if block_m > 16:
    return 64 if spec.head_dim <= 128 else 32
  if spec.head_dim > 128:
    return 16
  if fp8_pairs and pairs_apply(spec) and _ptx_conversion_applies(spec):
    return 64
  return 128 if spec.max_seqlen_k >= 8 * 128 else 64


def table_ahead(spec: AttentionSpec) -> bool:
  """Whether a pipelined (num_stages > 2) paged tile looks each tile's pages up a tile ahead itself.

  Triton's pipeliner gives a paged tile's page-table load, which feeds the K / V addresses, a
  stage of its own ahead of each K / V stage. Looked up by the kernel a tile ahead instead, the
  K / V copies are direct loads to the pipeliner and the table takes no stage. Measured faster on
  fp8 caches (decode and prefill), slower on fp16 prefill (NOTES.md "Tile rules"): fp8 only.
  """
  return spec.layout is not None and spec.kv_fp8


def _default_fp8_v(spec: AttentionSpec, block_m: int, block_n: int, num_splits: int, programs: int) -> str:
  """How an fp8 V tile reaches P @ V (`Config.fp8_v`) where the caller does not say.

  Decode tiles (block_m <= MIN_ROWS: mma.sync reads the operand from registers) read V as 16-bit
  pairs: ldmatrix.trans instead of byte loads (the sm_90 e4m3 build's unmasked loop: 613 SASS
  instructions against 824, 188 registers against 254), except on a decode batch whose grid is
  about one program an SM or less, each with few key tiles: there nothing hides a tile's chain
  of dependent steps, and converting at load (off the chain) measured faster. Split-KV grids
  (few long sequences) and prefill tiles (wgmma reads V from shared memory) keep Triton's own:
  pairs measured slower on both (not understood on the split grid). NOTES.md "Tile rules".
  """
  if block_m > tile_rules.MIN_ROWS:
    return "operand"
  if (spec.mean_queries_per_sequence <= 1 and programs <= V_AT_LOAD_PROGRAMS_PER_SM * device.num_sms()
      and spec.max_seqlen_k // (block_n * num_splits) <= V_AT_LOAD_MAX_TILES):
    return "load"
  return "operand" if num_splits > 1 else "pairs"


def _ptx_conversion_applies(spec: AttentionSpec) -> bool:
  """Whether the inline-PTX fp8 conversions can run: sm_89+ (cvt from e4m3 / e5m2), not under
  Triton's interpreter (which runs no PTX)."""
  return spec.kv_fp8 and not triton_interpreting() and compute_capability() >= 89


def pairs_apply(spec: AttentionSpec) -> bool:
  """Whether V can be read as 16-bit pairs of adjacent head dims (`Config.fp8_v="pairs"`).

  The pairs' dots take P in fp16 (fp16 / bf16 compute only: an fp32 caller gets fp32 products),
  each half of V is at least 16 wide (tl.dot's N), and the head dim is even: every layout offset
  is a multiple of it (KVCacheLayout), so halved offsets address whole pairs.
  """
  return (spec.dtype in ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
          and spec.head_dim % 2 == 0 and max(16, next_pow2(spec.head_dim)) >= 32)


def stages_for_buffers(buffers: int, spec: AttentionSpec) -> int:
  """num_stages that gives Triton's pipeliner `buffers` K / V tiles in shared memory.

  One more than the buffers, except on a paged cache whose table takes a stage per buffer
  (`table_ahead` false): twice the buffers, plus one. One buffer is 2 stages either way: the next
  tile's copy is issued only after this tile's math, so nothing overlaps the wait (sm_90 TTGIR of
  triton 3.6 and 3.9).
  """
  if buffers <= 1 or spec.layout is None or table_ahead(spec):
    return buffers + 1
  return 2 * buffers + 1


def _default_stages(spec: AttentionSpec, block_m: int, block_n: int, num_splits: int,
                    programs: int) -> int:
  """Pipeline stages where neither the caller nor the tuned table says.

  Big tiles: the shared rule's K / V buffers (tile_rules.num_stages counts a direct load's stages:
  two buffers). Decode-shaped tiles (block_m <= 16) stream K / V with little math a tile. With one
  buffer a program waits out each tile's load in turn; where the grid is about one program an SM
  (DOUBLE_BUFFER_PROGRAMS_PER_SM; a decode grid's padding programs exit at once) nothing else hides
  that wait, so two buffers keep the next tile in flight. On bigger grids programs hide each
  other's loads and a second buffer (twice the shared memory) only costs residency. fp8 tiles,
  half the bytes, take two buffers at any grid. Either way only where the longest sequence gives
  each program (split) MIN_TILES_PER_SPLIT tiles or more: a shorter pipeline never fills. Head dim
  256 (16-key tiles) was not measured and keeps the shared rule. A tile whose two buffers would not
  fit in shared memory gets one. Measurements: NOTES.md "Tile rules".
  """
  if not _fits_two_buffers(spec, block_m, block_n):
    return stages_for_buffers(1, spec)
  shared = tile_rules.num_stages(block_m, spec.head_dim)
  if shared > 2:
    return stages_for_buffers(shared - 1, spec)
  tiles = spec.max_seqlen_k // (block_n * num_splits)
  if (block_m <= tile_rules.MIN_ROWS and spec.head_dim <= 128 and tiles >= MIN_TILES_PER_SPLIT
      and (spec.kv_fp8 or programs <= DOUBLE_BUFFER_PROGRAMS_PER_SM * device.num_sms())):
    return stages_for_buffers(2, spec)
  return shared


def _fits_two_buffers(spec: AttentionSpec, block_m: int, block_n: int) -> bool:
  """Whether a tile with two K / V buffers fits the GPU's shared memory, estimated from above.

  sm_90 builds (triton 3.6) hold q's tile, the pipeline's K / V buffers and, for prefill tiles,
  one more K / V tile's worth of scratch: count three K / V tiles and 8 KB besides (the compiled
  sizes: NOTES.md "Tile rules").
  """
  d_pad = max(16, next_pow2(spec.head_dim))
  q_bytes = block_m * d_pad * max(2, jnp.dtype(spec.dtype).itemsize)  # an fp8 q computes in fp16
  kv_bytes = 2 * block_n * d_pad * jnp.dtype(spec.kv_dtype or spec.dtype).itemsize
  return q_bytes + 3 * kv_bytes + 8192 <= device.shared_memory_bytes()
