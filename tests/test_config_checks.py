"""Every backend's Config rejects bad fields with a ValueError naming the field (one shared check)."""

import pytest

from jax_varlen_attn.backends.pallas.config import Config as PallasConfig
from jax_varlen_attn.backends.triton.config import Config as TritonConfig
from jax_varlen_attn.spec import next_pow2


@pytest.mark.parametrize("cls, field, value", [
    (TritonConfig, "block_m", 24), (TritonConfig, "block_n", 8), (TritonConfig, "num_splits", 0),
    (TritonConfig, "num_splits", 65), (TritonConfig, "num_warps", 3), (TritonConfig, "num_warps", True),
    (TritonConfig, "num_stages", 0), (TritonConfig, "block_n", 64.0),
    (PallasConfig, "block_q", 0), (PallasConfig, "block_q", 4096), (PallasConfig, "block_k", 48),
    (PallasConfig, "num_warps", 32), (PallasConfig, "num_stages", -1), (PallasConfig, "block_q", True),
])
def test_bad_field_raises_naming_it(cls, field, value):
  with pytest.raises(ValueError, match=f"Config.{field} "):
    cls(**{field: value})


@pytest.mark.parametrize("cls, fields", [
    (TritonConfig, dict(block_m=64, block_n=128, num_splits=4, num_warps=8, num_stages=3)),
    (PallasConfig, dict(block_q=7, block_k=32, num_warps=4, num_stages=1)),
])
def test_good_fields_pass(cls, fields):
  assert cls(**fields) == cls(**fields)


def test_next_pow2():
  assert [next_pow2(n) for n in (-3, 0, 1, 2, 3, 16, 17)] == [1, 1, 1, 2, 4, 16, 32]
