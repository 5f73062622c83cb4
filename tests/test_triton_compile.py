"""Every specialization of the Triton kernel compiles for sm_90 (H100), checked on any machine."""

import pytest

from tests.sm90 import run_compile_check

pytest.importorskip("triton")


def test_every_specialization_compiles_for_sm90(tmp_path):
  run_compile_check("tests.triton_compile_check", tmp_path)
