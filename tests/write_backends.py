"""The backends a cache-write test runs on: "xla" everywhere, "triton" on a GPU or under Triton's
interpreter (TRITON_INTERPRET=1, which conftest.py sets on a CPU machine)."""

import os

import jax
import pytest


def triton_runs() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return os.environ.get("TRITON_INTERPRET") == "1"


BACKENDS = ["xla", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_runs(), reason="no GPU and TRITON_INTERPRET is not 1"))]
