"""Builds the `pallas_call` of `varlen_attention_kernel` from an AttentionSpec: grid, operands, outputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_varlen_attn.backends.pallas import lowering, mosaic
from jax_varlen_attn.backends.pallas.config import Config
from jax_varlen_attn.backends.pallas.kernel import KernelParams, varlen_attention_kernel
from jax_varlen_attn.spec import AttentionArrays, AttentionSpec, next_pow2

_I32_MAX = 2**31 - 1


def kernel_params(spec: AttentionSpec, config: Config) -> KernelParams:
  """The kernel's static parameters; `config` must be resolved. Strides come from the layout."""
  layout = spec.layout
  paged = layout is not None
  st = layout.strides_in_rows() if paged else {}
  return KernelParams(
      batch=spec.batch, total_q=spec.total_q, num_heads=spec.num_heads,
      num_kv_heads=spec.num_kv_heads, group=spec.group_size, head_dim=spec.head_dim,
      head_dim_pad=next_pow2(spec.head_dim), block_q=config.block_q,
      block_m=Config.block_m_for(config.block_q, spec.group_size), block_k=config.block_k,
      scale=spec.scale, softcap=spec.softcap, window_left=spec.window_left,
      window_right=spec.window_right, has_alibi=spec.has_alibi, return_lse=spec.return_lse,
      kv_fp8=spec.kv_fp8, q_fp8=spec.q_fp8, has_sinks=spec.has_sinks,
      paged=paged,
      max_blocks=spec.max_blocks if paged else 1,
      block_size=layout.block_size if paged else 1,
      num_pages=layout.num_pages if paged else 1,
      page_rows=st.get("page", 0), token_rows=st.get("token", 0), head_rows=st.get("head", 0),
      k_offset_rows=st.get("k_offset", 0), v_offset_rows=st.get("v_offset", 0),
      fused=paged and layout.fused,
      stacked=paged and layout.stacked,
      num_layers=max(layout.num_layers, 1) if paged else 1,
      layer_rows=st.get("layer", 0),
      total_k=spec.total_k)


def _rows(x: jax.Array, head_dim: int) -> jax.Array:
  """A buffer as rows of head_dim elements: a row-major reshape, which XLA makes a bitcast."""
  return x.reshape(-1, head_dim)


def attention(spec: AttentionSpec, arrays: AttentionArrays, config: Config):
  """Varlen attention with the Pallas kernel.

  Args:
    spec: the static description of the call (shapes, layout, options).
    arrays: the normalized arrays (see AttentionArrays): q [T, H, D]; k / v the caller's cache
      buffers (paged) or [total_k, Hk, D]; cu_seqlens_q i32[B + 1]; seqlens_k i32[B]; kv_index
      i32[B, max_blocks] (paged) or i32[B + 1]; alibi f32[B, H] or None; layer i32[] or None;
      q_descale / k_descale / v_descale f32[B, Hk] or None; s_aux f32[H] or None.
    config: block sizes, resolved (`Config.resolved(spec)`: api does it once per call).

  Returns:
    (out [T, H, D] in spec.out_dtype, lse f32[H, T] or None).
  """
  kernel = config.kernel
  if kernel is None:  # the measured-faster kernel for this call (mosaic.preferred)
    kernel = "mosaic" if mosaic.preferred(spec, arrays.k.size, arrays.v.size) else "triton"
  if kernel == "mosaic":
    why = mosaic.unsupported_reason(spec, k_size=arrays.k.size, v_size=arrays.v.size)
    if why is not None:
      raise ValueError(f"PallasConfig(kernel='mosaic') cannot run this call: {why}; use "
                       "kernel='triton' (the default) or backend='triton'")
    # On a CUDA GPU the Mosaic kernel; elsewhere the same semantics in interpret mode.
    return jax.lax.platform_dependent(
        arrays, cuda=lambda a: mosaic.attention(spec, a),
        default=lambda a: _triton_lowered(spec, a, config))
  return _triton_lowered(spec, arrays, config)


def _triton_lowered(spec: AttentionSpec, arrays: AttentionArrays, config: Config):
  """`attention` with kernel.py's kernel (Triton lowering on a GPU, interpret mode elsewhere)."""
  p = kernel_params(spec, config)
  T, H, D = spec.total_q, spec.num_heads, spec.head_dim
  for name, x in (("q", arrays.q), ("k", arrays.k), ("v", arrays.v)):
    # Row ids are int32 inside the kernel.
    if x.size // D > _I32_MAX:
      raise ValueError(f"{name} has {x.size // D} rows of head_dim; the Pallas backend addresses "
                       "rows with int32 (at most 2**31 - 1)")

  operands = [arrays.cu_seqlens_q, arrays.seqlens_k, arrays.kv_index]
  if p.stacked:
    operands.append(jnp.reshape(arrays.layer, (1,)).astype(jnp.int32))
  if p.has_alibi:
    operands.append(arrays.alibi.astype(jnp.float32))
  if p.q_fp8:
    operands.append(arrays.q_descale)  # f32[B, Hk]
  if p.kv_fp8:
    operands += [arrays.k_descale, arrays.v_descale]  # f32[B, Hk] each
  if p.has_sinks:
    operands.append(arrays.s_aux)  # f32[H]
  operands.append(_rows(arrays.q, D))
  operands.append(_rows(arrays.k, D))
  if not p.fused:  # a fused cache is one buffer: passing it twice would make two operands of it
    operands.append(_rows(arrays.v, D))

  out_shape = [jax.ShapeDtypeStruct((T * H, D), spec.out_dtype)]
  if spec.return_lse:
    out_shape.append(jax.ShapeDtypeStruct((H, T), jnp.float32))
  grid = (spec.query_programs(config.block_q), spec.num_kv_heads)
  call = lowering.pallas_call(
      functools.partial(varlen_attention_kernel, p=p), out_shape=out_shape, grid=grid,
      num_warps=config.num_warps, num_stages=config.num_stages,
      name=f"jva_varlen_attention_bq{config.block_q}_bk{config.block_k}")
  results = call(*operands)
  out = results[0].reshape(T, H, D)
  return out, (results[1] if spec.return_lse else None)
