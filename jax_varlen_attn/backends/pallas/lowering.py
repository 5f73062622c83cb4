"""The one module of the Pallas backend that knows the platform it lowers to.

Today a Pallas kernel reaches an NVIDIA GPU through Pallas's Triton lowering
(`jax.experimental.pallas.triton`); anywhere else (a laptop CPU, CI) the same kernel runs under
`interpret=True`, which turns it into plain XLA. JAX 0.11 deprecated the Triton lowering in favour of
Mosaic GPU, so everything Triton-specific lives here, in three places: the choice of platform, the
compiler options of `pallas_call`, and the masked load / store primitives. Porting the backend to
another lowering means rewriting this file, not the kernel.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
from jax import lax
from jax.experimental import pallas as pl
# `load` / `store` with a mask are the Triton lowering's gather / scatter (a masked-out lane touches
# no memory). They are ordinary Pallas primitives with discharge rules, so interpret mode runs them
# too: a clamped gather, and a scatter that drops out-of-range indices.
from jax.experimental.pallas import triton as _pl_triton


def load(ref, index, mask: Optional[jax.Array] = None, other=None) -> jax.Array:
  """Gathers `ref[index]` (a tuple of broadcasting int32 index arrays, one per axis of `ref`).

  Where `mask` (bool, broadcastable to the result) is False the result is `other` and, on the GPU,
  nothing is read. Indices must be in range wherever `mask` is True.
  """
  if mask is None:
    return ref[tuple(index)]
  return _pl_triton.load(ref.at[tuple(index)], mask=mask, other=other)


def store(ref, index, value: jax.Array, mask: Optional[jax.Array] = None) -> None:
  """Scatters `value` to `ref[index]`; lanes where `mask` is False write nothing.

  A masked-out lane should carry an index past the end of its axis: the GPU never writes it, and
  the interpreter's scatter drops it (an in-range index there could race a real lane's write).
  """
  _pl_triton.store(ref.at[tuple(index)], value, mask=mask)


def pallas_call(kernel: Callable, *, out_shape: Sequence[jax.ShapeDtypeStruct], grid: tuple,
                num_warps: int, num_stages: int, name: str) -> Callable:
  """`pl.pallas_call` of `kernel` over `grid`, every operand a whole array in global memory.

  No BlockSpecs: the kernel computes its own addresses (row gathers through a block table), so
  every ref is the caller's full buffer and nothing is copied into blocks before the launch.

  The platform is chosen when XLA lowers, not when Python traces (`lax.platform_dependent`): on a
  CUDA GPU the Triton lowering with `num_warps` / `num_stages`; on any other platform interpret mode
  (where the launch options mean nothing). So a GPU machine running on its CPU device, or a CPU host
  exporting for CUDA, still gets the right one.
  """
  out_shape = tuple(out_shape)
  gpu = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, name=name,
      compiler_params=_pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages))
  interpreted = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, name=name, interpret=True)

  def call(*operands):
    return lax.platform_dependent(*operands, cuda=gpu, default=interpreted)

  return call
