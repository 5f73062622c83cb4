"""`jax_varlen_attn.nn.add_rms_norm` (residual add + RMSNorm, one Triton kernel on a GPU) on every
backend against a float64 NumPy oracle written here from the docstring's semantics.

The sum is checked bit for bit (it is one rounded add); y within the dtype's tolerance. Rows of
NaN in x or the residual must stay in their own row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("flax")

from jax_varlen_attn.nn import add_rms_norm  # noqa: E402
from tests.conftest import HAS_GPU  # noqa: E402
from tests.write_backends import BACKENDS  # noqa: E402

NP = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
TOL = {"bfloat16": 2e-2, "float16": 2e-3, "float32": 1e-5}
EPS = 1e-6


def oracle(x, residual, scale, eps):
  """float64 (y, s) from the semantics; s rounded to x's dtype first, as the docstring says."""
  s = x if residual is None else (x.astype(np.float64) + residual.astype(np.float64)).astype(x.dtype)
  sf = s.astype(np.float64)
  y = sf / np.sqrt(np.mean(sf * sf, axis=-1, keepdims=True) + eps) * scale.astype(np.float64)
  return y, s


CASES = [  # (rows, hidden, dtype, with residual)
    (4, 2048, "float32", True),
    (3, 100, "float16", True),   # hidden not a power of two: masked tail
    (1, 64, "float32", False),
    (17, 256, "bfloat16", True),
    (5, 48, "float16", False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_oracle(backend, case):
  rows, hidden, dtype, with_residual = case
  if backend == "triton" and dtype == "bfloat16" and not HAS_GPU:
    pytest.skip("Triton's interpreter rounds bfloat16 by truncation (its numpy emulation)")
  rng = np.random.default_rng(rows * 1000 + hidden)
  x = (rng.standard_normal((rows, hidden)) * 3).astype(NP[dtype])
  residual = (rng.standard_normal((rows, hidden)) * 3).astype(NP[dtype]) if with_residual else None
  scale = (1 + 0.3 * rng.standard_normal(hidden)).astype(NP[dtype])
  y, s = add_rms_norm(jnp.asarray(x), None if residual is None else jnp.asarray(residual),
                      jnp.asarray(scale), eps=EPS, backend=backend)
  y_ref, s_ref = oracle(x, residual, scale, EPS)
  assert y.shape == s.shape == x.shape and y.dtype == s.dtype == jnp.dtype(dtype)
  u = np.uint16 if np.dtype(NP[dtype]).itemsize == 2 else np.uint32
  np.testing.assert_array_equal(np.asarray(s).view(u), s_ref.view(u))
  np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_poisoned_row_stays_in_its_row(backend):
  rng = np.random.default_rng(7)
  x = rng.standard_normal((6, 96)).astype(np.float32)
  residual = rng.standard_normal((6, 96)).astype(np.float32)
  x[2, 5] = np.nan
  residual[4, 0] = np.inf
  y, s = add_rms_norm(jnp.asarray(x), jnp.asarray(residual), jnp.ones(96, jnp.float32), backend=backend)
  bad = ~np.isfinite(np.asarray(y)).all(axis=1)
  assert list(np.flatnonzero(bad)) == [2, 4]
  y_ref, _ = oracle(x, residual, np.ones(96, np.float32), EPS)
  ok = [0, 1, 3, 5]
  np.testing.assert_allclose(np.asarray(y)[ok], y_ref[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_compile_across_row_contents_and_none_residual_is_its_own(backend):
  f = jax.jit(lambda x, r, w: add_rms_norm(x, r, w, backend=backend))
  w = jnp.ones(32, jnp.float32)
  for seed in range(3):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((4, 32)), jnp.float32)
    f(x, x, w)
  assert f._cache_size() == 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=[[1.0] * 8] * 2), TypeError, "x must be an array"),
    (dict(x=jnp.ones((2, 3, 8))), ValueError, "x must have rank 2"),
    (dict(x=jnp.ones((2, 8), jnp.int32)), TypeError, "x must be float16, bfloat16 or float32"),
    (dict(residual=jnp.ones((3, 8))), ValueError, "residual must have x's shape"),
    (dict(residual=jnp.ones((2, 8), jnp.float16)), TypeError, "residual must have x's dtype"),
    (dict(scale=jnp.ones(7)), ValueError, r"scale must be \[hidden=8\]"),
    (dict(scale=jnp.ones(8, jnp.int32)), TypeError, "scale must be a float array"),
    (dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_raises_naming_the_argument(kwargs, error, match):
  args = dict(x=jnp.ones((2, 8)), residual=jnp.ones((2, 8)), scale=jnp.ones(8), eps=1e-6, backend="xla")
  args.update(kwargs)
  with pytest.raises(error, match=match):
    add_rms_norm(args.pop("x"), args.pop("residual"), args.pop("scale"), **args)
