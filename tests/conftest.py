import os

# Tests run on the CPU unless a GPU is present; several host devices let shard tests build a mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402  (after XLA_FLAGS)


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


HAS_GPU = _has_gpu()
if not HAS_GPU:
  # No GPU: the Triton backend runs its kernel source under Triton's interpreter. This must be set
  # before anything imports triton.
  os.environ.setdefault("TRITON_INTERPRET", "1")
