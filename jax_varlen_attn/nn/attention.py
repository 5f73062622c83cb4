"""`PagedAttention`: a Flax NNX attention layer over a paged (optionally layer-stacked) KV cache.

One call serves a flat batch that mixes prefill chunks and decode tokens:

    q, k, v = projections of x; RMSNorm on q / k heads (optional, Qwen3); RoPE at `positions`
    k_cache, v_cache = write_kv(k, v, k_cache, v_cache, batch.slot_mapping, layer=layer)
    o = flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=..., seqused_k=..., block_table=...,
                               causal=True, layer=layer)
    return o_proj(o), k_cache, v_cache

Everything about the batch is an array (`PagedBatch`), so a jitted step compiles once per shape and
`layer` may be a traced int (one compiled attention for every layer under `lax.scan`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jax_varlen_attn.api import flash_attn_varlen_func
from jax_varlen_attn.cache import write_kv
from jax_varlen_attn.nn.qkv import apply_rope, rope_write_kv
from jax_varlen_attn.reference import naive_paged_attention


class PagedBatch(NamedTuple):
  """Metadata of one flat batch of T tokens (padding included) over B sequences (padding included).

  positions:     i32[T]  position of each token in its sequence (RoPE); padding: anything (0).
  cu_seqlens_q:  i32[B + 1] the tokens of sequence b are rows [cu[b], cu[b+1]); padded sequences
                 repeat the last offset, rows past cu[-1] are padding.
  seqused_k:     i32[B]  keys of each sequence once this step's tokens are written (0: padding).
  block_table:   i32[B, max_blocks] pages of each sequence (entries past its pages are never read).
  slot_mapping:  i32[T]  cache slot (page * block_size + offset) of each token; -1: not written.
  """

  positions: jax.Array
  cu_seqlens_q: jax.Array
  seqused_k: jax.Array
  block_table: jax.Array
  slot_mapping: jax.Array


class PagedAttention(nnx.Module):
  """Causal GQA self-attention whose keys and values live in a paged cache.

  Args:
    hidden_size, num_heads, num_kv_heads, head_dim: shapes (num_heads % num_kv_heads == 0).
    rope_theta: RoPE base.
    qk_norm: RMSNorm (over head_dim, one learned scale shared by all heads) on q and k before RoPE.
    use_bias: biases on the q / k / v projections (o_proj has none).
    fused_qkv: one [hidden, (H + 2 Hk) * D] projection (`qkv_proj`, columns q | k | v) instead of
      `q_proj`, `k_proj`, `v_proj`: one matmul whatever XLA decides (on the GPU it already merged
      the three; fusing measured within a few percent: benchmarks/NOTES.md, "the serving decode
      loop"), and the layout serving checkpoints often use.
    fused_rope_write: with fused_qkv, the q / k norms, RoPE and the cache write run as one
      `jax_varlen_attn.nn.qkv.rope_write_kv` call (`project_and_write`): one Triton kernel where
      the backend is Triton, else the same jnp ops as `project` then `write_kv`.
    dtype / param_dtype: compute and weight dtypes; the cache must be in `dtype`.
    backend: `flash_attn_varlen_func`'s backend ("auto": Triton on a CUDA GPU, else XLA), or
      "naive": `jax_varlen_attn.reference.naive_paged_attention` (the serving benchmark's baseline;
      the cache is then written with the XLA scatter).
    init_std: projections start as N(0, init_std^2) (biases at 0, norm scales at 1).
  """

  def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_theta: float = 1_000_000.0, qk_norm: bool = False, norm_eps: float = 1e-6,
               use_bias: bool = False, fused_qkv: bool = False, fused_rope_write: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32,
               backend: str = "auto", init_std: float = 0.02, rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = float(rope_theta)
    self.norm_eps = float(norm_eps)
    self.backend = backend
    self.dtype = jnp.dtype(dtype)
    lin = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.normal(init_std),
               rngs=rngs)
    if fused_qkv:
      self.qkv_proj = nnx.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, use_bias=use_bias,
                                 **lin)
    else:
      self.q_proj = nnx.Linear(hidden_size, num_heads * head_dim, use_bias=use_bias, **lin)
      self.k_proj = nnx.Linear(hidden_size, num_kv_heads * head_dim, use_bias=use_bias, **lin)
      self.v_proj = nnx.Linear(hidden_size, num_kv_heads * head_dim, use_bias=use_bias, **lin)
    self.fused_qkv = fused_qkv
    self.fused_rope_write = fused_qkv and fused_rope_write
    self.o_proj = nnx.Linear(num_heads * head_dim, hidden_size, use_bias=False, **lin)
    if qk_norm:
      norm = dict(epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.q_norm = nnx.RMSNorm(head_dim, **norm)
      self.k_norm = nnx.RMSNorm(head_dim, **norm)
    else:
      self.q_norm = self.k_norm = None

  def project(self, x: jax.Array, positions: jax.Array):
    """x [T, hidden] -> q [T, H, D], k [T, Hk, D], v [T, Hk, D]: projections, qk-norm, RoPE."""
    t, h, hk, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
    if self.fused_qkv:
      q, k, v = jnp.split(self.qkv_proj(x), [h * d, (h + hk) * d], axis=-1)
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q, k, v = q.reshape(t, h, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    return q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype)

  def project_and_write(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, batch: PagedBatch,
                        layer: Optional[jax.Array] = None):
    """`project` and `write_kv` in one (fused_qkv only): x [T, hidden] -> (q [T, H, D], k_cache,
    v_cache) through `rope_write_kv`, one kernel on the Triton backend; same values as `project`."""
    qkv = self.qkv_proj(x).astype(self.dtype)
    norms = {} if self.q_norm is None else dict(q_norm_scale=self.q_norm.scale[...],
                                                  k_norm_scale=self.k_norm.scale[...])
    return rope_write_kv(qkv, k_cache, v_cache, batch.slot_mapping, batch.positions, num_heads=self.num_heads,
                         rope_theta=self.rope_theta, eps=self.norm_eps, layer=layer, backend=self.backend,
                         **norms)

  def output(self, o: jax.Array) -> jax.Array:
    """o [T, H, D] (attention output) -> [T, hidden]."""
    return self.o_proj(o.reshape(o.shape[0], self.num_heads * self.head_dim))

  def __call__(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, batch: PagedBatch,
               layer: Optional[jax.Array] = None):
    """x [T, hidden] -> (y [T, hidden], k_cache, v_cache).

    The caches are NHD, [num_blocks, block_size, Hk, D], or layer-stacked [L, num_blocks, block_size,
    Hk, D] with `layer` an int32 scalar (traced is fine). This step's keys and values are written at
    `batch.slot_mapping` first, so every token attends to its own sequence's history and to itself.
    Under `jax.jit` with the caches donated the write is in place.
    """
    naive = self.backend == "naive"
    if self.fused_rope_write and not naive:  # one launch from the projection to attention's inputs
      q, k_cache, v_cache = self.project_and_write(x, k_cache, v_cache, batch, layer)
    else:
      q, k, v = self.project(x, batch.positions)
      k_cache, v_cache = write_kv(k, v, k_cache, v_cache, batch.slot_mapping, layer=layer,
                                  backend="xla" if naive else self.backend)
    attend = naive_paged_attention if naive else functools.partial(flash_attn_varlen_func,
                                                                   backend=self.backend)
    o = attend(q, k_cache, v_cache, cu_seqlens_q=batch.cu_seqlens_q, seqused_k=batch.seqused_k,
               block_table=batch.block_table, causal=True, layer=layer)
    return self.output(o), k_cache, v_cache
