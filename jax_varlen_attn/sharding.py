"""Tensor parallelism over attention heads: each device runs the kernel on its own heads.

Attention is independent per kv-head group, so with the q heads and the cache's kv heads split over
a mesh axis (n devices, each holding H/n q heads and Hk/n kv heads), every device computes its part
of the output with no communication. This module decides when and how a call is split that way and
wraps it in `jax.shard_map`; `api` calls it, and it knows no backend.

When the split happens (see `detect`):
  - inside `jax.shard_map` the caller already passes per-device arrays: nothing to do here.
  - under `jax.jit` with a mesh whose axes are `Explicit` (what `jax.make_mesh` builds by default) the
    sharding is part of the array's type (`jax.typeof(q).sharding`), so it is read at trace time.
  - on concrete arrays (a call outside `jit`), from their `NamedSharding`.
  - under `jax.jit` with an `Auto` mesh (`jax.sharding.Mesh(...)` + `NamedSharding` inputs) the types
    carry no sharding: nothing can be detected when Python traces. Callers name the mesh axis
    instead, with `sharded_flash_attn_varlen_func(mesh, head_axis, ...)` (api).
Without the split, XLA's partitioner gathers the cache (the XLA backend views it as rows of head_dim
elements, which merges the head axis) and runs custom calls (Triton, Pallas) on one device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple, Union

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_varlen_attn.layout import resolve
from jax_varlen_attn.spec import AttentionArrays, AttentionSpec

# Axis of the kv heads in k (and v) for each named layout, one layer; a stacked cache adds one.
KV_HEAD_AXIS = {"NHD": 2, "HND": 1, "fused_page_major": 3, "fused_kv_major": 3}

AxisNames = Union[str, Tuple[str, ...]]


def kv_head_axis(spec: AttentionSpec, arrays: AttentionArrays) -> Optional[int]:
  """Axis of the kv heads in the k / v arrays as passed; None for a `KVCacheLayout` (unknown)."""
  if not spec.paged:
    return 1  # [total_k, Hk, D]
  layout = spec.layout
  if layout.name not in KV_HEAD_AXIS:
    return None
  # A KVCacheLayout the caller built may carry any name: only what kv_layout="<name>" resolves to
  # has the named form's axes.
  v_shape = None if layout.fused else arrays.v.shape
  try:
    if resolve(layout.name, arrays.k.shape, v_shape, stacked=layout.stacked) != layout:
      return None
  except ValueError:
    return None
  return KV_HEAD_AXIS[layout.name] + (1 if layout.stacked else 0)


@dataclasses.dataclass(frozen=True)
class HeadSplit:
  """How one call is split over heads (static: part of the jit compile key).

  mesh: the (concrete or abstract) mesh; axes: the mesh axes the heads are split over, major first;
  local_spec: the spec each device sees (H/n, Hk/n heads, the layout of its shard of the cache).
  """

  mesh: object
  axes: Tuple[str, ...]
  kv_axis: int
  local_spec: AttentionSpec

  @property
  def size(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.axes)

  @property
  def entry(self):
    """The PartitionSpec entry naming the head axes."""
    return self.axes[0] if len(self.axes) == 1 else self.axes

  @property
  def explicit(self) -> bool:
    """Some mesh axis is Explicit: array types carry shardings, which must match shard_map's specs."""
    return any(t == AxisType.Explicit for t in self.mesh.axis_types)

  def in_specs(self, spec: AttentionSpec, arrays: AttentionArrays) -> AttentionArrays:
    h = self.entry
    kv = [None] * arrays.k.ndim
    kv[self.kv_axis] = h
    kv = P(*kv)
    return AttentionArrays(
        q=P(None, h, None), k=kv, v=kv, cu_seqlens_q=P(), seqlens_k=P(), kv_index=P(),
        alibi=None if arrays.alibi is None else P(None, h),
        layer=None if arrays.layer is None else P(),
        # descales f32[batch, Hk]: kv heads on axis 1; sinks f32[H]: q heads
        q_descale=None if arrays.q_descale is None else P(None, h),
        k_descale=None if arrays.k_descale is None else P(None, h),
        v_descale=None if arrays.v_descale is None else P(None, h),
        s_aux=None if arrays.s_aux is None else P(h))

  def out_specs(self, spec: AttentionSpec):
    out = P(None, self.entry, None)
    return (out, P(self.entry, None)) if spec.return_lse else out


def _axes(entry) -> Tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _sharding_of(x):
  """(mesh, PartitionSpec) of an array's sharding where it is known now, else None.

  A tracer under jit carries a sharding in its type only on Explicit mesh axes; a concrete array
  knows its NamedSharding. Manual axes (inside shard_map) never name a split here.
  """
  if isinstance(x, jax.core.Tracer):
    try:
      sharding = jax.typeof(x).sharding
    except Exception:  # an aval without sharding (older tracers, custom types)
      return None
  else:
    sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  return sharding.mesh, sharding.spec


def _split_axes(x, axis: int):
  """(mesh, axes) of the mesh axes that split `x` along `axis` (Auto / Explicit axes), or None."""
  found = _sharding_of(x)
  if found is None:
    return None
  mesh, spec = found
  if axis >= len(spec):
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  axes = tuple(a for a in _axes(spec[axis]) if types.get(a) != AxisType.Manual and mesh.shape[a] > 1)
  return (mesh, axes) if axes else None


def detect(spec: AttentionSpec, arrays: AttentionArrays) -> Optional[HeadSplit]:
  """The head split visible in q's (else the cache's) sharding now, or None: run unsplit.

  A `KVCacheLayout` (custom layout) is never split here: its kv-head axis in k is not known.
  """
  kv_axis = kv_head_axis(spec, arrays)
  if kv_axis is None:
    return None
  found = _split_axes(arrays.q, 1) or _split_axes(arrays.k, kv_axis)
  if found is None:
    return None
  mesh, axes = found
  return plan(spec, arrays, mesh, axes)


def replicate_explicit(arrays: AttentionArrays) -> AttentionArrays:
  """Every input split over Explicit mesh axes, resharded to replicated on its mesh (an
  all-gather); the rest unchanged. For calls that run unsplit although an input is split."""
  def gather(x):
    found = None if x is None else _sharding_of(x)
    if found is None:
      return x
    mesh, pspec = found
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if not any(types.get(a) == AxisType.Explicit for entry in pspec for a in _axes(entry)):
      return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P()))
  return AttentionArrays(*(gather(x) for x in arrays))


def plan(spec: AttentionSpec, arrays: AttentionArrays, mesh, head_axis: AxisNames) -> Optional[HeadSplit]:
  """The split of `spec` over mesh axes `head_axis`; None when they have one device in all.

  Raises ValueError when the heads cannot be split evenly (each device needs whole kv heads) or the
  cache's kv-head axis is unknown (a KVCacheLayout).
  """
  if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  axes = _axes(head_axis)
  if not axes or not all(isinstance(a, str) for a in axes):
    raise TypeError(f"head_axis must be a mesh axis name or a tuple of them, got {head_axis!r}")
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"head_axis {head_axis!r} names axes {missing} that the mesh does not have "
                     f"(its axes: {tuple(mesh.axis_names)})")
  n = math.prod(mesh.shape[a] for a in axes)
  if n == 1:
    return None
  kv_axis = kv_head_axis(spec, arrays)
  if kv_axis is None:
    raise ValueError("heads can be split over devices only for a named kv_layout ('NHD', 'HND', "
                     "'fused_page_major', 'fused_kv_major', stacked or not) or a non-paged k / v: a "
                     "KVCacheLayout does not say which axis of k holds the kv heads. Call "
                     "flash_attn_varlen_func inside jax.shard_map with per-device arrays and a "
                     "per-device KVCacheLayout instead")
  if spec.num_kv_heads % n:
    raise ValueError(
        f"heads are split over mesh axes {axes} ({n} devices), but the cache has num_kv_heads="
        f"{spec.num_kv_heads}: every device needs whole kv heads (GQA), so num_kv_heads must be a "
        f"multiple of {n}. Replicate the kv heads, or split over fewer devices")
  return HeadSplit(mesh=mesh, axes=axes, kv_axis=kv_axis, local_spec=_local_spec(spec, arrays, kv_axis, n))


def _local_spec(spec: AttentionSpec, arrays: AttentionArrays, kv_axis: int, n: int) -> AttentionSpec:
  """The spec of one device's shard: H/n and Hk/n heads; a named layout re-read from the shard's shape."""
  layout = spec.layout
  if layout is not None:
    k_shape = list(arrays.k.shape)
    k_shape[kv_axis] //= n
    layout = resolve(layout.name, k_shape, None if layout.fused else k_shape, stacked=layout.stacked)
  return dataclasses.replace(spec, num_heads=spec.num_heads // n,
                             num_kv_heads=spec.num_kv_heads // n, layout=layout)


def shard_heads(fn: Callable, split: HeadSplit, spec: AttentionSpec, arrays: AttentionArrays):
  """Runs `fn(local_arrays) -> (out, lse or None)` per device under `jax.shard_map`.

  Call it under `jax.jit`. Returns (out [T, H, D] split on H, lse [H, T] split on H, or None).
  On Explicit mesh axes the inputs are first resharded to the specs shard_map takes (nothing moves
  when they are already split that way; a replicated input is sliced locally).
  """
  in_specs = split.in_specs(spec, arrays)
  if split.explicit:
    arrays = AttentionArrays(*(
        None if x is None else jax.sharding.reshard(x, NamedSharding(split.mesh, s))
        for x, s in zip(arrays, in_specs)))

  def body(local: AttentionArrays):
    out, lse = fn(local)
    return (out, lse) if spec.return_lse else out

  # check_vma=False: custom calls (Triton, Pallas) and host callbacks have no replication rule.
  result = jax.shard_map(body, mesh=split.mesh, in_specs=(in_specs,), out_specs=split.out_specs(spec),
                         check_vma=False)(arrays)
  return result if spec.return_lse else (result, None)
