"""check_inputs: the eager value check names the argument and the first bad index."""

import numpy as np
import jax.numpy as jnp
import pytest

from jax_varlen_attn.checks import check_inputs
from tests.problems import Problem, make_problem


def _kwargs(**overrides):
  kwargs, _ = make_problem(Problem(**overrides))
  return {k: (np.array(v) if hasattr(v, "shape") else v) for k, v in kwargs.items()}


@pytest.mark.parametrize("layout", ["NHD", "stacked_strided"])
def test_valid_inputs_pass(layout):
  check_inputs(**_kwargs(layout=layout))
  check_inputs(**_kwargs(paged=False))


def _set(kwargs, name, index, value):
  a = np.array(kwargs[name])
  a[index] = value
  kwargs[name] = jnp.asarray(a)
  return kwargs


@pytest.mark.parametrize("name,index,value,match", [
    ("cu_seqlens_q", 0, 1, r"cu_seqlens_q\[0\] must be 0"),
    ("cu_seqlens_q", 2, 0, r"cu_seqlens_q must be non-decreasing: cu_seqlens_q\[2\]"),
    ("cu_seqlens_q", -1, 10**5, r"cu_seqlens_q\[-1\] = 100000 exceeds total_q"),
    ("seqused_k", 1, -3, r"seqused_k: sequence 1 has a negative key count"),
    ("seqused_k", 2, 10**6, r"seqused_k\[2\] = 1000000 exceeds the block table's capacity"),
    ("block_table", (1, 0), 10**6, r"block_table\[1, 0\] = 1000000 is outside \[0, num_pages="),
    ("block_table", (0, 1), -1, r"block_table\[0, 1\] = -1 is outside"),
])
def test_bad_values_named(name, index, value, match):
  kwargs = _set(_kwargs(), name, index, value)
  with pytest.raises(ValueError, match=match):
    check_inputs(**kwargs)


def test_padded_block_table_entries_are_not_checked():
  # make_problem fills entries past each sequence's pages with out-of-range junk: that is allowed.
  kwargs = _kwargs(extra_blocks=4)
  assert (np.asarray(kwargs["block_table"]) >= 10**6).any() or (np.asarray(kwargs["block_table"]) < 0).any()
  check_inputs(**kwargs)


def test_layer_out_of_range():
  kwargs = _kwargs(layout="stacked_NHD")
  kwargs["layer"] = jnp.int32(7)
  with pytest.raises(ValueError, match=r"layer=7 is outside \[0, num_layers=3\)"):
    check_inputs(**kwargs)


def test_non_paged_lengths_beyond_rows():
  kwargs = _set(_kwargs(paged=False), "seqused_k", 0, 10**4)
  with pytest.raises(ValueError, match=r"seqused_k\[0\] = 10000 exceeds that sequence's rows in k"):
    check_inputs(**kwargs)


def test_max_seqlen_bounds():
  kwargs = _kwargs()
  kwargs["max_seqlen_q"] = 2
  with pytest.raises(ValueError, match=r"max_seqlen_q=2 but sequence 0 has 5 queries"):
    check_inputs(**kwargs)


def test_under_jit_says_it_runs_eagerly():
  """Traced index arrays cannot be read on the host: a TypeError that says so, naming them."""
  import jax
  kwargs = _kwargs()
  meta = {n: jnp.asarray(kwargs.pop(n)) for n in ("cu_seqlens_q", "block_table")}
  match = r"eagerly: call it outside jax.jit .*\['cu_seqlens_q', 'block_table'\]"
  with pytest.raises(TypeError, match=match):
    jax.jit(lambda m: check_inputs(**kwargs, **m))(meta)
