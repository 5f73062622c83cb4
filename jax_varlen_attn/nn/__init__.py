"""Flax NNX layers over a paged KV cache: `PagedAttention` and a small decoder LM built from it.

Needs flax (`pip install "jax_varlen_attn[nn]"`).

    from flax import nnx
    from jax_varlen_attn.nn import DecoderLM, ModelConfig, PagedBatch, init_cache
    model = DecoderLM(ModelConfig.tiny(), rngs=nnx.Rngs(0))

`jax_varlen_attn.serving` runs such a model over mixed prefill + decode batches.
"""

from jax_varlen_attn.nn.attention import PagedAttention, PagedBatch
from jax_varlen_attn.nn.config import PRESETS, ModelConfig, preset
from jax_varlen_attn.nn.model import DecoderBlock, DecoderLM, SwiGLU, init_cache
from jax_varlen_attn.nn.norm import add_rms_norm
from jax_varlen_attn.nn.qkv import apply_rope, rms_norm, rope_frequencies, rope_tables, rope_write_kv

__all__ = ["PagedAttention", "PagedBatch", "add_rms_norm", "apply_rope", "rope_frequencies", "rope_tables", "rms_norm",
           "rope_write_kv", "ModelConfig", "PRESETS", "preset", "DecoderBlock", "DecoderLM", "SwiGLU",
           "init_cache"]
