"""`jax_varlen_attn.nn.partials`: split-K partial products and `silu_mul` (SwiGLU's gate, one Triton
kernel on a GPU, summing partials as it reads them), on every backend against float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("flax")

from jax_varlen_attn.nn.partials import partials, silu_mul  # noqa: E402
from tests.conftest import HAS_GPU  # noqa: E402
from tests.write_backends import BACKENDS  # noqa: E402

NP = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
TOL = {"bfloat16": 2e-2, "float16": 2e-3, "float32": 1e-5}


def silu_mul_oracle(x, dtype):
  """float64 silu(gate) * up from x = [gate | up] (or partials summed), halves rounded to dtype."""
  x = np.asarray(x, np.float64)
  if x.ndim == 3:
    x = x.sum(0)
  x = x.astype(NP[dtype]).astype(np.float64)
  gate, up = np.split(x, 2, axis=-1)
  return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_partials_sum_to_the_product(splits):
  rng = np.random.default_rng(splits)
  x = rng.standard_normal((3, 64)).astype(np.float32)
  w = rng.standard_normal((64, 24)).astype(np.float32)
  p = partials(jnp.asarray(x), jnp.asarray(w), splits)
  assert p.shape == (splits, 3, 24) and p.dtype == jnp.float32
  k = 64 // splits
  for s in range(splits):  # each is its own K range's product
    np.testing.assert_allclose(np.asarray(p[s]), x[:, s * k:(s + 1) * k].astype(np.float64)
                               @ w[s * k:(s + 1) * k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [  # (shape of x, x's dtype, out dtype)
    ((4, 2 * 96), "float32", None),
    ((3, 2 * 2500), "float16", None),         # several column blocks, a masked tail
    ((2, 5, 2 * 40), "float32", "float16"),   # partials
    ((4, 3, 2 * 64), "float32", "float32"),
    ((2, 4, 2 * 64), "float32", "bfloat16"),
], ids=lambda c: "x".join(map(str, c[0])) + f"-{c[1]}-{c[2]}")
def test_silu_mul_matches_oracle(backend, case):
  shape, dtype, out = case
  if backend == "triton" and out == "bfloat16" and not HAS_GPU:
    pytest.skip("Triton's interpreter rounds bfloat16 by truncation (its numpy emulation)")
  x = (np.random.default_rng(len(shape) * 100 + shape[-1]).standard_normal(shape) * 3).astype(NP[dtype])
  y = silu_mul(jnp.asarray(x), None if out is None else jnp.dtype(out), backend=backend)
  out = out or dtype
  assert y.shape == (shape[-2], shape[-1] // 2) and y.dtype == jnp.dtype(out)
  np.testing.assert_allclose(np.asarray(y, np.float64), silu_mul_oracle(x, out), rtol=TOL[out], atol=TOL[out])


@pytest.mark.parametrize("backend", BACKENDS)
def test_silu_mul_compiles_once_across_contents(backend):
  f = jax.jit(lambda x: silu_mul(x, jnp.float32, backend=backend))
  for seed in range(3):
    f(jnp.asarray(np.random.default_rng(seed).standard_normal((2, 4, 64)), jnp.float32))
  assert f._cache_size() == 1


@pytest.mark.parametrize("call, error, match", [
    (lambda: partials([[1.0]], jnp.ones((1, 2)), 1), TypeError, "x must be an array"),
    (lambda: partials(jnp.ones((2, 8)), jnp.ones((6, 4)), 2), ValueError, r"w must be \[K=8, N\]"),
    (lambda: partials(jnp.ones((2, 9)), jnp.ones((9, 4)), 2), ValueError, "splits=2 must divide K=9"),
    (lambda: partials(jnp.ones((2, 8)), jnp.ones((8, 4)), 0), ValueError, "splits must be an int >= 1"),
    (lambda: silu_mul(jnp.ones((2, 7))), ValueError, "must be even"),
    (lambda: silu_mul(jnp.ones((2, 8), jnp.int32)), TypeError, "x must be float16"),
    (lambda: silu_mul(jnp.ones((2, 2, 8))), ValueError, "dtype is required for partials"),
    (lambda: silu_mul(jnp.ones((2, 2, 8), jnp.float16), jnp.float16), TypeError, "must be float32"),
    (lambda: silu_mul(jnp.ones(8)), ValueError, "x must have rank 2"),
    (lambda: silu_mul(jnp.ones((2, 8)), jnp.int8), TypeError, "dtype must be"),
    (lambda: silu_mul(jnp.ones((2, 8)), backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_raises_naming_the_argument(call, error, match):
  with pytest.raises(error, match=match):
    call()
