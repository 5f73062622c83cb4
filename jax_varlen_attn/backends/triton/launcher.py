"""Builds the launch of `varlen_attention_kernel` from an AttentionSpec: grid, arguments, outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_varlen_attn.backends.triton.call import launch
from jax_varlen_attn.backends.triton.config import Config
from jax_varlen_attn.backends.triton.kernel import varlen_attention_kernel
from jax_varlen_attn.spec import AttentionArrays, AttentionSpec

_I32_MAX = 2**31 - 1


def kernel_arguments(spec: AttentionSpec, arrays: AttentionArrays, config: Config):
  """(inputs by kernel parameter name, outputs, grid, constexprs) of one launch; config resolved."""
  consts = config.constexprs(spec)
  if spec.total_q * spec.num_heads * spec.head_dim > _I32_MAX:
    raise ValueError(f"q has {spec.total_q * spec.num_heads * spec.head_dim} elements; the Triton "
                     "backend indexes q / out with int32 (at most 2**31 - 1): split the batch")
  layout = spec.layout
  inputs = dict(
      q_ptr=arrays.q,
      k_ptr=arrays.k,
      v_ptr=arrays.v,
      cu_seqlens_q_ptr=arrays.cu_seqlens_q,
      seqlens_k_ptr=arrays.seqlens_k,
      kv_index_ptr=arrays.kv_index,
      alibi_ptr=jnp.zeros((1,), jnp.float32) if arrays.alibi is None else arrays.alibi,
      layer_ptr=(jnp.zeros((1,), jnp.int32) if arrays.layer is None
                 else jnp.reshape(arrays.layer, (1,))),
      page_stride=layout.page_stride if layout is not None else 0,
      token_stride=layout.token_stride if layout is not None else 0,
      head_stride=layout.head_stride if layout is not None else 0,
      scale=np.float32(spec.scale),  # np.float32: a Python float would become an fp64 argument
      softcap=np.float32(spec.softcap if spec.softcap > 0 else 1.0),
      batch=spec.batch,
      total_q=spec.total_q,
  )
  outputs = (jax.ShapeDtypeStruct((spec.total_q, spec.num_heads, spec.head_dim), arrays.q.dtype),
             jax.ShapeDtypeStruct((spec.num_heads, spec.total_q) if spec.return_lse else (1,),
                                  jnp.float32))
  grid = (spec.query_programs(consts["BLOCK_Q"]), spec.num_kv_heads)
  return inputs, outputs, grid, consts


def attention(spec: AttentionSpec, arrays: AttentionArrays, config: Config):
  """Returns (out [T, H, D] in q's dtype, lse f32[H, T] or None)."""
  config = config.resolved(spec)
  inputs, outputs, grid, consts = kernel_arguments(spec, arrays, config)
  out, lse = launch(varlen_attention_kernel, inputs, outputs, grid, config.num_warps,
                    config.num_stages, consts)
  return out, (lse if spec.return_lse else None)
