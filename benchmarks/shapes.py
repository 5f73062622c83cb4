"""The named benchmark cases (docs/contract.md, "Benchmark results") and the two numbers of each: bytes and FLOPs.

Every case: num_heads 16, num_kv_heads 8, head_dim 128, page (block) size 16, causal (bottom-right
aligned), fp16 unless the caller asks for bf16.

- seed1_prefill512, seed2_small_mixed, seed3_mixed55, seed4_long200: FlagGems' benchmark shapes, read
  from seed_shapes.json; block tables drawn at random (seeded) from [0, 2000) as FlagGems does, so
  sequences share pages (seed4's cache is then partly served from L2: not an HBM figure).
- seed4_distinct: seed4's lengths, every page used by exactly one sequence.
- decode_256x4096, decode_8x32768: one query per sequence, distinct pages.
- prefill_4x4096: 4 sequences of 4096 queries over 4096 keys, distinct pages.

seed_shapes.json is looked up at $JVA_SEED_SHAPES, then ../shared/data/seed_shapes.json (beside the
repo), then benchmarks/data/seed_shapes.json (a committed copy: ../shared does not travel to the GPU
machine).

Bytes (the floor for memory-bound cases): KV = sum(seqused_k) * Hk * D * 2 (K and V) * the cache's
itemsize (1 for an fp8 cache), plus q and out (total_q * H * D * q's itemsize each). FLOPs (the floor
for prefill): 4 * D * H * (allowed (q, k) pairs under the causal mask).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 16
SEED_NUM_BLOCKS = 2000  # FlagGems' benchmark cache size (pages)
L2_BYTES = 50 * 2**20  # H100 L2
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1}

CASE_NAMES = ("seed1_prefill512", "seed2_small_mixed", "seed3_mixed55", "seed4_long200",
              "seed4_distinct", "decode_256x4096", "decode_8x32768", "prefill_4x4096")
# Beside the named cases, any `decode_<B>x<K>` (B sequences of one query over K keys each, distinct
# pages; e.g. decode_64x600, the serving model's batch-64 step) is a case too: `parse_case`.
UNIFORM_DECODE = re.compile(r"decode_([1-9][0-9]*)x([1-9][0-9]*)")
# And `decode_<B>x<K>r<R>`: the same bytes with lengths spread evenly over [K - R, K + R], in a
# fixed shuffled order (do decode programs that start and end out of step hide each other's
# start-up? benchmarks/NOTES.md session 25).
SPREAD_DECODE = re.compile(r"decode_([1-9][0-9]*)x([1-9][0-9]*)r([0-9]+)")
# And any `prefill_<B>x<L>`: B causal sequences of L queries over their L keys, distinct pages;
# `prefill_<B>x<L>p<P>` the same over pages of P tokens (what paging costs a kernel against 16).
UNIFORM_PREFILL = re.compile(r"prefill_([1-9][0-9]*)x([1-9][0-9]*)(?:p([1-9][0-9]*))?")
# Cases whose floor is arithmetic (quoted in TFLOP/s, % of the matmul ceiling); the rest are bound
# by bytes (TB/s, % of the read ceiling).
FLOP_BOUND = ("seed1_prefill512", "prefill_4x4096")


def seed_shapes_path() -> Path:
  env = os.environ.get("JVA_SEED_SHAPES")
  candidates = ([Path(env)] if env else []) + [
      REPO.parent / "shared" / "data" / "seed_shapes.json",
      HERE / "data" / "seed_shapes.json"]
  for path in candidates:
    if path.is_file():
      return path
  raise FileNotFoundError(f"seed_shapes.json not found; looked at {[str(p) for p in candidates]} "
                          "(set JVA_SEED_SHAPES)")


def load_seed_cases(path: Optional[Path] = None) -> Dict[str, dict]:
  data = json.loads(Path(path or seed_shapes_path()).read_text())
  for key, want in (("num_heads", NUM_HEADS), ("num_kv_heads", NUM_KV_HEADS),
                    ("head_dim", HEAD_DIM), ("block_size", BLOCK_SIZE)):
    if data.get(key, want) != want:
      raise ValueError(f"seed_shapes.json has {key}={data[key]}, this module assumes {want}")
  return {c["name"]: c for c in data["cases"]}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  cu_seqlens_q: Tuple[int, ...]
  seqused_k: Tuple[int, ...]
  distinct_pages: bool  # every page belongs to one sequence (else drawn from [0, num_blocks))
  num_blocks_shared: int = SEED_NUM_BLOCKS  # cache pages when pages are drawn at random
  num_heads: int = NUM_HEADS
  num_kv_heads: int = NUM_KV_HEADS
  head_dim: int = HEAD_DIM
  block_size: int = BLOCK_SIZE
  causal: bool = True

  # ---- static facts --------------------------------------------------------------------------
  @property
  def batch(self) -> int:
    return len(self.seqused_k)

  @property
  def seqlens_q(self) -> List[int]:
    c = self.cu_seqlens_q
    return [c[i + 1] - c[i] for i in range(self.batch)]

  @property
  def total_q(self) -> int:
    return self.cu_seqlens_q[-1]

  @property
  def max_seqlen_q(self) -> int:
    return max(self.seqlens_q)

  @property
  def max_seqlen_k(self) -> int:
    return max(self.seqused_k)

  @property
  def max_blocks(self) -> int:
    return -(-self.max_seqlen_k // self.block_size)

  @property
  def pages_per_seq(self) -> List[int]:
    return [-(-k // self.block_size) for k in self.seqused_k]

  @property
  def num_blocks(self) -> int:
    """Pages of one cache (one input set)."""
    return sum(self.pages_per_seq) if self.distinct_pages else self.num_blocks_shared

  @property
  def decode_only(self) -> bool:
    return all(s == 1 for s in self.seqlens_q)

  @property
  def flop_bound(self) -> bool:
    return self.name in FLOP_BOUND or UNIFORM_PREFILL.fullmatch(self.name) is not None

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads

  # ---- inputs --------------------------------------------------------------------------------
  def block_table(self, seed: int) -> np.ndarray:
    """int32 [batch, max_blocks]; entries past a sequence's pages are valid random page ids."""
    rng = np.random.default_rng(seed)
    n = self.num_blocks
    table = rng.integers(0, n, size=(self.batch, self.max_blocks), dtype=np.int64)
    if self.distinct_pages:
      perm = rng.permutation(n)
      start = 0
      for b, p in enumerate(self.pages_per_seq):
        table[b, :p] = perm[start:start + p]
        start += p
    return table.astype(np.int32)

  # ---- the two numbers -----------------------------------------------------------------------
  def allowed_pairs(self) -> int:
    """(q, k) pairs the mask keeps: causal bottom-right, query i of a sequence sees j <= i + sk - sq."""
    total = 0
    for sq, sk in zip(self.seqlens_q, self.seqused_k):
      if not self.causal:
        total += sq * sk
        continue
      i = np.arange(sq, dtype=np.int64)
      total += int(np.clip(i + sk - sq + 1, 0, sk).sum())
    return total

  def kv_bytes(self, dtype: str = "float16") -> int:
    return sum(self.seqused_k) * self.num_kv_heads * self.head_dim * 2 * ITEMSIZE[dtype]

  def q_bytes(self, dtype: str = "float16") -> int:
    return self.total_q * self.num_heads * self.head_dim * ITEMSIZE[dtype]

  def bytes_moved(self, dtype: str = "float16", kv_dtype: Optional[str] = None) -> int:
    """KV (in kv_dtype, default dtype) + q + out (in dtype): each read (written) once."""
    return self.kv_bytes(kv_dtype or dtype) + 2 * self.q_bytes(dtype)

  def flops(self) -> int:
    return 4 * self.head_dim * self.num_heads * self.allowed_pairs()

  def page_bytes(self, dtype: str = "float16") -> int:
    """One page of K (or of V)."""
    return self.block_size * self.num_kv_heads * self.head_dim * ITEMSIZE[dtype]

  def cache_bytes(self, dtype: str = "float16") -> int:
    """K and V caches of one input set (contiguous form)."""
    return 2 * self.num_blocks * self.page_bytes(dtype)

  def touched_bytes(self, block_table: np.ndarray, dtype: str = "float16",
                    kv_dtype: Optional[str] = None) -> int:
    """Bytes one call brings through L2: the distinct pages it reads (K and V, in kv_dtype, default
    dtype), q and out."""
    used = np.concatenate([block_table[b, :p] for b, p in enumerate(self.pages_per_seq) if p])
    pages = len(np.unique(used)) if used.size else 0
    return 2 * pages * self.page_bytes(kv_dtype or dtype) + 2 * self.q_bytes(dtype)

  def summary(self, dtype: str = "float16") -> dict:
    return dict(case=self.name, batch=self.batch, total_q=self.total_q,
                max_seqlen_q=self.max_seqlen_q, max_seqlen_k=self.max_seqlen_k,
                sum_seqused_k=sum(self.seqused_k), num_blocks=self.num_blocks,
                distinct_pages=self.distinct_pages, bytes=self.bytes_moved(dtype),
                kv_bytes=self.kv_bytes(dtype), flops=self.flops(),
                bound="flops" if self.flop_bound else "bytes")


def _uniform(name, sq, sk, batch, distinct=True, **kw) -> Case:
  cu = tuple(int(x) for x in np.arange(batch + 1) * sq)
  return Case(name, cu, (sk,) * batch, distinct_pages=distinct, **kw)


def _spread(name, batch, mean, radius) -> Case:
  """B one-query sequences, lengths K - R ... K + R evenly (total B x K up to rounding), shuffled
  by a fixed seed."""
  if not 0 <= radius < mean:
    raise ValueError(f"{name}: the spread R must be in [0, K), got R={radius}, K={mean}")
  ramp = np.rint(mean + radius * np.linspace(-1.0, 1.0, batch)).astype(np.int64)
  lens = np.random.default_rng(0).permutation(ramp)
  cu = tuple(int(x) for x in np.arange(batch + 1))
  return Case(name, cu, tuple(int(k) for k in lens), distinct_pages=True)


def get_cases(tiny: bool = False, seed_path: Optional[Path] = None) -> Dict[str, Case]:
  """All named cases, in CASE_NAMES order. tiny: same names, shapes small enough for a CPU run."""
  if tiny:
    return _tiny_cases()
  seeds = load_seed_cases(seed_path)
  cases = {}
  for name in ("seed1_prefill512", "seed2_small_mixed", "seed3_mixed55", "seed4_long200"):
    c = seeds[name]
    cases[name] = Case(name, tuple(c["cu_seqlens_q"]), tuple(c["seqused_k"]), distinct_pages=False)
  s4 = seeds["seed4_long200"]
  cases["seed4_distinct"] = Case("seed4_distinct", tuple(s4["cu_seqlens_q"]), tuple(s4["seqused_k"]),
                                 distinct_pages=True)
  cases["decode_256x4096"] = _uniform("decode_256x4096", 1, 4096, 256)
  cases["decode_8x32768"] = _uniform("decode_8x32768", 1, 32768, 8)
  cases["prefill_4x4096"] = _uniform("prefill_4x4096", 4096, 4096, 4)
  assert tuple(cases) == CASE_NAMES
  return cases


def is_case(name: str) -> bool:
  """A named case or a `decode_<B>x<K>` one."""
  return (name in CASE_NAMES or UNIFORM_DECODE.fullmatch(name) is not None
          or SPREAD_DECODE.fullmatch(name) is not None or UNIFORM_PREFILL.fullmatch(name) is not None)


def cases_for(names, tiny: bool = False) -> Dict[str, Case]:
  """The cases `names` (named, `decode_<B>x<K>` or `prefill_<B>x<L>`; tiny: named ones shrunk,
  parsed ones as given)."""
  named = get_cases(tiny=tiny) if any(n in CASE_NAMES for n in names) else {}
  out = {}
  for name in names:
    m = UNIFORM_DECODE.fullmatch(name)
    pm = UNIFORM_PREFILL.fullmatch(name)
    sm = SPREAD_DECODE.fullmatch(name)
    if name in named:
      out[name] = named[name]
    elif sm:
      out[name] = _spread(name, *(int(g) for g in sm.groups()))
    elif m:
      out[name] = _uniform(name, 1, int(m.group(2)), int(m.group(1)))
    elif pm:
      page = {"block_size": int(pm.group(3))} if pm.group(3) else {}
      out[name] = _uniform(name, int(pm.group(2)), int(pm.group(2)), int(pm.group(1)), **page)
    else:
      raise ValueError(f"unknown case {name!r}: one of {CASE_NAMES}, decode_<B>x<K>, decode_<B>x<K>r<R> "
                       "or prefill_<B>x<L>")
  return out


def _tiny_cases() -> Dict[str, Case]:
  """Plumbing checks on a CPU: same names and kinds (prefill, mixed, shared/distinct pages)."""
  small = dict(num_blocks_shared=48)
  cases = {
      "seed1_prefill512": Case("seed1_prefill512", (0, 40), (40,), False, **small),
      "seed2_small_mixed": Case("seed2_small_mixed", (0, 1, 2, 12), (1, 1, 10), False, **small),
      "seed3_mixed55": Case("seed3_mixed55", (0, 1, 2, 3, 9), (35, 34, 33, 32), False, **small),
      "seed4_long200": Case("seed4_long200", (0, 1, 2, 3, 4, 5, 7), (70, 65, 60, 55, 50, 48), False,
                            **small),
      "seed4_distinct": Case("seed4_distinct", (0, 1, 2, 3, 4, 5, 7), (70, 65, 60, 55, 50, 48), True),
      "decode_256x4096": _uniform("decode_256x4096", 1, 64, 8),
      "decode_8x32768": _uniform("decode_8x32768", 1, 256, 2),
      "prefill_4x4096": _uniform("prefill_4x4096", 48, 48, 2),
  }
  assert tuple(cases) == CASE_NAMES
  return cases


if __name__ == "__main__":
  for case in get_cases().values():
    s = case.summary()
    print(f"{s['case']:18s} B={s['batch']:4d} T={s['total_q']:6d} maxk={s['max_seqlen_k']:6d} "
          f"pages={s['num_blocks']:6d} bytes={s['bytes'] / 1e6:9.1f} MB flops={s['flops'] / 1e9:8.2f} G "
          f"bound={s['bound']}")
