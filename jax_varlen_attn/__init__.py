"""jax_varlen_attn: variable-length attention over a paged KV cache for JAX.

`flash_attn_varlen_func` is the `flash_attn_varlen_func` of FlashAttention / vLLM / FlagGems, native to
JAX: a Triton kernel on NVIDIA GPUs (through jax-triton), a Pallas version, and plain XLA anywhere.
"""

from jax_varlen_attn.api import flash_attn_varlen_func, sharded_flash_attn_varlen_func
from jax_varlen_attn.backends import report as backend_report
from jax_varlen_attn.cache import write_kv
from jax_varlen_attn.checks import check_inputs
from jax_varlen_attn.layout import NAMED_LAYOUTS, KVCacheLayout

__all__ = ["flash_attn_varlen_func", "sharded_flash_attn_varlen_func", "write_kv", "check_inputs",
           "KVCacheLayout", "NAMED_LAYOUTS", "backend_report", "TritonConfig", "PallasConfig", "XlaConfig"]
__version__ = "0.1.0"

# `config=` of each backend, e.g. `config=jax_varlen_attn.TritonConfig(block_n=64)`; imported on first
# use (the triton backend imports triton, which a CPU-only install of the xla backend need not have).
_CONFIGS = {"TritonConfig": "triton", "PallasConfig": "pallas", "XlaConfig": "xla"}


def __getattr__(name):
  if name in _CONFIGS:
    import importlib
    return importlib.import_module(f"jax_varlen_attn.backends.{_CONFIGS[name]}").Config
  raise AttributeError(f"module 'jax_varlen_attn' has no attribute {name!r}")
