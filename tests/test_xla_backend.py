"""The shared suite on the XLA backend, plus what only the XLA backend promises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_varlen_attn import flash_attn_varlen_func
from jax_varlen_attn.backends.xla import Config
from tests.attention_suite import AttentionSuite, _INSTRUCTION
from tests.problems import Problem, make_problem


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
