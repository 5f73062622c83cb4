#!/usr/bin/env python3
"""Plots bench_serving results: decode step time per batch size, one bar per (file, backend, mode),
beside the step's bandwidth bound (weights + K/V bytes over the read ceiling of that run).

  python benchmarks/plot_serving.py A.json B.json ... -o benchmarks/results/serving.png
  python benchmarks/plot_serving.py "one step, scan=benchmarks/results/X.json" ...   (label=path)

Records without `bound_ms` (older files) get no bound mark. Bars are labelled with tokens/s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Tuple

from plot import save  # benchmarks/ is the script's directory


def series(label: str, doc: dict) -> List[Tuple[str, dict]]:
  """(bar label, {batch: record}) per (backend, mode) of one results file."""
  groups = {}
  for r in doc["records"]:
    key = (r.get("backend", "auto"), r.get("mode", "step"))
    groups.setdefault(key, {})[r["batch"]] = r
  many = len(groups) > 1
  return [(f"{label} ({backend}, {mode})" if many else label, recs) for (backend, mode), recs in groups.items()]


def plot(inputs: List[Tuple[str, dict]], out_path, title: str = None):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  bars = [s for label, doc in inputs for s in series(label, doc)]
  batches = sorted({b for _, recs in bars for b in recs})
  width = 0.8 / len(bars)
  fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(batches), 4.6))
  for i, (label, recs) in enumerate(bars):
    xs = [j + (i - (len(bars) - 1) / 2) * width for j, b in enumerate(batches) if b in recs]
    ys = [recs[b]["decode_step_ms"] for b in batches if b in recs]
    ax.bar(xs, ys, width * 0.95, label=label)
    for x, b in zip(xs, [b for b in batches if b in recs]):
      ax.annotate(f"{recs[b]['tokens_per_s']:.0f}", (x, recs[b]["decode_step_ms"]), ha="center", va="bottom",
                  fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
  for j, b in enumerate(batches):  # the bound of the newest file that has one
    bound = next((recs[b]["bound_ms"] for _, recs in reversed(bars) if b in recs and "bound_ms" in recs[b]), None)
    if bound:
      ax.hlines(bound, j - 0.45, j + 0.45, colors="black", linestyles="--")
      ax.annotate(f"bound {bound:.2f} ms", (j + 0.45, bound), ha="right", va="bottom", fontsize=7)
  ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
  ax.set_ylabel("decode step, ms (bar label: tokens/s)")
  ax.set_title(title or "serving decode step vs its bandwidth bound")
  ax.legend(fontsize=7, loc="upper left")
  ax.set_ylim(0, max(r["decode_step_ms"] for _, recs in bars for r in recs.values()) * 1.2)
  return save(fig, out_path)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("results", nargs="+", help="results JSON files, optionally 'label=path'")
  p.add_argument("-o", "--output", required=True, help="PNG path")
  p.add_argument("--title", default=None)
  args = p.parse_args(argv)
  inputs = []
  for item in args.results:
    label, _, path = item.rpartition("=")
    doc = json.loads(Path(path).read_text())
    inputs.append((label or f"{doc.get('commit', '?')[:7]}", doc))
  print(plot(inputs, args.output, args.title))


if __name__ == "__main__":
  main()
