"""bench_attention's results: ratios between records, the answers to the run's questions, the JSON
file and the compact table printed last."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
  if p not in sys.path:
    sys.path.insert(0, p)

import numpy as np  # noqa: E402

from bench_inputs import PEERS, QUESTION, kv_tag  # noqa: E402


# ---- results ---------------------------------------------------------------------------------------

def add_ratios(records: List[dict]):
  """vs_<peer>: the peer's ms / this record's ms, same case (and layout where the peer has one)."""
  ok = [r for r in records if r.get("status") == "ok" and r.get("ms")]
  for r in ok:
    for peer in PEERS:
      if r["impl"] == peer:
        continue
      key = "vs_" + peer.replace("-", "_")
      same = [p for p in ok if p["impl"] == peer and p["case"] == r["case"] and p["layout"] == r["layout"]]
      contig = [p for p in ok if p["impl"] == peer and p["case"] == r["case"]
                and p["layout"] == "contiguous"]
      if same:
        r[key] = round(same[0]["ms"] / r["ms"], 3)
        if peer == "flaggems" and same[0].get("ms_wall") and r.get("ms_wall"):
          r[key + "_wall"] = round(same[0]["ms_wall"] / r["ms_wall"], 3)
        if r.get("ms_device"):  # the peer's ms (a graph replay, or wall) / our device busy time
          r[key + "_device"] = round(same[0].get("ms_device", same[0]["ms"]) / r["ms_device"], 3)
      elif contig:
        r[key + "_contiguous"] = round(contig[0]["ms"] / r["ms"], 3)


def answers(records: List[dict], case_order) -> dict:
  """Per case: our default kernel on the strided (and doubled-storage contiguous) cache against the
  contiguous one. (Row-id addressing and runtime strides, the seed's questions, were answered and
  then taken out of the kernel: benchmarks/NOTES.md, session 7.)"""
  def ms(case, layout, key="ms"):
    for r in records:
      if (r["case"], r["layout"], r["impl"], r["variant"]) == (case, layout, "jva-triton", "page-stride-constexpr") \
          and r.get("status") == "ok" and r.get("kv_dtype", r["dtype"]) == r["dtype"] and not r.get("sinks"):
        return r.get(key)
    return None

  ratio = lambda a, b: round(a / b, 3) if a is not None and b else None  # noqa: E731
  rows = []
  for case in case_order:
    contig, strided = ms(case, "contiguous"), ms(case, "strided")
    if contig is None or strided is None:
      continue
    contig_dev, strided_dev = ms(case, "contiguous", "ms_device"), ms(case, "strided", "ms_device")
    rows.append(dict(case=case, contiguous_ms=contig, strided_ms=strided,
                     strided_over_contiguous=ratio(strided, contig),
                     strided_over_contiguous_device=ratio(strided_dev, contig_dev),
                     # same storage and addresses as strided, contiguous addressing
                     strided_over_contiguous_2x_device=ratio(strided_dev, ms(case, "contiguous_2x", "ms_device"))))
  # Device time where every case has it: the wall time of a 5 us kernel is mostly launch noise.
  key = "strided_over_contiguous"
  if rows and all(r["strided_over_contiguous_device"] for r in rows):
    key = "strided_over_contiguous_device"
  verdict = None
  if rows:
    geo = math.exp(sum(math.log(r[key]) for r in rows) / len(rows))
    verdict = (f"strided / contiguous geo-mean {geo:.3f} over {len(rows)} cases "
               f"({'device' if key.endswith('device') else 'wall'} time); per case: "
               + ", ".join(f"{r['case']} {r[key]}" for r in rows))
  return dict(question=QUESTION, verdict=verdict, per_case=rows)


def kv_answers(records: List[dict]) -> List[dict]:
  """Per (case, layout, impl, variant) run on more than one kv variant: each variant's times, % of
  the read ceiling (on its own bytes) and errors, and its device-time speedup over the default."""
  groups: Dict[tuple, Dict[str, dict]] = {}
  for r in records:
    if r.get("status") != "ok" or "kv_dtype" not in r:
      continue
    key = (r["case"], r["layout"], r["impl"], r["variant"])
    groups.setdefault(key, {})[kv_tag(r["kv_dtype"], r.get("sinks", False))] = r
  rows = []
  for (case, layout, impl, variant), by_kv in groups.items():
    if len(by_kv) < 2:
      continue
    base = next((r for r in by_kv.values() if r["kv_dtype"] == r["dtype"] and not r.get("sinks")), None)
    row = dict(case=case, layout=layout, impl=impl, variant=variant, kv={})
    for tag, r in by_kv.items():
      t = r.get("ms_device") or r.get("ms")
      bt = base and (base.get("ms_device") or base.get("ms"))
      row["kv"][tag] = dict(ms=r.get("ms"), ms_device=r.get("ms_device"),
                            tbps=r.get("tbps_device", r.get("tbps")),
                            pct_of_ceiling=r.get("pct_of_ceiling_device", r.get("pct_of_ceiling")),
                            rel_err=r.get("rel_err"), rel_err_unquantized=r.get("rel_err_unquantized"),
                            speedup=round(bt / t, 3) if bt and t else None)
    rows.append(row)
  return rows


def write_results(path: Path, doc: dict):
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
  tmp.replace(path)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  return str(x)


def _fmt(x, nd=3):
  return "-" if x is None else f"{x:.{nd}f}"


IMPL_SHORT = {"jva-triton": "triton", "jva-pallas": "pallas", "jva-xla": "xla", "flaggems": "flaggems",
              "jax-pallas-paged": "jax-paged", "xla-naive": "xla-naive"}
LAYOUT_SHORT = {"contiguous": "contig", "strided": "stride", "contiguous_2x": "cont2x"}
VARIANT_SHORT = {"page-stride-constexpr": "pstride-c", "runtime-stride": "rt-stride", "cuda-graph": "graph",
                 "default": "-", "plain-calls": "plain"}


def table(doc: dict) -> str:
  """One line per record, about 90 characters (the lead sees the last 12,000 of the output)."""
  c = doc["ceilings"]
  lines = [f"ceilings: read {_fmt(c.get('read_tbps'), 2)} TB/s, copy {_fmt(c.get('copy_tbps'), 2)} TB/s, "
           f"matmul fp16 {_fmt(c.get('matmul_fp16_tflops'), 0)} TFLOP/s | {doc['gpu']} | "
           f"{doc['commit'][:10]} | {doc['dtype']}",
           "impls: triton/pallas/xla = jva-*, jax-paged = jax-pallas-paged; pstride-c = page stride "
           "constexpr, rt-stride = runtime strides; vsFG = FlagGems ms / ms (same layout, else its "
           "contiguous); dev = device busy ms (profiler), dvFG = FlagGems ms / dev; wall = plain call ms",
           f"{'case':15s} {'layout':6s} {'impl':9s} {'variant':9s} {'ms':>8s} {'perf':>10s} "
           f"{'%ceil':>5s} {'vsFG':>5s} {'dev':>7s} {'%dev':>4s} {'dvFG':>5s} {'wall':>7s} status"]
  for r in doc["records"]:
    var = r.get("variant") or "-"
    var = "best-cfg" if var.startswith("block_h") else VARIANT_SHORT.get(var, var)
    if r.get("kv_dtype", r.get("dtype")) != r.get("dtype") or r.get("sinks"):
      var = kv_tag(r["kv_dtype"], r.get("sinks", False)).replace("+sinks", "+s") + ":" + var
    if var.startswith("cfg:"):  # cfg:num_splits=2;block_n=32 -> s2n32
      for long, short in (("num_splits=", "s"), ("block_n=", "n"), ("block_m=", "m"),
                          ("num_stages=", "st"), ("num_warps=", "w"), (";", "")):
        var = var.replace(long, short)
      var = var[4:]
    if r.get("ms") is not None:
      perf = (f"{r['tflops']:.0f}TFLOP/s" if r["bound"] == "flops" else f"{r['tbps']:.3g}TB/s")
    else:
      perf = "-"
    vs = r.get("vs_flaggems", r.get("vs_flaggems_contiguous"))
    status = r.get("status") or "?"
    if status == "wrong":
      status = f"WRONG rel_err {r.get('rel_err')}"
    elif status in ("error", "skipped"):
      status = f"{status}: {str(r.get('note') or r.get('error') or '')[:36]}"
    lines.append(f"{r['case'][:15]:15s} {LAYOUT_SHORT.get(r['layout'], r['layout'])[:6]:6s} {IMPL_SHORT.get(r['impl'], r['impl'])[:9]:9s} "
                 f"{var[:9]:9s} {_fmt(r.get('ms'), 4):>8s} {perf:>10s} "
                 f"{_fmt(r.get('pct_of_ceiling'), 0):>5s} {_fmt(vs, 2):>5s} "
                 f"{_fmt(r.get('ms_device'), 4):>7s} {_fmt(r.get('pct_of_ceiling_device'), 0):>4s} "
                 f"{_fmt(r.get('vs_flaggems_device'), 2):>5s} "
                 f"{_fmt(r.get('ms_wall'), 3):>7s} "
                 f"{status}")
  return "\n".join(lines)
