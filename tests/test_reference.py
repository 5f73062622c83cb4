"""`naive_paged_attention` (the serving benchmark's baseline) against the float64 oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_varlen_attn.reference import naive_paged_attention
from tests.oracle import reference_attention
from tests.problems import TOLERANCE, Problem, make_problem, rel_err


@pytest.mark.parametrize("layout", ["NHD", "stacked_NHD"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_naive_matches_oracle(layout, causal, dtype):
  p = Problem(layout=layout, causal=causal, dtype=dtype, return_lse=False,
              seed=int(np.random.SeedSequence().entropy % 2**32))
  kwargs, oracle = make_problem(p)
  out = naive_paged_attention(
      kwargs["q"], kwargs["k"], kwargs["v"], cu_seqlens_q=kwargs["cu_seqlens_q"],
      seqused_k=kwargs["seqused_k"], block_table=kwargs["block_table"], causal=causal,
      layer=kwargs.get("layer"))
  ref, _ = reference_attention(**oracle)
  out = np.asarray(out.astype(jnp.float32))
  n_real = int(oracle["cu_seqlens_q"][-1])
  assert np.isfinite(out).all(), "poisoned pages / padding leaked"
  assert (out[n_real:] == 0).all()
  assert rel_err(out[:n_real], ref[:n_real]) < TOLERANCE[dtype]


def test_naive_needs_layer_exactly_for_a_stacked_cache():
  q = jnp.zeros((2, 4, 32), jnp.float16)
  cache = jnp.zeros((3, 4, 16, 2, 32), jnp.float16)
  args = dict(cu_seqlens_q=jnp.array([0, 2]), seqused_k=jnp.array([2]),
              block_table=jnp.zeros((1, 1), jnp.int32))
  with pytest.raises(ValueError, match="layer"):
    naive_paged_attention(q, cache, cache, **args)
  with pytest.raises(ValueError, match="layer"):
    naive_paged_attention(q, cache[0], cache[0], layer=jnp.int32(0), **args)


@pytest.mark.parametrize("kv_dtype,descale", [("float8_e4m3fn", "seq_head"), ("float8_e5m2", "scalar")])
def test_naive_fp8_cache_and_sinks_match_oracle(kv_dtype, descale):
  p = Problem(kv_dtype=kv_dtype, descale=descale, sinks=True, causal=True, return_lse=False,
              seqlens_q=(0, 4, 3, 2), seqlens_k=(5, 0, 20, 9),
              seed=int(np.random.SeedSequence().entropy % 2**32))
  kwargs, oracle = make_problem(p)
  out = naive_paged_attention(
      kwargs["q"], kwargs["k"], kwargs["v"], cu_seqlens_q=kwargs["cu_seqlens_q"],
      seqused_k=kwargs["seqused_k"], block_table=kwargs["block_table"], causal=True,
      k_descale=kwargs["k_descale"], v_descale=kwargs["v_descale"], s_aux=kwargs["s_aux"])
  ref, _ = reference_attention(**oracle)
  out = np.asarray(out.astype(jnp.float32))
  n_real = int(oracle["cu_seqlens_q"][-1])
  assert np.isfinite(out).all() and (out[n_real:] == 0).all()
  assert rel_err(out[:n_real], ref[:n_real]) < TOLERANCE["float16"]
