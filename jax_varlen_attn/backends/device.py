"""What the tile rules read from the GPU they will run on: its kind and its multiprocessor count.

    device_kind()  # "NVIDIA H200", or None where JAX sees no GPU (CPU tests, CUDA export on a CPU)
    num_sms()      # 132 on an H100 / H200 SXM
    is_hopper()    # compute capability 9.x (wgmma, TMA: what the Mosaic GPU kernel needs)
    shared_memory_bytes()  # 232448 on an H100 / H200: what one block may use

All describe the first GPU JAX sees and are read once per process.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax

# The GPU the heuristics and the tuned table were measured on; what rules assume without a GPU
# (kernels compiled for sm_90 on a CPU get the tiles an H100 would).
REFERENCE_KIND = "NVIDIA H100 80GB HBM3"
REFERENCE_SMS = 132
# Shared memory one block may opt into, by compute capability (CUDA's per-architecture limits);
# SHARED_MEMORY_FLOOR for one not listed.
SHARED_MEMORY_BYTES = {"8.0": 166912, "8.7": 166912, "9.0": 232448, "10.0": 232448}
SHARED_MEMORY_FLOOR = 101376  # sm_86 / sm_89 / sm_120, the least of current GPUs


def _first_gpu():
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:  # no GPU backend in this process
    return None
  return gpus[0] if gpus else None


@functools.lru_cache(maxsize=None)
def device_kind() -> Optional[str]:
  """`device_kind` of the first GPU (e.g. "NVIDIA H200"), None without one."""
  gpu = _first_gpu()
  return None if gpu is None else str(gpu.device_kind)


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
  """Streaming multiprocessors of the first GPU (jaxlib's `core_count`); REFERENCE_SMS without a
  GPU or where the device does not report it."""
  gpu = _first_gpu()
  count = getattr(gpu, "core_count", None) if gpu is not None else None
  return int(count) if isinstance(count, int) and count > 0 else REFERENCE_SMS


@functools.lru_cache(maxsize=None)
def is_hopper() -> bool:
  """The first GPU has compute capability 9.x (H100 / H200); False without a GPU."""
  gpu = _first_gpu()
  cc = str(getattr(gpu, "compute_capability", "")) if gpu is not None else ""
  return cc.split(".")[0] == "9"


@functools.lru_cache(maxsize=None)
def shared_memory_bytes() -> int:
  """Shared memory one block of the first GPU may use; the reference H100's without a GPU."""
  gpu = _first_gpu()
  if gpu is None:
    return SHARED_MEMORY_BYTES["9.0"]
  return SHARED_MEMORY_BYTES.get(str(getattr(gpu, "compute_capability", "")), SHARED_MEMORY_FLOOR)
