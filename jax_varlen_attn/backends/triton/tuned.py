"""The tuned tile table: measured (block_n, num_warps, num_stages, optionally block_m) per problem class.

The table is data: `tuned.json` beside this module, written by `benchmarks/tune_triton.py` (its
header names the GPU and commit that produced it; copy the script's output here). Keys are
`key_of(regime, head_dim, page_size, group)`; a class the sweep did not cover, or without a clear
winner (one beating the heuristic by 2% in at least 3 of the 4 GQA groups of its class: see
`build_table` in the script), has no entry and `Config.resolved` falls back to its heuristic. An
entry never overrides a field the caller set, nor the latency rule for grids smaller than two waves.

regime: "decode" when a sequence brings at most `DECODE_MAX_QUERIES` queries on average (bound by
KV bytes: decode and decode-heavy mixed batches), else "prefill" (bound by matmuls; the sweep
measured prefill at page size 16 only, so prefill keys use 16 whatever the page size).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

from jax_varlen_attn.spec import AttentionSpec

TABLE_PATH = Path(__file__).with_name("tuned.json")
DECODE_MAX_QUERIES = 16
PREFILL_PAGE = 16


def key_of(regime: str, head_dim: int, page: int, group: int) -> str:
  return f"{regime}_d{head_dim}_p{page}_g{group}"


def table(path: Optional[Path] = None) -> dict:
  """{key: {"block_n", "num_warps", "num_stages", ...}} of `path` (default TABLE_PATH); {} when
  there is no such file."""
  return _read(Path(path or TABLE_PATH))


@functools.lru_cache(maxsize=None)
def _read(path: Path) -> dict:
  if not path.is_file():
    return {}
  entries = json.loads(path.read_text()).get("table", {})
  for key, entry in entries.items():
    # block_m is optional: without it the rows stay the heuristic's.
    for field in ("block_n", "num_warps", "num_stages") + (("block_m",) if "block_m" in entry else ()):
      if not isinstance(entry.get(field), int) or entry[field] < 1:
        raise ValueError(f"{path}: entry {key!r} has no positive int {field!r}: {entry}")
  return entries


def regime_of(spec: AttentionSpec) -> str:
  return "decode" if spec.mean_queries_per_sequence <= DECODE_MAX_QUERIES else "prefill"


def lookup(spec: AttentionSpec) -> Optional[dict]:
  """The table's entry for this problem class, or None (non-paged inputs: none)."""
  if spec.layout is None:
    return None
  regime = regime_of(spec)
  page = spec.layout.block_size if regime == "decode" else PREFILL_PAGE
  return table().get(key_of(regime, spec.head_dim, page, spec.group_size))
