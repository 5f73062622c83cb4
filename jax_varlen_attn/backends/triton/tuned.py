"""The tuned tile table: measured (block_n, num_warps, num_stages, optionally block_m) per problem class.

The table is data: `tuned.json` beside this module, one table per GPU kind (`device_kind`, e.g.
"NVIDIA H100 80GB HBM3") under "devices", written by `benchmarks/tune_triton.py --rebuild` (each
names the commits and sweeps that produced it). "same_as" lets a kind use another's table (with the
reason); "without_gpu" names the table used where JAX sees no GPU (kernels compiled for sm_90 on a
CPU). A GPU of any other kind gets no table: the heuristics alone. Keys are
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

from jax_varlen_attn.backends import device
from jax_varlen_attn.spec import AttentionSpec

TABLE_PATH = Path(__file__).with_name("tuned.json")
DECODE_MAX_QUERIES = 16
PREFILL_PAGE = 16


def key_of(regime: str, head_dim: int, page: int, group: int) -> str:
  return f"{regime}_d{head_dim}_p{page}_g{group}"


def table(path: Optional[Path] = None, kind: Optional[str] = "current") -> dict:
  """{key: {"block_n", "num_warps", "num_stages", ...}}: the table of GPU `kind` in `path` (default
  TABLE_PATH; kind "current": the GPU JAX sees, `device.device_kind()`, None: no GPU); {} for a kind
  without one, or without the file."""
  doc = _read(Path(path or TABLE_PATH))
  kind = device.device_kind() if kind == "current" else kind
  name = doc.get("without_gpu") if kind is None else kind
  name = doc.get("same_as", {}).get(name, {}).get("table_of", name)
  return doc.get("devices", {}).get(name, {}).get("table", {})


@functools.lru_cache(maxsize=None)
def _read(path: Path) -> dict:
  """The file, every device's table checked; {} when there is no such file."""
  if not path.is_file():
    return {}
  doc = json.loads(path.read_text())
  for kind, per_device in doc.get("devices", {}).items():
    for key, entry in per_device.get("table", {}).items():
      # block_m is optional: without it the rows stay the heuristic's.
      for field in ("block_n", "num_warps", "num_stages") + (("block_m",) if "block_m" in entry else ()):
        if not isinstance(entry.get(field), int) or entry[field] < 1:
          raise ValueError(f"{path}: {kind!r} entry {key!r} has no positive int {field!r}: {entry}")
  for kind, alias in doc.get("same_as", {}).items():
    if alias.get("table_of") not in doc.get("devices", {}):
      raise ValueError(f"{path}: same_as {kind!r} names no table: {alias}")
  return doc


def regime_of(spec: AttentionSpec) -> str:
  return "decode" if spec.mean_queries_per_sequence <= DECODE_MAX_QUERIES else "prefill"


def lookup(spec: AttentionSpec) -> Optional[dict]:
  """The table's entry for this problem class, or None (non-paged inputs: none)."""
  if spec.layout is None:
    return None
  regime = regime_of(spec)
  page = spec.layout.block_size if regime == "decode" else PREFILL_PAGE
  return table().get(key_of(regime, spec.head_dim, page, spec.group_size))
