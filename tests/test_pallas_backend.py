"""The shared suite on the Pallas backend (Triton lowering on a GPU, interpret mode elsewhere), plus
its Config, and a CPU-side check that every kernel variant lowers through Pallas's Triton lowering
and compiles for the H100 (sm_90)."""

import jax
import jax.numpy as jnp
import pytest

from jax_varlen_attn.validation import AttentionArgs, validate
from jax_varlen_attn.backends.pallas import Config, attention
from jax_varlen_attn.spec import AttentionSpec
from tests.attention_suite import AttentionSuite
from tests.conftest import HAS_GPU
from tests.problems import Problem, make_problem


class TestPallas(AttentionSuite):
  backend = "pallas"
  # Interpret mode is slow: both fp8 formats, scalar and per-(sequence, head) descales, paged and
  # non-paged, an fp8 q; sinks with LSE, on rows that see no key, with fp8 (the xla and triton
  # suites run every case).
  fp8_cases = ("e4m3_nhd_causal", "e5m2_hnd_window_scalar", "e4m3_stacked_gqa8_decode", "e4m3_non_paged",
               "e4m3_q_and_cache", "bf16_q_e4m3")
  sink_cases = ("causal_lse", "empty_rows", "zero_lengths", "softcap_alibi_fp8")

  @pytest.mark.parametrize("config", [
      Config(block_q=3, block_k=16),  # 6 rows of a 16-row tile, many small key steps
      Config(block_q=1, block_k=128),  # one token a program, a key step wider than the sequences
      Config(block_q=40, block_k=32, num_warps=8, num_stages=3),  # a tile spanning whole sequences
  ])
  def test_non_default_config(self, config):
    self.check(self.problem(causal=True, window=(25, -1), alibi="batch"), config=config)

  def test_single_page_tiles(self):
    """block_k dividing the page size: one scalar block-table lookup per key tile."""
    self.check(self.problem(block_size=32, layout="HND", window=(9, 3)), config=Config(block_k=16))

  def test_group_not_a_power_of_two(self):
    """6 q heads on 2 kv heads: tile rows past block_q * 3 are padding."""
    self.check(self.problem(num_heads=6, num_kv_heads=2, causal=True, alibi="head"))


def _spec(**overrides) -> AttentionSpec:
  fields = dict(total_q=26, num_heads=4, num_kv_heads=2, head_dim=64, batch=4, layout=None,
                max_blocks=0, total_k=100, max_seqlen_q=26, max_seqlen_k=100, scale=0.125,
                causal=False, window_left=-1, window_right=-1, softcap=0.0, has_alibi=False,
                return_lse=True, dtype="float16")
  fields.update(overrides)
  return AttentionSpec(**fields)


@pytest.mark.parametrize("bad", [
    dict(block_q=0), dict(block_q=2000), dict(block_q=1.5), dict(block_q=True),
    dict(block_k=8), dict(block_k=48), dict(block_k="64"),
    dict(num_warps=3), dict(num_warps=0), dict(num_stages=0), dict(num_stages=2.0),
])
def test_config_rejects_bad_values(bad):
  with pytest.raises(ValueError, match="Config"):
    Config(**bad)


def test_config_default_heuristics():
  decode = Config.get_default(_spec(total_q=64, batch=64, max_seqlen_q=1))
  assert decode.block_q * 2 == 16  # one token's 2 heads, tile filled to tl.dot's 16 rows
  prefill = Config.get_default(_spec(total_q=4096, batch=2, max_seqlen_q=4096, head_dim=128))
  assert (prefill.block_q, prefill.block_k, prefill.num_warps) == (64, 64, 8)
  wide = Config.get_default(_spec(total_q=4096, batch=2, max_seqlen_q=4096, head_dim=256))
  assert wide.block_q * 2 == 64 and wide.block_k == 32
  mqa = Config.get_default(_spec(num_heads=64, num_kv_heads=1, total_q=8, batch=8, max_seqlen_q=1))
  assert mqa.block_q == 1  # the group alone fills the tile
  assert Config(block_q=5).resolved(_spec()).block_q == 5  # explicit fields are kept


# ---- the GPU lowering, checked on the CPU ---------------------------------------------------------

# (name, Problem overrides, Config or None): every branch of the kernel the statics select.
LOWERING_VARIANTS = [
    ("nhd-causal", dict(causal=True), None),
    ("strided-window", dict(layout="strided", window=(8, 4)), None),
    ("stacked-fused-alibi-softcap", dict(layout="stacked_fused_kv_major", alibi="batch", softcap=5.0,
                                         causal=True), None),
    ("non-paged", dict(paged=False, causal=True, return_lse=False), None),
    ("bf16-d80-gqa3", dict(dtype="bfloat16", head_dim=80, num_heads=6, num_kv_heads=2,
                           causal=True), None),
    ("fp32-d64", dict(dtype="float32", causal=True), None),
    ("d192-gqa8-prefill", dict(head_dim=192, num_heads=8, num_kv_heads=1, causal=True,
                               seqlens_q=(300, 40), seqlens_k=(300, 90)), None),
    ("hnd-single-page-tiles", dict(layout="HND", block_size=32, causal=True), Config(block_k=32)),
    ("fp8-e4m3-decode-sinks", dict(kv_dtype="float8_e4m3fn", sinks=True, head_dim=128, seqlens_q=(1, 1, 1),
                                   seqlens_k=(40, 7, 33), causal=True), None),
    ("fp8-q-e5m2-strided-softcap", dict(dtype="float8_e5m2", kv_dtype="float8_e5m2", layout="strided",
                                        softcap=5.0, window=(8, 4)), None),
    ("bf16-fp8-e4m3-prefill", dict(dtype="bfloat16", kv_dtype="float8_e4m3fn", head_dim=128, causal=True,
                                   seqlens_q=(300, 40), seqlens_k=(300, 90)), None),
]


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the suite above runs the real lowering")
@pytest.mark.parametrize("name,overrides,config", LOWERING_VARIANTS, ids=[v[0] for v in LOWERING_VARIANTS])
def test_triton_lowering_compiles_for_sm90(name, overrides, config, tmp_path, monkeypatch):
  """Lowers the pallas_call for CUDA on this CPU machine, captures the Triton IR that Pallas's
  Triton lowering emits, and compiles it for sm_90 with the installed Triton: catches kernels that
  interpret mode accepts but the Triton lowering or compiler rejects (shapes, dtypes, ops)."""
  triton = pytest.importorskip("triton")
  from triton.backends.compiler import GPUTarget
  try:
    from jax._src.pallas.triton import pallas_call_registration as registration
    lower_module = registration.lowering.lower_jaxpr_to_triton_module
  except (ImportError, AttributeError) as e:  # a private hook: JAX may move it
    pytest.skip(f"Pallas's Triton lowering hook is not where this test looks ({e})")
  monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a fresh cache: really compile
  monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
  modules = []

  def capture(*args, **kwargs):
    result = lower_module(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
  kwargs, _ = make_problem(Problem(**overrides))
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
  if "layer" in kwargs:
    arrays["layer"] = jnp.asarray(kwargs["layer"])
  static = {k: v for k, v in kwargs.items() if k not in arrays}
  config = config or Config()

  resolved = []

  def f(arrays):
    params = dict(max_seqlen_q=None, max_seqlen_k=None, cu_seqlens_k=None, seqused_k=None,
                  alibi_slopes=None, block_table=None, layer=None, kv_layout="NHD")
    params.update(static)
    params.update(arrays)
    spec, normalized = validate(AttentionArgs(**params))
    resolved.append(config.resolved(spec))
    return attention(spec, normalized, resolved[-1])  # backends take a resolved config (api resolves)

  jax.jit(f).trace(arrays).lower(lowering_platforms=("cuda",))
  assert len(modules) == 1, "expected one Triton module (one pallas_call lowered for CUDA)"
  path = tmp_path / f"{name}.ttir"
  path.write_text(modules[0])
  compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=resolved[0].num_warps,
                                         num_stages=resolved[0].num_stages))
  assert compiled.asm.get("cubin"), "no cubin"
  # The H100 has 227 KB of shared memory per block.
  assert compiled.metadata.shared <= 227 * 1024, f"{compiled.metadata.shared} bytes of shared memory"
