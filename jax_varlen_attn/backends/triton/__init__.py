"""The Triton backend: `@triton.jit` kernels launched through jax-triton (GPU) or Triton's interpreter.

Importing this package imports triton but not jax_triton: jax_triton is imported at launch time, so
the package works on a CPU-only machine (under TRITON_INTERPRET=1) too.
"""

from jax_varlen_attn.backends.triton.config import Config
from jax_varlen_attn.backends.triton.launcher import attention

__all__ = ["attention", "Config"]
