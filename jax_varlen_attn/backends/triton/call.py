"""The one function that launches a Triton kernel from JAX: jax-triton on a GPU, the interpreter on CPU.

jax-triton 0.4 renames `out_shape` / `input_output_aliases`; keeping every launch behind `launch`
makes that a one-place change.
"""

from __future__ import annotations

from typing import Dict, Sequence

import jax
import numpy as np

from jax_varlen_attn.backends import triton_interpreting


def launch(kernel, inputs: Dict[str, object], outputs: Sequence[jax.ShapeDtypeStruct], grid,
           num_warps: int, num_stages: int, constexprs: Dict[str, object]):
  """Runs `kernel` over `grid`; returns the outputs (a list, in the order of `outputs`).

  inputs: the kernel's input parameters by name, in the kernel's order (arrays and scalars: a
  Python int is a runtime i32, np.float32 a runtime f32); outputs follow them; then constexprs.
  """
  params = list(kernel.arg_names)
  expected = params[:len(inputs)]
  if list(inputs) != expected:
    raise TypeError(f"kernel {kernel.fn.__name__} takes inputs {expected}, got {list(inputs)}")
  if triton_interpreting():
    return _interpret(kernel, inputs, outputs, grid, constexprs)
  import jax_triton  # imported here: it refuses to import on a CPU-only jaxlib

  return jax_triton.triton_call(*inputs.values(), kernel=kernel, out_shape=list(outputs), grid=grid,
                                num_warps=num_warps, num_stages=num_stages, **constexprs)


class _HostTensor:
  """A NumPy array posing as the torch tensor Triton's interpreter expects (it reads data_ptr)."""

  def __init__(self, array: np.ndarray):
    self.array = array
    self.dtype = array.dtype

  def data_ptr(self):
    return self.array.ctypes.data

  def untyped_storage(self):
    return self

  def cpu(self):
    return self

  def new_empty(self, *args, **kwargs):
    return self

  def set_(self, *args, **kwargs):
    return self

  def copy_(self, *args):
    return self

  def storage_offset(self):
    return 0

  def size(self):
    return self.array.shape

  def stride(self):
    return tuple(s // self.array.itemsize for s in self.array.strides)


def _interpret(kernel, inputs, outputs, grid, constexprs):
  """Runs the kernel source under Triton's interpreter inside a host callback (CPU, for checking)."""
  names = [n for n, x in inputs.items() if isinstance(x, jax.Array)]

  def host(*arrays):
    args = dict(inputs)
    for name, array in zip(names, arrays):
      args[name] = _HostTensor(np.array(array, copy=True, order="C"))
    for name, value in args.items():
      if isinstance(value, np.floating):
        args[name] = float(value)
    # Poisoned outputs: an element the kernel fails to write shows up as NaN.
    outs = [np.full(o.shape, np.nan, o.dtype) for o in outputs]
    kernel[grid](*args.values(), *(_HostTensor(o) for o in outs), **constexprs)
    return outs

  return jax.pure_callback(host, list(outputs), *(inputs[n] for n in names),
                           vmap_method="sequential")
