"""KVCacheLayout: strides of the named forms, derived facts, and its use as a static (jit) argument.

Stride values are checked two ways: against the table of docs/contract.md ("Cache layouts"), and against NumPy's own
indexing of an `arange` buffer in the named shape (so a layout that names the wrong element fails
whatever its stride arithmetic says).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_varlen_attn import NAMED_LAYOUTS, KVCacheLayout
from jax_varlen_attn.layout import resolve

N, BS, HK, D = 5, 4, 3, 32  # pages, tokens per page, kv heads, head_dim (all distinct on purpose)
SHAPES = {"NHD": (N, BS, HK, D), "HND": (N, HK, BS, D), "fused_page_major": (N, 2, BS, HK, D),
          "fused_kv_major": (2, N, BS, HK, D)}


def named(name, num_layers=0):
  shape = SHAPES[name]
  if num_layers:
    shape = (num_layers,) + shape
  v_shape = None if name.startswith("fused") else shape
  return resolve(name, shape, v_shape, stacked=num_layers > 0)


def element(name, buf, p, t, h, d, which):
  """Element (page p, token t, head h, dim d) of K (which=0) or V (1) of a named-form buffer, by NumPy."""
  if name == "NHD":
    return buf[which][p, t, h, d]
  if name == "HND":
    return buf[which][p, h, t, d]
  if name == "fused_page_major":
    return buf[p, which, t, h, d]
  return buf[which, p, t, h, d]


def address(layout, p, t, h, d, which, layer=0):
  offset = layout.v_offset if which else layout.k_offset
  return (layer * layout.layer_stride + offset + p * layout.page_stride + t * layout.token_stride
          + h * layout.head_stride + d)


# docs/contract.md, "Cache layouts": page stride, token stride, head stride, V offset, fused.
EXPECTED = {
    "NHD": (BS * HK * D, HK * D, D, 0, False),
    "HND": (HK * BS * D, D, BS * D, 0, False),
    "fused_page_major": (2 * BS * HK * D, HK * D, D, BS * HK * D, True),
    "fused_kv_major": (BS * HK * D, HK * D, D, N * BS * HK * D, True),
}


@pytest.mark.parametrize("name", NAMED_LAYOUTS)
def test_named_strides(name):
  lay = named(name)
  assert (lay.page_stride, lay.token_stride, lay.head_stride, lay.v_offset, lay.fused) == EXPECTED[name]
  assert (lay.block_size, lay.num_kv_heads, lay.head_dim, lay.num_pages) == (BS, HK, D, N)
  assert lay.k_offset == 0 and not lay.stacked and lay.name == name


@pytest.mark.parametrize("name", NAMED_LAYOUTS)
def test_named_addresses_match_numpy_indexing(name):
  lay = named(name)
  size = math.prod(SHAPES[name])
  if lay.fused:
    buf = np.arange(size).reshape(SHAPES[name])
  else:  # V gets its own buffer, numbered from 0 like K (addresses are per buffer)
    buf = np.arange(size).reshape(SHAPES[name]), np.arange(size).reshape(SHAPES[name])
  for p in range(N):
    for t in range(BS):
      for h in range(HK):
        for which in (0, 1):
          for d in (0, D - 1):
            assert address(lay, p, t, h, d, which) == element(name, buf, p, t, h, d, which), (p, t, h, d, which)


@pytest.mark.parametrize("name", NAMED_LAYOUTS)
def test_stacked_named(name):
  """A layer-stacked cache: layer_stride is the size of one layer, and addresses step over layers."""
  L = 3
  lay = named(name, num_layers=L)
  assert lay.stacked and lay.num_layers == L
  assert lay.layer_stride == math.prod(SHAPES[name])
  assert dataclasses.replace(lay, num_layers=0, layer_stride=0) == named(name)
  shape = (L,) + SHAPES[name]
  stack = np.arange(math.prod(shape)).reshape(shape)
  for layer in range(L):
    buf = stack[layer] if lay.fused else (stack[layer], stack[layer])
    for which in (0, 1):
      assert (address(lay, N - 1, BS - 1, HK - 1, D - 1, which, layer)
              == element(name, buf, N - 1, BS - 1, HK - 1, D - 1, which))


def test_stacked_custom_layer_stride_is_per_layer_size():
  """Any per-layer shape (here a flat buffer per layer) stacks by its element count."""
  base = KVCacheLayout(block_size=BS, num_kv_heads=HK, head_dim=D, page_stride=2 * BS * HK * D)
  lay = resolve(base, (7, 2 * N * BS * HK * D), (7, 2 * N * BS * HK * D), stacked=True)
  assert (lay.num_layers, lay.layer_stride, lay.num_pages) == (7, 2 * N * BS * HK * D, N)


@pytest.mark.parametrize("name,contiguous", [("NHD", True), ("fused_kv_major", True), ("HND", False),
                                             ("fused_page_major", False)])
def test_is_contiguous_named(name, contiguous):
  assert named(name).is_contiguous is contiguous
  assert named(name, num_layers=2).is_contiguous is contiguous  # stacking adds a layer offset only


def test_is_contiguous_custom():
  row = HK * D
  strided = KVCacheLayout(BS, HK, D, page_stride=2 * BS * row, k_offset=BS * row, v_offset=BS * row)
  assert not strided.is_contiguous
  packed_with_offset = KVCacheLayout(BS, HK, D, page_stride=BS * row, k_offset=3 * BS * row)
  assert packed_with_offset.is_contiguous  # row id + a constant offset: still the row-id address
  padded_tokens = KVCacheLayout(BS, HK, D, page_stride=BS * (row + D), token_stride=row + D)
  assert not padded_tokens.is_contiguous


def test_defaults_are_token_major():
  lay = KVCacheLayout(block_size=BS, num_kv_heads=HK, head_dim=D, page_stride=BS * HK * D)
  assert (lay.token_stride, lay.head_stride, lay.k_offset, lay.v_offset) == (HK * D, D, 0, 0)
  assert not lay.fused and not lay.stacked and lay.num_pages is None and lay.name == "custom"


def test_frozen_and_hashable():
  a = KVCacheLayout(BS, HK, D, page_stride=2 * BS * HK * D)
  b = KVCacheLayout(BS, HK, D, page_stride=2 * BS * HK * D)
  c = KVCacheLayout(BS, HK, D, page_stride=3 * BS * HK * D)
  assert a == b and hash(a) == hash(b) and a != c
  assert len({a, b, c, named("NHD"), named("NHD")}) == 3
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.page_stride = 0


def test_jit_static_argument():
  """Equal layouts share one compilation; a different layout is a different program."""
  traces = []

  @functools.partial(jax.jit, static_argnums=1)
  def first_rows(buf, layout):
    traces.append(layout)
    st = layout.strides_in_rows()
    return buf.reshape(-1, layout.head_dim)[st["k_offset"] + st["page"] * jnp.arange(layout.num_pages)]

  buf = jnp.arange(math.prod(SHAPES["HND"]), dtype=jnp.float32).reshape(SHAPES["HND"])
  out = first_rows(buf, named("HND"))
  first_rows(buf, named("HND"))  # an equal object built anew: no retrace
  assert len(traces) == 1
  np.testing.assert_array_equal(out, np.asarray(buf)[:, 0, 0, :])  # page p, head 0, token 0
  first_rows(buf, dataclasses.replace(named("HND"), k_offset=D))
  assert len(traces) == 2


def test_num_pages_derived_for_strided_storage():
  """Pages every other page of a storage twice as large, from the second: as many as fit."""
  span = BS * HK * D
  storage = (2 * N, BS, HK, D)
  odd = KVCacheLayout(BS, HK, D, page_stride=2 * span, k_offset=span, v_offset=span)
  assert resolve(odd, storage, storage, stacked=False).num_pages == N
  even = KVCacheLayout(BS, HK, D, page_stride=2 * span)
  assert resolve(even, storage, storage, stacked=False).num_pages == N
  every = KVCacheLayout(BS, HK, D, page_stride=span)
  assert resolve(every, storage, storage, stacked=False).num_pages == 2 * N
  # The smaller of K and V decides, and only whole pages count.
  assert resolve(every, storage, (2 * N * span - D,), stacked=False).num_pages == 2 * N - 1
  # Fused, V half a storage after K: both must fit.
  fused = KVCacheLayout(BS, HK, D, page_stride=span, v_offset=N * span, fused=True)
  assert resolve(fused, storage, None, stacked=False).num_pages == N
  # A given num_pages is kept (and checked).
  assert resolve(dataclasses.replace(every, num_pages=3), storage, storage, stacked=False).num_pages == 3


def test_page_span():
  row = HK * D
  assert named("NHD").page_span() == BS * row
  assert named("HND").page_span() == BS * row  # heads outermost, still one dense block
  assert named("fused_page_major").page_span() == BS * row  # K's half of the page
  padded = KVCacheLayout(BS, HK, D, page_stride=BS * (row + D), token_stride=row + D)
  assert padded.page_span() == (BS - 1) * (row + D) + row  # the padding after the last token is not read


def test_strides_in_rows():
  assert named("fused_page_major").strides_in_rows() == dict(
      page=2 * BS * HK, token=HK, head=1, k_offset=0, v_offset=BS * HK, layer=0)
  assert named("HND", num_layers=2).strides_in_rows() == dict(
      page=HK * BS, token=1, head=BS, k_offset=0, v_offset=0, layer=N * HK * BS)
  lay = KVCacheLayout(BS, HK, D, page_stride=6 * D, token_stride=2 * D, head_stride=7 * D, k_offset=5 * D,
                      v_offset=9 * D, layer_stride=11 * D)
  assert lay.strides_in_rows() == dict(page=6, token=2, head=7, k_offset=5, v_offset=9, layer=11)


def test_with_layers():
  lay = named("NHD").with_layers(4, N * BS * HK * D)
  assert lay.stacked and (lay.num_layers, lay.layer_stride) == (4, N * BS * HK * D)
  assert named("NHD").with_layers(0, 0) == named("NHD")
