"""Property-based tests: drawn problems, every backend that can run here, against the float64 oracle.

Hypothesis draws a `Problem` (tests/strategies.py): batch 1-4, per-sequence query lengths 0-20 (at
least one non-zero) and key lengths 0-70, 0-4 padding rows, heads (H, Hk) in (1,1) (2,1) (4,2) (6,3)
(8,2), head_dim 32/64/80/96/128, page size 8/16/32, non-paged k / v or a paged cache in any layout of
tests/problems.py (NHD, HND, fused, strided, layer-stacked), causal, window sides -1 or 0..40, softcap
0 or 0.5..20, ALiBi none / per head / per batch, softmax_scale default or 0.05..2, fp16 / bf16 / fp32,
with or without the LSE and the max_seqlen_q / max_seqlen_k bounds, and a seed for the (poisoned)
inputs that `make_problem` builds. The properties:

- `test_matches_oracle_<backend>`: for xla, pallas and triton (each skipped where
  `jax_varlen_attn.backends.status` says it cannot run; bfloat16 skipped under Triton's CPU interpreter,
  whose bf16 arithmetic is wrong): the output is finite, padding rows are zero, rows that see no key
  are exactly zero, the relative error against `tests.oracle.reference_attention` is under
  `TOLERANCE[dtype]` over all rows *and* per sequence, and the LSE has the oracle's +inf rows and
  values (the checks of tests/attention_suite.py).
- `test_check_inputs_accepts_valid_problems`: `jax_varlen_attn.checks.check_inputs` accepts every
  drawn problem (poisoned padding and junk in padded block-table entries are valid inputs).
- `test_deterministic_<backend>`: two calls with identical inputs (the second on fresh copies of
  every array) give bitwise-identical outputs and LSEs.

Profiles (env JVA_HYPOTHESIS_PROFILE, default "ci"):
- "ci" (default): 25 examples per oracle property and backend, 8 per determinism property and
  backend, 100 for check_inputs, no deadline. 50-60 s on an idle 2-core CPU (~100 s when other jobs
  share it).
- "large": 400 / 100 / 1000 examples, for a soak by hand or on the GPU machine (where triton and
  pallas run natively and bf16 is checked for triton too):
      JVA_HYPOTHESIS_PROFILE=large python -m pytest tests/test_properties.py -q
  or one backend: ... -k "xla". On an idle 2-core CPU the large profile takes ~13 minutes.

A crash that kills the process (a segfault) leaves no report: set JVA_PROPERTIES_LOG=/some/file and
every call is appended there before it runs; the last line is the culprit.

Reproducing a failure: the report's "Falsifying example" names the `Problem` (its `seed` fixes every
input) and the bounds; paste it into an `@example(...)` below, or call
`check_against_oracle(backend, Problem(...), bounds)` directly. Every run also draws from a session
seed that failures report ("JVA_HYPOTHESIS_SEED=..."); set that env var to replay the same draws.
"""

from __future__ import annotations

import os
import random
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis.control import currently_in_test_context, note as _hypothesis_note
from hypothesis import strategies as st

from jax_varlen_attn import flash_attn_varlen_func
from jax_varlen_attn.backends import status, triton_interpreting
from jax_varlen_attn.checks import check_inputs
from tests.oracle import reference_attention
from tests.problems import TOLERANCE, Problem, make_problem, rel_err
from tests.strategies import DTYPES, SEQLEN_BOUNDS, describe, problems, seqlen_bounds

# ---- profiles and seed -------------------------------------------------------------------------------
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Examples per test: (oracle property per backend, determinism property per backend, check_inputs).
EXAMPLES = {"ci": (25, 8, 100), "large": (400, 100, 1000)}
for _name, (_n, _, _) in EXAMPLES.items():
  settings.register_profile(_name, max_examples=_n, **_COMMON)
PROFILE_NAME = os.environ.get("JVA_HYPOTHESIS_PROFILE", "ci")
if PROFILE_NAME not in EXAMPLES:
  raise ValueError(f"JVA_HYPOTHESIS_PROFILE must be one of {sorted(EXAMPLES)}, got {PROFILE_NAME!r}")
# Applied per test (not loaded globally), so other test modules keep their own settings.
PROFILE = settings.get_profile(PROFILE_NAME)
N_ORACLE, N_DETERMINISM, N_CHECKS = EXAMPLES[PROFILE_NAME]

SESSION_SEED = int(os.environ.get("JVA_HYPOTHESIS_SEED") or random.SystemRandom().randrange(2**32))


def _seeded(name: str):
  """A per-test seed derived from the session seed (so backends do not all draw the same problems)."""
  return seed(SESSION_SEED ^ zlib.crc32(name.encode()))


def note(text: str):
  """hypothesis.note inside a test (shown with a failing example); a no-op when called directly."""
  if currently_in_test_context():
    _hypothesis_note(text)


def _note_seed():
  note(f"JVA_HYPOTHESIS_SEED={SESSION_SEED} JVA_HYPOTHESIS_PROFILE={PROFILE_NAME}")


def backend_dtypes(backend: str):
  if backend == "triton" and triton_interpreting():
    return tuple(d for d in DTYPES if d != "bfloat16")  # the interpreter's bf16 arithmetic is wrong
  return DTYPES


def _marks(backend: str):
  """Skip where the backend cannot run; quiet the Triton interpreter's deliberate exp2 overflow (the
  kernel's tanh saturates through exp2 -> inf, which NumPy reports as a RuntimeWarning)."""
  ok, why = status(backend)
  skip = pytest.mark.skipif(not ok, reason=f"backend {backend!r} cannot run here: {why}")
  quiet = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
  return lambda test: quiet(skip(test))


_LOG = os.environ.get("JVA_PROPERTIES_LOG")  # a file: every call is appended before it runs


def _log(line: str):
  """For crashes that kill the process (no report, nothing saved): the last line names the call."""
  if _LOG:
    with open(_LOG, "a") as f:
      f.write(line + "\n")


_log(f"# JVA_HYPOTHESIS_SEED={SESSION_SEED} JVA_HYPOTHESIS_PROFILE={PROFILE_NAME}")


# Every drawn shape compiles anew, and XLA:CPU keeps ~80 memory mappings per executable held by the
# jit caches: ~650 compiles in one process reach Linux's vm.max_map_count (65530) and XLA segfaults
# while compiling (seen in the large profile). Dropping the caches now and then keeps that far away.
_CLEAR_EVERY = 100
_calls = 0


def _call(backend, kwargs, bounds, where=""):
  global _calls
  _calls += 1
  if _calls % _CLEAR_EVERY == 0:
    jax.clear_caches()
  _log(where)
  return flash_attn_varlen_func(**kwargs, **bounds, backend=backend)


# ---- the check --------------------------------------------------------------------------------------
def check_against_oracle(backend: str, p: Problem, bounds: str = "none") -> float:
  """Runs `p` on `backend` and compares with the float64 oracle; returns the relative error."""
  where = f"backend={backend!r}, {describe(p, bounds)}"
  note(where)
  kwargs, oracle = make_problem(p)
  result = _call(backend, kwargs, seqlen_bounds(p, bounds), where)
  out, lse = result if p.return_lse else (result, None)
  q = kwargs["q"]
  assert out.shape == q.shape and out.dtype == q.dtype, f"out {out.shape} {out.dtype} ({where})"
  ref_out, ref_lse = reference_attention(**oracle)
  out = np.asarray(out.astype(jnp.float32)).astype(np.float64)
  cu = np.asarray(oracle["cu_seqlens_q"])
  n_real = int(cu[-1])

  assert np.isfinite(out).all(), f"NaN/Inf in the output (poison leaked?) at rows " \
      f"{sorted(set(np.argwhere(~np.isfinite(out))[:, 0].tolist()))[:10]} ({where})"
  assert (out[n_real:] == 0).all(), f"padding rows past cu_seqlens_q[-1]={n_real} must be zero ({where})"
  # A (row, head) that sees no key outputs exactly zero (the oracle marks it with LSE +inf).
  empty = np.isinf(ref_lse.T)  # [T, H]
  bad = np.argwhere(empty & (out != 0).any(axis=-1))
  assert not len(bad), f"(row, head) {tuple(int(i) for i in bad[0])} sees no key but is not zero ({where})"

  tol = TOLERANCE[p.dtype]
  err = rel_err(out[:n_real], ref_out[:n_real])
  per_seq = [rel_err(out[cu[b]:cu[b + 1]], ref_out[cu[b]:cu[b + 1]]) if cu[b + 1] > cu[b] else 0.0
             for b in range(len(cu) - 1)]
  note(f"rel err {err:.3e}, per sequence {[f'{e:.2e}' for e in per_seq]}, tolerance {tol}")
  assert err < tol, f"rel err {err:.2e} >= {tol} ({where})"
  worst = int(np.argmax(per_seq))
  assert per_seq[worst] < tol, f"sequence {worst}: rel err {per_seq[worst]:.2e} >= {tol} ({where})"

  if lse is not None:
    lse = np.asarray(lse)
    assert lse.shape == (p.num_heads, q.shape[0]) and lse.dtype == np.float32, \
        f"lse {lse.shape} {lse.dtype} ({where})"
    inf_ref = np.isinf(ref_lse)
    np.testing.assert_array_equal(np.isposinf(lse), inf_ref, err_msg=f"+inf LSE rows differ ({where})")
    np.testing.assert_allclose(lse[~inf_ref], ref_lse[~inf_ref], rtol=2e-3, atol=2e-3,
                               err_msg=f"LSE ({where})")
  return err


# Known-tricky cases, run on every backend before the drawn ones (fp16 / fp32 only, so they also run
# under Triton's interpreter).
TRICKY = [
    # Rows that see no key: 6 queries over 3 keys with window (0, 0) (the first 3 rows are empty).
    (Problem(seqlens_q=(6, 2), seqlens_k=(3, 40), window=(0, 0), pad_q=2, seed=1), "none"),
    # Zero-length sequences on both sides, ALiBi per batch, exact max_seqlen bounds.
    (Problem(seqlens_q=(0, 4, 3, 0), seqlens_k=(5, 0, 20, 0), causal=True, alibi="batch", seed=2),
     "exact"),
    # No sequence has a key: every row empty, the block table's only column is padding.
    (Problem(seqlens_q=(3, 1), seqlens_k=(0, 0), extra_blocks=1, spare_pages=1, layout="HND",
             num_heads=2, num_kv_heads=1, head_dim=32, seed=3), "exact"),
    # Non-paged with an empty key sequence; causal with a right window the API must force to 0.
    (Problem(seqlens_q=(2, 5, 1), seqlens_k=(0, 17, 9), paged=False, causal=True, window=(3, 7),
             dtype="float32", head_dim=80, num_heads=6, num_kv_heads=3, seed=4), "loose"),
    # Keys exactly filling pages, decode, peaky softmax (scale 2, D 128), softcap, stacked fused.
    (Problem(seqlens_q=(1, 1, 1), seqlens_k=(16, 8, 24), block_size=8, extra_blocks=0,
             layout="stacked_fused_kv_major", head_dim=128, softmax_scale=2.0, softcap=5.0,
             num_heads=8, num_kv_heads=2, causal=True, seed=5), "none"),
]


def _with_examples(test):
  for p, bounds in TRICKY:
    test = example(p=p, bounds=bounds)(test)
  return test


# ---- property 1: every backend matches the oracle ---------------------------------------------------
def _oracle_property(backend: str):
  @_marks(backend)
  @_seeded(f"oracle-{backend}")
  @settings(PROFILE, max_examples=N_ORACLE)
  @given(p=problems(dtypes=backend_dtypes(backend)), bounds=st.sampled_from(SEQLEN_BOUNDS))
  @_with_examples
  def test(p, bounds):
    _note_seed()
    check_against_oracle(backend, p, bounds)

  test.__name__ = test.__qualname__ = f"test_matches_oracle_{backend}"
  return test


test_matches_oracle_xla = _oracle_property("xla")
test_matches_oracle_pallas = _oracle_property("pallas")
test_matches_oracle_triton = _oracle_property("triton")


# ---- property 2: check_inputs accepts every valid problem -------------------------------------------
@_seeded("check_inputs")
@settings(PROFILE, max_examples=N_CHECKS)
@given(p=problems(), bounds=st.sampled_from(SEQLEN_BOUNDS))
@_with_examples
def test_check_inputs_accepts_valid_problems(p, bounds):
  _note_seed()
  note(describe(p, bounds))
  kwargs, _ = make_problem(p)
  check_inputs(**kwargs, **seqlen_bounds(p, bounds))


# ---- property 3: identical inputs, bitwise-identical outputs ----------------------------------------
def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _determinism_property(backend: str):
  @_marks(backend)
  @_seeded(f"determinism-{backend}")
  @settings(PROFILE, max_examples=N_DETERMINISM)
  @given(p=problems(dtypes=backend_dtypes(backend)), bounds=st.sampled_from(SEQLEN_BOUNDS))
  def test(p, bounds):
    _note_seed()
    where = f"backend={backend!r}, {describe(p, bounds)}"
    note(where)
    kwargs, _ = make_problem(p)
    extra = seqlen_bounds(p, bounds)
    first = _call(backend, kwargs, extra, where)
    copies = {k: (jnp.array(v, copy=True) if isinstance(v, jax.Array) else v) for k, v in kwargs.items()}
    second = _call(backend, copies, extra, where + " (second call)")
    first, second = (first, second) if p.return_lse else ((first,), (second,))
    for name, a, b in zip(("out", "lse"), first, second):
      a, b = _bits(a), _bits(b)
      diff = np.argwhere(a != b)
      assert not len(diff), f"{name} differs between identical calls at {tuple(int(i) for i in diff[0])} " \
          f"({len(diff)} elements) ({where})"

  test.__name__ = test.__qualname__ = f"test_deterministic_{backend}"
  return test


test_deterministic_xla = _determinism_property("xla")
test_deterministic_pallas = _determinism_property("pallas")
test_deterministic_triton = _determinism_property("triton")
