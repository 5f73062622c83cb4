"""bench_attention's environment: the GPU env defaults (set before jax / torch are imported), the
log, the time budget, what this process can run (`setup_env`), the commit, timing (wall clock, chained
dispatch, CUDA events) and the ceilings measured in the same run (read, copy, matmul)."""

from __future__ import annotations

import os


# Before jax / torch are imported: jax must not grab 75% of the GPU up front when torch shares it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# jax's allocator keeps what it frees; torch (FlagGems) only allocates outputs (inputs are shared
# through dlpack), so jax may grow to 85% of the card.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")
os.environ.setdefault("FLAGGEMS_CACHE_DIR", "/tmp/flaggems_cache")
os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/triton_cache")  # the GPU machine has no writable ~/.triton
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import contextlib
import dataclasses
import functools
import gc
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
  if p not in sys.path:
    sys.path.insert(0, p)

import numpy as np  # noqa: E402



# ---- logging ---------------------------------------------------------------------------------------

class Log:
  def __init__(self):
    self.file = None

  def open(self, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    self.file = open(path, "w")

  def __call__(self, *parts, quiet=False):
    line = " ".join(str(p) for p in parts)
    if not quiet:
      print(line, flush=True)
    if self.file:
      self.file.write(line + "\n")
      self.file.flush()


log = Log()


class Budget:
  def __init__(self, seconds: float):
    self.t0 = time.perf_counter()
    self.seconds = seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def over(self, reserve: float = 0.0) -> bool:
    return self.seconds > 0 and self.elapsed() > self.seconds - reserve


# ---- environment -----------------------------------------------------------------------------------

def _ensure_triton_cache_dir():
  """torch-side Triton (FlagGems, the sum-kernel ceiling) builds its driver module through Triton's
  file cache; on the GPU machine that cache dir came out empty ("Could not create or locate cache
  dir"), so set it explicitly when it is unset or empty."""
  try:
    import triton
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
      print(f"triton cache dir: {knobs.cache.dir!r} (home {knobs.cache.home_dir!r})", flush=True)
      if not knobs.cache.dir:
        knobs.cache.dir = os.environ.get("TRITON_CACHE_DIR") or "/tmp/triton_cache"
      os.makedirs(knobs.cache.dir, exist_ok=True)
  except Exception as e:  # diagnostics only
    print(f"triton cache dir: could not set ({type(e).__name__}: {e})", flush=True)


@dataclasses.dataclass
class Env:
  jax: Any
  jnp: Any
  on_gpu: bool
  gpu: str
  torch: Any = None  # None when unavailable
  flaggems_fn: Optional[Callable] = None
  paged_attention: Optional[Callable] = None
  triton_config: Any = None  # jax_varlen_attn.backends.triton.Config
  why_not: Dict[str, str] = dataclasses.field(default_factory=dict)
  versions: Dict[str, str] = dataclasses.field(default_factory=dict)


def setup_env(args) -> Env:
  import jax
  import jax.numpy as jnp

  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    gpus = []
  on_gpu = bool(gpus)
  gpu = gpus[0].device_kind if on_gpu else f"cpu ({jax.devices()[0].device_kind})"
  env = Env(jax=jax, jnp=jnp, on_gpu=on_gpu, gpu=gpu)
  env.versions["jax"] = jax.__version__
  try:
    import jaxlib
    env.versions["jaxlib"] = jaxlib.__version__
  except Exception:
    pass
  want = set(args.impls)

  from jax_varlen_attn import backends as registry
  for impl, backend in (("jva-triton", "triton"), ("jva-pallas", "pallas"), ("jva-xla", "xla")):
    if impl in want:
      ok, why = registry.status(backend)
      if impl == "jva-triton" and ok and not on_gpu and not args.interpret:
        ok, why = False, "no GPU (the Triton interpreter path is for tests, far too slow to time)"
      if impl == "jva-pallas" and ok and not on_gpu and not args.interpret:
        ok, why = False, "no GPU (Pallas interpret mode is for tests, far too slow to time)"
      if not ok:
        env.why_not[impl] = why
  for impl in ("cudnn-dense", "jax-mgpu-dense"):  # dense peers: CUDA only
    if impl in want and not on_gpu:
      env.why_not[impl] = "no GPU"
  if "jax-mgpu-dense" in want and "jax-mgpu-dense" not in env.why_not:
    try:
      from jax.experimental.pallas.ops.gpu import attention_mgpu  # noqa: F401
    except Exception as e:
      env.why_not["jax-mgpu-dense"] = f"attention_mgpu unavailable: {type(e).__name__}: {e}"
  if "jva-triton" in want and "jva-triton" not in env.why_not:
    try:
      from jax_varlen_attn.backends.triton import Config
      env.triton_config = Config
    except Exception as e:  # variants need the Config class; the default needs nothing
      log(f"note: jax_varlen_attn.backends.triton.Config unavailable ({e}); default variant only")
    try:
      import triton
      env.versions["triton"] = triton.__version__
      import jax_triton
      env.versions["jax_triton"] = getattr(jax_triton, "__version__", "?")
    except Exception:
      pass

  needs_torch = (("flaggems" in want) or not args.tiny) and on_gpu
  if needs_torch:
    try:
      import torch
      if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
      env.torch = torch
      env.versions["torch"] = torch.__version__
    except Exception as e:
      env.why_not["torch"] = f"torch unavailable: {e}"
  elif "flaggems" in want:
    env.why_not["torch"] = "no GPU" if not on_gpu else "not requested"
  if "flaggems" in want:
    if env.torch is None:
      env.why_not["flaggems"] = env.why_not.get("torch", "torch unavailable")
    else:
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          import flag_gems  # importing registers nothing globally; flag_gems.enable() would
          from flag_gems.ops import flash_attn_varlen_func as fg_fn
        env.flaggems_fn = fg_fn
        env.versions["flag_gems"] = getattr(flag_gems, "__version__", "?")
        _ensure_triton_cache_dir()
      except Exception as e:
        env.why_not["flaggems"] = f"flag_gems unavailable: {type(e).__name__}: {e}"
  if "jax-pallas-paged" in want:
    if not on_gpu and not args.interpret:
      env.why_not["jax-pallas-paged"] = "no GPU (Pallas GPU kernel)"
    else:
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        env.paged_attention = paged_attention
      except Exception as e:
        env.why_not["jax-pallas-paged"] = f"jax.experimental.pallas.ops.gpu.paged_attention: {e}"
  for impl, why in env.why_not.items():
    log(f"skip {impl}: {why}")
  return env


@contextlib.contextmanager
def config_constant(name: str, value: int):
  """A rule-constant sweep point, here rather than in the kernel: the Triton backend's config.py
  constant `name` is `value` while it lasts (every jitted trace made under it rebuilt)."""
  import jax
  from jax_varlen_attn.backends.triton import config
  if not hasattr(config, name):
    raise ValueError(f"config.py has no {name}")
  keep = getattr(config, name)
  setattr(config, name, value)
  jax.clear_caches()
  try:
    yield
  finally:
    setattr(config, name, keep)
    jax.clear_caches()


def git_commit() -> Tuple[str, Optional[bool]]:
  """(commit, dirty). $JVA_COMMIT wins: the GPU machine's copy of the tree may carry a stale .git."""
  if os.environ.get("JVA_COMMIT"):
    return os.environ["JVA_COMMIT"], None
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         timeout=10)
    if sha.returncode == 0 and sha.stdout.strip():
      dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
      return sha.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
  except Exception:
    pass
  return os.environ.get("JVA_COMMIT", "unknown"), None


# ---- timing ----------------------------------------------------------------------------------------

def _stats(times: List[float]) -> Tuple[float, float]:
  """(median, relative spread p90/p10 - 1) of a list of seconds."""
  med = statistics.median(times)
  if len(times) >= 5:
    qs = np.quantile(np.array(times), [0.1, 0.9])
    spread = float(qs[1] / max(qs[0], 1e-12) - 1.0)
  else:
    spread = float(max(times) / max(min(times), 1e-12) - 1.0)
  return med, spread


def time_jax(jax, fn, args, reps: int, max_s: float, warmup: int = 2) -> Tuple[float, float, int]:
  """Median wall seconds of fn(*args) + block_until_ready, and spread, and repeats."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  stop = time.perf_counter() + max_s
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
    del out
    if time.perf_counter() > stop and len(times) >= 5:
      break
  med, spread = _stats(times)
  return med, spread, len(times)


def time_chained(jax, fn, *fargs, inner: int = 10, outer: int = 5) -> float:
  """Seconds per call of `inner` back-to-back (asynchronously dispatched) calls with one wait at
  the end, median of `outer`: each call's host work overlaps the previous one's GPU work."""
  jax.block_until_ready(fn(*fargs))
  jax.block_until_ready(fn(*fargs))
  per = []
  for _ in range(outer):
    t0 = time.perf_counter()
    outs = [fn(*fargs) for _ in range(inner)]
    jax.block_until_ready(outs)
    per.append((time.perf_counter() - t0) / inner)
    del outs
  return statistics.median(per)


def time_torch_events(torch, fn, reps: int, max_s: float, warmup: int = 2) -> Tuple[float, float, int]:
  """Median seconds between CUDA events around fn() (synchronized after each)."""
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
  times = []
  stop = time.perf_counter() + max_s
  for _ in range(reps):
    start.record()
    fn()
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
    if time.perf_counter() > stop and len(times) >= 5:
      break
  med, spread = _stats(times)
  return med, spread, len(times)


# ---- ceilings --------------------------------------------------------------------------------------

def measure_ceilings(env: Env, reps: int) -> Tuple[dict, dict]:
  jax, jnp = env.jax, env.jnp
  detail: Dict[str, float] = {}
  n = 2**30  # float32 elements: 4 GiB
  nbytes = 4 * n
  torch = env.torch
  if torch is not None:
    try:
      x = torch.randn(n, dtype=torch.float32, device="cuda")
      try:
        import triton
        import triton.language as tl

        @triton.jit
        def _sum_kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr, ITERS: tl.constexpr):
          pid = tl.program_id(0).to(tl.int64)
          acc = tl.zeros([BLOCK], tl.float32)
          base = pid * BLOCK * ITERS
          for i in range(ITERS):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n_elements, other=0.0)
          tl.store(out_ptr + pid, tl.sum(acc, axis=0))

        block, iters = 4096, 8
        programs = -(-n // (block * iters))
        partial = torch.empty(programs, dtype=torch.float32, device="cuda")
        fn = lambda: _sum_kernel[(programs,)](x, partial, n, BLOCK=block, ITERS=iters, num_warps=8)
        fn()
        torch.cuda.synchronize()
        ok = abs(float(partial.sum()) - float(x.sum(dtype=torch.float64))) < 1e-3 * n**0.5 * 10
        t, spread, _ = time_torch_events(torch, fn, reps, 3.0)
        if ok:
          detail["read_triton_sum_tbps"] = nbytes / t / 1e12
        else:
          log("ceiling: Triton sum kernel gave a wrong sum; not used")
        del partial, fn
      except Exception as e:
        log(f"ceiling: Triton sum kernel failed: {type(e).__name__}: {e}")
      t, _, _ = time_torch_events(torch, lambda: torch.sum(x), reps, 3.0)
      detail["read_torch_sum_tbps"] = nbytes / t / 1e12
      half = n // 2
      dst = torch.empty(half, dtype=torch.float32, device="cuda")
      src = x[:half]
      t, _, _ = time_torch_events(torch, lambda: dst.copy_(src), reps, 3.0)
      detail["copy_torch_tbps"] = 2 * 4 * half / t / 1e12
      del x, dst, src
      m = 8192
      a = torch.randn(m, m, dtype=torch.float16, device="cuda")
      b = torch.randn(m, m, dtype=torch.float16, device="cuda")
      t, _, _ = time_torch_events(torch, functools.partial(torch.matmul, a, b), reps, 3.0, warmup=3)
      detail["matmul_fp16_torch_tflops"] = 2 * m**3 / t / 1e12
      del a, b
      torch.cuda.synchronize()
      torch.cuda.empty_cache()
    except Exception as e:
      log(f"ceiling (torch) failed: {type(e).__name__}: {e}")

  chained = functools.partial(time_chained, jax)

  try:
    xj = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    t = chained(jax.jit(lambda a: jnp.sum(a)), xj)
    detail["read_jnp_sum_tbps"] = nbytes / t / 1e12
    del xj
    half = n // 2
    yj = jax.random.normal(jax.random.key(2), (half,), jnp.float32)
    t = chained(jax.jit(lambda a: -a), yj)
    detail["copy_jnp_negate_tbps"] = 2 * 4 * half / t / 1e12
    del yj
    m = 8192
    a = jax.random.normal(jax.random.key(3), (m, m), jnp.float16)
    b = jax.random.normal(jax.random.key(4), (m, m), jnp.float16)
    t = chained(jax.jit(jnp.dot), a, b)
    detail["matmul_fp16_jnp_tflops"] = 2 * m**3 / t / 1e12
    del a, b
  except Exception as e:
    log(f"ceiling (jax) failed: {type(e).__name__}: {e}")
  gc.collect()

  def best(prefix):
    vals = [v for k, v in detail.items() if k.startswith(prefix)]
    return round(max(vals), 4) if vals else None

  ceilings = {"read_tbps": best("read_"), "copy_tbps": best("copy_"),
              "matmul_fp16_tflops": best("matmul_fp16_")}
  return ceilings, {k: round(v, 4) for k, v in detail.items()}


def merge_ceilings(*measured: dict) -> dict:
  """The best of several ceiling measurements, per metric (None where none measured it).

  A ceiling is the best the GPU reached, and noise only ever lowers a measurement: one H100
  measured its fp16 matmul at 698, 737 and 758 TFLOP/s at the start of three runs of this
  session (2026-11-26), so the benchmark measures at the start and at the end of a run."""
  keys = {k for m in measured for k in m}
  best = {}
  for k in sorted(keys):
    vals = [m[k] for m in measured if m.get(k) is not None]
    best[k] = max(vals) if vals else None
  return best


def apply_ceilings(records: List[dict], ceilings: dict):
  """(Re)computes every record's % of the ceiling (wall and device) from its TB/s or TFLOP/s."""
  for rec in records:
    flop = rec.get("bound") == "flops"
    ceil = ceilings.get("matmul_fp16_tflops") if flop else ceilings.get("read_tbps")
    for suffix in ("", "_device"):
      value = rec.get(("tflops" if flop else "tbps") + suffix)
      if value is not None and ("pct_of_ceiling" + suffix) in rec:
        rec["pct_of_ceiling" + suffix] = round(100 * value / ceil, 1) if ceil else None
