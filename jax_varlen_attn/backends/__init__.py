"""The backend registry: which implementations exist, which can run here, and why not.

Each backend is a subpackage exposing `attention(spec, arrays, config) -> (out, lse | None)` and a
`Config` class with `get_default(spec)`. Only `api` calls into this module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Callable, Tuple

import jax

BACKENDS = ("xla", "pallas", "triton")


@functools.lru_cache(maxsize=None)
def _on_cuda_gpu() -> bool:
  """An NVIDIA GPU is visible to JAX (the only place the Triton kernels run natively)."""
  try:
    devices = jax.devices("gpu")
  except RuntimeError:
    return False
  return any("cuda" in str(getattr(d.client, "platform_version", "")).lower()
             or d.device_kind.upper().startswith("NVIDIA") for d in devices)


def triton_interpreting() -> bool:
  """True when Triton kernels should run under Triton's CPU interpreter (TRITON_INTERPRET=1, no GPU)."""
  return os.environ.get("TRITON_INTERPRET", "0") == "1" and not _on_cuda_gpu()


def _xla_status() -> Tuple[bool, str]:
  return True, "plain jax.numpy: runs on every platform"


def _pallas_status() -> Tuple[bool, str]:
  try:
    importlib.import_module("jax_varlen_attn.backends.pallas.attention")
  except ImportError as e:
    return False, f"the pallas backend could not be imported ({e})"
  if _on_cuda_gpu():
    from jax_varlen_attn.backends.pallas import mosaic
    return True, ("Pallas lowered through Triton on the GPU" + (
        "" if mosaic.BY_DEFAULT else f"; its Mosaic GPU kernel: {mosaic.KNOWN_HANG}"))
  return True, "Pallas in interpret mode (no GPU here; slow, for checking)"


def _triton_status() -> Tuple[bool, str]:
  try:
    importlib.import_module("triton")
  except ImportError:
    return False, "triton is not installed (pip install 'jax_varlen_attn[gpu]')"
  if _on_cuda_gpu():
    try:
      jax_triton = importlib.import_module("jax_triton")
    except Exception as e:  # jax_triton 0.3 raises RuntimeError on CPU-only jaxlib
      return False, f"jax_triton cannot be imported ({e}); pip install 'jax_varlen_attn[gpu]'"
    import triton
    from jax_varlen_attn.backends.triton.call import jax_triton_generation
    jt, tr = getattr(jax_triton, "__version__", "?"), triton.__version__
    if (jax_triton_generation() or (0, 0)) >= (0, 4) and _version(tr) < (3, 7):
      # jax-triton 0.4 imports against triton 3.6 but every launch then fails inside it.
      return False, (f"jax-triton {jt} needs triton >= 3.7, found {tr}: pip install 'triton>=3.7,<3.8' "
                     "(or jax-triton 0.3.1 for triton 3.6)")
    return True, f"Triton kernels through jax-triton {jt} (triton {tr}) on a CUDA GPU"
  if triton_interpreting():
    return True, "Triton's CPU interpreter (TRITON_INTERPRET=1) through a host callback; slow, for checking"
  return False, ("no CUDA GPU is visible to JAX; set TRITON_INTERPRET=1 before importing triton to run "
                 "the kernel source under Triton's interpreter on the CPU")


def _version(text: str) -> Tuple[int, int]:
  parts = [int(p) for p in text.split(".")[:2] if p.isdigit()]
  return tuple(parts + [0] * (2 - len(parts)))


_STATUS = {"xla": _xla_status, "pallas": _pallas_status, "triton": _triton_status}


def status(name: str) -> Tuple[bool, str]:
  """(can it run here, why / why not) for one backend name."""
  return _STATUS[name]()


def report() -> dict:
  """{backend: (available, reason)} for every backend: what `backend="auto"` chooses from."""
  return {name: status(name) for name in BACKENDS}


@dataclasses.dataclass(frozen=True)
class Backend:
  name: str
  attention: Callable
  config_cls: type


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Backend:
  module = importlib.import_module(f"jax_varlen_attn.backends.{name}")
  return Backend(name=name, attention=module.attention, config_cls=module.Config)


def auto_name(spec=None, kv_sizes=(None, None)) -> str:
  """What backend="auto" means here: on a CUDA GPU, pallas for a call its Mosaic GPU kernel takes
  and measured faster on (`pallas.mosaic.preferred`: long prefill on a Hopper GPU), else triton
  where it can run (the measured fastest for the rest, and write_kv's, which passes no spec);
  xla elsewhere. kv_sizes: the k / v buffers' element counts (the Mosaic kernel's view needs them)."""
  if spec is not None and _on_cuda_gpu() and status("pallas")[0]:
    from jax_varlen_attn.backends.pallas import mosaic
    if mosaic.preferred(spec, *kv_sizes):
      return "pallas"
  return "triton" if status("triton")[0] and _on_cuda_gpu() else "xla"


def load(name: str) -> Backend:
  """The backend called `name`, already selected (no availability check)."""
  return _load(name)


def select(backend: str, spec=None, kv_sizes=(None, None)) -> Backend:
  """The backend for `backend=` ("auto": `auto_name(spec, kv_sizes)`)."""
  if not isinstance(backend, str):
    raise TypeError(f"backend must be a str, one of {('auto',) + BACKENDS}, got {type(backend).__name__}")
  if backend == "auto":
    return _load(auto_name(spec, kv_sizes))
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
  ok, why = status(backend)
  if not ok:
    avail = [n for n in BACKENDS if status(n)[0]]
    raise ValueError(f"backend={backend!r} cannot run here: {why}. Available here: {avail}")
  return _load(backend)
