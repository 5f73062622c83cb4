"""Builds the launch of `varlen_attention_kernel` from an AttentionSpec: grid, arguments, outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_varlen_attn.backends.triton.call import launch, route_for
from jax_varlen_attn.backends.triton.config import Config
from jax_varlen_attn.backends.triton.kernel import varlen_attention_kernel
from jax_varlen_attn.spec import AttentionArrays, AttentionSpec

_I32_MAX = 2**31 - 1


def kernel_arguments(spec: AttentionSpec, arrays: AttentionArrays, config: Config):
  """(inputs by kernel parameter name, outputs, grid, constexprs, input_output_aliases) of one
  launch; config resolved."""
  consts = config.constexprs(spec)
  splits = config.num_splits
  if splits * spec.total_q * spec.num_heads * spec.head_dim > _I32_MAX:
    raise ValueError(f"q has {spec.total_q * spec.num_heads * spec.head_dim} elements (x{splits} "
                     "KV splits); the Triton backend indexes q / out with int32 (at most 2**31 - 1): "
                     "split the batch or pass Config(num_splits=1)")
  layout = spec.layout
  unused = jnp.zeros((1,), jnp.float32)  # a pointer argument the constexprs leave unread
  inputs = dict(
      q_ptr=arrays.q,
      k_ptr=arrays.k,
      v_ptr=arrays.v,
      cu_seqlens_q_ptr=arrays.cu_seqlens_q,
      seqlens_k_ptr=arrays.seqlens_k,
      kv_index_ptr=arrays.kv_index,
      alibi_ptr=unused if arrays.alibi is None else arrays.alibi,
      layer_ptr=(jnp.zeros((1,), jnp.int32) if arrays.layer is None
                 else jnp.reshape(arrays.layer, (1,))),
      q_descale_ptr=unused if arrays.q_descale is None else arrays.q_descale,  # f32[B, Hk]
      k_descale_ptr=unused if arrays.k_descale is None else arrays.k_descale,
      v_descale_ptr=unused if arrays.v_descale is None else arrays.v_descale,
      sinks_ptr=unused if arrays.s_aux is None else arrays.s_aux,  # f32[H]
      # Runtime, not constexpr: the kernel says why. Python ints: jax-triton types them i32, or i64
      # past 2**31.
      k_offset=layout.k_offset if layout is not None else 0,
      v_offset=layout.v_offset if layout is not None else 0,
      scale=np.float32(spec.scale),  # np.float32: a Python float would become an fp64 argument
      softcap=np.float32(spec.softcap if spec.softcap > 0 else 1.0),
      batch=spec.batch,
      total_q=spec.total_q,
  )
  out_shape = (spec.total_q, spec.num_heads, spec.head_dim)
  lse_shape = (spec.num_heads, spec.total_q)
  # The grid's last round (kernel._tail_plan): a count per tail item, zero at the start of every
  # call (the kernel adds to it in place), and the pieces' partials.
  tail = consts["TAIL_PIECES"] > 1
  slots = consts["TAIL_SLOTS"]
  counts = (slots // 2,) if tail else (1,)
  inputs["tail_in_ptr"] = jnp.zeros(counts, jnp.int32)
  outputs = [jax.ShapeDtypeStruct(counts, jnp.int32)]
  if splits > 1:  # partial results per split, f32, combined by `combine_splits`
    outputs += [jax.ShapeDtypeStruct((splits,) + out_shape, jnp.float32),
                jax.ShapeDtypeStruct((splits,) + lse_shape, jnp.float32)]
  else:
    outputs += [jax.ShapeDtypeStruct(out_shape, spec.out_dtype),
                jax.ShapeDtypeStruct(lse_shape if spec.return_lse else (1,), jnp.float32)]
  outputs += [jax.ShapeDtypeStruct((slots, consts["BLOCK_M"], consts["HEAD_DIM_PAD"]) if tail else (1,),
                                   jnp.float32),
              jax.ShapeDtypeStruct((slots, consts["BLOCK_M"]) if tail else (1,), jnp.float32)]
  aliases = {"tail_in_ptr": 0} if tail else {}
  # Query programs x kv heads on axis 0 (the kernel splits them; axis 1 would cap the programs at
  # 65535), then the tail's helpers; split-KV on axis 2.
  grid = (spec.query_programs(consts["BLOCK_Q"]) * spec.num_kv_heads + (slots if tail else 0), 1, splits)
  return inputs, outputs, grid, consts, aliases


def attention(spec: AttentionSpec, arrays: AttentionArrays, config: Config):
  """Returns (out [T, H, D] in spec.out_dtype, lse f32[H, T] or None); `config` resolved
  (`Config.resolved(spec)`: api does it once per call)."""
  inputs, outputs, grid, consts, aliases = kernel_arguments(spec, arrays, config)
  _, out, lse, _, _ = launch(varlen_attention_kernel, inputs, outputs, grid, config.num_warps,
                             config.num_stages, consts, input_output_aliases=aliases,
                             route=config.launch or route_for(spec.total_q))
  if config.num_splits > 1:
    out, lse = combine_splits(out, lse)
    out = out.astype(spec.out_dtype)
  return out, (lse if spec.return_lse else None)


def combine_splits(out, lse):
  """Merges split-KV partials: out f32[S, T, H, D] (each normalized), lse f32[S, H, T] (-inf where a
  split saw no key) -> (out f32[T, H, D], lse f32[H, T] with +inf where no split saw a key).

  One XLA fusion reading the partials once; the weights exp(lse_s - max_s lse) are those of the
  softmax over the union of the splits' keys.
  """
  top = jnp.max(lse, axis=0)  # [H, T]
  seen = top > -jnp.inf
  top = jnp.where(seen, top, 0.0)
  weight = jnp.exp(lse - top)  # [S, H, T]; 0 for a split without keys
  total = jnp.sum(weight, axis=0)  # [H, T]
  scale = weight / jnp.where(seen, total, 1.0)  # [S, H, T]
  merged = jnp.einsum("sht,sthd->thd", scale, out, precision=jax.lax.Precision.HIGHEST)
  merged_lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), jnp.inf)
  return merged, merged_lse
