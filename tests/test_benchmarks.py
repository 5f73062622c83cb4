"""The benchmark scripts' plumbing on the CPU: they run, write their JSON, and their pure logic
(ncu attribution, the tile table's consistency rule) does what their docstrings say.

The timings here mean nothing (CPU, tiny shapes); the GPU numbers come from the GPU machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))


def _run(script, *args, out_dir):
  env = dict(os.environ, OUT=str(out_dir), JVA_COMMIT="test")
  env.pop("TRITON_INTERPRET", None)  # the dry runs use the XLA paths only
  proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_bench_attention_tiny_writes_checked_records(tmp_path):
  """Every named case is built (tiny); four of them run here: prefill, mixed, shared pages, a long
  split-KV decode (the other tiny tests run decode_256x4096 and seed3_mixed55)."""
  _run("bench_attention.py", "--tiny", "--cases", "seed1_prefill512,seed2_small_mixed,seed4_long200,decode_8x32768",
       "--out", "tiny_test", "--results-dir", str(tmp_path), out_dir=tmp_path / "copies")
  doc = json.loads((tmp_path / "tiny_test.json").read_text())
  assert doc["commit"] == "test" and doc["records"]
  ok = [r for r in doc["records"] if r["status"] == "ok"]
  assert ok and all(r["rel_err"] is not None and r["rel_err"] < r["tolerance"] for r in ok)
  assert (tmp_path / "tiny_test.png").is_file()


def test_bench_attention_tiny_fp8_cache_and_sinks(tmp_path):
  """--kv-dtype / --sinks: each case again on an fp8 cache and with sinks, in one run; records say
  which, count the cache's own bytes, and carry the error vs the dequantized and the fp16 inputs."""
  _run("bench_attention.py", "--tiny", "--cases", "decode_256x4096", "--impls", "jva-xla,xla-naive",
       "--layouts", "contiguous,stacked", "--kv-dtype", "float16,float8_e4m3fn", "--sinks",
       "--no-plot", "--out", "tiny_kv", "--results-dir", str(tmp_path), out_dir=tmp_path / "copies")
  doc = json.loads((tmp_path / "tiny_kv.json").read_text())
  recs = [r for r in doc["records"] if r["impl"] == "jva-xla"]
  assert {(r["kv_dtype"], r["sinks"], r["layout"]) for r in recs} == {
      (kv, s, lay) for kv in ("float16", "float8_e4m3fn") for s in (False, True)
      for lay in ("contiguous", "stacked")}
  assert all(r["status"] == "ok" and r["rel_err"] < r["tolerance"] for r in recs)
  naive = [r for r in doc["records"] if r["impl"] == "xla-naive"]
  assert naive and all(r["kv_dtype"] == "float16" and not r["sinks"] for r in naive)  # peers: fp16 only
  by = {(r["kv_dtype"], r["sinks"], r["layout"]): r for r in recs}
  fp16, fp8 = by[("float16", False, "contiguous")], by[("float8_e4m3fn", False, "contiguous")]
  assert fp8["bytes"] < fp16["bytes"]  # K / V at one byte an element
  assert fp16.get("rel_err_unquantized") is None
  # e4m3 keeps 3 mantissa bits: the quantization error shows against the fp16 inputs' reference.
  assert fp8["rel_err"] < 1e-3 < fp8["rel_err_unquantized"] < 0.1
  rows = [r for r in doc["kv_answers"] if r["impl"] == "jva-xla" and r["layout"] == "contiguous"]
  assert rows and set(rows[0]["kv"]) == {"fp16", "fp16+sinks", "e4m3", "e4m3+sinks"}


def test_bench_attention_tiny_softcap_and_alibi(tmp_path):
  """--softcap / --alibi: every call and the reference take them (a record within tolerance means
  the kernel and the bench's reference agree on them); peers skip; records say which."""
  _run("bench_attention.py", "--tiny", "--cases", "seed3_mixed55", "--impls", "jva-xla,xla-naive",
       "--softcap", "5", "--alibi", "--no-plot", "--out", "tiny_score", "--results-dir", str(tmp_path),
       out_dir=tmp_path / "copies")
  doc = json.loads((tmp_path / "tiny_score.json").read_text())
  recs = [r for r in doc["records"] if r["impl"] == "jva-xla"]
  assert recs and all(r["status"] == "ok" and r["rel_err"] < r["tolerance"] for r in recs)
  assert all(r["softcap"] == 5.0 and r["alibi"] for r in recs)
  assert not [r for r in doc["records"] if r["impl"] == "xla-naive"]  # no score options there


def test_bench_loop_tiny_writes_unrolled_stacked_and_fori_records(tmp_path):
  out = _run("bench_loop.py", "--tiny", "--impls", "jva-xla", "--out", "loop_test", "--results-dir",
             str(tmp_path), out_dir=tmp_path / "copies")
  doc = json.loads((tmp_path / "loop_test.json").read_text())
  assert doc["commit"] == "test"
  loops = sorted((r["layout"], r["loop"]) for r in doc["records"])
  assert loops == [(lay, loop) for lay in ("contiguous", "strided")
                   for loop in ("fori", "stacked", "unrolled")]
  for r in doc["records"]:
    assert r["status"] == "ok" and r["rel_err"] < r["tolerance"], r
    assert r["ms"] > 0 and r["ms_pipelined"] > 0 and r["k_calls"] >= 2
  assert "loop/dev" in out


def test_host_breakdown_groups_host_events_by_name():
  import device_time
  trace = _trace_with_two_streams()
  trace["traceEvents"] += [
      {"ph": "X", "pid": 1, "tid": 7, "ts": 1.0, "dur": 6.0, "name": "triton_kernel_call.96#hlo_op=x#"},
      {"ph": "X", "pid": 1, "tid": 7, "ts": 9.0, "dur": 4.0, "name": "triton_kernel_call.96#hlo_op=y#"}]
  rows = {r["name"]: r for r in device_time.host_breakdown(trace, calls=2)}
  assert rows["host"]["us_per_call"] == pytest.approx(250.0)
  assert rows["triton_kernel_call.96"] == dict(name="triton_kernel_call.96", us_per_call=5.0,
                                               count_per_call=1.0)
  assert not any(r["name"] in ("attn", "memcpy") for r in rows.values())  # GPU rows are not host


def test_bench_serving_tiny_compares_backends_and_modes(tmp_path):
  out = _run("bench_serving.py", "--tiny", "--mixed", "--profile", "--out", "serving_test", out_dir=tmp_path)
  doc = json.loads((tmp_path / "serving_test.json").read_text())
  keys = sorted((r["backend"], r["batch"], r["mode"]) for r in doc["records"])
  assert keys == sorted((b, n, m) for b in ("auto", "naive") for n in (1, 4) for m in ("multi", "step"))
  assert doc["read_ceiling"]["read_gbps"] > 0
  assert doc["commit"] and doc["commit_dirty"] in (True, False, None)  # bench_env.git_commit's pair
  for r in doc["records"]:
    assert r["tokens_per_s"] > 0 and r["decode_steps_timed"] >= 3 and 0 < r["bound_ms"], r
    assert r["weight_bytes"] > 0 and r["kv_bytes_per_step"] > 0
    if r["mode"] == "multi":  # the tiny model is fp32: the multi-step loop gives the same greedy tokens
      assert r["steps_per_call"] > 1 and r["same_tokens_as_step"] == 1.0
  assert [(r["batch"], r["mode"]) for r in doc["ratios"] if "speedup" in r] == [
      (1, "step"), (4, "step"), (1, "multi"), (4, "multi")]
  assert len([r for r in doc["ratios"] if "multi_over_step" in r]) == 4
  for r in doc["ratios"]:
    if "speedup" in r:  # the first differing token: a position in [0, tokens generated]
      assert 0 <= r["first_difference"] <= doc["records"][0]["generated"]
  assert [m["mode"] for m in doc["mixed"]] == ["step", "multi"]
  for m in doc["mixed"]:
    assert m["tokens"] > 0 and m["tokens_per_s"] > 0 and m["ttft_ms_p50"] <= m["ttft_ms_p99"]
    assert m["itl_ms_p99"] is not None and m["tpot_ms_p50"] is not None
  assert [p["batch"] for p in doc["profile"]] == [1, 4]  # on a CPU: no GPU stream, a note each
  assert "speedup" in out and "multi / step" in out


def test_bench_serving_check_every_modes_and_the_serving_plot(tmp_path):
  pytest.importorskip("matplotlib")
  _run("bench_serving.py", "--tiny", "--backends", "auto", "--modes", "multi,multi/2,multi-serial",
       "--min-split-tiles", "1", "--write-launch", "xla", "--out", "serving_n", out_dir=tmp_path)
  doc = json.loads((tmp_path / "serving_n.json").read_text())
  assert doc["write_launch"] == "xla"  # recorded (on a CPU the write is XLA's scatter either way)
  # "multi": the Engine's defaults (no checks, overlapped calls); "/N" checks; "-serial" no overlap.
  assert sorted((r["batch"], r["mode"], r["check_every"], r["overlap"]) for r in doc["records"]) == [
      (b, m, n, o) for b in (1, 4)
      for m, n, o in (("multi", 0, True), ("multi-serial", 0, False), ("multi/2", 2, True))]
  assert doc["min_split_tiles"] == 1
  with pytest.raises(AssertionError, match="multi/3"):  # must divide --steps-per-call (4 with --tiny)
    _run("bench_serving.py", "--tiny", "--modes", "multi/3", out_dir=tmp_path)
  png = tmp_path / "serving.png"
  out = _run("plot_serving.py", f"tiny={tmp_path / 'serving_n.json'}", "-o", str(png), out_dir=tmp_path)
  assert png.stat().st_size > 10_000 and str(png) in out


def test_bench_serving_kernel_mix_groups_gpu_time_by_category():
  import bench_serving
  meta = 'metadata={op_name="jit(decode_loop)/while/body/'
  hlo = "\n".join([
      "%fused_computation.1 (p: f32[4]) -> f32[4] {",
      f'  %multiply.1 = f32[4]{{0}} multiply(f32[4]{{0}} %p, f32[4]{{0}} %p), {meta}closed_call/rsqrt"}}',
      "}",
      "%fused_sort (p: f32[4]) -> f32[4] {",
      f'  %sort.2 = f32[4]{{0}} sort(f32[4]{{0}} %p), {meta}jit(_sample)/sort"}}',
      "}",
      "ENTRY %main (a: f32[4]) -> f32[4] {",
      "  %loop_multiply_fusion.3 = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused_computation.1",
      "  %sort_fusion = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused_sort",
      f'  %copy.4 = f32[4]{{0}} copy(f32[4]{{0}} %a), {meta}jit(dynamic_slice)"}}',
      "}"])
  trace = _trace_with_two_streams()
  x = lambda ts, dur, name, **args: {"ph": "X", "pid": 2, "tid": 10, "ts": ts, "dur": dur,  # noqa: E731
                                     "name": name, "args": args}
  trace["traceEvents"] = [e for e in trace["traceEvents"] if e["ph"] == "M"] + [
      x(0.0, 10.0, "varlen_attention_kernel"), x(10.0, 2.0, "write_kv_kernel"),
      x(12.0, 20.0, "nvjet_tst_64x8_64x16_4x1_v_bz_TNT"), x(32.0, 3.0, "loop_multiply_fusion_3"),
      x(35.0, 4.0, "some_kernel", hlo_op="sort_fusion"), x(39.0, 1.0, "copy_4"),
      x(50.0, 2.0, "MemcpyDtoH")]  # 10 us idle before it: a while-loop gap
  mix = bench_serving.kernel_mix(trace, hlo, steps=2)
  assert mix["us_per_step"] == {"attention": 5.0, "matmul/gemm": 10.0, "cache write": 1.0, "sampling": 2.0,
                                "copies/slices": 1.5, "norm/rope/elementwise": 1.5, "other": 0.0}
  assert mix["busy_us_per_step"] == 21.0 and mix["while_loop_gaps_us_per_step"] == 5.0
  assert mix["top_kernels"][0]["name"].startswith("nvjet") and mix["kernels_per_step"] == 3.5
  assert bench_serving.kernel_mix({"traceEvents": []}, hlo, steps=1) is None


def test_kernel_times_attributes_kernels_to_blocks_in_order(tmp_path):
  from kernel_times import summarize
  header = ('"ID","Kernel Name","Grid Size","Metric Name","Metric Unit","Metric Value"\n')
  rows = [("varlen_attention_kernel", 10_000), ("varlen_attention_kernel", 12_000),
          ("varlen_attention_kernel", 20_000), ("varlen_attention_kernel", 22_000)]
  csv = tmp_path / "ncu.csv"
  csv.write_text("==PROF== Connected\n" + header + "".join(
      f'"{i}","{name}(int)","(1, 1, 1)","gpu__time_duration.sum","nsecond","{ns:,}"\n'
      for i, (name, ns) in enumerate(rows)))
  log = tmp_path / "kt.log"
  log.write_text("PROFILE seed1 ours {}\nnoise\nPROFILE seed1 ours {\"block_n\": 128}\n")
  got = summarize(str(csv), str(log), reps=2)
  assert got == [("seed1 ours {}", {"varlen_attention_kernel": 11.0}),
                 ("seed1 ours {\"block_n\": 128}", {"varlen_attention_kernel": 21.0})]
  # A kernel count that does not split into the blocks is reported, not guessed.
  assert summarize(str(csv), str(log), reps=3)[0][0] == "unattributed"


def _entry(group, best_us, default_us=100.0, regime="decode", d=256, page=16, best="n32_w8_s2"):
  from jax_varlen_attn.backends.triton.tuned import key_of
  # n16_w4_s2 is what the heuristic picks for wide-head decode (tune_triton.default_equivalent)
  cands = {"n16_w4_s2": dict(us=default_us), "n64_w4_s1": dict(us=default_us * 1.1),
           best: dict(us=best_us)}
  return dict(regime=regime, head_dim=d, page=page, group=group, key=key_of(regime, d, page, group),
              default_us=default_us, candidates=cands)


def test_tile_table_keeps_only_winners_repeated_across_groups():
  pytest.importorskip("jax")
  from tune_triton import build_table
  consistent = [_entry(g, 88.0) for g in (1, 2, 4, 8)]  # 12% in every group
  assert sorted(build_table(consistent, 0.05)) == sorted(e["key"] for e in consistent)
  lone = [_entry(1, 80.0)] + [_entry(g, 99.0) for g in (2, 4, 8)]  # one group only
  assert build_table(lone, 0.05) == {}
  # The default-equivalent candidate (n16_w4_s2 for wide decode) counts as the default: a slow
  # first default timing alone does not make a win.
  slow_first = [dict(_entry(g, 97.0), default_us=120.0) for g in (1, 2, 4, 8)]
  for e in slow_first:
    e["candidates"]["n16_w4_s2"] = dict(us=98.0)
  assert build_table(slow_first, 0.05) == {}


def _trace_with_two_streams():
  meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind,  # noqa: E731
                                       "args": {"name": name}}
  x = lambda tid, ts, dur, name="k": {"ph": "X", "pid": 2, "tid": tid, "ts": ts, "dur": dur,  # noqa: E731
                                      "name": name}
  return {"traceEvents": [
      meta(1, None, "process_name", "/host:CPU"), meta(2, None, "process_name", "/device:GPU:0"),
      meta(1, 7, "thread_name", "python"),
      meta(2, 10, "thread_name", "Stream #13(Compute)"), meta(2, 11, "thread_name", "Stream #14(MemcpyD2D)"),
      meta(2, 12, "thread_name", "XLA Ops"), meta(2, 13, "thread_name", "XLA Modules"),
      x(10, 100.0, 10.0, "attn"), x(10, 130.0, 5.0, "attn"), x(11, 105.0, 10.0, "memcpy"),
      x(12, 100.0, 35.0, "op"), x(13, 90.0, 60.0, "module"),  # annotations: never counted
      {"ph": "X", "pid": 1, "tid": 7, "ts": 0.0, "dur": 500.0, "name": "host"}]}


def test_device_time_counts_stream_work_once():
  import device_time
  events, rows = device_time.stream_events(_trace_with_two_streams())
  assert sorted(rows.values()) == ["Stream #13(Compute)", "Stream #14(MemcpyD2D)"]
  s = device_time.summarize(events)
  # [100, 115) from the overlapping kernel and copy, then [130, 135): 20 us busy over a 35 us span.
  assert s["busy_us"] == pytest.approx(20.0) and s["span_us"] == pytest.approx(35.0)
  assert s["events"] == 3 and s["names"] == ["attn", "memcpy"]


def test_gaps_before_charges_each_idle_stretch_to_the_kernel_after_it():
  """Idle time between the end of all earlier work and a kernel's start goes to that kernel; overlap
  and back-to-back starts are not idle."""
  sys.path.insert(0, str(BENCH))
  import device_time
  ev = lambda name, ts, dur: dict(name=name, ts=ts, dur=dur)  # noqa: E731
  events = [ev("a", 0, 10), ev("b", 12, 5), ev("c", 14, 10), ev("a", 24, 1), ev("b", 30, 2), ev("b", 40, 1)]
  rows = {r["name"]: r for r in device_time.gaps_before(events, calls=2)}
  assert rows["b"]["gap_us_per_call"] == pytest.approx((2 + 5 + 8) / 2) and rows["b"]["count_per_call"] == 1.5
  assert rows["b"]["after"] == "a"  # b waited after a twice (ends 10 and 25), after b once (32)
  assert "c" not in rows and "a" not in rows


def test_device_time_is_none_without_a_gpu_stream():
  import jax
  import jax.numpy as jnp
  import device_time
  fn = jax.jit(lambda x: x * 2)
  x = jnp.ones((8,))
  fn(x).block_until_ready()
  assert device_time.measure(jax, fn, (x,), calls=1, runs=1) is None


def test_config_variant_parses_to_config_kwargs():
  import bench_attention
  assert bench_attention.parse_config_variant("cfg:num_splits=2;block_n=32;launch=xla") == \
      dict(num_splits=2, block_n=32, launch="xla")
  assert bench_attention.parse_config_variant("ffi-launch") == {}


def test_config_constant_variant_sets_the_kernels_constexpr_while_it_lasts():
  pytest.importorskip("triton")
  import bench_attention
  from jax_varlen_attn.backends.triton import Config, config
  from tests.problems import static_spec

  spec = static_spec(8, 4)
  default = config.SEARCH_PROBES
  with bench_attention._config_constant("const:SEARCH_PROBES=1"):
    assert Config.get_default(spec).constexprs(spec)["SEARCH_PROBES"] == 1
  assert Config.get_default(spec).constexprs(spec)["SEARCH_PROBES"] == default != 1
  with bench_attention._config_constant("default"):
    assert config.SEARCH_PROBES == default
  with pytest.raises(ValueError, match="no NOPE"):
    with bench_attention._config_constant("const:NOPE=1"):
      pass


def test_tile_table_picks_one_candidate_per_class():
  """Near-ties that swap the winner between groups still give the class one choice, for all groups."""
  pytest.importorskip("jax")
  from tune_triton import build_table
  rows = [_entry(g, 90.0) for g in (1, 2, 4, 8)]
  for e, other in zip(rows, (89.0, 91.0, 91.0, 89.5)):  # n64_w4_s1 wins two groups by a hair
    e["candidates"]["n64_w4_s1"] = dict(us=other)
  table = build_table(rows, 0.05)
  assert sorted(table) == sorted(e["key"] for e in rows)
  assert {t["block_n"] for t in table.values()} == {32}  # n32_w8_s2: geo-mean 90.0 beats 90.1


def test_ceilings_keep_the_best_measurement_and_percentages_follow():
  from bench_attention import apply_ceilings, merge_ceilings
  start = {"read_tbps": 3.1, "matmul_fp16_tflops": 698.0, "copy_tbps": None}
  end = {"read_tbps": 3.0, "matmul_fp16_tflops": 758.0, "copy_tbps": 2.9}
  best = merge_ceilings(start, end)
  assert best == {"read_tbps": 3.1, "matmul_fp16_tflops": 758.0, "copy_tbps": 2.9}
  recs = [dict(bound="flops", tflops=379.0, tflops_device=417.0, pct_of_ceiling=54.3,
               pct_of_ceiling_device=59.7),
          dict(bound="bytes", tbps=2.79, tbps_device=None, pct_of_ceiling=1.0,
               pct_of_ceiling_device=None),
          dict(bound="bytes", status="skipped")]
  apply_ceilings(recs, best)
  assert (recs[0]["pct_of_ceiling"], recs[0]["pct_of_ceiling_device"]) == (50.0, 55.0)
  assert recs[1]["pct_of_ceiling"] == 90.0 and recs[1]["pct_of_ceiling_device"] is None
  assert "pct_of_ceiling" not in recs[2]


def test_bench_gemv_tiny_checks_every_variant(tmp_path):
  """The skinny-matmul experiment under Triton's interpreter: every variant checked against float64."""
  pytest.importorskip("triton")
  env = dict(os.environ, OUT=str(tmp_path), JVA_COMMIT="test", TRITON_INTERPRET="1")
  proc = subprocess.run([sys.executable, str(BENCH / "bench_gemv.py"), "--tiny", "--rows", "1,4", "--out", "g"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  doc = json.loads((tmp_path / "g.json").read_text())
  recs = doc["records"]
  assert {r["impl"] for r in recs} == {"xla", "triton"} and len(recs) == 2 * 2 * 3
  assert all(r["status"] == "ok" and r["rel_err"] < 2e-2 for r in recs), recs


def test_bench_gemv_tiny_partials_sum_to_the_product(tmp_path):
  """--partials: XLA's batched, unsummed form of each projection, checked (summed) against float64."""
  env = dict(os.environ, OUT=str(tmp_path), JVA_COMMIT="test", TRITON_INTERPRET="1")
  proc = subprocess.run([sys.executable, str(BENCH / "bench_gemv.py"), "--tiny", "--partials", "--rows",
                         "1,4", "--out", "p"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  recs = json.loads((tmp_path / "p.json").read_text())["records"]
  assert {(r["impl"], r["variant"]) for r in recs} == {("xla", "jnp.dot")} | {
      ("xla-partials", f"splits{s}") for s in (2, 4, 8)}
  assert len(recs) == 2 * 2 * 4 and all(r["status"] == "ok" and r["rel_err"] < 2e-2 for r in recs), recs


def test_bench_gemv_tiny_mlp_forms_match_the_oracle(tmp_path):
  """--mlp: every form of the MLP block (XLA's four, and mlp_fused.py's one kernel with partials or
  atomics, its column tile a power of two or padded to one) computes the float64
  down(silu(x g) * (x u))."""
  env = dict(os.environ, OUT=str(tmp_path), JVA_COMMIT="test", TRITON_INTERPRET="1")
  proc = subprocess.run([sys.executable, str(BENCH / "bench_gemv.py"), "--tiny", "--mlp", "--rows", "1,4",
                         "--out", "m"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  recs = json.loads((tmp_path / "m.json").read_text())["records"]
  assert {r["variant"] for r in recs} == {"fused", "fused_f32", "separate", "interleaved",
                                          "triton_bi32_k32_n32_w1_st1_partials",
                                          "triton_bi48_k32_n32_w1_st2_partials",
                                          "triton_bi48_k32_n32_w1_st1_atomic"}
  assert len(recs) == 2 * 7 and all(r["status"] == "ok" and r["rel_err"] < 2e-2 for r in recs), recs


@pytest.mark.parametrize("w_nk", [False, True])
def test_gemv_mosaic_lowers_for_cuda_and_refuses_bad_tiles(w_nk):
  """bench_gemv --mosaic's kernel lowers to Mosaic GPU's CUDA call without a GPU (the weight [K, N]
  read transposed, or stored [N, K]); tiles that do not divide the shape raise before lowering."""
  import jax
  import jax.numpy as jnp
  import gemv_mosaic

  k, n = 512, 256
  xp = jax.ShapeDtypeStruct((gemv_mosaic.ROWS, k), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((n, k) if w_nk else (k, n), jnp.bfloat16)
  op = lambda a, b: gemv_mosaic.matmul(a, b, m=4, block_n=64, block_k=128, split_k=2, stages=2, w_nk=w_nk)
  text = jax.jit(op).trace(xp, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  with pytest.raises(ValueError, match="block_n"):
    gemv_mosaic.partials(jnp.zeros((gemv_mosaic.ROWS, k), jnp.bfloat16), jnp.zeros((k, 96), jnp.bfloat16),
                         block_n=64, block_k=128, split_k=1, stages=2)
  with pytest.raises(ValueError, match="at most"):
    gemv_mosaic.pad_rows(jnp.zeros((17, k), jnp.bfloat16))


def test_decode_stream_mosaic_lowers_for_cuda_and_its_expectation_is_the_sum_over_tiles():
  """decode_stream_mosaic's kernel lowers to Mosaic GPU's CUDA call without a GPU, and the float64
  expectation it is checked against equals the per-(sequence, head) sum written out directly."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import decode_stream_mosaic as m

  q = jax.ShapeDtypeStruct((m.ROWS, 128), jnp.float16)
  kv = jax.ShapeDtypeStruct((2 * 256, 4 * 128), jnp.float16)
  op = lambda q, k, v: m.stream(q, k, v, batch=2, kv_heads=4, keys=256, block_kv=128, stages=2)
  assert "mosaic_gpu" in jax.jit(op).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  with pytest.raises(ValueError, match="block_kv"):
    m.stream(jnp.zeros((m.ROWS, 128), jnp.float16), jnp.zeros((192, 512), jnp.float16),
             jnp.zeros((192, 512), jnp.float16), batch=1, kv_heads=4, keys=192, block_kv=128, stages=2)
  rng = np.random.default_rng(1)
  qq, kk, vv = (rng.standard_normal(s) for s in ((m.ROWS, 128), (512, 512), (512, 512)))
  got = m.expected(qq, kk, vv, batch=2, kv_heads=4, keys=256, block_kv=128)
  b, h = 1, 2
  k_bh, v_bh = kk.reshape(2, 256, 4, 128)[b, :, h], vv.reshape(2, 256, 4, 128)[b, :, h]
  want = sum((qq @ k_bh[t:t + 128].T).astype(np.float16).astype(np.float64) @ v_bh[t:t + 128]
             for t in (0, 128))
  np.testing.assert_allclose(got[b, h], want, rtol=1e-12, atol=1e-9)


def test_decode_stream_mosaic_fp8_is_the_tma_stream_alone():
  """An fp8 cache takes the stream without wgmmas (8-bit V is not K-major), and lowers so; the
  wgmma form refuses it rather than mixing dtypes."""
  import jax
  import jax.numpy as jnp
  import decode_stream_mosaic as m

  q = jax.ShapeDtypeStruct((m.ROWS, 128), jnp.float16)
  kv = jax.ShapeDtypeStruct((2 * 256, 4 * 128), jnp.float8_e4m3fn)
  op = lambda q, k, v: m.stream(q, k, v, batch=2, kv_heads=4, keys=256, block_kv=128, stages=2, mma=False)
  assert "mosaic_gpu" in jax.jit(op).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  with pytest.raises(ValueError, match="mma=False"):
    m.stream(jnp.zeros((m.ROWS, 128), jnp.float16), jnp.zeros((512, 512), jnp.float8_e4m3fn),
             jnp.zeros((512, 512), jnp.float8_e4m3fn), batch=2, kv_heads=4, keys=256, block_kv=128, stages=2)


def test_decode_stream_mosaic_persistent_lowers_and_its_expectation_is_the_cta_sum():
  """The persistent TMA stream lowers for an fp8 and (check=True) an fp16 cache; its expectation is,
  per CTA, the sum of its own items' K and V tiles (CTA 5 of 12 over 24 items: items 10 and 11);
  uneven splits and an 8-bit check are refused."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import decode_stream_mosaic as m

  for dt, check in ((jnp.float8_e4m3fn, False), (jnp.float16, True)):
    kv = jax.ShapeDtypeStruct((6 * 256, 4 * 128), dt)
    op = lambda k, v, check=check: m.stream_persistent(k, v, 6, 4, 256, 128, 2, 12, check=check)
    assert "mosaic_gpu" in jax.jit(op).trace(kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  with pytest.raises(ValueError, match="ctas"):
    m.stream_persistent(jnp.zeros((6 * 256, 512), jnp.float16), jnp.zeros((6 * 256, 512), jnp.float16),
                        6, 4, 256, 128, 2, 7)
  with pytest.raises(ValueError, match="16-bit"):
    m.stream_persistent(jnp.zeros((6 * 256, 512), jnp.float8_e4m3fn), jnp.zeros((6 * 256, 512), jnp.float8_e4m3fn),
                        6, 4, 256, 128, 2, 12, check=True)
  rng = np.random.default_rng(0)
  k, v = rng.standard_normal((6 * 256, 512)), rng.standard_normal((6 * 256, 512))
  got = m.persistent_expected(k, v, 6, 4, 256, 128, 12)
  kk, vv = k.reshape(6, 256, 4, 128), v.reshape(6, 256, 4, 128)
  want = sum(kk[2, t:t + 128, h] + vv[2, t:t + 128, h] for t in (0, 128) for h in (2, 3))
  np.testing.assert_allclose(got[5], want, rtol=1e-12, atol=1e-9)


def test_decode_persistent_lowers_for_fp8_and_fp16_and_sums_its_items_per_cta():
  """decode_persistent, decode_persistent_ws and decode_persistent_keys_m (the persistent stream with a
  tile's two wgmmas; fp8 tiles converted to fp16; the second and third warp-specialized, the third
  with keys as wgmma's M) lower for both caches;
  their expectation is `expected`'s items summed per CTA (with softmax, one softmax over the CTA's keys)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import decode_stream_mosaic as m

  q = jax.ShapeDtypeStruct((m.ROWS, 128), jnp.float16)
  for dt in (jnp.float8_e4m3fn, jnp.float16):
    kv = jax.ShapeDtypeStruct((6 * 256, 4 * 128), dt)
    for fn in (m.decode_persistent, m.decode_persistent_ws):
      for softmax in (False, True):
        op = lambda q, k, v, fn=fn, softmax=softmax: fn(q, k, v, 6, 4, 256, 64, 4, 12, softmax=softmax)
        assert "mosaic_gpu" in jax.jit(op).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  for dt in (jnp.float8_e4m3fn, jnp.float16):  # keys as wgmma's M: 16 q rows, its softmax
    kv = jax.ShapeDtypeStruct((6 * 256, 4 * 128), dt)
    op = lambda q, k, v: m.decode_persistent_keys_m(q, k, v, 6, 4, 256, 64, 4, 12)
    q16 = jax.ShapeDtypeStruct((m.Q_COLS, 128), jnp.float16)
    assert "mosaic_gpu" in jax.jit(op).trace(q16, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  with pytest.raises(ValueError, match="rows"):
    m.decode_persistent_keys_m(jnp.zeros((m.ROWS, 128), jnp.float16), jnp.zeros((6 * 256, 512), jnp.float16),
                               jnp.zeros((6 * 256, 512), jnp.float16), 6, 4, 256, 64, 4, 12)
  with pytest.raises(ValueError, match="ctas"):
    m.decode_persistent(jnp.zeros((m.ROWS, 128), jnp.float16), jnp.zeros((6 * 256, 512), jnp.float16),
                        jnp.zeros((6 * 256, 512), jnp.float16), 6, 4, 256, 128, 2, 5)
  rng = np.random.default_rng(2)
  qq = rng.standard_normal((m.ROWS, 128))
  kk, vv = rng.standard_normal((6 * 256, 512)), rng.standard_normal((6 * 256, 512))
  got = m.decode_persistent_expected(qq, kk, vv, 6, 4, 256, 128, 12)
  per_item = m.expected(qq, kk, vv, 6, 4, 256, 128)  # [batch, kv_heads, ROWS, D]
  np.testing.assert_allclose(got[5], per_item[2, 2] + per_item[2, 3], rtol=1e-12, atol=1e-9)
  # softmax=True: CTA 5's keys are items 10 and 11 (sequence 2, kv heads 2 and 3), one softmax over both
  k4, v4 = kk.reshape(6, 256, 4, 128), vv.reshape(6, 256, 4, 128)
  keys_c, vals_c = np.concatenate([k4[2, :, 2], k4[2, :, 3]]), np.concatenate([v4[2, :, 2], v4[2, :, 3]])
  s = qq @ keys_c.T
  p = np.exp(s - s.max(axis=1, keepdims=True))
  want = (p.astype(np.float16).astype(np.float64) @ vals_c) / p.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(m.decode_softmax_expected(qq, kk, vv, 6, 4, 256, 12)[5], want, rtol=1e-12, atol=1e-12)


def test_decode_stream_k_tiny_matches_the_reference_with_items_cut_into_pieces():
  """The stream-K experiment under Triton's interpreter: 7 and 50 programs cut most items of the
  tiny batch (16-key tiles) into pieces that the last one combines; every output against the
  reference (the script fails on any record not ok)."""
  env = dict(os.environ, TRITON_INTERPRET="1", JVA_COMMIT="test")
  proc = subprocess.run([sys.executable, str(BENCH / "decode_stream_k.py"), "--tiny", "--kv-dtype", "float8_e4m3fn"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("tiny ")]
  assert [line.split()[2] for line in lines] == ["stream-k", "stream-k", "jva-triton"]
  assert all(line.split()[-1] == "ok" for line in lines)


def test_first_difference_is_the_median_first_differing_position():
  import bench_serving

  assert bench_serving.first_difference([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 9, 3], [4, 5, 6], [0, 8]]) == 1.0
  assert bench_serving.first_difference([[1, 2, 3]], [[1, 2, 3]]) == 3.0
  assert bench_serving.first_difference([[5, 1], [5, 2, 7], [6]], [[5, 1], [5, 3, 7], [5]]) == 1.0


def test_spread_decode_case_keeps_the_total_and_spreads_lengths_in_a_fixed_order():
  import numpy as np
  import shapes

  name = "decode_198x2336r1168"
  lens = np.array(shapes.cases_for([name])[name].seqused_k)
  assert shapes.is_case(name) and len(lens) == 198
  assert lens.sum() == 198 * 2336 and lens.min() == 1168 and lens.max() == 3504
  assert not np.all(np.diff(lens) >= 0)  # shuffled, not a sorted ramp
  assert np.array_equal(lens, shapes.cases_for([name])[name].seqused_k)  # the same every run
  assert set(shapes.cases_for(["decode_8x100r0"])["decode_8x100r0"].seqused_k) == {100}
  with pytest.raises(ValueError, match="spread"):
    shapes.cases_for(["decode_8x100r100"])


def test_prefill_case_takes_a_page_size_suffix():
  import shapes

  paged = shapes.cases_for(["prefill_2x256p64"])["prefill_2x256p64"]
  plain = shapes.cases_for(["prefill_2x256"])["prefill_2x256"]
  assert shapes.is_case("prefill_2x256p64") and paged.flop_bound
  assert (paged.block_size, plain.block_size) == (64, shapes.BLOCK_SIZE)
  assert paged.pages_per_seq == [4, 4] and plain.pages_per_seq == [16, 16]
  assert paged.flops() == plain.flops() and paged.kv_bytes() == plain.kv_bytes()


def test_model_rule_sets_a_config_constant_for_one_backend_entry_and_restores_it():
  import bench_serving

  from jax_varlen_attn.backends.triton import config

  keep = config.MIN_TILES_PER_SPLIT
  with bench_serving.model_rule("auto@MIN_TILES_PER_SPLIT=2"):
    assert config.MIN_TILES_PER_SPLIT == 2
  assert config.MIN_TILES_PER_SPLIT == keep
  with bench_serving.model_rule("auto"):
    assert config.MIN_TILES_PER_SPLIT == keep
  with pytest.raises(ValueError, match="NO_SUCH_RULE"):
    with bench_serving.model_rule("auto@NO_SUCH_RULE=1"):
      pass


def test_mosaic_profile_splits_ctas_into_regions_and_measures_the_gaps_between_them():
  """A synthetic Mosaic GPU trace: two CTAs back to back on SM 1 at 2 GHz (the second starting
  1 us after the first ends) and one alone on SM 2; the summary's regions, CTA split, clock and
  gap come out as built."""
  import mosaic_profile

  compute = [("setup", 0, 100), ("q", 100, 400), ("first_k", 400, 500), ("loop", 500, 3500),
             ("out", 3500, 4000)]
  loader = [("setup", 0, 100), ("load", 100, 3600)]
  events = []
  for block, sm, start_ns in ((0, 1, 1000.0), (1, 1, 4000.0), (2, 2, 1000.0)):
    for wg, regions in enumerate((compute, compute, loader)):
      for name, a, b in regions:  # ts: (CTA start in ns + cycles since the first event) / 1e3
        for ph, t in (("B", a), ("E", b)):
          events.append(dict(name=name, ph=ph, ts=(start_ns + t) / 1e3, pid=1 + sm,
                             tid=1 + wg + 3 * block))
  r = mosaic_profile.summarize({"traceEvents": events})
  assert r["ctas"] == 3
  assert r["regions_cycles"]["compute:q"] == 300 and r["regions_cycles"]["loader:load"] == 3500
  assert (r["cta_span_cycles"], r["prologue_cycles"], r["loop_cycles"], r["epilogue_cycles"]) == (
      4000, 500, 3000, 500)
  # 4000 cycles in the 3000 ns between the two starts on SM 1: the estimate's upper bound on the
  # clock (it reads 1.33 GHz here, not the 2 GHz built in, since the pair has a gap) and no gap.
  assert abs(r["sm_clock_ghz_est"] - 4000 / 3000) < 1e-9 and abs(r["gap_ns_median"]) < 1e-6
  # Given the clock, the gap is what was built: 3000 ns - 4000 cycles / 2 GHz.
  assert abs(mosaic_profile.summarize({"traceEvents": events}, 2.0)["gap_ns_median"] - 1000) < 1e-6


def test_power_sample_keeps_the_middle_of_a_stretch_and_reads_the_power_cap_bit(tmp_path):
  import time

  import power_sample

  t0 = time.mktime(time.strptime("2026/12/02 09:00:00", "%Y/%m/%d %H:%M:%S"))
  rows = ["2026/12/02 09:00:00.100, 1980 MHz, 300.00 W, 0x0000000000000000",
          "2026/12/02 09:00:01.250, 1755 MHz, 689.50 W, 0x0000000000000004",
          "2026/12/02 09:00:01.270, [N/A], 689.50 W, 0x0000000000000004",
          "2026/12/02 09:00:02.900, 1980 MHz, 80.00 W, 0x0000000000000001"]
  path = tmp_path / "smi.csv"
  path.write_text("\n".join(rows) + "\n")
  got = power_sample._samples(str(path), t0, t0 + 3.0)  # keeps [t0 + 0.5, t0 + 2.5]
  assert len(got) == 1
  assert abs(got[0][0] - (t0 + 1.25)) < 1e-6 and got[0][1:3] == (1755.0, 689.5) and got[0][3] & 0x4


def test_mosaic_sass_loops_count_each_backward_branch_body_by_class():
  """nvdisasm's listing with hex targets and with labels: each backward BRA is a loop whose
  instructions from its target to the branch are counted by class; forward branches are not."""
  import mosaic_ptxas

  text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
  .L_x_1:
        /*0010*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], RZ, !UPT ;
        /*0020*/                   FMNMX R2, R24, R25, !PT ;
        /*0030*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0040*/                   FFMA R4, R24, R5, -R6 ;
        /*0050*/                   MUFU.EX2 R4, R4 ;
        /*0060*/                   F2FP.F16.F32.PACK_AB R7, R4, R4 ;
        /*0070*/              @!P0 BRA `(.L_x_1) ;
        /*0080*/                   BRA 0xa0 ;
        /*0090*/                   SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ, [UR4], RZ ;
        /*00a0*/                   IADD3 R8, R8, 0x1, RZ ;
        /*00b0*/                   BRA 0x90 ;
        /*00c0*/                   EXIT ;
"""
  loops = mosaic_ptxas.sass_loops(text)
  assert [(l["start"], l["end"], l["count"]) for l in loops] == [(0x10, 0x70, 7), (0x90, 0xb0, 3)]
  first = loops[0]["classes"]
  assert (first["tensor"], first["fp32"], first["mufu"], first["convert"], first["shuffle"],
          first["control"]) == (1, 2, 1, 1, 1, 1)
  assert loops[0]["ops"]["MUFU.EX2"] == 1
  assert loops[1]["classes"]["sync"] == 1 and loops[1]["classes"]["integer"] == 1


def test_mosaic_ptxas_reads_spills_from_the_report():
  import mosaic_ptxas

  clean = ["0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"]
  assert not mosaic_ptxas.spilled(clean)
  assert mosaic_ptxas.spilled(clean + ["48 bytes stack frame, 48 bytes spill stores, 0 bytes spill loads"])
  assert mosaic_ptxas.spilled(["16 bytes stack frame, 0 bytes spill stores, 52 bytes spill loads"])


def test_inst_mix_reads_ncu_raw_csv_and_counts_per_hgmma():
  """ncu's raw page (a log line, the header, the units row, one row per kernel; instanced metrics
  as "KEY: value; ..."): the largest kernel is picked and its opcodes counted per HGMMA."""
  import inst_mix

  text = "\n".join([
      "==PROF== Connected to process 1",
      '"ID","Kernel Name","gpu__time_duration.sum","launch__grid_size","sass__inst_executed_per_opcode"',
      '"","","ns","",""',
      '"0","small","1,000","4 (0: 4)","HGMMA: 1; FFMA: 9"',
      '"1","big","12,345","2,112 (0: 2,112)","HGMMA: 100; FFMA: 250; MUFU: 400; IMAD: 50"'])
  kernels = inst_mix.parse_raw(text)
  assert [k["Kernel Name"] for k in kernels] == ["small", "big"]
  big = inst_mix.largest(kernels)
  assert big["Kernel Name"] == "big" and inst_mix.number(big["gpu__time_duration.sum"]) == 12345
  s = inst_mix.summary({"ours": big, "peer": kernels[0]})
  assert s["ours"]["opcodes"] == {"MUFU": 400, "FFMA": 250, "HGMMA": 100, "IMAD": 50}
  assert s["ours"]["per_hgmma"]["MUFU"] == 4.0 and s["ours"]["all_per_hgmma"] == 8.0
  assert s["ours"]["metrics"]["launch__grid_size"] == 2112 and s["peer"]["all"] == 10
  assert inst_mix.parse_raw("no csv here") == []


def test_mosaic_ab_kernel_list_rotations_and_a_variant_module(tmp_path):
  import mosaic_ab

  assert mosaic_ab.parse_kernels("tree, b=x.py") == [("tree", None), ("b", "x.py")]
  for bad in ("", "tree=x.py", "b", "a=x.py,a=y.py", "cudnn-dense=x.py"):
    with pytest.raises(ValueError):
      mosaic_ab.parse_kernels(bad)
  assert mosaic_ab.rotations(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"],
                                                     ["c", "a", "b"], ["a", "b", "c"]]
  # A copy of the kernel module loads beside the package's own (its dataclasses included).
  from jax_varlen_attn.backends.pallas import mosaic
  copy = tmp_path / "mosaic_copy.py"
  copy.write_text(Path(mosaic.__file__).read_text().replace("block_kv: int = 128",
                                                            "block_kv: int = 64"))
  variant = mosaic_ab.load_kernel("copy", str(copy))
  assert variant is not mosaic and variant.MosaicTiles().block_kv == 64
  assert mosaic.MosaicTiles().block_kv == 128


def test_mosaic_replay_arguments_and_no_gpu():
  import mosaic_replay

  args = mosaic_replay.parse(["--between", "cudnn", "--second-executable"])
  assert (args.calls, args.sets, args.between, args.second_executable) == (8, 2, "cudnn", True)
  for bad in (["--between", "nothing"], ["--calls", "0"], ["--runs", "-1"]):
    with pytest.raises(SystemExit):
      mosaic_replay.parse(bad)
  import jax
  if jax.default_backend() != "gpu":
    assert mosaic_replay.main([]) == 2


def test_cudnn_dense_inputs_match_the_paged_problem_and_refuse_ragged_lengths():
  import mosaic_profile
  import shapes

  case = shapes.cases_for(["prefill_2x64"])["prefill_2x64"]
  q, k, v = mosaic_profile.dense_problem(case)
  assert q.shape == (2, 64, 16, 128) and k.shape == v.shape == (2, 64, 8, 128)
  assert str(q.dtype) == "float16" and not (q == k[:, :, :1]).all()
  ragged = shapes.cases_for(["seed3_mixed55"])["seed3_mixed55"]  # sequences of 1, 16 and 61 tokens
  with pytest.raises(ValueError, match="one length"):
    mosaic_profile.dense_problem(ragged)


def test_mosaic_soak_runs_each_form_in_its_own_process_and_reports_it(tmp_path):
  """The soak tool's plumbing on the CPU (tiny shapes, the pallas backend in interpret mode): every
  (form, pad) row comes back from its child process, counted and not stalled."""
  import mosaic_soak
  out = tmp_path / "soak.json"
  flag = "--xla_backend_optimization_level=2"
  assert mosaic_soak.main(["--tiny", "--case", "seed1_prefill512", "--seconds", "0.5",
                           "--stall-s", "300", "--chain", "2", "--forms", "chain",
                           "--pad-q", "8", "--flag-sets", f"|{flag}", "--json", str(out)]) == 0
  doc = json.loads(out.read_text())
  rows = doc["rows"]
  assert doc["commit"] and "commit_dirty" in doc  # which tree the soak ran
  assert [(r["form"], r["pad_q"], r["flags"]) for r in rows] == [("chain", 8, ""), ("chain", 8, flag)]
  assert all(r["stalled"] is False and r["calls"] > 0 for r in rows), rows


def test_gemm_floor_tiny_checks_the_chain_and_writes_a_record_per_batch_and_build(tmp_path):
  """gemm_floor.py: its layers' chain matches float64 in both builds, and every record is timed."""
  _run("gemm_floor.py", "--preset", "tiny", "--batches", "1,4", "--steps", "2", "--calls", "1", "--loops",
       "fori,while", "--out", "f", out_dir=tmp_path)
  recs = json.loads((tmp_path / "f.json").read_text())["records"]
  assert [(r["batch"], r["build"], r["loop"]) for r in recs] == [
      (b, build, loop) for b in (1, 4) for build in ("xla", "cublas") for loop in ("fori", "while")]
  assert all(r["status"] == "ok" and r["rel_err"] < 1e-3 and r["step_ms"] > 0 for r in recs), recs
  assert recs[0]["rows"] == 4 and recs[0]["model_target_ms"] == 1.5
  assert recs[4]["model_target_ms"] == pytest.approx(2 * recs[4]["model_bound_ms"], abs=2e-4)


def test_gemm_floor_reference_is_the_chain_it_times():
  """The float64 reference catches a chain that drops a matmul (here: the down projection)."""
  import jax
  import gemm_floor
  from jax_varlen_attn.nn import preset
  cfg = preset("tiny")
  weights = gemm_floor.make_weights(cfg)
  x = jax.random.normal(jax.random.key(0), (3, cfg.hidden_size))
  want = gemm_floor.step_reference(cfg, gemm_floor.as_float64(weights), x)
  assert gemm_floor.layers_error(cfg, weights, x, want) < 1e-4
  broken = dict(weights, down=[w * 0 for w in weights["down"]])
  assert gemm_floor.layers_error(cfg, broken, x, want) > 0.5


def test_loop_args_tiny_times_both_forms_on_the_same_tokens(tmp_path):
  """loop_args.py: fresh and same argument buffers, every call's tokens equal to the first's."""
  _run("loop_args.py", "--preset", "tiny", "--batches", "1", "--rounds", "2", "--steps", "4", "--out", "a",
       out_dir=tmp_path)
  [rec] = json.loads((tmp_path / "a.json").read_text())["records"]
  assert rec["batch"] == 1 and rec["rows"] == 4 and rec["steps"] == 4
  assert rec["fresh_ms_per_call"] > 0 and rec["same_ms_per_call"] > 0
