"""Device-side decoding: on-device sampling and a multi-step decode loop over a paged cache.

- `Sampling`: one request's sampling options on the host (greedy by default), checked on creation.
- `sample(logits, key, temperature, top_k, top_p)`: one token per row; greedy where temperature is 0,
  else a draw from softmax(logits / temperature) restricted to the top-k tokens, then to the top-p
  nucleus. Per-row options are arrays (data: changing them never recompiles).
- `decode_loop(graphdef, state, k_cache, v_cache, batch, sampling, steps=N)`: up to N decode steps
  of a `DecoderLM` in one jitted call (`jax.lax.while_loop`, which also ends once every sequence
  is done; or with `check_every=NEVER` a loop of N steps that reads nothing back, so the call
  returns before the GPU is done), sampling on device, writing each step's K / V into the donated
  caches in place, each step's cache slot computed on device from the sequence's position and
  block table.
  `loop_for(rows)` picks its build for a batch size (cuBLAS matmuls for large batches on Hopper).
- `next_batch(batch, tokens, counts, block_table)`: the `DecodeBatch` of the call after it, on device
  (the engine dispatches that call before reading this one's tokens).

Randomness is keyed per token, not per call: the token sampled from the logits at position p of a
sequence uses fold_in(fold_in(key(seed), seq_id), p). A sequence's draws therefore do not depend on
how the host groups steps into calls or sequences into batches: the one-step path
(`serving.serving_step`) and this loop give the same tokens for the same seed.

`jax_varlen_attn.serving` is the host side (scheduler, page allocator, `Engine`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_varlen_attn.graph_key import KeyedJit, graph_key
from jax_varlen_attn.nn import PagedBatch

PAD_TOKEN = -1  # the token output of a finished (or padding) sequence: never a vocabulary id
NO_EOS = -1  # a sequence without an end-of-sequence token (no sampled id equals it)
MODES = ("greedy", "sample", "filter")  # cheapest first; see `sampling_mode`
_SEED_LIMIT = 2**31  # seeds travel as int32


# ---- host-side options ----------------------------------------------------------------------------
def _check_number(name: str, value, integer: bool):
  kinds = (numbers.Integral,) if integer else (numbers.Real,)
  if isinstance(value, bool) or not isinstance(value, kinds):
    raise TypeError(f"{name} must be {'an int' if integer else 'a real number'}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one sequence picks its tokens (host side; `sampling_arrays` turns a batch of them into data).

  temperature: >= 0; 0 is greedy (argmax; top_k / top_p ignored).
  top_k: keep the k most likely tokens; 0 keeps all.
  top_p: then keep the smallest set of most likely tokens whose probability (renormalized after
    top_k) reaches top_p, in (0, 1]; 1 keeps all. Tokens tied with the last one kept are kept too.
  seed: int in [0, 2**31); with the sequence's id it keys every draw (reproducible runs).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    _check_number("temperature", self.temperature, integer=False)
    _check_number("top_k", self.top_k, integer=True)
    _check_number("top_p", self.top_p, integer=False)
    _check_number("seed", self.seed, integer=True)
    if not (np.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not 0 <= self.seed < _SEED_LIMIT:
      raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = Sampling()


class SamplingParams(NamedTuple):
  """Per-sequence sampling options as arrays (S = sequence rows, padding included).

  temperature: f32[S] (0: greedy).   top_k: i32[S] (0: all).   top_p: f32[S] in (0, 1].
  seed: i32[S] and seq_id: i32[S]: the token sampled from the logits at position p of row s uses
    the key fold_in(fold_in(key(seed[s]), seq_id[s]), p).
  """

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array
  seq_id: jax.Array


def sampling_arrays(samplings: Sequence[Sampling], seq_ids: Sequence[int], num_rows: int) -> SamplingParams:
  """NumPy `SamplingParams` for the first len(samplings) rows of `num_rows`; padding rows are greedy."""
  if len(samplings) != len(seq_ids) or len(samplings) > num_rows:
    raise ValueError(f"{len(samplings)} samplings, {len(seq_ids)} seq_ids, {num_rows} rows")
  n = len(samplings)
  temperature = np.zeros(num_rows, np.float32)
  top_k = np.zeros(num_rows, np.int32)
  top_p = np.ones(num_rows, np.float32)
  seed = np.zeros(num_rows, np.int32)
  seq_id = np.zeros(num_rows, np.int32)
  temperature[:n] = [s.temperature for s in samplings]
  top_k[:n] = [s.top_k for s in samplings]
  top_p[:n] = [s.top_p for s in samplings]
  seed[:n] = [s.seed for s in samplings]
  seq_id[:n] = seq_ids
  return SamplingParams(temperature, top_k, top_p, seed, seq_id)


def sampling_mode(temperature, top_k, top_p) -> str:
  """The cheapest `sample` mode right for these (concrete) options: "greedy" when every temperature
  is 0; "sample" when no row with temperature > 0 filters (top_k 0, top_p 1); else "filter" (which
  sorts the vocabulary). Every mode gives each row the same token as "filter" would."""
  t, k, p = (np.asarray(x) for x in (temperature, top_k, top_p))
  hot = t > 0
  if not hot.any():
    return "greedy"
  if not ((k[hot] if k.ndim else k) > 0).any() and ((p[hot] if p.ndim else p) >= 1).all():
    return "sample"
  return "filter"


# ---- sampling on device ---------------------------------------------------------------------------
def _concrete(x) -> Optional[np.ndarray]:
  """x as NumPy where its value is known now (not traced), else None."""
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def _row_option(name: str, value, rows: int, integer: bool) -> jax.Array:
  """A per-row option as [rows] (a scalar is broadcast), dtype-checked: TypeError / ValueError name it."""
  try:
    value = jnp.asarray(value)
  except TypeError as e:
    raise TypeError(f"{name} must be a number or an array, got {value!r}") from e
  want = jnp.integer if integer else jnp.floating
  if not jnp.issubdtype(value.dtype, want):
    raise TypeError(f"{name} must be {'an integer' if integer else 'a floating'} array, got {value.dtype}")
  if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != rows):
    raise ValueError(f"{name} must be a scalar or [{rows}] (one per logits row), got {value.shape}")
  return jnp.broadcast_to(value.astype(jnp.int32 if integer else jnp.float32), (rows,))


def _check_values(temperature, top_k, top_p) -> None:
  """Value checks where the options are concrete (under jit they cannot raise: check on the host)."""
  t, k, p = _concrete(temperature), _concrete(top_k), _concrete(top_p)
  if t is not None and not (np.isfinite(t).all() and (t >= 0).all()):
    raise ValueError(f"temperature must be finite and >= 0, got {t}")
  if k is not None and (k < 0).any():
    raise ValueError(f"top_k must be >= 0 (0: no top-k), got {k}")
  if p is not None and not ((p > 0) & (p <= 1)).all():
    raise ValueError(f"top_p must be in (0, 1], got {p}")


def _row_keys(key, rows: int) -> jax.Array:
  """A typed key array [rows]: `key` split when it is one key, kept when it is one per row."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.dtype != jnp.uint32 or key.ndim == 0:
      raise TypeError(f"key must be a key array (jax.random.key) or raw uint32 key data "
                      f"(jax.random.PRNGKey), got {key.dtype}{list(key.shape)}")
    key = jax.random.wrap_key_data(key)
  if key.ndim == 0:
    return jax.random.split(key, rows)
  if key.shape != (rows,):
    raise ValueError(f"key must be one key or [{rows}] keys (one per logits row), got {key.shape}")
  return key


def token_keys(params: SamplingParams, positions: jax.Array) -> jax.Array:
  """Typed keys [S]: row s's key for the token sampled from its logits at `positions[s]` (i32[S])."""
  def one(seed, seq_id, position):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), seq_id), position)

  return jax.vmap(one)(params.seed, params.seq_id, positions)


def _nucleus_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """f32[S]: the smallest scaled logit each row keeps under top-k, then top-p (scaled: f32[S, V])."""
  vocab = scaled.shape[-1]
  desc = -jnp.sort(-scaled, axis=-1)  # values only: no index sort, no gather back to vocab order
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # tokens top-k keeps
  in_k = jnp.arange(vocab)[None, :] < k[:, None]
  probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)  # renormalized over the top k
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
  kept = jnp.sum(in_k & (before < top_p[:, None]), axis=-1)  # >= 1: the first always qualifies
  return jnp.take_along_axis(desc, (kept - 1)[:, None], axis=-1)[:, 0]


def sample(logits: jax.Array, key, temperature, top_k, top_p, *, mode: Optional[str] = None) -> jax.Array:
  """One token per row: greedy where temperature is 0, else a top-k / top-p restricted draw.

  Args (S rows, V vocabulary):
    logits: f32[S, V] (any float dtype; computed in f32).
    key: one key (split per row) or [S] keys, typed (`jax.random.key`) or raw uint32 data
      (`jax.random.PRNGKey`, [2] or [S, 2]).
    temperature: f32[S] or a scalar, >= 0; row s draws from softmax(logits[s] / temperature[s]).
      0: argmax of logits[s] (top_k / top_p ignored).
    top_k: i32[S] or a scalar, >= 0: keep the top_k largest logits (ties with the k-th kept); 0: all.
    top_p: f32[S] or a scalar in (0, 1]: then keep the smallest prefix of the most likely tokens
      whose renormalized probability reaches top_p (ties with the last kept are kept); 1: all.
    mode: static; "greedy" (every temperature is 0), "sample" (no row filters), "filter" (sorts the
      vocabulary), or None: the cheapest right one where the options are concrete (`sampling_mode`),
      "filter" where they are traced. Every mode that is right for the options gives the same tokens.

  Returns:
    i32[S] token ids.

  Option values are checked where concrete (ValueError naming the argument); under `jax.jit` they
  cannot raise, so check them on the host (`Sampling`).
  """
  logits = jnp.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [S, V], got shape {logits.shape}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"logits must be a floating array, got {logits.dtype}")
  rows = logits.shape[0]
  t = _row_option("temperature", temperature, rows, integer=False)
  k = _row_option("top_k", top_k, rows, integer=True)
  p = _row_option("top_p", top_p, rows, integer=False)
  _check_values(temperature, top_k, top_p)
  if mode is None:
    concrete = [_concrete(x) for x in (temperature, top_k, top_p)]
    mode = "filter" if any(c is None for c in concrete) else sampling_mode(*concrete)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
  keys = None if mode == "greedy" else _row_keys(key, rows)
  return _sample(logits, keys, t, k, p, mode)


@functools.partial(jax.jit, static_argnums=5)
def _sample(logits, keys, temperature, top_k, top_p, mode: str):
  """`sample` past its checks (one compiled program per shape and mode, also when called eagerly)."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if mode == "greedy":
    return greedy
  hot = temperature > 0
  scaled = logits / jnp.where(hot, temperature, 1.0)[:, None]
  if mode == "filter":
    threshold = _nucleus_threshold(scaled, top_k, top_p)
    scaled = jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)
  drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
  return jnp.where(hot, drawn, greedy)


# ---- the multi-step decode loop -------------------------------------------------------------------
class DecodeBatch(NamedTuple):
  """The state a decode call starts from (S = sequence rows of the bucket, padding included).

  tokens:      i32[S] each sequence's last token: sampled, its K / V not in the cache yet.
  positions:   i32[S] that token's position (= the tokens whose K / V are in the cache).
  block_table: i32[S, max_blocks] pages of each sequence, covering positions < positions +
               min(steps, remaining) (the host reserves them before the call).
  remaining:   i32[S] tokens the sequence may still generate (its max length); 0: a padding row.
  eos:         i32[S] its end-of-sequence id (`NO_EOS` = -1: none); a sampled eos ends it, eos included.
  """

  tokens: jax.Array
  positions: jax.Array
  block_table: jax.Array
  remaining: jax.Array
  eos: jax.Array


def step_batch(tokens: jax.Array, positions: jax.Array, active: jax.Array, block_table: jax.Array,
               block_size: int) -> Tuple[jax.Array, PagedBatch, jax.Array]:
  """One decode step's flat batch: active sequences one row each, in order; the others empty.

  Args: tokens i32[S], positions i32[S], active bool[S], block_table i32[S, max_blocks], block_size
  (static). Sequence s's row is cu[s] (the active sequences before it); finished / padding sequences
  have no row, no keys (seqused_k 0) and write nothing; rows past the active count are padding
  (slot -1). Returns (row tokens i32[S], PagedBatch, rows i32[S]: the row whose logits are sequence
  s's, clamped into [0, S) for the inactive).
  """
  rows = tokens.shape[0]
  cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(active.astype(jnp.int32))])
  row = cu[:-1]
  dest = jnp.where(active, row, rows)  # the inactive land past the end: dropped
  page_index = jnp.clip(positions // block_size, 0, block_table.shape[1] - 1)
  page = jnp.take_along_axis(block_table, page_index[:, None], axis=1)[:, 0]
  slot = page * block_size + positions % block_size

  def scatter(fill, values):
    return jnp.full(rows, fill, jnp.int32).at[dest].set(values.astype(jnp.int32), mode="drop")

  batch = PagedBatch(positions=scatter(0, positions), cu_seqlens_q=cu,
                     seqused_k=jnp.where(active, positions + 1, 0).astype(jnp.int32),
                     block_table=block_table, slot_mapping=scatter(-1, slot))
  return scatter(0, tokens), batch, jnp.minimum(row, rows - 1)


def _check_fields(fields) -> None:
  """(name, value, shape, integer) each: ValueError on a shape, TypeError on a dtype, naming it."""
  for name, value, shape, integer in fields:
    if jnp.shape(value) != shape:
      raise ValueError(f"{name} must be {list(shape)} (one per sequence row), got shape {jnp.shape(value)}")
    if not jnp.issubdtype(jnp.result_type(value), jnp.integer if integer else jnp.floating):
      raise TypeError(f"{name} must be {'an integer' if integer else 'a floating'} array, got "
                      f"{jnp.result_type(value)}")


def _check_batch(batch: DecodeBatch) -> int:
  """Static checks of a `DecodeBatch`'s arrays (errors name the field); returns its rows S."""
  rows = jnp.shape(batch.tokens)[0] if jnp.ndim(batch.tokens) == 1 else None
  if rows is None:
    raise ValueError(f"batch.tokens must be i32[S], got shape {jnp.shape(batch.tokens)}")
  _check_fields([(f"batch.{n}", getattr(batch, n), (rows,), True)
                 for n in ("tokens", "positions", "remaining", "eos")])
  _check_table("batch.block_table", batch.block_table, rows)
  return rows


def _check_table(name: str, table, rows: int) -> None:
  """A block table must be i32[rows, max_blocks]: ValueError naming it otherwise."""
  integer = jnp.issubdtype(jnp.result_type(table), jnp.integer)
  if jnp.ndim(table) != 2 or jnp.shape(table)[0] != rows or not integer:
    raise ValueError(f"{name} must be i32[{rows}, max_blocks], got {jnp.result_type(table)}"
                     f"{list(jnp.shape(table))}")


def _check_loop_inputs(batch: DecodeBatch, sampling: SamplingParams) -> None:
  """Static checks of decode_loop's arrays: ValueError / TypeError naming the field."""
  rows = _check_batch(batch)
  _check_fields([(f"sampling.{n}", getattr(sampling, n), (rows,), n in ("top_k", "seed", "seq_id"))
                 for n in SamplingParams._fields])


class _Carry(NamedTuple):
  step: jax.Array  # i32[]
  tokens: jax.Array  # i32[S]
  positions: jax.Array  # i32[S]
  active: jax.Array  # bool[S]
  counts: jax.Array  # i32[S]
  out: jax.Array  # i32[S, steps]
  k_cache: jax.Array
  v_cache: jax.Array


NEVER = 0  # check_every: no checks, a loop of static length (`decode_loop`)
# Steps one iteration of that static loop runs (lax.fori_loop's unroll), read when a loop is traced;
# bench_serving.py --static-unroll varies it (benchmarks/NOTES.md, "overlapped decode calls of
# static length": 2 measured within the spread).
STATIC_LOOP_UNROLL = 1


def check_steps_between_checks(check_every, steps: int) -> int:
  """`check_every` as an int, or a ValueError naming it: `NEVER` (0) or an int >= 1 dividing `steps`."""
  if isinstance(check_every, bool) or not isinstance(check_every, (int, np.integer)):
    raise TypeError(f"check_every must be an int, got {check_every!r}")
  if check_every < 0 or (check_every and steps % check_every):
    raise ValueError(f"check_every must be 0 (never) or an int >= 1 dividing steps={steps}, "
                     f"got {check_every}")
  return int(check_every)


def _decode_loop(graphdef, state, k_cache: jax.Array, v_cache: jax.Array, batch: DecodeBatch,
                sampling: SamplingParams, *, steps: int, mode: str = "filter", check_every: int = 1):
  """Up to `steps` decode steps of the model in one call; returns (tokens, counts, k_cache, v_cache).

  Args:
    graphdef, state: `nnx.split(model)` of a `DecoderLM` (graphdef static).
    k_cache, v_cache: [L, num_blocks, block_size, Hk, D] in the model's compute dtype; donated and
      written in place (each step writes each active sequence's fed token at its slot
      block_table[s, pos // block_size] * block_size + pos % block_size).
    batch: `DecodeBatch` (data: new lengths, tables, positions never recompile).
    sampling: `SamplingParams` (data).
    steps: static, the most steps of this call (one compile per value and sequence bucket).
    mode: static `sample` mode, right for every row (`sampling_mode` on the host).
    check_every: static, a divisor of `steps`: the loop asks whether any sequence is still active
      every `check_every` steps (1: every step); the steps between checks run as an inner loop of
      static length. Each check reads one flag back to the host; checking rarely measured no
      faster (benchmarks/NOTES.md, "the serving decode loop"), hence the default of 1. A call
      whose sequences all finish early runs up to `check_every - 1` idle steps (nothing is
      written or sampled for an inactive sequence). `NEVER` (0): always `steps` steps, a loop of
      static length that reads nothing back, so the call returns to Python as soon as it is
      enqueued (a loop with checks returns only after its last check, i.e. when it is done): the
      host can prepare and dispatch the next call meanwhile (`serving.Engine(overlap=True)`).

  Each step, every active sequence feeds its last token, samples the next one, and stops after
  `remaining` tokens or on its eos; the loop ends after `steps` steps or once none is active.

  Returns:
    tokens: i32[S, steps], sequence s's new tokens in [s, :counts[s]], `PAD_TOKEN` after them.
    counts: i32[S], tokens generated (= K / V rows written: the fed tokens) per sequence.
    k_cache, v_cache: the updated caches.
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  check_every = check_steps_between_checks(check_every, steps)
  _check_loop_inputs(batch, sampling)
  rows = batch.tokens.shape[0]
  block_size = k_cache.shape[2]

  def cond(c: _Carry):
    return (c.step < steps) & jnp.any(c.active)

  def step(c: _Carry) -> _Carry:
    model = nnx.merge(graph_key(graphdef).graphdef, state)
    tokens, paged, logit_rows = step_batch(c.tokens, c.positions, c.active, batch.block_table, block_size)
    logits, k_cache, v_cache = model(tokens, c.k_cache, c.v_cache, paged, logits_indices=logit_rows)
    keys = token_keys(sampling, c.positions)
    nxt = sample(logits, keys, sampling.temperature, sampling.top_k, sampling.top_p, mode=mode)
    counts = c.counts + c.active.astype(jnp.int32)
    out = c.out.at[:, c.step].set(jnp.where(c.active, nxt, PAD_TOKEN))
    done = (nxt == batch.eos) | (counts >= batch.remaining)
    return _Carry(c.step + 1, jnp.where(c.active, nxt, c.tokens), c.positions + c.active, c.active & ~done,
                  counts, out, k_cache, v_cache)

  def body(c: _Carry) -> _Carry:
    if check_every == 1:
      return step(c)
    # A static trip count: no check between these steps.
    return jax.lax.fori_loop(0, check_every, lambda _, c: step(c), c)

  init = _Carry(jnp.int32(0), batch.tokens.astype(jnp.int32), batch.positions.astype(jnp.int32),
                batch.remaining > 0, jnp.zeros(rows, jnp.int32),
                jnp.full((rows, steps), PAD_TOKEN, jnp.int32), k_cache, v_cache)
  if check_every == NEVER:  # XLA runs a loop of known trip count without reading its predicate back
    final = jax.lax.fori_loop(0, steps, lambda _, c: step(c), init, unroll=STATIC_LOOP_UNROLL)
  else:
    final = jax.lax.while_loop(cond, body, init)
  return final.out, final.counts, final.k_cache, final.v_cache


def _next_batch(batch: DecodeBatch, tokens: jax.Array, counts: jax.Array,
                block_table: jax.Array) -> DecodeBatch:
  """The `DecodeBatch` that continues `batch` after a decode call on it returned (tokens, counts).

  Args (S rows): batch: the call's `DecodeBatch`; tokens: i32[S, steps] and counts: i32[S], its
  outputs; block_table: i32[S, max_blocks], the next call's pages (covering each row's next
  min(steps, remaining) tokens).

  Row s continues from its last new token (or its old one where it made none) at positions[s] +
  counts[s], with counts[s] fewer tokens to go, or none where that last token is its eos: a row
  that stopped stays stopped. All on device, so the next call can be dispatched before this one's
  tokens reach the host (`serving.Engine(overlap=True)`).
  """
  rows = _check_batch(batch)
  _check_fields([("counts", counts, (rows,), True)])
  if jnp.ndim(tokens) != 2 or jnp.shape(tokens)[0] != rows:
    raise ValueError(f"tokens must be i32[{rows}, steps], got shape {jnp.shape(tokens)}")
  _check_table("block_table", block_table, rows)
  counts = counts.astype(jnp.int32)
  made = counts > 0
  last = jnp.take_along_axis(tokens.astype(jnp.int32), jnp.maximum(counts - 1, 0)[:, None], axis=1)[:, 0]
  ended = made & (last == batch.eos)
  return DecodeBatch(tokens=jnp.where(made, last, batch.tokens).astype(jnp.int32),
                     positions=(batch.positions + counts).astype(jnp.int32),
                     block_table=jnp.asarray(block_table, jnp.int32),
                     remaining=jnp.where(ended, 0, batch.remaining - counts).astype(jnp.int32),
                     eos=jnp.asarray(batch.eos, jnp.int32))


next_batch = jax.jit(_next_batch)


# The graphdef travels as its `GraphKey` (hashing an nnx GraphDef on every call cost 2.4 ms of a
# call's dispatch: graph_key's docstring).
_LOOP_JIT = dict(static_argnames=("steps", "mode", "check_every"), donate_argnames=("k_cache", "v_cache"))
decode_loop = KeyedJit(_decode_loop, **_LOOP_JIT)
# The same loop compiled with XLA's matmuls on cuBLAS instead of its Triton GEMM fusions.
CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}
decode_loop_cublas = KeyedJit(_decode_loop, compiler_options=CUBLAS_GEMMS, **_LOOP_JIT)
# From this many sequences a step, on a Hopper GPU, `loop_for` takes the cuBLAS build: it measured
# faster there and slower at 1 and 16 sequences (benchmarks/NOTES.md, "cuBLAS GEMMs in the serving loop").
CUBLAS_FROM_ROWS = 64


def loop_for(rows: int):
  """The jitted decode loop for `rows` sequences a step (`DecodeBatch.tokens.shape[0]`):
  `decode_loop_cublas` from `CUBLAS_FROM_ROWS` rows on a Hopper GPU, else `decode_loop`. Both take
  `decode_loop`'s arguments and compute the same function; only XLA's choice of matmul kernels
  differs (rounding may differ in the last bits)."""
  from jax_varlen_attn.backends import device
  return decode_loop_cublas if rows >= CUBLAS_FROM_ROWS and device.is_hopper() else decode_loop
