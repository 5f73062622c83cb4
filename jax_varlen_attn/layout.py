"""Where a paged KV cache keeps element (page, token, kv_head, dim): the one place strides are computed.

A layout is static (hashable, frozen): under `jax.jit` it is part of the compile key, and the Triton
backend turns its strides into `tl.constexpr`s, so a strided cache costs no runtime-stride arithmetic.

Addresses are in elements of the *flat* buffer, i.e. the row-major flattening of the array the caller
passed as `k` (and `v`, unless V lives in the same buffer). `dim` always has stride 1, and every other
stride and offset is a multiple of `head_dim`: a layout therefore addresses whole rows of `head_dim`
contiguous elements, which is what lets the XLA backend gather rows instead of single elements.

Named forms (``kv_layout=`` strings) and the arrays they expect:

| name | k | v | page stride |
| --- | --- | --- | --- |
| ``"NHD"`` | ``[num_blocks, block_size, Hk, D]`` | same shape | ``block_size*Hk*D`` |
| ``"HND"`` | ``[num_blocks, Hk, block_size, D]`` | same shape | ``Hk*block_size*D`` |
| ``"fused_page_major"`` | ``[num_blocks, 2, block_size, Hk, D]`` | ``None`` | ``2*block_size*Hk*D`` |
| ``"fused_kv_major"`` | ``[2, num_blocks, block_size, Hk, D]`` | ``None`` | ``block_size*Hk*D`` |

Anything else is a `KVCacheLayout(...)`, e.g. pages every `page_stride` elements of a larger storage.
With ``layer=`` (a traced int32 scalar) the arrays carry a leading ``[L]`` axis of layers; the layer
offset is added at run time, never by slicing the cache (a slice is a copy of it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple, Union

NAMED_LAYOUTS = ("NHD", "HND", "fused_page_major", "fused_kv_major")


@dataclasses.dataclass(frozen=True)
class KVCacheLayout:
  """Static address map of a paged KV cache, in elements of the flat k / v buffers.

  Element (page p, token t, kv head h, dim d) of K lives at
  ``layer * layer_stride + k_offset + p * page_stride + t * token_stride + h * head_stride + d``
  of the flat `k` buffer; V likewise at `v_offset`, in the `k` buffer when `fused` else in `v`.

  Construct it directly for a custom cache (the caller's arrays may then have any shape; only
  their size matters), or let `resolve` build one from a named form and the arrays' shapes.
  Fields left as None (`num_pages`) are derived from the buffer size by `resolve`.

  Example: two caches, each every other page of a storage twice as large::

      storage_k = jnp.zeros((2 * num_blocks, block_size, Hk, D), jnp.float16)
      layout = KVCacheLayout(block_size=block_size, num_kv_heads=Hk, head_dim=D,
                             page_stride=2 * block_size * Hk * D)
  """

  block_size: int
  num_kv_heads: int
  head_dim: int
  page_stride: int
  token_stride: Optional[int] = None  # default: Hk * D (token-major pages, as NHD)
  head_stride: Optional[int] = None  # default: D
  k_offset: int = 0
  v_offset: int = 0
  fused: bool = False  # V lives in the k buffer (v is None)
  num_pages: Optional[int] = None  # pages a block-table entry may name; None: as many as fit
  layer_stride: int = 0  # elements between layers of a stacked cache; 0: not stacked
  num_layers: int = 0
  name: str = "custom"

  def __post_init__(self):
    for field in ("block_size", "num_kv_heads", "head_dim", "page_stride"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"KVCacheLayout.{field} must be a positive int, got {value!r}")
    if self.token_stride is None:
      object.__setattr__(self, "token_stride", self.num_kv_heads * self.head_dim)
    if self.head_stride is None:
      object.__setattr__(self, "head_stride", self.head_dim)
    for field in ("token_stride", "head_stride", "k_offset", "v_offset", "layer_stride"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"KVCacheLayout.{field} must be a non-negative int, got {value!r}")
      if value % self.head_dim:
        raise ValueError(
            f"KVCacheLayout.{field}={value} must be a multiple of head_dim={self.head_dim}: "
            "a layout addresses whole rows of head_dim contiguous elements")
    if self.page_stride % self.head_dim:
      raise ValueError(f"KVCacheLayout.page_stride={self.page_stride} must be a multiple of "
                       f"head_dim={self.head_dim}")
    if self.num_pages is not None and (not isinstance(self.num_pages, int) or isinstance(self.num_pages, bool)
                                       or self.num_pages <= 0):
      raise ValueError(f"KVCacheLayout.num_pages must be a positive int or None, got {self.num_pages!r}")
    # fused decides where V is read from: a truthy non-bool ("yes", 1) would be a silent guess.
    if not isinstance(self.fused, bool):
      raise TypeError(f"KVCacheLayout.fused must be a bool, got {type(self.fused).__name__}")
    if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 0:
      raise ValueError(f"KVCacheLayout.num_layers must be a non-negative int, got {self.num_layers!r}")

  # ---- derived static facts -------------------------------------------------------------------
  @property
  def stacked(self) -> bool:
    return self.num_layers > 0

  @property
  def is_contiguous(self) -> bool:
    """Token-major pages packed back to back: the address is the row id ``page*block_size+t``."""
    row = self.num_kv_heads * self.head_dim
    return (self.token_stride == row and self.head_stride == self.head_dim
            and self.page_stride == self.block_size * row)

  def page_span(self) -> int:
    """Elements from the first to one past the last element of one page of K (or V)."""
    return ((self.block_size - 1) * self.token_stride + (self.num_kv_heads - 1) * self.head_stride
            + self.head_dim)

  def strides_in_rows(self) -> dict:
    """Strides and offsets in rows of `head_dim` elements (the XLA backend gathers rows)."""
    d = self.head_dim
    return dict(page=self.page_stride // d, token=self.token_stride // d, head=self.head_stride // d,
                k_offset=self.k_offset // d, v_offset=self.v_offset // d, layer=self.layer_stride // d)

  def with_layers(self, num_layers: int, layer_stride: int) -> "KVCacheLayout":
    return dataclasses.replace(self, num_layers=num_layers, layer_stride=layer_stride)


ArrayShape = Tuple[int, ...]

# (rank, axes) of k for each named form, one layer.
_NAMED_FORMS = {
    "NHD": (4, "[num_blocks, block_size, num_kv_heads, head_dim]"),
    "HND": (4, "[num_blocks, num_kv_heads, block_size, head_dim]"),
    "fused_page_major": (5, "[num_blocks, 2, block_size, num_kv_heads, head_dim]"),
    "fused_kv_major": (5, "[2, num_blocks, block_size, num_kv_heads, head_dim]"),
}


def named_form(name: str) -> str:
  """The axes of k in the named form `name` (one layer), e.g. "[num_blocks, block_size, ...]"."""
  return _NAMED_FORMS[name][1]


def _named(name: str, k_shape: ArrayShape, v_shape: Optional[ArrayShape]) -> KVCacheLayout:
  """The layout of a named form, read off the (per-layer) shapes of k and v."""
  fused = name.startswith("fused")
  if fused and v_shape is not None:
    raise ValueError(f"kv_layout={name!r} keeps K and V in one array: pass it as k and v=None")
  if not fused and v_shape is None:
    raise ValueError(f"v is None, but kv_layout={name!r} takes separate k and v arrays; "
                     "pass v, or use kv_layout='fused_page_major' / 'fused_kv_major'")
  if not fused and tuple(v_shape) != tuple(k_shape):
    raise ValueError(f"v must have the shape of k for kv_layout={name!r}: k {k_shape}, v {v_shape}")
  if 0 in k_shape:
    # Caught here rather than by KVCacheLayout.__post_init__, whose message would name a field the
    # caller never wrote.
    raise ValueError(f"k for kv_layout={name!r} must have no empty axis (num_blocks, block_size, "
                     f"num_kv_heads, head_dim >= 1), got shape {k_shape}")
  if name == "NHD":
    n, bs, hk, d = k_shape
    return KVCacheLayout(bs, hk, d, page_stride=bs * hk * d, num_pages=n, name=name)
  if name == "HND":
    n, hk, bs, d = k_shape
    return KVCacheLayout(bs, hk, d, page_stride=hk * bs * d, token_stride=d, head_stride=bs * d,
                         num_pages=n, name=name)
  if name == "fused_page_major":
    n, two, bs, hk, d = k_shape
    if two != 2:
      raise ValueError(f"k for kv_layout='fused_page_major' must have 2 at axis 1 (K, V), got {k_shape}")
    return KVCacheLayout(bs, hk, d, page_stride=2 * bs * hk * d, v_offset=bs * hk * d, fused=True,
                         num_pages=n, name=name)
  two, n, bs, hk, d = k_shape
  if two != 2:
    raise ValueError(f"k for kv_layout='fused_kv_major' must have 2 at axis 0 (K, V), got {k_shape}")
  return KVCacheLayout(bs, hk, d, page_stride=bs * hk * d, v_offset=n * bs * hk * d, fused=True,
                       num_pages=n, name=name)


def resolve(kv_layout: Union[str, KVCacheLayout], k_shape: Sequence[int],
            v_shape: Optional[Sequence[int]], stacked: bool) -> KVCacheLayout:
  """Turns `kv_layout` and the shapes of k / v into a complete, checked `KVCacheLayout`.

  With `stacked` (a `layer=` was passed) the arrays carry a leading [L] axis of layers.
  Raises ValueError when the buffers cannot hold what the layout addresses.
  """
  k_shape = tuple(int(s) for s in k_shape)
  v_shape = None if v_shape is None else tuple(int(s) for s in v_shape)
  if isinstance(kv_layout, str) and kv_layout in NAMED_LAYOUTS:
    # The rank is checked on the shape the caller passed (before the layer axis is taken off), so
    # the message shows their shape and says whether layer= is what is missing or extra.
    rank, form = _NAMED_FORMS[kv_layout]
    if stacked:
      rank, form = rank + 1, "[num_layers, " + form[1:]
    if len(k_shape) != rank:
      hint = ""
      if not stacked and len(k_shape) == rank + 1:
        hint = "; a layer-stacked cache [num_layers, ...] also needs layer="
      elif stacked and len(k_shape) == rank - 1:
        hint = "; with layer= the cache needs a leading [num_layers] axis (or drop layer=)"
      raise ValueError(f"k for kv_layout={kv_layout!r}{' with layer=' if stacked else ''} must be {form} "
                       f"(rank {rank}), got shape {k_shape}{hint}")
  num_layers, layer_stride = 0, 0
  if stacked:
    if len(k_shape) < 2 or k_shape[0] < 1:  # zero layers: nothing for a clamped layer index to read
      raise ValueError(f"with layer= the cache k must be [num_layers >= 1, ...], got shape {k_shape}")
    if v_shape is not None and (len(v_shape) < 1 or v_shape[0] != k_shape[0]):
      raise ValueError(f"with layer= k and v must have the same number of layers (axis 0): "
                       f"k {k_shape}, v {v_shape}")
    num_layers, layer_stride = k_shape[0], math.prod(k_shape[1:])
    k_shape = k_shape[1:]
    v_shape = None if v_shape is None else v_shape[1:]

  if isinstance(kv_layout, str):
    if kv_layout not in NAMED_LAYOUTS:
      raise ValueError(f"kv_layout must be one of {NAMED_LAYOUTS} or a KVCacheLayout, got {kv_layout!r}")
    layout = _named(kv_layout, k_shape, v_shape)
  elif isinstance(kv_layout, KVCacheLayout):
    layout = kv_layout
    if layout.stacked:
      raise ValueError("pass an unstacked KVCacheLayout; layer= and the arrays' leading axis stack it")
    if layout.fused != (v_shape is None):
      raise ValueError(f"KVCacheLayout(fused={layout.fused}) needs "
                       f"{'v=None (V in the k buffer)' if layout.fused else 'a v array'}, got "
                       f"{'v=None' if v_shape is None else 'v of shape ' + str(v_shape)}")
    layout = _with_page_count(layout, k_shape, v_shape)
  else:
    raise TypeError(f"kv_layout must be a str or KVCacheLayout, got {type(kv_layout).__name__}")

  _check_fits(layout, k_shape, v_shape)
  if stacked:
    layout = layout.with_layers(num_layers, layer_stride)
  return layout


def _with_page_count(layout: KVCacheLayout, k_shape, v_shape) -> KVCacheLayout:
  """Fills in num_pages from the buffer sizes: the most pages whose K and V both fit."""
  if layout.num_pages is not None:
    return layout
  k_size = math.prod(k_shape)
  v_size = k_size if v_shape is None else math.prod(v_shape)
  span = layout.page_span()
  fit = min((k_size - layout.k_offset - span) // layout.page_stride,
            (v_size - layout.v_offset - span) // layout.page_stride) + 1
  if fit <= 0:
    raise ValueError(f"kv_layout {layout} addresses no whole page inside k (size {k_size}) / "
                     f"v (size {v_size})")
  return dataclasses.replace(layout, num_pages=fit)


def _check_fits(layout: KVCacheLayout, k_shape, v_shape) -> None:
  """Every element of every addressable page lies inside its buffer (so clamped reads stay in)."""
  k_size = math.prod(k_shape)
  v_size = k_size if v_shape is None else math.prod(v_shape)
  last = (layout.num_pages - 1) * layout.page_stride + layout.page_span()
  for which, offset, size in (("k", layout.k_offset, k_size), ("v", layout.v_offset, v_size)):
    if offset + last > size:
      raise ValueError(f"kv_layout addresses {offset + last} elements of {which} (page {layout.num_pages - 1}"
                       f" ends there) but {which} holds {size}")
  for which, size in (("k", k_size), ("v", v_size)):
    if size % layout.head_dim:
      raise ValueError(f"{which} holds {size} elements, not a whole number of head_dim={layout.head_dim} rows")
