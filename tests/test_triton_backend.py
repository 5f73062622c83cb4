"""The shared suite on the Triton backend: on a GPU natively, elsewhere under Triton's interpreter."""

import os

import pytest

from tests.attention_suite import AttentionSuite
from tests.conftest import HAS_GPU

pytest.importorskip("triton")

if not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
  pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


class TestTriton(AttentionSuite):
  backend = "triton"
  # Triton's interpreter computes bf16 on raw bits (wrong numbers): bf16 is checked on the GPU only.
  dtypes = ("float16", "bfloat16", "float32") if HAS_GPU else ("float16", "float32")
  # On the GPU an fp32 dot is exact only with input_precision="ieee", which the kernel uses.
