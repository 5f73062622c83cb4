"""vLLM's argument forms and the forward-only rule, on the xla backend (any machine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_varlen_attn import flash_attn_varlen_func

CU = np.array([0, 3, 4], np.int32)
USED = np.array([3, 20], np.int32)
TABLE = np.array([[0, 0], [5, 2]], np.int32)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((4, 4, 32)), jnp.float32)
  kv = jnp.asarray(rng.standard_normal((8, 16, 2, 32)), jnp.float32)
  return q, kv


def _call(q, kv, **kw):
  return flash_attn_varlen_func(q, kv, kv, cu_seqlens_q=jnp.asarray(CU), seqused_k=jnp.asarray(USED),
                                block_table=jnp.asarray(TABLE), backend="xla", **kw)


def test_window_none_is_unbounded():
  q, kv = _inputs()
  np.testing.assert_array_equal(np.asarray(_call(q, kv, window_size=None)), np.asarray(_call(q, kv)))


@pytest.mark.parametrize("scale", [np.float32(0.2), np.array(0.2, np.float32), jnp.float32(0.2)])
def test_softmax_scale_takes_concrete_scalars(scale):
  q, kv = _inputs(1)
  np.testing.assert_allclose(np.asarray(_call(q, kv, softmax_scale=scale)),
                             np.asarray(_call(q, kv, softmax_scale=float(np.float32(0.2)))), rtol=0, atol=0)


def test_flash_attention_2_positional_order_gets_a_hint():
  q = jnp.ones((4, 4, 32), jnp.float16)
  k = jnp.ones((23, 2, 32), jnp.float16)
  cu_q, cu_k = jnp.asarray(CU), jnp.asarray([0, 3, 23], jnp.int32)
  with pytest.raises(TypeError, match="positional order is vLLM's.*by keyword"):
    flash_attn_varlen_func(q, k, k, cu_q, cu_k, 3, 20)  # FlashAttention 2's order


@pytest.mark.parametrize("how", ["grad", "jvp"])
def test_derivatives_raise_forward_only(how):
  q, kv = _inputs(2)
  loss = lambda q: _call(q, kv).sum()
  with pytest.raises(TypeError, match="forward-only"):
    if how == "grad":
      jax.grad(loss)(q)
    else:
      jax.jvp(loss, (q,), (jnp.ones_like(q),))


def test_stop_gradient_lets_a_differentiated_function_use_it():
  q, kv = _inputs(3)
  g = jax.grad(lambda w: (w * _call(jax.lax.stop_gradient(q), kv)).sum())(jnp.float32(2.0))
  assert np.isfinite(float(g))


@pytest.mark.parametrize("name", ["xla", "pallas", "triton"])
def test_each_backends_config_is_exported_at_the_top(name):
  """`config=jax_varlen_attn.<Name>Config(...)`: the class the backend takes, and its TypeError's name."""
  import jax_varlen_attn
  from jax_varlen_attn import backends
  cls = getattr(jax_varlen_attn, f"{name.capitalize()}Config")
  assert cls is backends.load(name).config_cls
  q = jnp.ones((2, 4, 32), jnp.float32)
  kv = jnp.ones((2, 2, 32), jnp.float32)
  cu = jnp.asarray([0, 2], jnp.int32)
  with pytest.raises(TypeError, match=rf"must be a jax_varlen_attn\.{name.capitalize()}Config, got dict"):
    flash_attn_varlen_func(q, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=name, config={})
