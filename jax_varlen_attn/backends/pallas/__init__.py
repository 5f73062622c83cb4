"""The Pallas backend: the Triton backend's algorithm written in Pallas.

On a CUDA GPU it lowers through Pallas's Triton lowering; elsewhere it runs in interpret mode
(`lowering.py` is the one module that knows which).
"""

from jax_varlen_attn.backends.pallas.attention import attention
from jax_varlen_attn.backends.pallas.config import Config

__all__ = ["attention", "Config"]
