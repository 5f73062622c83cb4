"""The one function that launches a Triton kernel from JAX: jax-triton on a GPU, the interpreter on CPU.

jax-triton 0.4 renames `out_shape` / `input_output_aliases`; keeping every launch behind `launch`
makes that a one-place change.

How a launch reaches XLA. jax-triton 0.3.1 emits the legacy custom call `triton_kernel_call`, whose
opaque payload is the zlib-compressed kernel (PTX included, tens of KB); its handler looks that
payload up in a hash map on every launch. jaxlib > 0.10.2 also registers the launcher as a typed
XLA FFI handler, `triton_kernel_call_ffi` (Pallas' Triton lowering uses it), which XLA may record
into CUDA graphs. `launch(..., ffi=True)` sends a kernel there (jax-triton builds the call as usual;
`retarget_to_ffi` swaps the one custom-call op it emitted for the FFI one, same payload).

Measured on an H200 (benchmarks/NOTES.md), the FFI route did not pay: jitted functions of 32-48
small attention calls ran 0-9 us *slower* per call through it than through the legacy call, with
XLA command buffers on or off (seed1 31 vs 39 us; kernel alone 16 us). Our reading of jaxlib's
source: its FFI initialize hook runs per execution and looks the payload up again, and the call
frame carries the payload as an attribute. So the legacy call is the default and FFI is opt-in
(`Config(ffi_launch=True)`), kept tested for when jaxlib caches it per executable.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from jax_varlen_attn.backends import triton_interpreting

# Triton's interpreter swaps module globals while a kernel runs; host callbacks of several devices
# (shard_map on a multi-device CPU) may run at once, so interpret one launch at a time.
_INTERPRETER_LOCK = threading.Lock()


# The targets jaxlib registers for jax-triton's launcher (legacy and typed FFI), and the markers our
# launches carry in the primitive's `custom_call_target_name` so our lowering rule knows them (a
# marker never reaches XLA; every other jax-triton user in the process keeps its lowering untouched).
LEGACY_TARGET = "triton_kernel_call"
FFI_TARGET = "triton_kernel_call_ffi"
_OURS = "jax_varlen_attn:" + LEGACY_TARGET
_VIA_FFI = "jax_varlen_attn:" + FFI_TARGET


def ffi_available() -> bool:
  """Whether this jaxlib registers `triton_kernel_call_ffi` (the same test Pallas' lowering makes)."""
  from jax._src.lib import version as jaxlib_version
  return tuple(jaxlib_version) > (0, 10, 2)


def launch(kernel, inputs: Dict[str, object], outputs: Sequence[jax.ShapeDtypeStruct], grid,
           num_warps: int, num_stages: int, constexprs: Dict[str, object],
           input_output_aliases: Optional[Mapping[str, int]] = None, ffi: bool = False):
  """Runs `kernel` over `grid`; returns the outputs (a list, in the order of `outputs`).

  inputs: the kernel's input parameters by name, in the kernel's order (arrays and scalars: a
  Python int is a runtime i32, np.float32 a runtime f32); outputs follow them; then constexprs.
  input_output_aliases: {input name: output index}: that output *is* the input's buffer (same
  shape and dtype), so a kernel that stores into some of it leaves the rest as the input had it;
  under `jax.jit(..., donate_argnums=...)` of the input nothing is copied (written in place). The
  kernel still takes the aliased output as its own parameter, pointing at the same memory (the
  jax-triton 0.3 convention; 0.4 drops that parameter: the one place to change is here).
  ffi: launch through XLA's FFI handler where jaxlib has it; False (default) keeps jax-triton's
  legacy custom call (the module docstring says why; the benchmark times both).
  """
  params = list(kernel.arg_names)
  expected = params[:len(inputs)]
  if list(inputs) != expected:
    raise TypeError(f"kernel {kernel.fn.__name__} takes inputs {expected}, got {list(inputs)}")
  aliases = dict(input_output_aliases or {})
  for name, out_idx in aliases.items():
    x = inputs.get(name)
    if _is_scalar(x) or x is None:
      raise TypeError(f"input_output_aliases: {name!r} is not an array input of {kernel.fn.__name__}")
    if not 0 <= out_idx < len(outputs):
      raise ValueError(f"input_output_aliases: output {out_idx} of {len(outputs)} for {name!r}")
    o = outputs[out_idx]
    if tuple(o.shape) != tuple(x.shape) or np.dtype(o.dtype) != np.dtype(x.dtype):
      raise ValueError(f"input_output_aliases: {name!r} {tuple(x.shape)} {x.dtype} cannot alias output "
                       f"{out_idx} {tuple(o.shape)} {o.dtype}")
  if len(set(aliases.values())) != len(aliases):
    raise ValueError(f"input_output_aliases: two inputs alias one output: {aliases}")
  if triton_interpreting():
    return _interpret(kernel, inputs, outputs, grid, constexprs, aliases)
  import jax_triton  # imported here: it refuses to import on a CPU-only jaxlib

  # jax-triton numbers aliased inputs among the *array* arguments only (scalars are not operands).
  array_names = [n for n, x in inputs.items() if not _is_scalar(x)]
  by_index = {array_names.index(name): out_idx for name, out_idx in aliases.items()}
  extra = dict(input_output_aliases=by_index) if by_index else {}
  _install_lowering()
  extra["custom_call_target_name"] = _VIA_FFI if ffi and ffi_available() else _OURS
  return jax_triton.triton_call(*inputs.values(), kernel=kernel, out_shape=list(outputs), grid=grid,
                                num_warps=num_warps, num_stages=num_stages, **extra, **constexprs)


@functools.lru_cache(maxsize=None)
def _install_lowering() -> None:
  """Wraps jax-triton's CUDA lowering: calls marked `_OURS` / `_VIA_FFI` are compiled without line
  info (and the FFI ones retargeted); every other call is lowered exactly as jax-triton does."""
  from jax.interpreters import mlir
  from jax_triton import triton_lib

  legacy = functools.partial(triton_lib.triton_kernel_call_lowering, triton_lib.get_cuda_backend)

  def lowering(ctx, *args, custom_call_target_name, **params):
    if custom_call_target_name not in (_OURS, _VIA_FFI):
      return legacy(ctx, *args, custom_call_target_name=custom_call_target_name, **params)
    target = FFI_TARGET if custom_call_target_name == _VIA_FFI else LEGACY_TARGET
    with _without_line_info():
      results = legacy(ctx, *args, custom_call_target_name=target, **params)
    if target == LEGACY_TARGET:
      return results
    return retarget_to_ffi(ctx, args, results, dict(params["input_output_aliases"]))

  mlir.register_lowering(triton_lib.triton_kernel_call_p, lowering, platform="cuda")


@contextlib.contextmanager
def _without_line_info():
  """Compiles our kernels without source-line info, unless JVA_TRITON_LINE_INFO=1 (for profilers).

  Why: the legacy launcher finds its kernel by hashing and comparing the whole compressed payload
  (PTX and TTIR) on every launch; line info is a third of the PTX (seed2's kernel: 18 -> 11 KB
  compressed, measured with tests/triton_compile_check's sm_90 compile).
  """
  import triton
  knobs = getattr(triton, "knobs", None)
  scope = getattr(getattr(knobs, "compilation", None), "scope", None)
  if os.environ.get("JVA_TRITON_LINE_INFO") == "1" or scope is None:
    yield
    return
  with scope():
    knobs.compilation.disable_line_info = True
    yield


def retarget_to_ffi(ctx, operands, legacy_results, input_output_aliases):
  """Replaces the legacy custom call that produced `legacy_results` (jax-triton's payload as its
  backend_config string) by the typed-FFI call jaxlib's handler reads the same payload from (its
  `opaque` attribute), built by jax's own FFI lowering; returns the new call's results.

  operands: the MLIR values the legacy call took (the array arguments, in order);
  input_output_aliases: {operand index: result index}, as the legacy call had them.
  """
  from jax._src.lib.mlir import ir
  legacy_op = legacy_results[0].owner  # every launch has outputs
  legacy_op = getattr(legacy_op, "operation", legacy_op)
  payload = ir.StringAttr(legacy_op.attributes["backend_config"]).value_bytes
  results = jax.ffi.ffi_lowering(FFI_TARGET, operand_output_aliases=input_output_aliases or None)(
      ctx, *operands, opaque=payload)
  legacy_op.erase()  # nothing uses its results yet: they were never returned to JAX
  return results


def _is_scalar(x) -> bool:
  """What jax-triton passes by value rather than as a buffer (bool, int, float, np.float32)."""
  return isinstance(x, (bool, int, float, np.float32))


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


def _interpret(kernel, inputs, outputs, grid, constexprs, aliases=None):
  """Runs the kernel source under Triton's interpreter inside a host callback (CPU, for checking).

  An aliased output is its input's host copy, passed to the kernel as both parameters (as on the GPU,
  where they are one buffer); the callback returns it as the output.
  """
  aliases = aliases or {}
  names = [n for n, x in inputs.items() if isinstance(x, jax.Array)]
  for name in aliases:
    if name not in names:
      raise TypeError(f"input_output_aliases: {name!r} must be a jax.Array input to be interpreted")
  alias_of = {out_idx: name for name, out_idx in aliases.items()}

  def host(*arrays):
    args = dict(inputs)
    for name, array in zip(names, arrays):
      args[name] = _HostTensor(np.array(array, copy=True, order="C"))
    for name, value in args.items():
      if isinstance(value, np.floating):
        args[name] = float(value)
    # Poisoned outputs: an element the kernel fails to write shows up as NaN. Aliased ones start as
    # their input (the very host array the kernel also sees as that input).
    outs = [args[alias_of[i]].array if i in alias_of else np.full(o.shape, np.nan, o.dtype)
            for i, o in enumerate(outputs)]
    with _INTERPRETER_LOCK:
      kernel[grid](*args.values(), *(_HostTensor(o) for o in outs), **constexprs)
    return outs

  return jax.pure_callback(host, list(outputs), *(inputs[n] for n in names),
                           vmap_method="sequential")
