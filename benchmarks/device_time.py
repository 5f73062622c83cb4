"""Device time of a jitted JAX function: the GPU's own kernel timestamps (CUPTI, via jax.profiler).

Why: bench_attention's `ms` for a JAX implementation is wall time around a jitted function of K
calls, so a small kernel (seed1, seed2: 6-16 us) is charged XLA's host-side cost of launching each
custom call. FlagGems' figure is a CUDA-graph replay, which has no host cost in the loop. This
module reads what the GPU itself spent: every kernel / memset / memcpy the function ran on the
device, from the profiler's trace, as

  busy_us: the union of those intervals (time some work of ours was on the GPU), and
  span_us: first start to last end (busy plus the gaps where the GPU waited for the host).

Both divided by the number of calls in the function. busy is the like-for-like partner of a graph
replay's time (a graph also leaves ~1 us between its kernels, so busy slightly favours us on tiny
kernels); span is what the GPU was held for.

  python -m benchmarks.device_time TRACE.json.gz   # prints the stream threads and their totals
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

# Rows of the GPU process in the trace that are not work on a stream: XLA's per-op / per-module
# annotations repeat the kernels' intervals, launch statistics are host-side.
_NOT_STREAMS = ("xla", "step", "launch", "source", "framework", "tensorflow", "python")


def _union(intervals: List[Tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def stream_events(trace: dict) -> Tuple[List[dict], Dict[Tuple[int, int], str]]:
  """X events on the GPU's stream rows, and the names of those rows ((pid, tid) -> name)."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") != "M":
      continue
    if e.get("name") == "process_name":
      processes[e["pid"]] = str(e.get("args", {}).get("name", ""))
    elif e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  gpu_pids = {pid for pid, name in processes.items() if name.startswith("/device:GPU")}
  rows = {}
  for (pid, tid), name in threads.items():
    if pid in gpu_pids and not any(word in name.lower() for word in _NOT_STREAMS):
      rows[(pid, tid)] = name
  # Prefer rows named as streams where the profiler names them so.
  named = {k: v for k, v in rows.items() if "stream" in v.lower()}
  rows = named or rows
  out = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in rows
         and e.get("dur") is not None]
  return out, rows


def summarize(events: Iterable[dict]) -> dict:
  """busy / span (us) and the distinct event names of a list of X events."""
  ivs = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events]
  if not ivs:
    return dict(busy_us=None, span_us=None, events=0, names=[])
  names = sorted({str(e.get("name", ""))[:80] for e in events})
  return dict(busy_us=_union(ivs), span_us=max(e for _, e in ivs) - min(s for s, _ in ivs),
              events=len(ivs), names=names)


def per_kernel(events: Iterable[dict], calls: int, top: int = 12) -> List[dict]:
  """Device work by kernel name (the first 70 characters): microseconds and count a call, the
  largest first. Summed durations, not a union: concurrent kernels each count in full."""
  by_name: Dict[str, List[float]] = {}
  for e in events:
    by_name.setdefault(str(e.get("name", ""))[:70], []).append(float(e["dur"]))
  rows = [dict(name=n, us_per_call=round(sum(d) / calls, 3), count_per_call=round(len(d) / calls, 2))
          for n, d in by_name.items()]
  rows.sort(key=lambda r: -r["us_per_call"])
  return rows[:top]


def gaps_before(events: Iterable[dict], calls: int, top: int = 12) -> List[dict]:
  """Where the GPU waited: each idle stretch between a kernel's start and the end of all work before
  it, charged to that kernel's name (the first 70 characters), in us and count a call, the largest
  first, with `after`: the kernel that most often ended just before it. (A stretch inside one
  call's span; the first event's wait is not counted.)"""
  by_name: Dict[str, List[float]] = {}
  before: Dict[str, collections.Counter] = {}
  end, last = None, ""
  for e in sorted(events, key=lambda e: float(e["ts"])):
    start, stop = float(e["ts"]), float(e["ts"]) + float(e["dur"])
    name = str(e.get("name", ""))[:70]
    if end is not None and start > end:
      by_name.setdefault(name, []).append(start - end)
      before.setdefault(name, collections.Counter())[last] += 1
    if end is None or stop >= end:
      end, last = stop, name
  rows = [dict(name=n, gap_us_per_call=round(sum(g) / calls, 2), count_per_call=round(len(g) / calls, 2),
               after=before[n].most_common(1)[0][0]) for n, g in by_name.items()]
  rows.sort(key=lambda r: -r["gap_us_per_call"])
  return rows[:top]


def load_trace(directory: str) -> dict:
  paths = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True))
  if not paths:
    paths = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no trace under {directory}")
  with gzip.open(paths[-1], "rt") as f:
    return json.load(f)


def measure(jax, fn, args, calls: int, runs: int = 3, breakdown: bool = False) -> Optional[dict]:
  """Device time per call of `fn(*args)` (which makes `calls` calls), fn already compiled.

  Profiles `runs` executions and keeps the one with the least busy time per call (the profiler's
  own start-up can land in the first). Returns dict(busy_ms, span_ms, kernels_per_call, names) or
  None where the trace holds no GPU stream (a CPU run, or a profiler without CUPTI); breakdown:
  also `per_kernel` of that run (per_kernel's rows).
  """
  best = None
  for _ in range(runs):
    with tempfile.TemporaryDirectory(prefix="jva-trace-") as d:
      jax.block_until_ready(fn(*args))  # nothing of a previous run still queued
      with jax.profiler.trace(d):
        jax.block_until_ready(fn(*args))
      try:
        events, _ = stream_events(load_trace(d))
      except FileNotFoundError:
        return None
    s = summarize(events)
    if s["busy_us"] is None:
      return None
    if best is None or s["busy_us"] < best["busy_us"]:
      best = s
      if breakdown:
        best["per_kernel"] = per_kernel(events, calls)
  out = dict(busy_ms=best["busy_us"] / 1e3 / calls, span_ms=best["span_us"] / 1e3 / calls,
             kernels_per_call=round(best["events"] / calls, 2), names=best["names"][:8])
  if breakdown:
    out["per_kernel"] = best["per_kernel"]
  return out


def host_events(trace: dict) -> List[dict]:
  """X events of the host (every process but the GPU's): XLA's thunks, CUDA driver calls, Python."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and str(e.get("args", {}).get("name", "")).startswith("/device:GPU")}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") not in gpu_pids
          and e.get("dur") is not None]


def host_breakdown(trace: dict, calls: int, top: int = 12) -> List[dict]:
  """The host-side work of a profiled execution: per event name (hlo op / thunk suffixes dropped),
  total microseconds and count per call, the largest first. Nested events each count in full (a
  thunk and the driver call inside it both appear), so this says where, not a sum."""
  by_name: Dict[str, List[float]] = {}
  for e in host_events(trace):
    name = str(e.get("name", "")).split("#", 1)[0].split(":", 1)[0].strip()[:60] or "?"
    by_name.setdefault(name, []).append(float(e["dur"]))
  rows = [dict(name=n, us_per_call=round(sum(d) / calls, 2), count_per_call=round(len(d) / calls, 2))
          for n, d in by_name.items()]
  rows.sort(key=lambda r: -r["us_per_call"])
  return rows[:top]


def profile(jax, fn, args, calls: int, runs: int = 3) -> Optional[dict]:
  """`measure`, plus the host-side breakdown (host_breakdown) of the run it keeps."""
  best = None
  for _ in range(runs):
    with tempfile.TemporaryDirectory(prefix="jva-trace-") as d:
      jax.block_until_ready(fn(*args))
      with jax.profiler.trace(d):
        jax.block_until_ready(fn(*args))
      try:
        trace = load_trace(d)
      except FileNotFoundError:
        return None
    events, _ = stream_events(trace)
    s = summarize(events)
    if s["busy_us"] is None:
      return None
    if best is None or s["busy_us"] < best[0]["busy_us"]:
      best = (s, host_breakdown(trace, calls))
  s, host = best
  return dict(busy_ms=s["busy_us"] / 1e3 / calls, span_ms=s["span_us"] / 1e3 / calls,
              kernels_per_call=round(s["events"] / calls, 2), names=s["names"][:8], host=host)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  with gzip.open(argv[0], "rt") as f:
    trace = json.load(f)
  events, rows = stream_events(trace)
  for key, name in sorted(rows.items()):
    mine = [e for e in events if (e["pid"], e["tid"]) == key]
    s = summarize(mine)
    print(f"{name}: {s['events']} events, busy {s['busy_us']} us, span {s['span_us']} us")
  return 0


if __name__ == "__main__":
  sys.exit(main())
