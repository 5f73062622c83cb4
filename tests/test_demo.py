"""The demo runs in-process on a small batch, passes its own check, and fails it when it should."""

import numpy as np

from jax_varlen_attn import demo
from tests.oracle import reference_attention

SMALL = ["--prefill", "40", "24", "--decodes", "3", "--history", "70", "--heads", "4", "2",
         "--head-dim", "64", "--repeats", "1"]


def test_demo_small_batch_passes(capsys):
  assert demo.main(SMALL + ["--seed", "1"]) == 0
  out = capsys.readouterr().out
  assert "backend=xla" in out  # "auto" on a CPU
  for row in ("prefill", "decode", "all"):
    assert any(line.split()[:1] == [row] for line in out.splitlines()), out
  assert "OK: rel err" in out and "steady state" in out


def test_demo_exits_nonzero_over_tolerance(capsys):
  assert demo.main(SMALL + ["--rtol", "0"]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_demo_exits_2_for_a_backend_that_cannot_run(capsys):
  assert demo.main(SMALL + ["--backend", "cuda"]) == 2
  assert "backend must be one of" in capsys.readouterr().err


def test_demo_reference_agrees_with_the_oracle():
  """The demo's compact float64 reference is the oracle's causal case (they share no code)."""
  rng = np.random.default_rng(0)
  arrays, keys, values = demo.make_batch(rng, [9, 4], 3, 30, 4, 2, 32, 8, "float16")
  ours = demo.reference(arrays["q"], keys, values, arrays["cu_seqlens_q"], 0.3)
  theirs, _ = reference_attention(arrays["q"], keys, values, arrays["cu_seqlens_q"], scale=0.3, causal=True)
  np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
