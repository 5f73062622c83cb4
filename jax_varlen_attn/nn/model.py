"""A small decoder-only language model built on `PagedAttention` (Qwen3-style, random weights).

    tokens -> embed -> N x [x + attn(rms(x)); x + swiglu(rms(x))] -> rms -> LM head (tied or not)

`DecoderLM.__call__` runs one flat batch (prefill chunks and decodes mixed) over a layer-stacked
paged cache [L, num_blocks, block_size, Hk, D] and returns (logits, k_cache, v_cache).

`ModelConfig.scan_layers=True`: the blocks' weights are stacked on a leading [L] axis and the layers
run under `jax.lax.scan` with the layer index as a traced int32 (one attention and one `write_kv` in
the compiled program for all layers; quick to compile, but each step copies every layer's weights out
of the stack, as XLA's matmuls do not read a slice in place). `scan_layers=False`: each layer owns its
own arrays (`DecoderLM.layers`) and a Python loop unrolls them, so a step reads the weights where they
lie (what a serving loop wants; benchmarks/NOTES.md, "the serving decode loop").

`ModelConfig.fuse_add_norm=True` (the default): each residual add and the RMSNorm after it are one
`add_rms_norm` call (one Triton kernel on a GPU), and the unrolled loop carries each block's MLP
output into the next block's norm (`DecoderBlock.carry`), so the stream's adds all run inside norms.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_varlen_attn.nn.attention import PagedAttention, PagedBatch
from jax_varlen_attn.nn.config import ModelConfig
from jax_varlen_attn.nn.norm import add_rms_norm


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), no biases. `fused`: gate and up as one [hidden, 2 * intermediate]
  projection (`gate_up_proj`, columns gate | up): one matmul instead of two."""

  def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, param_dtype, init_std: float = 0.02,
               fused: bool = False, rngs: nnx.Rngs):
    lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype,
               kernel_init=nnx.initializers.normal(init_std), rngs=rngs)
    if fused:
      self.gate_up_proj = nnx.Linear(hidden_size, 2 * intermediate_size, **lin)
    else:
      self.gate_proj = nnx.Linear(hidden_size, intermediate_size, **lin)
      self.up_proj = nnx.Linear(hidden_size, intermediate_size, **lin)
    self.down_proj = nnx.Linear(intermediate_size, hidden_size, **lin)
    self.fused = fused

  def __call__(self, x):
    if self.fused:
      gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(jax.nn.silu(gate) * up)


def add_norm(norm: nnx.RMSNorm, h, residual, attention_backend: str):
  """`add_rms_norm` with an `nnx.RMSNorm`'s scale and epsilon: returns (norm(h + residual), the sum),
  on the backend of a model whose attention runs on `attention_backend` ("naive": jnp)."""
  backend = "xla" if attention_backend == "naive" else attention_backend
  return add_rms_norm(h, residual, norm.scale[...], eps=norm.epsilon, backend=backend)


class DecoderBlock(nnx.Module):
  """Pre-norm block: x + attn(rms(x)), then x + mlp(rms(x)).

  With `ModelConfig.fuse_add_norm` each add and the norm after it are one `add_rms_norm` call.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    dt = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
    self.input_norm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, rngs=rngs, **dt)
    self.attn = PagedAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                               rope_theta=c.rope_theta, qk_norm=c.qk_norm, norm_eps=c.rms_norm_eps,
                               use_bias=c.attention_bias, fused_qkv=c.fuse_projections,
                               fused_rope_write=c.fuse_rope_write, backend=c.backend,
                               init_std=c.init_std, rngs=rngs, **dt)
    self.post_attn_norm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, rngs=rngs, **dt)
    self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, init_std=c.init_std, fused=c.fuse_projections,
                      rngs=rngs, **dt)
    self.fuse_add_norm = c.fuse_add_norm

  def __call__(self, x, k_cache, v_cache, batch: PagedBatch, layer=None):
    if not self.fuse_add_norm:
      h, k_cache, v_cache = self.attn(self.input_norm(x), k_cache, v_cache, batch, layer)
      x = x + h
      x = x + self.mlp(self.post_attn_norm(x))
      return x, k_cache, v_cache
    x, pending, k_cache, v_cache = self.carry(x, None, k_cache, v_cache, batch, layer)
    return x + pending, k_cache, v_cache

  def carry(self, x, pending, k_cache, v_cache, batch: PagedBatch, layer=None):
    """The block over a residual stream held as x + pending, its adds inside `add_rms_norm`.

    x: [T, hidden]; pending: the previous block's MLP output not yet added to x ([T, hidden]), or
    None. Returns (x, mlp_out, k_cache, v_cache), the stream after the block being x + mlp_out: the
    next block's (or the final) norm adds it, so a layer launches no add of its own.
    """
    if pending is None:
      y, x = add_norm(self.input_norm, x, None, self.attn.backend)
    else:
      y, x = add_norm(self.input_norm, pending, x, self.attn.backend)
    h, k_cache, v_cache = self.attn(y, k_cache, v_cache, batch, layer)
    y, x = add_norm(self.post_attn_norm, h, x, self.attn.backend)
    return x, self.mlp(y), k_cache, v_cache


class DecoderLM(nnx.Module):
  """Decoder-only LM over a paged, layer-stacked KV cache. Randomly initialized from `rngs`.

  Example::

      cfg = ModelConfig.tiny()
      model = DecoderLM(cfg, rngs=nnx.Rngs(0))
      k_cache, v_cache = init_cache(cfg, num_blocks=32, block_size=16)
      logits, k_cache, v_cache = model(tokens, k_cache, v_cache, batch)   # batch: PagedBatch
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    init = nnx.initializers.normal(c.init_std)
    self.embed = nnx.Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype,
                           param_dtype=c.weight_dtype, embedding_init=init, rngs=rngs)

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return DecoderBlock(c, rngs=rngs)

    blocks = make_blocks(rngs)  # every weight has a leading [num_layers] axis
    if c.scan_layers:
      self.blocks = blocks
    else:  # one module per layer, the same weights as the stacked form (same rngs)
      graphdef, state = nnx.split(blocks)
      self.layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                              for i in range(c.num_layers)])
      del blocks, state
    self.final_norm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, dtype=c.compute_dtype,
                                  param_dtype=c.weight_dtype, rngs=rngs)
    self.lm_head = None if c.tie_embeddings else nnx.Linear(
        c.hidden_size, c.vocab_size, use_bias=False, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
        kernel_init=init, rngs=rngs)

  def block(self, i: int) -> DecoderBlock:
    """Layer i as a `DecoderBlock`: the layer itself when unrolled, else a slice of the stacked
    weights (a copy; for inspection and tests)."""
    if not self.config.scan_layers:
      return self.layers[i]
    graphdef, state = nnx.split(self.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and LM head: x [N, hidden] -> logits [N, vocab] (in the compute dtype)."""
    return self.head(self.final_norm(x))

  def head(self, y: jax.Array) -> jax.Array:
    """LM head over normed rows: y [N, hidden] -> logits [N, vocab]."""
    return self.embed.attend(y) if self.lm_head is None else self.lm_head(y)

  def __call__(self, tokens: jax.Array, k_cache: jax.Array, v_cache: jax.Array, batch: PagedBatch,
               logits_indices: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """One flat batch: tokens i32[T] -> (logits, k_cache, v_cache).

    k_cache, v_cache: [L, num_blocks, block_size, Hk, D] in the compute dtype (`init_cache`).
    batch: `PagedBatch` for the T tokens; padding tokens have slot -1 and lie past cu_seqlens_q[-1].
    logits_indices: optional i32[N] rows whose logits to return ([N, vocab]); None: all T rows.
    """
    c = self.config
    expected = c.cache_shape(k_cache.shape[1], k_cache.shape[2]) if k_cache.ndim == 5 else None
    if tuple(k_cache.shape) != expected or tuple(v_cache.shape) != expected:
      raise ValueError(f"k_cache / v_cache must be [num_layers={c.num_layers}, num_blocks, block_size, "
                       f"num_kv_heads={c.num_kv_heads}, head_dim={c.head_dim}], got "
                       f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    x = self.embed(tokens)
    if c.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(carry, xs):
        x, k_cache, v_cache = carry
        block_state, layer = xs
        block = nnx.merge(graphdef, block_state)
        return block(x, k_cache, v_cache, batch, layer), None

      layers = jnp.arange(c.num_layers, dtype=jnp.int32)
      (x, k_cache, v_cache), _ = jax.lax.scan(body, (x, k_cache, v_cache), (state, layers))
    elif c.fuse_add_norm:  # the stream is x + pending; each add runs inside the next norm's call
      pending = None
      for i, layer in enumerate(self.layers):
        x, pending, k_cache, v_cache = layer.carry(x, pending, k_cache, v_cache, batch, jnp.int32(i))
      if logits_indices is not None:
        x, pending = x[logits_indices], pending[logits_indices]
      y, _ = add_norm(self.final_norm, pending, x, c.backend)
      return self.head(y), k_cache, v_cache
    else:
      for i, layer in enumerate(self.layers):
        x, k_cache, v_cache = layer(x, k_cache, v_cache, batch, jnp.int32(i))
    if logits_indices is not None:
      x = x[logits_indices]
    return self.logits(x), k_cache, v_cache


def init_cache(config: ModelConfig, num_blocks: int, block_size: int = 16, dtype=None):
  """Zeroed K and V caches, each [num_layers, num_blocks, block_size, num_kv_heads, head_dim] (NHD,
  layer-stacked), in the model's compute dtype unless `dtype` says otherwise."""
  shape = config.cache_shape(num_blocks, block_size)
  dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
