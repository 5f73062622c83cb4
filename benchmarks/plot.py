#!/usr/bin/env python3
"""Plots a benchmark results JSON (docs/contract.md, "Benchmark results") as one panel per case.

Bars: effective TB/s (memory-bound cases: decode / mixed) or TFLOP/s (prefill: seed1_prefill512,
prefill_4x4096) of every implementation / layout / variant whose output was checked correct; wrong
results are marked with an X at the bottom. Horizontal lines: the ceilings measured in the same run
(read and copy TB/s, or fp16 matmul TFLOP/s).

  python benchmarks/plot.py benchmarks/results/X.json -o benchmarks/results/X.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMPL_COLORS = {"jva-triton": "#1f77b4", "jva-pallas": "#17becf", "jva-xla": "#9467bd",
               "flaggems": "#d62728", "jax-pallas-paged": "#ff7f0e", "xla-naive": "#7f7f7f"}
LAYOUT_HATCH = {"contiguous": "", "strided": "//", "contiguous_2x": "--", "hnd": "..", "fused": "xx",
                "stacked": "\\\\"}
SHORT = {"page-stride-constexpr": "pstride", "runtime-stride": "rt-stride", "row-id": "row-id",
         "cuda-graph": "", "default": "", "plain-calls": "plain"}


def _label(r: dict) -> str:
  var = r.get("variant") or ""
  var = "best" if var.startswith("block_h") else SHORT.get(var, var)
  impl = r["impl"].replace("jva-", "")
  layout = {"contiguous_2x": "cont2x"}.get(r["layout"], r["layout"][:6])
  parts = [impl, layout] + ([var] if var else [])
  return " ".join(parts)


def plot(doc: dict, out_path, title: str = None):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = [r for r in doc["records"] if r.get("case")]
  cases = []
  for r in records:
    if r["case"] not in cases:
      cases.append(r["case"])
  if not cases:
    raise ValueError("no records to plot")
  ceil = doc.get("ceilings") or {}
  ncols = min(4, len(cases))
  nrows = -(-len(cases) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.6 * nrows), squeeze=False)
  for ax, case in zip(axes.flat, cases):
    rows = [r for r in records if r["case"] == case and r.get("status") in ("ok", "wrong")]
    flops = any(r.get("bound") == "flops" for r in records if r["case"] == case)
    key, unit = ("tflops", "TFLOP/s") if flops else ("tbps", "TB/s")
    labels, values, walls, colors, hatches = [], [], [], [], []
    for r in rows:
      labels.append(_label(r))
      ok = r.get("status") == "ok"
      # JAX records: the device busy time (bench_attention's ms_device) is the bar, the wall-clock
      # figure of the jitted K-call function a tick; peers (CUDA-graph replay) have one figure.
      values.append((r.get(key + "_device") or r.get(key) or 0.0) if ok else 0.0)
      walls.append(r.get(key) if ok and r.get(key + "_device") else None)
      colors.append(IMPL_COLORS.get(r["impl"], "#333333"))
      hatches.append(LAYOUT_HATCH.get(r["layout"], ""))
    xs = range(len(rows))
    bars = ax.bar(xs, values, color=colors, edgecolor="black", linewidth=0.5)
    for bar, hatch in zip(bars, hatches):
      bar.set_hatch(hatch)
    for x, r in zip(xs, rows):
      if walls[x]:
        ax.plot([x - 0.4, x + 0.4], [walls[x]] * 2, color="black", linewidth=1.2)
      if r.get("status") == "wrong":
        ax.text(x, 0, "X\nwrong", ha="center", va="bottom", color="red", fontsize=7, fontweight="bold")
      elif r.get("ms") is not None:
        ms = r.get("ms_device") or r["ms"]
        ax.text(x, values[x], f"{ms:.3g}ms", ha="center", va="bottom", fontsize=6, rotation=90)
    if flops:
      lines = [("matmul fp16", ceil.get("matmul_fp16_tflops"), "black")]
    else:
      lines = [("read", ceil.get("read_tbps"), "black"), ("copy", ceil.get("copy_tbps"), "gray")]
    for name, value, color in lines:
      if value:
        ax.axhline(value, color=color, linestyle="--", linewidth=1)
        ax.text(len(rows) - 0.5 if rows else 0, value, f" {name} {value:.3g}", va="bottom", ha="right",
                fontsize=7, color=color)
    top = max([v for v in values] + [v for _, v, _ in lines if v] + [1e-9])
    ax.set_ylim(0, top * 1.18)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"effective {unit}")
    ax.set_title(case, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  for ax in list(axes.flat)[len(cases):]:
    ax.axis("off")
  fig.suptitle(title or f"{doc.get('gpu', '?')}  {doc.get('dtype', '')}  commit {str(doc.get('commit', '?'))[:10]}"
               f"  {doc.get('date', '')}\nhatched: strided (//), contiguous_2x (--); bars: device time "
               "(JAX) or CUDA-graph replay (torch); ticks: JAX wall time", fontsize=10)
  return save(fig, out_path)


def save(fig, out_path) -> Path:
  """Writes a figure as PNG (parents made) and closes it; returns the path."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("results", help="results JSON")
  p.add_argument("-o", "--output", default=None, help="PNG path (default: beside the JSON)")
  p.add_argument("--title", default=None)
  args = p.parse_args(argv)
  doc = json.loads(Path(args.results).read_text())
  out = args.output or str(Path(args.results).with_suffix(".png"))
  print(plot(doc, out, args.title))


if __name__ == "__main__":
  main()
