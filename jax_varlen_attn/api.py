"""The public function: binds and validates its arguments once (`validation`), picks a backend, runs it."""

from __future__ import annotations

import functools
import inspect
from typing import Union

import jax

from jax_varlen_attn import backends as registry
from jax_varlen_attn import sharding
from jax_varlen_attn.layout import KVCacheLayout
from jax_varlen_attn.spec import AttentionArrays, AttentionSpec
from jax_varlen_attn.validation import AttentionArgs, validate


def flash_attn_varlen_func(
    q, k, v, max_seqlen_q=None, cu_seqlens_q=None, max_seqlen_k=None, cu_seqlens_k=None,
    seqused_k=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, block_table=None, return_softmax_lse=False, *,
    kv_layout: Union[str, KVCacheLayout] = "NHD", layer=None, backend: str = "auto", config=None,
    q_descale=None, k_descale=None, v_descale=None, s_aux=None):
  """Variable-length attention over packed sequences, with a contiguous or paged KV cache.

  Example (a prefill of 3 tokens and a decode of 1 over a paged NHD cache)::

      import jax, jax.numpy as jnp
      from jax_varlen_attn import flash_attn_varlen_func
      ks = jax.random.split(jax.random.key(0), 3)
      q = jax.random.normal(ks[0], (4, 8, 64), jnp.float16)              # [total_q, H, D]
      k_cache = jax.random.normal(ks[1], (16, 16, 2, 64), jnp.float16)   # [num_blocks, block_size, Hk, D]
      v_cache = jax.random.normal(ks[2], (16, 16, 2, 64), jnp.float16)
      out = flash_attn_varlen_func(
          q, k_cache, v_cache, cu_seqlens_q=jnp.array([0, 3, 4], jnp.int32),
          seqused_k=jnp.array([3, 20], jnp.int32),
          block_table=jnp.array([[0, 0], [5, 2]], jnp.int32), causal=True)  # out: [4, 8, 64] f16

  Args (shapes: T = total_q rows, B = batch, H / Hk = q / kv heads, D = head_dim):
    q: f16/bf16/f32[T, H, D], or fp8 (float8_e4m3fn / float8_e5m2, with an fp8 cache). Rows past
      `cu_seqlens_q[-1]` are padding: they output zeros.
    k, v: non-paged: [total_k, Hk, D] (with `cu_seqlens_k`). Paged: the cache as `kv_layout`
      describes it (with `block_table`); `v=None` where V lives in k's buffer (fused forms).
      In q's dtype, or an fp8 cache (float8_e4m3fn / float8_e5m2, k and v alike) read with
      `k_descale` / `v_descale`.
    max_seqlen_q, max_seqlen_k: optional static Python ints, upper bounds of the per-sequence
      lengths (hints for block sizes and split counts; a traced value is a TypeError).
    cu_seqlens_q: i32[B + 1], query offsets of each sequence in q.
    cu_seqlens_k: i32[B + 1], key offsets in k / v (non-paged; paged: used for lengths if
      `seqused_k` is None).
    seqused_k: i32[B], keys of each sequence (required for a paged cache unless cu_seqlens_k is given).
    softmax_scale: positive finite float; default 1 / sqrt(D).
    causal: bottom-right aligned: query i of a sequence sees key j iff j <= i + seqlen_k - seqlen_q.
    window_size: (left, right), -1 (or window_size=None) unbounded: key j allowed iff
      i + sk - sq - left <= j <= i + sk - sq + right (right is 0 under causal).
    softcap: > 0 turns scores into softcap * tanh(score / softcap) (before ALiBi and masking).
    alibi_slopes: f32[H] or f32[B, H]; adds -slope * |i + sk - sq - j| to the score.
    block_table: i32[B, max_blocks], pages of each sequence (entries past a sequence's pages are
      never read; an out-of-range entry within them is clamped into the cache).
    return_softmax_lse: also return the log-sum-exp, f32[H, T] (see Returns).
    kv_layout: "NHD" (default), "HND", "fused_page_major", "fused_kv_major" or a `KVCacheLayout`.
    layer: i32[] (traced is fine) selecting a layer of a stacked cache [L, ...] (a traced value is
      clamped to [0, L); a Python / NumPy int outside it is a ValueError).
    backend: "auto" (triton on a CUDA GPU, else xla), "xla", "pallas" or "triton".
    config: the chosen backend's `Config` (block sizes), or None for its default.
    k_descale, v_descale: f32[B, Hk], or a scalar (f32[] / f32[1] / a Python float: every
      sequence and head), dequantization scales of an fp8 cache (vLLM's names and shapes): the key
      sequence b reads in kv head h is `float(k element) * k_descale[b, h]`, likewise V. None: 1.0
      (as vLLM). Applied as given, sign included. With a cache in q's dtype (not fp8) they are
      checked and ignored, as FlashAttention 3 does, so vLLM's calls (which always pass them) port.
    q_descale: the same for an fp8 q (q row of sequence b, q head h: `float(q) * q_descale[b,
      h // (H / Hk)]`); checked and ignored for a q that is not fp8.
    s_aux: f32[H], attention sinks (gpt-oss): logit s_aux[h] joins the softmax denominator of
      every row of q head h and carries no value: out = sum_j exp(s_j) v_j / (exp(s_aux[h]) +
      sum_j exp(s_j)). -inf is no sink for that head.

  Returns:
    out [T, H, D] in q's dtype (bfloat16 for an fp8 q, as FlashAttention 3), or (out, lse) when
    `return_softmax_lse`. A row that sees no key (zero-length sequence, empty window) outputs zeros;
    padding rows (past cu_seqlens_q[-1]) output zeros too.
    lse: f32[H, T], the natural log of the softmax denominator, sinks included: log(exp(s_aux[h])
    + sum_j exp(s_j)). A row of a sequence that sees no key has lse +inf without a sink and
    s_aux[h] with one (its denominator is exp(s_aux[h]): out is still zeros); padding rows have
    +inf.

  fp8 precision: keys and values are converted to the compute dtype exactly (every fp8 value is an
  fp16 / bf16 / f32 value); descales are applied to the scores (q.k * k_descale) and to the output
  (p @ v * v_descale), exact up to f32 rounding. An fp8 q computes in fp16.

  Positional order: vLLM's (q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, ...).
  FlashAttention 2's `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, ...)` differs: pass the lengths by keyword. There is no `out=` argument: JAX arrays
  are immutable; the result is returned (jit with donation reuses buffers). Forward only: any
  derivative raises a TypeError.

  Multi-device (heads split over a mesh axis, no communication): inside `jax.shard_map` pass each
  device's arrays; under `jax.jit` on an Explicit mesh (`jax.make_mesh`'s default), or outside jit,
  a q / cache split on its head axis is detected and each device runs on its own heads. On an Auto
  mesh use `sharded_flash_attn_varlen_func(mesh, head_axis, ...)`. See `jax_varlen_attn.sharding`.
  Descales split with the kv heads (axis 1) and `s_aux` with the q heads.
  """
  args = AttentionArgs(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k,
                       softmax_scale, causal, window_size, softcap, alibi_slopes, block_table,
                       return_softmax_lse, kv_layout, layer, q_descale, k_descale, v_descale, s_aux)
  return _attention(args, backend, config, heads=None)


def sharded_flash_attn_varlen_func(mesh, head_axis, *args, **kwargs):
  """`flash_attn_varlen_func` with the heads split over mesh axis `head_axis`: no communication.

  Each of the n devices on `head_axis` (an axis name or a tuple of them) computes H/n q heads
  from its Hk/n kv heads. Use it under `jax.jit` on a mesh with Auto axes, where the arrays' types
  carry no sharding to detect; anywhere else it is the same as letting `flash_attn_varlen_func`
  detect the split. The arguments after (mesh, head_axis) are flash_attn_varlen_func's.

      mesh = jax.sharding.Mesh(jax.devices(), ("tp",))
      step = jax.jit(lambda q, k, v, cu, used, bt: sharded_flash_attn_varlen_func(
          mesh, "tp", q, k, v, cu_seqlens_q=cu, seqused_k=used, block_table=bt, causal=True))

  Inputs already split that way (q on axis 1, the cache on its kv-head axis: NHD 2, HND 1, fused
  forms 3, one more when layer-stacked; non-paged k / v 1) are used in place; others are resharded
  (a replicated input is sliced locally). Metadata (cu_seqlens, block_table, seqused_k) is used
  replicated. Returns out [T, H, D] (and lse [H, T]) split on H.

  Raises ValueError when num_kv_heads is not a multiple of the number of devices on `head_axis`,
  or for a `KVCacheLayout` (its kv-head axis is unknown: use jax.shard_map with per-device arrays).

  Descales ([B, Hk]) are split on their kv-head axis and `s_aux` ([H]) on its heads, like q.
  """
  bound = inspect.signature(flash_attn_varlen_func).bind(*args, **kwargs)
  bound.apply_defaults()
  named = dict(bound.arguments)
  backend, config = named.pop("backend"), named.pop("config")
  return _attention(AttentionArgs(**named), backend, config, heads=(mesh, head_axis))


def _attention(args: AttentionArgs, backend: str, config, *, heads):
  """Validates `args` once and runs the selected backend. heads: None (split as q's / the cache's
  sharding says, if it says) or (mesh, head_axis)."""
  spec, arrays = validate(args)
  split = sharding.detect(spec, arrays) if heads is None else sharding.plan(spec, arrays, *heads)
  # "auto" picks per call from the spec (backends.auto_name), unless the config names a backend.
  impl = registry.select(backend, spec if config is None else None, (arrays.k.size, arrays.v.size))
  run_spec = spec if split is None else split.local_spec  # what each device's kernel sees
  if config is None:
    config = impl.config_cls.get_default(run_spec)
  elif not isinstance(config, impl.config_cls):
    raise TypeError(f"config for backend={impl.name!r} must be a jax_varlen_attn."
                    f"{impl.name.capitalize()}Config, got {type(config).__name__}")
  else:
    config = config.resolved(run_spec)  # the caller's None fields, chosen once: backends get it whole
  if split is None:
    # Inputs split on an Explicit mesh that we do not take up (a KVCacheLayout: its head axis is
    # unknown) are gathered first: jax's sharding-in-types would reject the unsplit computation.
    arrays = sharding.replicate_explicit(arrays)
    out, lse = _forward_only(_run, (impl.name, spec, config), arrays)
  else:
    out, lse = _forward_only(_run_split, (impl.name, spec, config, split), arrays)
  return (out, lse) if spec.return_lse else out


FORWARD_ONLY = ("flash_attn_varlen_func is forward-only: it defines no derivative (jax.grad, jax.vjp, "
                "jax.jvp). For inference inside a differentiated function, pass its inputs through "
                "jax.lax.stop_gradient.")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _forward_only(run, static, arrays):
  """run(*static, arrays), with a derivative rule that raises FORWARD_ONLY (instead of an error
  from deep inside a backend: a while_loop's reverse mode, a Pallas assertion)."""
  return run(*static, arrays)


@_forward_only.defjvp
def _no_derivative(run, static, primals, tangents):
  raise TypeError(FORWARD_ONLY)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(backend_name: str, spec: AttentionSpec, config, arrays: AttentionArrays):
  return registry.load(backend_name).attention(spec, arrays, config)  # selected by _attention


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run_split(backend_name: str, spec: AttentionSpec, config, split, arrays: AttentionArrays):
  """_run on each device's heads (split: a sharding.HeadSplit)."""
  local = functools.partial(_run, backend_name, split.local_spec, config)
  return sharding.shard_heads(local, split, spec, arrays)


