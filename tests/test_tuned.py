"""The tuned tile table: well-formed, looked up by problem class, never above the caller's fields."""

import json

import pytest

from jax_varlen_attn.backends import device
from jax_varlen_attn.backends.triton import Config, tuned
from tests.problems import static_spec


def spec_for(batch, q_per_seq, pages, head_dim=128):
  return static_spec(batch, pages, q_per_seq=q_per_seq, head_dim=head_dim)


def test_committed_table_is_well_formed():
  doc = tuned._read(tuned.TABLE_PATH)  # raises on a malformed entry or a dangling same_as
  assert doc["devices"] and doc["without_gpu"] in doc["devices"]
  for per_device in doc["devices"].values():
    for key in per_device["table"]:
      regime, d, p, g = key.split("_")
      assert regime in ("decode", "prefill") and d[0] == "d" and p[0] == "p" and g[0] == "g"


def test_table_is_keyed_by_device_kind():
  """A kind's own table, a kind that shares one (same_as), and no table for an unmeasured kind."""
  h100 = tuned.table(kind=device.REFERENCE_KIND)
  assert h100 and tuned.table(kind="NVIDIA H200") == h100
  assert tuned.table(kind=None) == h100  # no GPU: the reference GPU's tiles
  assert tuned.table(kind="NVIDIA GeForce RTX 4090") == {}


def test_an_unmeasured_gpu_gets_the_heuristics(monkeypatch):
  decode = spec_for(256, 1, 256)
  monkeypatch.setattr(device, "device_kind", lambda: "Some Other GPU")
  assert tuned.lookup(decode) is None


@pytest.fixture
def fake_table(tmp_path, monkeypatch):
  path = tmp_path / "tuned.json"
  entries = {tuned.key_of("decode", 128, 16, 2): dict(block_n=32, num_warps=8, num_stages=3),
             tuned.key_of("prefill", 128, 16, 2): dict(block_n=128, num_warps=4, num_stages=2)}
  path.write_text(json.dumps({"devices": {"test GPU": {"table": entries}}, "without_gpu": "test GPU"}))
  monkeypatch.setattr(tuned, "TABLE_PATH", path)
  monkeypatch.setattr(device, "device_kind", lambda: None)  # the file's without_gpu table, on any machine
  return entries


def test_table_entry_applies_to_its_class(fake_table):
  decode = spec_for(256, 1, 256)  # 2304 programs: not latency-bound
  c = Config.get_default(decode)
  assert (c.block_n, c.num_warps, c.num_stages) == (32, 8, 3)
  prefill = spec_for(4, 4096, 256)
  c = Config.get_default(prefill)
  assert (c.block_n, c.num_warps, c.num_stages) == (128, 4, 2)


def test_callers_fields_win_and_other_classes_fall_back(fake_table):
  decode = spec_for(256, 1, 256)
  c = Config(block_n=64, num_stages=2).resolved(decode)
  assert (c.block_n, c.num_warps, c.num_stages) == (64, 8, 2)
  other = spec_for(256, 1, 256, head_dim=64)  # no entry: the heuristic (4096-key decode: 128)
  c = Config.get_default(other)
  assert (c.block_n, c.num_warps) == (128, 4)


def test_latency_rule_still_wins_for_small_grids(fake_table):
  small = spec_for(3, 24, 5)  # seed2-like: 96 programs, far below two waves
  assert Config.get_default(small).block_n == 128


def test_malformed_table_raises(tmp_path, monkeypatch):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"devices": {"g": {"table": {"decode_d128_p16_g2": {
      "block_n": 0, "num_warps": 4, "num_stages": 2}}}}}))
  with pytest.raises(ValueError, match="block_n"):
    tuned.table(path)
