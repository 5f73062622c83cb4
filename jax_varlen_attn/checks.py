"""Eager checks of the *values* of a call's index arrays (what `jax.jit` cannot raise on).

`flash_attn_varlen_func` validates shapes, dtypes and options before tracing, but values live in
arrays: inside `jax.jit` a bad block-table entry cannot raise. Every kernel therefore clamps what it
reads (the defined answers below); `check_inputs` is the opt-in, eager check that names the argument
and the first bad index instead. Call it outside `jax.jit` (it reads the arrays back to the host),
e.g. in tests or while debugging a serving loop.

Defined answers without the check (every backend; never a read outside a buffer, never a hang):
- block_table entry used by a sequence but outside [0, num_pages): clamped into [0, num_pages).
- seqused_k < 0: treated as 0 keys; above max_blocks * block_size: clamped to it.
- cu_seqlens_q / cu_seqlens_k not non-decreasing, or past total_q / total_k: sequence bounds are
  clamped into [0, total]; a sequence with a negative length has no rows; rows claimed by two
  sequences get one of the two answers, rows claimed by none are unspecified.
- layer outside [0, num_layers): clamped when traced (a Python or NumPy int out of range raises).
- NaN / Inf inside the keys / values a row attends to: propagate to that row only (poison in
  padding, unused page tails and unreferenced pages never reaches a real row).
- a non-finite descale (q / k / v_descale[b, h]): propagates to the rows of sequence b in the q
  heads of kv head h only. An s_aux of NaN or +inf: to the rows of that q head (-inf is no sink).
"""

from __future__ import annotations

import jax
import numpy as np

from jax_varlen_attn.validation import AttentionArgs, validate


def _first_bad(mask: np.ndarray):
  idx = np.argwhere(mask)
  return tuple(int(i) for i in idx[0]) if len(idx) else None


def check_inputs(q, k, v, max_seqlen_q=None, cu_seqlens_q=None, max_seqlen_k=None, cu_seqlens_k=None,
                 seqused_k=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                 alibi_slopes=None, block_table=None, return_softmax_lse=False, *, kv_layout="NHD",
                 layer=None, q_descale=None, k_descale=None, v_descale=None, s_aux=None,
                 **unused) -> None:
  """Raises ValueError naming the argument and the first bad index if any index value is invalid.

  Takes exactly the arguments of `flash_attn_varlen_func` (extra keywords such as `backend` are
  ignored), runs its static validation first, then checks values eagerly:
  cu_seqlens_q / cu_seqlens_k start at 0, never decrease, end within total_q / total_k; seqused_k
  within [0, capacity]; every block-table entry a sequence uses lies in [0, num_pages); layer in
  [0, num_layers); max_seqlen_q / max_seqlen_k, when given, bound the actual lengths; descales
  (where they apply: fp8 tensors) are finite; s_aux is neither NaN nor +inf.
  """
  spec, arrays = validate(AttentionArgs(
      q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k, softmax_scale, causal,
      window_size, softcap, alibi_slopes, block_table, return_softmax_lse, kv_layout, layer, q_descale,
      k_descale, v_descale, s_aux))
  values = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
                block_table=block_table, layer=layer, q_descale=q_descale, k_descale=k_descale,
                v_descale=v_descale, s_aux=s_aux)
  traced = [name for name, x in values.items() if isinstance(x, jax.core.Tracer)]
  if traced:
    raise TypeError(f"check_inputs reads index values on the host, eagerly: call it outside jax.jit "
                    f"(or jax.vmap, ...) on concrete arrays; traced here: {traced} (inside jit the "
                    f"kernels clamp instead: docs/contract.md, 'Values that cannot raise')")
  for name in ("q_descale", "k_descale", "v_descale"):
    scale = getattr(arrays, name)
    if scale is not None:
      bad = _first_bad(~np.isfinite(np.asarray(scale)))
      if bad is not None:
        raise ValueError(f"{name}: entry [{bad[0]}, {bad[1]}] (sequence, kv head) is "
                         f"{float(np.asarray(scale)[bad])}: descales must be finite")
  if arrays.s_aux is not None:
    sinks = np.asarray(arrays.s_aux)
    bad = _first_bad(np.isnan(sinks) | np.isposinf(sinks))
    if bad is not None:
      raise ValueError(f"s_aux[{bad[0]}] = {float(sinks[bad])}: a sink logit must be a number or -inf "
                       "(no sink)")
  cu_q = np.asarray(arrays.cu_seqlens_q)
  _check_offsets("cu_seqlens_q", cu_q, spec.total_q, "total_q (rows of q)")
  len_q = np.diff(cu_q)
  if max_seqlen_q is not None and (len_q > max_seqlen_q).any():
    b = int(np.argmax(len_q > max_seqlen_q))
    raise ValueError(f"max_seqlen_q={max_seqlen_q} but sequence {b} has {int(len_q[b])} queries")

  if spec.paged:
    capacity = spec.max_blocks * spec.layout.block_size
  else:
    cu_k = np.asarray(arrays.kv_index)
    _check_offsets("cu_seqlens_k", cu_k, spec.total_k, "total_k (rows of k)")
    capacity = None
  lens = np.asarray(arrays.seqlens_k)
  name = "seqused_k" if seqused_k is not None else "cu_seqlens_k"
  bad = _first_bad(lens < 0)
  if bad is not None:
    raise ValueError(f"{name}: sequence {bad[0]} has a negative key count {int(lens[bad])}")
  if capacity is not None:
    bad = _first_bad(lens > capacity)
    if bad is not None:
      raise ValueError(f"{name}[{bad[0]}] = {int(lens[bad])} exceeds the block table's capacity "
                       f"max_blocks * block_size = {capacity}")
  else:
    room = np.asarray(arrays.kv_index)[1:] - np.asarray(arrays.kv_index)[:-1]
    bad = _first_bad(lens > room)
    if bad is not None:
      raise ValueError(f"{name}[{bad[0]}] = {int(lens[bad])} exceeds that sequence's rows in k "
                       f"(cu_seqlens_k gives {int(room[bad])})")
  if max_seqlen_k is not None and (lens > max_seqlen_k).any():
    b = int(np.argmax(lens > max_seqlen_k))
    raise ValueError(f"max_seqlen_k={max_seqlen_k} but sequence {b} has {int(lens[b])} keys")

  if spec.paged:
    table = np.asarray(arrays.kv_index)
    bs = spec.layout.block_size
    used = np.arange(spec.max_blocks)[None, :] < -(-lens[:, None] // bs)  # entries a sequence reads
    bad = _first_bad(used & ((table < 0) | (table >= spec.layout.num_pages)))
    if bad is not None:
      raise ValueError(f"block_table[{bad[0]}, {bad[1]}] = {int(table[bad])} is outside "
                       f"[0, num_pages={spec.layout.num_pages}) and sequence {bad[0]} reads it")
    if spec.layout.stacked:
      value = int(np.asarray(arrays.layer))
      if not 0 <= value < spec.layout.num_layers:
        raise ValueError(f"layer={value} is outside [0, num_layers={spec.layout.num_layers})")


def _check_offsets(name: str, cu: np.ndarray, total: int, what: str) -> None:
  if cu[0] != 0:
    raise ValueError(f"{name}[0] must be 0, got {int(cu[0])}")
  step = np.diff(cu)
  bad = _first_bad(step < 0)
  if bad is not None:
    i = bad[0]
    raise ValueError(f"{name} must be non-decreasing: {name}[{i + 1}] = {int(cu[i + 1])} < "
                     f"{name}[{i}] = {int(cu[i])}")
  if cu[-1] > total:
    raise ValueError(f"{name}[-1] = {int(cu[-1])} exceeds {what} = {total}")
