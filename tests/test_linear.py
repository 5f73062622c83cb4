"""`jax_varlen_attn.nn.fused_linear` (RMSNorm -> projection -> residual add / SwiGLU) on every backend
against a float64 NumPy oracle written here from the docstring's semantics, and a decoder whose
projections run through it against the same decoder without (same weights).

The Triton kernel runs on a GPU, and on a CPU under Triton's interpreter (which computes bf16 on raw
bits: bf16 is checked on the GPU only, as in test_triton_backend.py).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jax_varlen_attn.nn import DecoderLM, ModelConfig, TransposedLinear, fused_linear  # noqa: E402
from jax_varlen_attn.nn import linear as linear_mod  # noqa: E402
from tests.conftest import HAS_GPU  # noqa: E402
from tests.write_backends import BACKENDS  # noqa: E402

NP = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
DTYPES = ["float16", "float32"] + (["bfloat16"] if HAS_GPU else [])
# Relative to the output's scale: the kernel rounds where the jnp form does, but sums K in another
# order; one or two roundings of the dtype (bf16: 2**-8) plus the rounding of the normed x.
# f32 on a GPU: XLA's dot and tl.dot both take TF32 (10-bit mantissa) by default.
TOL = {"bfloat16": 3e-2, "float16": 4e-3, "float32": 1e-3 if HAS_GPU else 1e-5}


def oracle(x, w, norm_scale, eps, residual, silu_mul):
  """float64, no rounding: the semantics of `fused_linear`'s docstring."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  if norm_scale is not None:
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(norm_scale, np.float64)
  y = x @ w.T
  if silu_mul:
    g, u = np.split(y, 2, axis=-1)
    y = g / (1.0 + np.exp(-g)) * u
  return y if residual is None else np.asarray(residual, np.float64) + y


CASES = [
    # (T, K, N, norm, residual, silu_mul)
    (1, 64, 48, True, False, False),     # the q|k|v form: norm prologue; N not a multiple of 16
    (4, 96, 32, True, False, True),      # gate|up: norm and SwiGLU; K not a power of two
    (16, 128, 64, False, True, False),   # o_proj / down: residual epilogue, a full 16-row tile
    (7, 1040, 40, False, True, False),   # K past one 512-wide step, ragged last step
    (3, 48, 16, True, True, True),       # everything at once
    (17, 64, 32, True, True, False),     # past the kernel's 16 rows: the jnp form on every backend
]


def _inputs(rng, case, dtype):
  t, k, n, norm, res, silu = case
  dt = NP[dtype]
  x = rng.standard_normal((t, k)).astype(dt)
  w = (rng.standard_normal(((2 if silu else 1) * n, k)) / np.sqrt(k)).astype(dt)
  scale = (1 + 0.3 * rng.standard_normal(k)).astype(dt) if norm else None
  residual = rng.standard_normal((t, n)).astype(dt) if res else None
  return x, w, scale, residual, silu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_oracle(backend, dtype, case):
  rng = np.random.default_rng(hash((case, dtype)) % 2**32)
  x, w, scale, residual, silu = _inputs(rng, case, dtype)
  out = fused_linear(jnp.asarray(x), jnp.asarray(w), norm_scale=None if scale is None else jnp.asarray(scale),
                     eps=1e-6, residual=None if residual is None else jnp.asarray(residual), silu_mul=silu,
                     backend=backend)
  ref = oracle(x, w, scale, 1e-6, residual, silu)
  assert out.shape == ref.shape and out.dtype == jnp.dtype(dtype)
  got = np.asarray(out, np.float64)
  assert np.isfinite(got).all()
  err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
  assert err < TOL[dtype], (backend, dtype, case, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_only_for_small_calls(backend):
  """Up to 16 rows the Triton backend lowers to its kernel (a custom call or the interpreter's
  callback); past it, and on the xla backend, to XLA's dot."""
  x16, x17 = jnp.ones((16, 64), jnp.float32), jnp.ones((17, 64), jnp.float32)
  w = jnp.ones((32, 64), jnp.float32)

  def kernel_in(x):
    text = jax.jit(lambda x: fused_linear(x, w, residual=x[:, :32], backend=backend)).lower(x).as_text()
    return "custom_call" in text and "dot_general" not in text

  assert kernel_in(x16) == (backend == "triton")
  assert not kernel_in(x17)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(x=np.ones((2, 8), np.int32)), TypeError, "x must be"),
    (dict(x=np.ones((2, 3, 8), np.float32)), ValueError, "x must"),
    (dict(w=np.ones((16, 8), np.float16)), TypeError, "w must be in x's dtype"),
    (dict(w=np.ones((16, 9), np.float32)), ValueError, r"w must be \[N, K=8\]"),
    (dict(w=np.ones((15, 8), np.float32), silu_mul=True), ValueError, "silu_mul needs w"),
    (dict(silu_mul=1), TypeError, "silu_mul must be a bool"),
    (dict(norm_scale=np.ones(9, np.float32)), ValueError, r"norm_scale must be \[K=8\]"),
    (dict(residual=np.ones((2, 15), np.float32)), ValueError, r"residual must be \[T, N\] = \[2, 16\]"),
    (dict(residual=np.ones((2, 16), np.float16)), ValueError, "residual must be"),
    (dict(eps=-1.0), ValueError, "eps must be"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_raises_naming_the_argument(kwargs, err, match):
  args = dict(x=np.ones((2, 8), np.float32), w=np.ones((16, 8), np.float32))
  args.update(kwargs)
  x, w = args.pop("x"), args.pop("w")
  with pytest.raises(err, match=match):
    fused_linear(x, w, **args)


def test_one_compile_across_values():
  """Values (activations, weights, residuals) are data: one compile per shape."""
  rng = np.random.default_rng(0)
  before = linear_mod._run._cache_size()
  for _ in range(3):
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    fused_linear(x, jnp.asarray(rng.standard_normal((16, 32)), jnp.float32), residual=x[:, :16], backend="xla")
  assert linear_mod._run._cache_size() == before + 1


def test_transposed_linear_holds_nnx_linears_weights():
  init = nnx.initializers.normal(0.02)
  a = nnx.Linear(24, 40, use_bias=False, kernel_init=init, rngs=nnx.Rngs(3))
  b = TransposedLinear(24, 40, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=init, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(np.asarray(a.kernel[...]).T, np.asarray(b.kernel[...]))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 24)), jnp.float32)
  np.testing.assert_allclose(np.asarray(b(x, backend="xla")), np.asarray(a(x)), rtol=1e-6, atol=1e-6)


def test_model_options_are_checked():
  with pytest.raises(ValueError, match="fused_linears needs fuse_projections"):
    ModelConfig.tiny(fused_linears=True)
  with pytest.raises(ValueError, match="fused_linears needs fuse_projections"):
    ModelConfig.tiny(fused_linears=True, fuse_projections=True, attention_bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_with_fused_linears_equals_without(backend):
  """The same weights (same rngs) with and without fused_linears: the same logits over steps of at
  most 16 tokens (the kernel's calls on the Triton backend), the NaN-poisoned cache never leaking."""
  from tests.test_nn import SMALL_STEPS, rel_err, run_paged

  base = ModelConfig.tiny(scan_layers=False, fuse_projections=True, backend=backend)
  plain = DecoderLM(base, rngs=nnx.Rngs(1))
  fused = DecoderLM(dataclasses.replace(base, fused_linears=True), rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(plain.layers[1].attn.o_proj.kernel[...]).T,
                                np.asarray(fused.layers[1].attn.o_proj.kernel[...]))
  _, want = run_paged(plain, base, num_tokens=16, steps=SMALL_STEPS)
  _, got = run_paged(fused, base, num_tokens=16, steps=SMALL_STEPS)
  for g, w in zip(got, want):
    assert rel_err(g, w) < (1e-3 if HAS_GPU else 1e-5)
