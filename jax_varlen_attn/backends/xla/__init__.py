"""The XLA backend: plain `jax.numpy`, blockwise online softmax. Runs on every platform."""

from jax_varlen_attn.backends.xla.attention import attention
from jax_varlen_attn.backends.xla.config import Config

__all__ = ["attention", "Config"]
