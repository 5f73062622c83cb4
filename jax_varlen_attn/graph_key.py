"""`graph_key(graphdef)`: a Flax NNX `GraphDef` as a static jit argument that hashes in O(1).

A jitted function with a static argument hashes it (and compares it with the cached one) on every
call. nnx's `GraphDef` does both by walking the whole module structure: 2.4 ms a call for the
28-layer serving model on a CPU core, more than the rest of a decode call's dispatch
(benchmarks/NOTES.md, "where a decode call's time goes on the host"). `graph_key` wraps a graphdef
once in a `GraphKey`, whose hash is computed once and whose equality is identity; equal graphdefs
(another `nnx.split` of the same model) map to the same key, so they share one compile.

    key = graph_key(graphdef)       # first sight of this object: one full hash
    model = nnx.merge(key.graphdef, state)
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Dict, Tuple

import jax

# Keys by id() of graphdef objects seen lately (the fast path; each entry holds its graphdef, so an
# id is not reused while its entry lives), and by value (one key for equal graphdefs).
_BY_ID: "collections.OrderedDict[int, Tuple[Any, GraphKey]]" = collections.OrderedDict()
_BY_VALUE: Dict[Any, "GraphKey"] = {}
_RECENT = 64  # ids remembered: models an interpreter alternates between


class GraphKey:
  """A graphdef with a precomputed hash and identity equality (make it with `graph_key`)."""

  __slots__ = ("graphdef", "_hash")

  def __init__(self, graphdef):
    self.graphdef = graphdef
    self._hash = hash(graphdef)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return self is other

  def __repr__(self) -> str:
    return f"GraphKey({type(self.graphdef).__name__}, hash={self._hash})"


def graph_key(graphdef) -> GraphKey:
  """The `GraphKey` of `graphdef` (itself if it is one already): the same key for equal graphdefs."""
  if isinstance(graphdef, GraphKey):
    return graphdef
  hit = _BY_ID.get(id(graphdef))
  if hit is not None and hit[0] is graphdef:
    _BY_ID.move_to_end(id(graphdef))
    return hit[1]
  key = _BY_VALUE.get(graphdef)
  if key is None:
    key = _BY_VALUE.setdefault(graphdef, GraphKey(graphdef))
  _BY_ID[id(graphdef)] = (graphdef, key)
  while len(_BY_ID) > _RECENT:
    _BY_ID.popitem(last=False)
  return key


class KeyedJit:
  """`jax.jit(fun, static_argnums=0, ...)` called with a graphdef first: passes `graph_key(graphdef)`
  (`fun` reads `graph_key(arg).graphdef`). `lower` and `_cache_size` as jit's."""

  def __init__(self, fun, **jit_kwargs):
    self._jitted = jax.jit(fun, static_argnums=0, **jit_kwargs)
    functools.update_wrapper(self, fun)

  def __call__(self, graphdef, *args, **kwargs):
    return self._jitted(graph_key(graphdef), *args, **kwargs)

  def lower(self, graphdef, *args, **kwargs):
    return self._jitted.lower(graph_key(graphdef), *args, **kwargs)

  def _cache_size(self) -> int:
    return self._jitted._cache_size()
