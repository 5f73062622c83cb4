"""The one module that launches a Triton kernel from JAX, and the only one that knows jax-triton.

Routes (`launch(route=...)`, `Config(launch=...)`):
- "xla" (the default for calls over at most SMALL_CALL_TOKENS tokens, `route_for`): the installed
  triton turns the kernel into Triton IR (every scalar argument folded in as a constant), and XLA's
  own Triton custom call (`__gpu$xla.gpu.triton`, what Pallas' Triton lowering emits) compiles it,
  with XLA's bundled Triton, into an ordinary kernel of the executable: no handler runs on the host
  per call and command buffers update it by pointer. It halves the loop time of the smallest calls,
  but XLA's bundled Triton builds slower kernels for larger ones (seed1's prefill tile, decode of 64
  sequences: +25%), so larger calls keep jax-triton's route (benchmarks/NOTES.md, "launch routes"
  and "the small-call rule"). jax-triton is not needed for it.
- "ffi" with jax-triton 0.4.x (Python >= 3.12, jax >= 0.11, triton >= 3.7): its public `triton_call`, which
  emits jaxlib's typed-FFI custom call `triton_kernel_call_ffi`. That handler is marked
  command-buffer compatible, so XLA records it into its CUDA graphs, but re-records it on the host
  at every execution (benchmarks/NOTES.md, "launch routes").
- "legacy" / "ffi" with jax-triton 0.3.x (Python 3.11, or jax 0.10): `triton_call` emits the legacy custom call
  `triton_kernel_call` (its handler looks the kernel up by hashing the compressed payload on every
  launch). Where this jaxlib also registers the typed-FFI handler (jaxlib > 0.10.2) our lowering
  moves the call there ("ffi", `retarget_to_ffi`); 0.3's public API cannot ask for it.
- no GPU, TRITON_INTERPRET=1: the kernel source under Triton's interpreter in a host callback.

The two jax-triton generations differ in what a launch looks like, and this module absorbs it:
| | 0.3.x | 0.4.x |
| --- | --- | --- |
| outputs | `out_shape=` | `out_type=` |
| in-place buffers | `input_output_aliases`; the kernel takes the aliased input *and* its output | a `jax.Ref` operand; the kernel takes it once |
| f32 scalars | `np.float32` (a Python float is f64) | Python float (np.float32 is deprecated) |
Our kernels keep 0.3's parameter list (an aliased buffer appears as an input and as an output, and
the kernel writes it only through the output parameter); on 0.4 the input parameter gets a 1-element
placeholder and the output parameter a Ref of the buffer, so the compiled call is still in place.
Those Refs live inside one `run_state` (`_launch_v04`): no Ref effect leaves a launch.
benchmarks/bench_loop.py times the routes; benchmarks/NOTES.md has the story.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import re
import threading
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
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


@functools.lru_cache(maxsize=None)
def jax_triton_generation() -> Optional[Tuple[int, int]]:
  """(major, minor) of the installed jax-triton, from its metadata (no import), or None."""
  try:
    version = importlib.metadata.version("jax-triton")
  except importlib.metadata.PackageNotFoundError:
    return None
  return _parse_version(version)


def _parse_version(version: str) -> Tuple[int, int]:
  parts = re.findall(r"\d+", version)[:2]
  return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)


ROUTES = ("xla", "ffi", "legacy")
LAUNCH_ENV = "JAX_VARLEN_ATTN_LAUNCH"  # the process's default route (default_route)


def launch(kernel, inputs: Dict[str, object], outputs: Sequence[jax.ShapeDtypeStruct], grid,
           num_warps: int, num_stages: int, constexprs: Dict[str, object],
           input_output_aliases: Optional[Mapping[str, int]] = None, route: Optional[str] = None):
  """Runs `kernel` over `grid`; returns the outputs (a list, in the order of `outputs`).

  inputs: the kernel's input parameters by name, in the kernel's order (arrays and scalars: a
  Python int is an i32 (i64 past 2**31), np.float32 an f32; the "xla" route folds scalars in as
  constants); the outputs' parameters follow them, then the constexprs.
  input_output_aliases: {input name: output index}: that output *is* the input's buffer (same
  shape and dtype; the aliased outputs come first), so a kernel that stores into some of it
  leaves the rest as the input had it;
  under `jax.jit(..., donate_argnums=...)` of the input nothing is copied (written in place). The
  kernel must read and write such a buffer only through the output's parameter (on jax-triton 0.4
  the input's parameter receives a placeholder: the module docstring says why).
  route: "xla" (XLA's Triton custom call), "ffi" (jax-triton's typed-FFI call), "legacy"
  (jax-triton 0.3's custom call) or None for `default_route()`. Ignored under Triton's interpreter.
  """
  params = list(kernel.arg_names)
  expected = params[:len(inputs)]
  if list(inputs) != expected:
    raise TypeError(f"kernel {kernel.fn.__name__} takes inputs {expected}, got {list(inputs)}")
  if route is not None and route not in ROUTES:
    raise ValueError(f"route must be one of {ROUTES} or None, got {route!r}")
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
  if aliases and max(aliases.values()) >= len(aliases):
    # jax-triton 0.4 passes an aliased output as a Ref operand and hands the kernel's pointer
    # parameters their buffers in order (operands, then new outputs): a new output's parameter
    # before an aliased one's would receive the wrong buffer (seen: rope_write_kv's q came back
    # wrong on jax-triton 0.4.1 while its q output came first).
    raise ValueError(f"input_output_aliases: the aliased outputs must be the first ones (outputs "
                     f"0..{len(aliases) - 1}), got {aliases}")
  if triton_interpreting():
    return _interpret(kernel, inputs, outputs, grid, constexprs, aliases)
  route = default_route() if route is None else route
  if route == "xla":
    return _launch_xla(kernel, inputs, outputs, grid, num_warps, num_stages, constexprs, aliases)
  generation = jax_triton_generation()
  if generation is None:
    raise RuntimeError(f"route={route!r} needs jax-triton: pip install 'jax_varlen_attn[gpu]' (or take "
                       "route 'xla', which does not)")
  import jax_triton  # imported here: 0.3 refuses to import on a CPU-only jaxlib
  if generation >= (0, 4):
    if route == "legacy":
      raise ValueError("jax-triton >= 0.4 launches through XLA's typed FFI only: the legacy custom "
                       "call needs jax-triton 0.3")
    return _launch_v04(jax_triton, kernel, inputs, outputs, aliases, dict(
        grid=grid, num_warps=num_warps, num_stages=num_stages, name=kernel.fn.__name__, **constexprs))
  # jax-triton 0.3 numbers aliased inputs among the *array* arguments only (scalars are not operands).
  array_names = [n for n, x in inputs.items() if not _is_scalar(x)]
  by_index = {array_names.index(name): out_idx for name, out_idx in aliases.items()}
  extra = dict(input_output_aliases=by_index) if by_index else {}
  _install_lowering()
  extra["custom_call_target_name"] = _VIA_FFI if route == "ffi" and ffi_available() else _OURS
  return jax_triton.triton_call(*inputs.values(), kernel=kernel, out_shape=list(outputs), grid=grid,
                                num_warps=num_warps, num_stages=num_stages, **extra, **constexprs)


# Launches over at most this many tokens (a decode step of up to 16 sequences; seed2, seed3) take
# XLA's Triton call: at that size jax-triton's host work per call (15-20 us) outweighs the kernel,
# so a jitted decode loop of such calls is bound by the host (benchmarks/NOTES.md, "the small-call
# rule").
SMALL_CALL_TOKENS = 16


def route_for(num_tokens: int) -> Optional[str]:
  """The route of a launch over `num_tokens` tokens (attention's q rows, a write's new tokens)
  that names none: "xla" for at most SMALL_CALL_TOKENS tokens, else None (`default_route()`);
  None whenever $JAX_VARLEN_ATTN_LAUNCH is set (it decides every launch of the process)."""
  if os.environ.get(LAUNCH_ENV) or num_tokens > SMALL_CALL_TOKENS:
    return None
  return "xla"


def default_route() -> str:
  """The route of a launch that names none: $JAX_VARLEN_ATTN_LAUNCH where set (one of ROUTES, for
  the whole process, write_kv included: e.g. "xla", which keeps a model step's calls in one CUDA
  graph; read when a call is traced, so set it before the first one), else jax-triton's ("ffi" on
  0.4, "legacy" on 0.3: the kernels its pinned triton compiles, measured fastest on the device),
  else "xla" (module docstring)."""
  chosen = os.environ.get(LAUNCH_ENV)
  if chosen:
    if chosen not in ROUTES:
      raise ValueError(f"${LAUNCH_ENV} must be one of {ROUTES}, got {chosen!r}")
    return chosen
  generation = jax_triton_generation()
  if generation is None:
    return "xla"
  return "ffi" if generation >= (0, 4) else "legacy"


# ---- the "xla" route: XLA's own Triton custom call -----------------------------------------------

XLA_TRITON_TARGET = "__gpu$xla.gpu.triton"
_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32",
                 "int64": "i64", "uint8": "u8", "int8": "i8", "float8_e4m3fn": "fp8e4nv",
                 "float8_e5m2": "fp8e5"}


def _launch_xla(kernel, inputs, outputs, grid, num_warps, num_stages, constexprs, aliases):
  arrays = [n for n, x in inputs.items() if not _is_scalar(x)]
  folded = {n: _plain(x) for n, x in inputs.items() if _is_scalar(x)}
  out_names = list(kernel.arg_names)[len(inputs):len(inputs) + len(outputs)]
  signature = tuple(
      [(n, "*" + _TRITON_TYPES[np.dtype(inputs[n].dtype).name]) for n in arrays]
      + [(n, "*" + _TRITON_TYPES[np.dtype(o.dtype).name]) for n, o in zip(out_names, outputs)])
  ttir, name = triton_ir(kernel, signature, tuple(sorted({**folded, **constexprs}.items())),
                         num_warps, num_stages, compute_capability())
  grid = tuple(grid) + (1,) * (3 - len(grid))
  results = _xla_triton_p.bind(
      *(inputs[n] for n in arrays), ttir=ttir, name=name, grid=grid, num_warps=num_warps,
      num_stages=num_stages, out_avals=tuple(jax.core.ShapedArray(o.shape, o.dtype) for o in outputs),
      aliases=tuple(sorted((arrays.index(n), i) for n, i in aliases.items())))
  return list(results)


def _plain(x):
  """A scalar argument as the constant it becomes (np.float32 -> float, bool stays bool)."""
  return float(x) if isinstance(x, (float, np.floating)) else x


@functools.lru_cache(maxsize=None)
def compute_capability() -> int:
  """sm number (90 for an H100 / H200) of the first GPU, 90 where JAX sees none (CPU lowering)."""
  try:
    cc = jax.devices("gpu")[0].compute_capability
    major, minor = str(cc).split(".")[:2]
    return int(major) * 10 + int(minor)
  except Exception:
    return 90


@functools.lru_cache(maxsize=256)
def triton_ir(kernel, signature: Tuple[Tuple[str, str], ...], constants: Tuple[Tuple[str, object], ...],
              num_warps: int, num_stages: int, capability: int) -> Tuple[str, str]:
  """(Triton IR text, kernel name) of `kernel` specialized to `signature` (buffer parameters, in
  order) and `constants` (every other parameter's value), compiled by the installed triton for
  sm_`capability` (which also checks it compiles); every buffer is 16-byte aligned (XLA's are)."""
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource

  names = list(kernel.arg_names)
  values = dict(constants)
  types = dict(signature)
  missing = [n for n in names if n not in types and n not in values]
  if missing:
    raise TypeError(f"kernel {kernel.fn.__name__}: no value or buffer for parameters {missing}")
  sig = {n: types.get(n, "constexpr") for n in names}
  attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in types}
  source = ASTSource(fn=kernel, signature=sig, constexprs=values, attrs=attrs)
  with _triton_cache_dir():
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
  ttir = compiled.asm["ttir"]
  match = re.search(r"tt\.func public @([\w$.]+)", ttir)
  if match is None:
    raise RuntimeError(f"no public function in the Triton IR of {kernel.fn.__name__}")
  return ttir, match.group(1)


@contextlib.contextmanager
def _triton_cache_dir():
  """A usable Triton file cache for this compile: jax-triton 0.3 empties TRITON_CACHE_DIR at import
  and Triton then fails ("Could not create or locate cache dir")."""
  import tempfile
  import triton
  cache = getattr(getattr(triton, "knobs", None), "cache", None)
  if cache is None or cache.dir:
    yield
    return
  with cache.scope():
    cache.dir = os.path.join(tempfile.gettempdir(), "jax_varlen_attn_triton_cache")
    os.makedirs(cache.dir, exist_ok=True)
    yield


def _xla_triton_abstract_eval(*avals, out_avals, **_):
  return list(out_avals)


def _xla_triton_lowering(ctx, *operands, ttir, name, grid, num_warps, num_stages, out_avals, aliases):
  from jax._src.interpreters import mlir as mlir_internal  # custom_call is not public API
  from jax._src.lib.mlir import ir
  from jax.interpreters import mlir

  config = dict(name=ir.StringAttr.get(name), ir=ir.StringAttr.get(ttir),
                num_stages=mlir.i32_attr(num_stages), num_warps=mlir.i32_attr(num_warps),
                grid_x=mlir.i32_attr(grid[0]), grid_y=mlir.i32_attr(grid[1]),
                grid_z=mlir.i32_attr(grid[2]), debug=ir.BoolAttr.get(False))
  row_major = lambda avals: [list(reversed(range(len(a.shape)))) for a in avals]
  return mlir_internal.custom_call(
      XLA_TRITON_TARGET, result_types=[mlir.aval_to_ir_type(ctx.module_context, a) for a in out_avals]
      if _aval_type_takes_context() else [mlir.aval_to_ir_type(a) for a in out_avals],
      operands=list(operands), backend_config=config, api_version=4,
      operand_layouts=row_major(ctx.avals_in), result_layouts=row_major(out_avals),
      operand_output_aliases=dict(aliases)).results


@functools.lru_cache(maxsize=None)
def _aval_type_takes_context() -> bool:
  """jax >= 0.11's mlir.aval_to_ir_type takes the module context first."""
  import inspect
  from jax.interpreters import mlir
  return len(inspect.signature(mlir.aval_to_ir_type).parameters) > 1


def _make_xla_triton_primitive():
  from jax.extend.core import Primitive
  from jax.interpreters import mlir
  prim = Primitive("jva_triton_kernel")
  prim.multiple_results = True
  prim.def_abstract_eval(_xla_triton_abstract_eval)
  mlir.register_lowering(prim, _xla_triton_lowering, platform="cuda")
  return prim


_xla_triton_p = _make_xla_triton_primitive()


def _launch_v04(jax_triton, kernel, inputs, outputs, aliases, call_kwargs):
  """jax-triton 0.4's `triton_call`; aliased buffers go in as Refs that live only inside one
  `run_state`, so no Ref effect leaves the launch.

  A Ref made by `jax.new_ref` would carry its effect out to whatever encloses the launch, and jit
  can discharge it only through primitives that have a state discharge rule: the attention call's
  `custom_jvp` (api._forward_only) has none, so its tail-plan launch failed to trace ("No state
  discharge rule implemented for primitive: custom_jvp_call", jax-triton 0.4.1 on an H200); a
  user's remat or custom_vjp around write_kv would fail the same way. run_state owns its Refs, so
  the launch is a pure function of values outside it; under jit it is still in place.
  """
  def call(refs):
    args, kwargs, placed = v04_call_arguments(kernel, inputs, outputs, aliases, refs)
    return jax_triton.triton_call(*args, kernel=kernel, **kwargs, **call_kwargs), placed

  if not aliases:
    return list(call({})[0])
  from jax.experimental.pallas import run_state  # jax's own state discharge, public in Pallas

  new = [i for i in range(len(outputs)) if i not in aliases.values()]

  def body(state):
    alias_refs, new_refs = state
    results, _ = call(dict(zip(aliases, alias_refs)))
    for ref, value in zip(new_refs, results):
      ref[...] = value  # the whole buffer: its zero initial value is dead and XLA drops it

  alias_values, new_values = run_state(body)(
      ([inputs[name] for name in aliases], [jnp.zeros(outputs[i].shape, outputs[i].dtype) for i in new]))
  by_index = dict(zip(aliases.values(), alias_values)) | dict(zip(new, new_values))
  return [by_index[i] for i in range(len(outputs))]


def v04_call_arguments(kernel, inputs: Dict[str, object], outputs: Sequence[jax.ShapeDtypeStruct],
                       aliases: Mapping[str, int], refs: Mapping[str, object]):
  """(positional operands, keyword arguments, {output index: Ref}) of a jax-triton 0.4 `triton_call`.

  Inputs go positionally, f32 scalars as Python floats; an aliased input's parameter gets a
  1-element placeholder (the kernel never touches it) and its output's parameter, by name, the
  input's Ref from `refs` ({input name: Ref}); `out_type` lists the other outputs, whose parameters
  jax-triton fills in order.
  """
  out_params = list(kernel.arg_names)[len(inputs):len(inputs) + len(outputs)]
  args, placed, kwargs = [], {}, {}
  for name, value in inputs.items():
    if name in aliases:
      args.append(jnp.zeros((1,), value.dtype))
      ref = refs[name]
      placed[aliases[name]] = ref
      kwargs[out_params[aliases[name]]] = ref
    else:
      args.append(_f32_scalar(value) if isinstance(value, np.float32) else value)
  kwargs["out_type"] = [o for i, o in enumerate(outputs) if i not in placed]
  return args, kwargs, placed


def _f32_scalar(x: np.float32):
  """An f32 kernel argument for jax-triton 0.4: a Python float where 0.4 types it f32 (zero, inf,
  nan and normal f32 magnitudes); a subnormal stays np.float32 (0.4 would type its float f64)."""
  value = float(x)
  fi = np.finfo(np.float32)
  if value == 0.0 or not math.isfinite(value) or fi.tiny <= abs(value) <= fi.max:
    return value
  return x


@functools.lru_cache(maxsize=None)
def _install_lowering() -> None:
  """Wraps jax-triton's CUDA lowering: calls marked `_OURS` / `_VIA_FFI` are compiled without line
  info (and the FFI ones retargeted); every other call is lowered exactly as jax-triton does."""
  from jax.interpreters import mlir
  from jax_triton import triton_lib

  # 0.3's public triton_call cannot name the FFI target nor drop line info: wrap its lowering rule.
  if not hasattr(triton_lib, "get_cuda_backend"):
    raise RuntimeError(f"jax-triton {jax_triton_generation()} lacks the 0.3 lowering this route wraps "
                       "(triton_lib.get_cuda_backend); the 0.4 route should have been taken")
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
