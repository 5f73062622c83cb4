"""The shared suite on the XLA backend, plus what only the XLA backend promises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from jax_varlen_attn import flash_attn_varlen_func
from jax_varlen_attn.backends.xla import Config
from tests.attention_suite import AttentionSuite, _INSTRUCTION
from tests.oracle import reference_attention
from tests.problems import Problem, make_problem, rel_err
from tests.strategies import problems


class TestXla(AttentionSuite):
  backend = "xla"

  @pytest.mark.parametrize("block_q,block_k", [(1, 16), (3, 7), (128, 256)])
  def test_any_block_sizes(self, block_q, block_k):
    self.check(self.problem(causal=True, window=(25, -1)), config=Config(block_q=block_q, block_k=block_k))

  def test_memory_bounded_on_long_sequence(self):
    """A 32k-token causal prefill never builds a 32k x 32k score matrix (compile only)."""
    n, H, D = 32768, 1, 32
    q = jax.ShapeDtypeStruct((n, H, D), jnp.float16)
    k = jax.ShapeDtypeStruct((n // 16, 16, 1, D), jnp.float16)
    cu = jax.ShapeDtypeStruct((2,), jnp.int32)
    used = jax.ShapeDtypeStruct((1,), jnp.int32)
    bt = jax.ShapeDtypeStruct((1, n // 16), jnp.int32)
    f = lambda q, k, v, cu, used, bt: flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu, seqused_k=used, block_table=bt, causal=True, backend="xla")
    hlo = jax.jit(f).lower(q, k, k, cu, used, bt).compile().as_text()
    largest = 0
    for line in hlo.splitlines():
      m = _INSTRUCTION.match(line.strip())
      if m and not m.group(1):
        largest = max(largest, int(np.prod([int(d) for d in m.group(3).split(",") if d])))
    assert largest < 8 * n * 128, f"largest buffer {largest} elements"


def test_copy_detector_sees_a_copy():
  """The HLO check of the suite can fail: a cache touched before the call shows up."""
  from tests.attention_suite import _large_buffers
  kwargs, _ = make_problem(Problem(layout="NHD", spare_pages=60))
  n = int(np.prod(kwargs["k"].shape))
  f = lambda k: flash_attn_varlen_func(kwargs["q"], k + 1, kwargs["v"], cu_seqlens_q=kwargs["cu_seqlens_q"],
                                       seqused_k=kwargs["seqused_k"], block_table=kwargs["block_table"],
                                       backend="xla")
  assert _large_buffers(jax.jit(f).lower(kwargs["k"]).compile().as_text(), n)


# ---- fp8 and sinks: what the arguments mean beyond the oracle comparison of the suite -------------

def test_descales_are_ignored_without_fp8():
  """With a cache (and q) in q's dtype the descales are checked and ignored (FlashAttention 3's
  rule, so vLLM's calls that always pass them port): bit-identical outputs."""
  kwargs, _ = make_problem(Problem(causal=True))
  plain = flash_attn_varlen_func(**kwargs, backend="xla")
  scaled = flash_attn_varlen_func(**kwargs, backend="xla", q_descale=jnp.float32(3.0),
                                  k_descale=jnp.full((4, 2), 0.5, jnp.float32), v_descale=2.0)
  for a, b in zip(plain, scaled):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_descales_are_one():
  """An fp8 cache without descales reads them as 1.0 (vLLM's default), for every form of 1."""
  kwargs, _ = make_problem(Problem(kv_dtype="float8_e4m3fn", descale="none", causal=True))
  base = flash_attn_varlen_func(**kwargs, backend="xla")
  for ones in (1.0, jnp.ones((), jnp.float32), jnp.ones((1,), jnp.float32), jnp.ones((4, 2), jnp.float32)):
    other = flash_attn_varlen_func(**{**kwargs, "k_descale": ones, "v_descale": ones}, backend="xla")
    for a, b in zip(base, other):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sink_of_minus_inf_is_no_sink():
  kwargs, _ = make_problem(Problem(causal=True, window=(0, 0), seqlens_q=(6, 2), seqlens_k=(3, 40)))
  base_out, base_lse = flash_attn_varlen_func(**kwargs, backend="xla")
  out, lse = flash_attn_varlen_func(**kwargs, backend="xla", s_aux=jnp.full((4,), -jnp.inf, jnp.float32))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(base_out))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(base_lse))


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices")
def test_head_split_with_fp8_and_sinks():
  """On a mesh splitting heads, an fp8 / sinks call (descales and sinks split with their heads)
  computes the same result as the plain call (tests/test_shard.py checks the split itself)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jax_varlen_attn.api import sharded_flash_attn_varlen_func
  kwargs, oracle = make_problem(Problem(num_heads=4, num_kv_heads=2, kv_dtype="float8_e4m3fn", sinks=True,
                                        causal=True))
  mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
  want = flash_attn_varlen_func(**kwargs, backend="xla")
  got = sharded_flash_attn_varlen_func(mesh, "tp", **kwargs, backend="xla")
  q = jax.device_put(kwargs["q"], NamedSharding(mesh, P(None, "tp", None)))
  detected = jax.jit(lambda q: flash_attn_varlen_func(**{**kwargs, "q": q}, backend="xla"))(q)
  ref, _ = reference_attention(**oracle)
  n = int(oracle["cu_seqlens_q"][-1])
  for result in (got, detected):
    for a, b in zip(result, want):
      np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)),
                                 rtol=1e-3, atol=1e-3)
    assert rel_err(np.asarray(result[0].astype(jnp.float32))[:n], ref[:n]) < 4e-3


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems(kv_dtypes=(None, "float8_e4m3fn", "float8_e5m2"), sinks=(False, True)))
def test_fp8_and_sinks_match_the_oracle_on_drawn_problems(p):
  """Any layout, lengths, heads, masks, with or without an fp8 cache and sinks: the oracle."""
  TestXla().check(p)
