"""The decoder's static configuration: a frozen dataclass with presets.

    cfg = ModelConfig.tiny()                 # for tests and notebooks (a few hundred kB of weights)
    cfg = ModelConfig.qwen3_1_7b_like()      # Qwen3-1.7B's shapes, randomly initialized
    cfg = dataclasses.replace(cfg, num_layers=4, dtype="float32")
"""

from __future__ import annotations

import dataclasses
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and options of `DecoderLM` (and of the `PagedAttention` in each of its blocks).

  dtype is the compute dtype, which is also the dtype of the KV cache (the attention kernel takes
  q and the cache in one dtype); param_dtype that of the weights.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qk_norm: bool = True  # RMSNorm over head_dim on every q and k head, before RoPE (Qwen3)
  attention_bias: bool = False  # biases on the q / k / v projections (Qwen2 has them, Qwen3 not)
  tie_embeddings: bool = True  # LM head = embedding matrix transposed
  dtype: str = "float32"
  param_dtype: str = "float32"
  # lax.scan over stacked blocks (one compiled block; fast to compile); False: one module per layer
  # and a Python loop (each layer compiled; what serving presets take: slicing a layer out of stacked
  # weights copies them every step, benchmarks/NOTES.md "serving step")
  scan_layers: bool = True
  # q / k / v as one projection and gate / up as one: 4 matmuls a layer however XLA fuses (serving
  # presets take it; XLA had merged them already, so it measured within a few %: NOTES.md)
  fuse_projections: bool = False
  # with fuse_projections: q / k norms, RoPE and the cache write as one `rope_write_kv` call (one
  # Triton kernel in place of 4 small XLA kernels and write_kv a layer; NOTES.md "rope_write_kv")
  fuse_rope_write: bool = True
  # each residual add and the RMSNorm after it as one `add_rms_norm` call (one Triton kernel in
  # place of XLA's three on a GPU; the same jnp ops elsewhere). Unrolled layers (scan_layers=False)
  # also carry the MLP's output into the next layer's norm (measured faster: NOTES.md)
  fuse_add_norm: bool = True
  init_std: float = 0.02  # weights ~ N(0, init_std^2) (Qwen's initializer_range); norms start at 1
  backend: str = "auto"  # the attention backend (flash_attn_varlen_func's `backend=`, or "naive")

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads}) (GQA)")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
    if not self.rope_theta > 0:
      raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
    for field in ("dtype", "param_dtype"):
      jnp.dtype(getattr(self, field))  # raises TypeError on a name that is no dtype

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def cache_shape(self, num_blocks: int, block_size: int):
    """Shape of each of the layer-stacked K and V caches: [L, num_blocks, block_size, Hk, D] (NHD)."""
    return (self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim)

  def num_params(self) -> int:
    """Parameter count (from the shapes; no weights are built)."""
    h, d, hk, nh = self.hidden_size, self.head_dim, self.num_kv_heads, self.num_heads
    attn = h * nh * d + 2 * h * hk * d + nh * d * h
    if self.attention_bias:
      attn += nh * d + 2 * hk * d
    if self.qk_norm:
      attn += 2 * d
    block = attn + 3 * h * self.intermediate_size + 2 * h
    head = 0 if self.tie_embeddings else h * self.vocab_size
    return self.vocab_size * h + self.num_layers * block + h + head

  # ---- presets ----------------------------------------------------------------------------------
  @classmethod
  def tiny(cls, **overrides) -> "ModelConfig":
    """2 layers, hidden 64, 4 q / 2 kv heads of 32, vocab 256: compiles and runs in seconds on a CPU."""
    base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                intermediate_size=128, rope_theta=10_000.0, qk_norm=True, tie_embeddings=False)
    return cls(**{**base, **overrides})

  @classmethod
  def qwen3_1_7b_like(cls, **overrides) -> "ModelConfig":
    """Qwen3-1.7B's shapes (28 layers, hidden 2048, 16 q / 8 kv heads of 128, intermediate 6144,
    vocab 151936, qk-norm, tied embeddings, RoPE base 1e6), bf16; about 1.72e9 parameters. Layers
    unrolled, each layer with its own arrays (`scan_layers=False`: a step that slices layer weights
    out of a stack copies all 2.8 GB of them every decode step), q / k / v and gate / up fused."""
    base = dict(vocab_size=151936, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
                head_dim=128, intermediate_size=6144, rope_theta=1_000_000.0, qk_norm=True,
                tie_embeddings=True, dtype="bfloat16", param_dtype="bfloat16", scan_layers=False,
                fuse_projections=True)
    return cls(**{**base, **overrides})


PRESETS = {"tiny": ModelConfig.tiny, "qwen3_1_7b_like": ModelConfig.qwen3_1_7b_like}


def preset(name: str, **overrides) -> ModelConfig:
  """`preset("tiny")`, `preset("qwen3_1_7b_like", num_layers=4)`."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; one of {sorted(PRESETS)}")
  return PRESETS[name](**overrides)

