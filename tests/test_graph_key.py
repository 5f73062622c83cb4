"""graph_key / KeyedJit: a model's graphdef as a static jit argument hashed once, not per call."""

import jax
import jax.numpy as jnp
from flax import nnx

from jax_varlen_attn.graph_key import GraphKey, KeyedJit, graph_key
from jax_varlen_attn.nn import DecoderLM, preset


def _model(seed=0, **overrides):
  return DecoderLM(preset("tiny", **overrides), rngs=nnx.Rngs(seed))


def test_equal_graphdefs_share_one_key_and_unequal_ones_do_not():
  g1, _ = nnx.split(_model())
  g2, _ = nnx.split(_model(seed=1))  # another model of the same structure: an equal graphdef
  g3, _ = nnx.split(_model(num_layers=3))
  k1 = graph_key(g1)
  assert isinstance(k1, GraphKey) and k1.graphdef == g1  # an earlier equal graphdef may hold the key
  assert graph_key(g1) is k1 and graph_key(k1) is k1  # the fast path, and a key passes through
  assert graph_key(g2) is k1  # equal structure: the same key, so the same compile
  assert graph_key(g3) is not k1 and graph_key(g3) != k1


def test_keyed_jit_compiles_once_for_equal_graphdefs_and_keeps_the_function():
  calls = []

  def fn(graphdef, state, x):
    calls.append(1)  # traces
    model = nnx.merge(graph_key(graphdef).graphdef, state)
    return x + model.config.num_layers

  jitted = KeyedJit(fn)
  g1, s1 = nnx.split(_model())
  g2, s2 = nnx.split(_model(seed=1))
  x = jnp.ones(3)
  assert float(jitted(g1, s1, x)[0]) == 1 + preset("tiny").num_layers
  jitted(g2, s2, x)
  jitted(graph_key(g1), s1, x)
  assert jitted._cache_size() == 1 and len(calls) == 1
  assert jitted.__name__ == "fn"
  assert "func.func" in jitted.lower(g1, s1, x).as_text() and len(calls) == 1  # lowered from the cached trace
  g3, s3 = nnx.split(_model(num_layers=3))
  jitted(g3, s3, x)
  assert jitted._cache_size() == 2
