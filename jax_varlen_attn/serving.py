"""A minimal continuous-batching serving loop for `jax_varlen_attn.nn.DecoderLM` (host-side Python).

Pieces, each usable alone:
- `PageAllocator`: a free list of cache pages and the pages each sequence holds.
- `Scheduler`: picks, every step, decodes first and then prefill chunks (continuing prompts, then new
  ones) up to a token budget; allocates pages (preempting the newest sequence, to be recomputed, when
  none are left); builds the flat batch as NumPy arrays padded to a token bucket and a sequence bucket
  (`StepBatch`), so the jitted step compiles once per bucket pair; takes the sampled tokens back.
- `Engine`: owns the layer-stacked caches and runs the jitted step (model forward over the flat
  batch, a token sampled at each sequence's last row) with the caches donated, so the cache is
  updated in place. With `steps_per_call=N > 1`, whenever every running sequence is decoding and no
  prompt could be admitted (none waits, or every sequence slot is taken), it runs up to N decode
  steps in one jitted call instead (`decode_chunk`: `jax_varlen_attn.decode.decode_loop`, pages for
  the N tokens reserved beforehand; by default the next call is dispatched before this one's
  tokens are read, `Engine`'s overlap); otherwise the one-step path (`step`) admits, prefills and
  decodes as before.
- `generate(model, prompts, max_new_tokens, steps_per_call=, sampling=)`: the whole loop.

Greedy by default; temperature / top-k / top-p sampling per sequence with `decode.Sampling`. Token ids
in, token ids out (no tokenizer).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import time
from typing import Deque, Dict, Iterable, List, Optional, Sequence as Seq, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from jax_varlen_attn.decode import (GREEDY, NEVER, NO_EOS, DecodeBatch, Sampling, SamplingParams,
                                    check_steps_between_checks, decode_loop_cublas, loop_for,
                                    next_batch, sample, sampling_arrays, sampling_mode, token_keys)
from jax_varlen_attn.graph_key import KeyedJit, graph_key
from jax_varlen_attn.nn import DecoderLM, PagedBatch, init_cache
from jax_varlen_attn.spec import next_pow2


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def bucket(n: int, minimum: int, maximum: int) -> int:
  """The smallest power of two >= max(n, minimum), capped at `maximum` (itself always a bucket)."""
  if n > maximum:
    raise ValueError(f"{n} exceeds the largest bucket {maximum}")
  return min(next_pow2(max(n, minimum)), maximum)


class OutOfPages(RuntimeError):
  """The allocator has fewer free pages than asked for."""


class PageAllocator:
  """Cache pages 0..num_blocks-1 handed out from a free list; each sequence owns an ordered list.

  Page i of a sequence holds its tokens [i * block_size, (i + 1) * block_size).
  """

  def __init__(self, num_blocks: int, block_size: int):
    if num_blocks < 1 or block_size < 1:
      raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
    self.num_blocks, self.block_size = num_blocks, block_size
    self._free: Deque[int] = collections.deque(range(num_blocks))
    self._pages: Dict[int, List[int]] = {}

  @property
  def num_free(self) -> int:
    return len(self._free)

  def pages(self, seq_id: int) -> List[int]:
    return self._pages.get(seq_id, [])

  def pages_needed(self, seq_id: int, num_tokens: int) -> int:
    """New pages `seq_id` needs to hold `num_tokens` tokens in all."""
    return max(0, _cdiv(num_tokens, self.block_size) - len(self.pages(seq_id)))

  def can_hold(self, seq_id: int, num_tokens: int) -> bool:
    return self.pages_needed(seq_id, num_tokens) <= self.num_free

  def reserve(self, seq_id: int, num_tokens: int) -> List[int]:
    """Grows `seq_id`'s pages to hold `num_tokens` tokens; returns the new pages. Raises OutOfPages
    (allocating nothing) when the free list is too short."""
    need = self.pages_needed(seq_id, num_tokens)
    if need > self.num_free:
      raise OutOfPages(f"sequence {seq_id} needs {need} more pages, {self.num_free} free")
    new = [self._free.popleft() for _ in range(need)]
    self._pages.setdefault(seq_id, []).extend(new)
    return new

  def free(self, seq_id: int) -> int:
    """Returns all of `seq_id`'s pages to the free list; returns how many."""
    pages = self._pages.pop(seq_id, [])
    self._free.extend(pages)
    return len(pages)

  def slot(self, seq_id: int, position: int) -> int:
    """Cache slot (page * block_size + offset) of token `position` of `seq_id`."""
    page = self._pages[seq_id][position // self.block_size]
    return page * self.block_size + position % self.block_size


@dataclasses.dataclass(eq=False)  # identity semantics: `in` / `remove` find this very request
class Sequence:
  """One request. `tokens` = prompt + generated; the first `num_computed` have K / V in the cache."""

  seq_id: int
  prompt: List[int]
  max_new_tokens: int
  eos_token_id: Optional[int] = None
  generated: List[int] = dataclasses.field(default_factory=list)
  num_computed: int = 0
  finished: bool = False
  num_preemptions: int = 0
  sampling: Sampling = GREEDY

  @property
  def num_remaining(self) -> int:
    """Tokens it may still generate."""
    return self.max_new_tokens - len(self.generated)

  @property
  def tokens(self) -> List[int]:
    return self.prompt + self.generated

  @property
  def num_tokens(self) -> int:
    """len(tokens), without building the list."""
    return len(self.prompt) + len(self.generated)

  def token_slice(self, start: int, stop: int) -> List[int]:
    """tokens[start:stop] without concatenating the whole prompt and generation (O(stop - start))."""
    p = len(self.prompt)
    return self.prompt[start:min(stop, p)] + self.generated[max(start - p, 0):max(stop - p, 0)]

  @property
  def num_pending(self) -> int:
    """Tokens whose K / V are not in the cache yet (a prompt's rest, or the one last sampled)."""
    return len(self.prompt) + len(self.generated) - self.num_computed

  @property
  def in_prefill(self) -> bool:
    return self.num_pending > 1 or not self.generated


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """max_tokens_per_step: token budget of one step (the largest token bucket).
  max_seqs: sequences in one step (the largest sequence bucket).
  max_model_len: longest prompt + generation; sets the block table's width.
  min_token_bucket / min_seq_bucket: smallest buckets (fewer, larger buckets: fewer compiles).
  """

  num_blocks: int
  block_size: int = 16
  max_tokens_per_step: int = 256
  max_seqs: int = 16
  max_model_len: int = 1024
  min_token_bucket: int = 16
  min_seq_bucket: int = 4

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"SchedulerConfig.{f.name} must be a positive int, got {v!r}")
    if self.max_blocks_per_seq > self.num_blocks:
      raise ValueError(f"max_model_len={self.max_model_len} needs {self.max_blocks_per_seq} pages of "
                       f"{self.block_size}, more than num_blocks={self.num_blocks}")

  @property
  def max_blocks_per_seq(self) -> int:
    return _cdiv(self.max_model_len, self.block_size)


@dataclasses.dataclass
class StepBatch:
  """One step's flat batch (host NumPy arrays, padded to the buckets) and what it schedules.

  scheduled: (sequence, first position, number of tokens, samples) for each real sequence, in the
  order of its rows; `samples` is True when the chunk reaches the end of the sequence's known tokens,
  so the logits of its last row give the next token.
  """

  tokens: np.ndarray  # i32[T]
  batch: PagedBatch  # of NumPy arrays
  sample_rows: np.ndarray  # i32[S]: last row of each sequence (0 for padded sequences)
  scheduled: List[Tuple[Sequence, int, int, bool]]
  num_tokens: int  # real tokens (rows past it are padding)

  @property
  def bucket(self) -> Tuple[int, int]:
    """(token bucket, sequence bucket): the shapes the jitted step sees."""
    return self.tokens.shape[0], self.sample_rows.shape[0]

  def describe(self) -> str:
    parts = []
    for s, start, n, samples in self.scheduled:
      kind = "decode" if (n == 1 and start >= len(s.prompt)) else "prefill"
      parts.append(f"seq {s.seq_id}: {kind} [{start}, {start + n}){' -> sample' if samples else ''}")
    t, b = self.bucket
    return f"{self.num_tokens} tokens in bucket ({t} tokens, {b} seqs): " + "; ".join(parts)


class Scheduler:
  """Mixes decodes and prefill chunks into one flat batch per step under a token budget."""

  def __init__(self, config: SchedulerConfig, allocator: Optional[PageAllocator] = None):
    self.config = config
    self.allocator = allocator or PageAllocator(config.num_blocks, config.block_size)
    if self.allocator.block_size != config.block_size:
      raise ValueError("the allocator's block_size differs from the config's")
    self.waiting: Deque[Sequence] = collections.deque()
    self.running: List[Sequence] = []  # holding pages, in admission order
    self.finished: List[Sequence] = []
    self._ids = itertools.count()

  def add(self, prompt: Iterable[int], max_new_tokens: int, eos_token_id: Optional[int] = None,
          sampling: Optional[Sampling] = None) -> Sequence:
    """Queues a request; sampling: a `decode.Sampling` (None: greedy)."""
    sampling = GREEDY if sampling is None else sampling
    if not isinstance(sampling, Sampling):
      raise TypeError(f"sampling must be a jax_varlen_attn.decode.Sampling or None, got {sampling!r}")
    prompt = [int(t) for t in prompt]
    if not prompt:
      raise ValueError("a prompt needs at least one token")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > self.config.max_model_len:
      raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"max_model_len={self.config.max_model_len}")
    seq = Sequence(next(self._ids), prompt, max_new_tokens, eos_token_id, sampling=sampling)
    self.waiting.append(seq)
    return seq

  @property
  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def _preempt(self, seq: Sequence) -> None:
    """Frees seq's pages; it goes back to the front of the queue and recomputes its tokens later."""
    self.allocator.free(seq.seq_id)
    self.running.remove(seq)
    seq.num_computed = 0
    seq.num_preemptions += 1
    self.waiting.appendleft(seq)

  def schedule(self) -> Optional[StepBatch]:
    """The next step's batch, or None when there is nothing to run."""
    cfg, alloc = self.config, self.allocator
    budget, chosen = cfg.max_tokens_per_step, []
    # Running sequences: decodes first (one token each), then continuing prompt chunks.
    order = sorted(self.running, key=lambda s: s.in_prefill)
    for seq in order:
      if budget == 0 or len(chosen) == cfg.max_seqs:
        break
      if seq not in self.running:  # preempted below to make room for an earlier one
        continue
      n = min(seq.num_pending, budget)
      while not alloc.can_hold(seq.seq_id, seq.num_computed + n):
        taken = [s for s, _ in chosen]
        victim = next((s for s in reversed(self.running) if s is not seq and s not in taken), None)
        if victim is None:
          break
        self._preempt(victim)
      if not alloc.can_hold(seq.seq_id, seq.num_computed + n):
        self._preempt(seq)
        continue
      alloc.reserve(seq.seq_id, seq.num_computed + n)
      chosen.append((seq, n))
      budget -= n
    # New (or preempted) sequences, while the budget, the sequence bucket and the pages allow.
    while self.waiting and budget > 0 and len(chosen) < cfg.max_seqs:
      seq = self.waiting[0]
      n = min(seq.num_pending, budget)
      if not alloc.can_hold(seq.seq_id, n):
        break
      self.waiting.popleft()
      alloc.reserve(seq.seq_id, n)
      self.running.append(seq)
      chosen.append((seq, n))
      budget -= n
    if not chosen:
      return None
    plan = [(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens) for seq, n in chosen]
    return self._build(plan, cfg.max_tokens_per_step - budget)

  def _build(self, plan, num_tokens: int) -> StepBatch:
    cfg, alloc = self.config, self.allocator
    t_bucket = bucket(num_tokens, cfg.min_token_bucket, cfg.max_tokens_per_step)
    s_bucket = bucket(len(plan), cfg.min_seq_bucket, cfg.max_seqs)
    tokens = np.zeros(t_bucket, np.int32)
    positions = np.zeros(t_bucket, np.int32)
    slots = np.full(t_bucket, -1, np.int32)  # padding rows write nothing
    cu = np.full(s_bucket + 1, num_tokens, np.int32)  # padded sequences: empty, at the end
    used = np.zeros(s_bucket, np.int32)
    table = np.zeros((s_bucket, cfg.max_blocks_per_seq), np.int32)  # past a sequence's pages: unread
    sample_rows = np.zeros(s_bucket, np.int32)
    row = 0
    for b, (seq, start, n, _) in enumerate(plan):
      cu[b] = row
      pos = np.arange(start, start + n, dtype=np.int32)
      pages = np.asarray(alloc.pages(seq.seq_id), np.int32)
      tokens[row:row + n] = seq.token_slice(start, start + n)  # a decode: O(1), not O(context)
      positions[row:row + n] = pos
      slots[row:row + n] = pages[pos // cfg.block_size] * cfg.block_size + pos % cfg.block_size
      used[b] = start + n
      table[b, :len(pages)] = pages
      sample_rows[b] = row + n - 1
      row += n
    batch = PagedBatch(positions=positions, cu_seqlens_q=cu, seqused_k=used, block_table=table,
                       slot_mapping=slots)
    return StepBatch(tokens, batch, sample_rows, plan, num_tokens)

  def update(self, step: StepBatch, next_tokens: np.ndarray) -> List[Sequence]:
    """Records a step's results (next_tokens: one per sequence row, padding included); returns the
    sequences that finished (their pages are freed)."""
    done = []
    for b, (seq, start, n, samples) in enumerate(step.scheduled):
      seq.num_computed = start + n
      if not samples:
        continue
      seq.generated.append(int(next_tokens[b]))
      if self._finish_if_done(seq):
        done.append(seq)
    return done

  def _finish_if_done(self, seq: Sequence) -> bool:
    """Retires seq (frees its pages) once it has all its tokens or ends with its eos."""
    if seq.num_remaining > 0 and not (seq.generated and seq.generated[-1] == seq.eos_token_id):
      return False
    seq.finished = True
    self.allocator.free(seq.seq_id)
    self.running.remove(seq)
    self.finished.append(seq)
    return True

  # ---- multi-step decode ------------------------------------------------------------------------
  def can_decode_many(self) -> bool:
    """True when a multi-step decode call may run: every running sequence decodes, and no prompt
    waits or none could be admitted now (every sequence slot is taken)."""
    n = len(self.running)
    return (0 < n <= self.config.max_seqs and (not self.waiting or n == self.config.max_seqs)
            and not any(s.in_prefill for s in self.running))

  def schedule_decode(self, steps: int) -> Optional["DecodeChunk"]:
    """The next multi-step decode call (up to `steps` tokens for every running sequence), or None
    when one may not run (`can_decode_many`) or the free pages cannot cover every sequence's next
    min(steps, remaining) tokens (then the one-step path, which preempts, runs instead).

    Reserves those pages before the call: the device then computes every step's slot itself.
    """
    if not self.can_decode_many():
      return None
    alloc, want = self.allocator, {}
    for seq in self.running:  # tokens in the cache once the call has written min(steps, remaining)
      want[seq.seq_id] = seq.num_computed + min(steps, seq.num_remaining)
    if sum(alloc.pages_needed(i, n) for i, n in want.items()) > alloc.num_free:
      return None
    for seq_id, n in want.items():
      alloc.reserve(seq_id, n)
    return self._build_decode(list(self.running), steps)

  def schedule_next_decode(self, chunk: "DecodeChunk",
                           steps: Optional[int] = None) -> Optional["DecodeChunk"]:
    """The decode call of up to `steps` steps (default chunk's) to run right after `chunk` (same rows
    and sampling), scheduled before chunk's tokens are known, or None when it may not run:
    `can_decode_many` fails, a sequence runs that chunk does not hold, the live sequences now fit a
    smaller bucket (rescheduling is cheaper), chunk reaches every sequence's max length, or the
    free pages cannot cover every live sequence's next min(chunk.steps + steps, remaining) tokens
    from the host's state, which is one call behind: chunk's tokens are not recorded yet.

    Reserves those pages. The call's batch holds its block table and eos only (finished rows: no
    pages, eos `NO_EOS`); its tokens, positions and remaining are chunk's, advanced on the device
    (`decode.next_batch`), so they are None here.
    """
    if not self.can_decode_many():
      return None
    rows = chunk.batch.eos.shape[0]
    index = {id(s): b for b, s in enumerate(chunk.scheduled)}
    if (any(id(s) not in index for s in self.running)
        or bucket(len(self.running), self.config.min_seq_bucket, self.config.max_seqs) != rows):
      return None
    if all(seq.num_remaining <= chunk.steps for seq in self.running):
      return None  # chunk ends every sequence (its max length): nothing would be left to run
    steps = chunk.steps if steps is None else steps
    alloc, span = self.allocator, chunk.steps + steps  # chunk's tokens, then this call's
    want = {seq.seq_id: seq.num_computed + min(span, seq.num_remaining) for seq in self.running}
    if sum(alloc.pages_needed(i, n) for i, n in want.items()) > alloc.num_free:
      return None
    for seq_id, n in want.items():
      alloc.reserve(seq_id, n)
    table = np.zeros_like(chunk.batch.block_table)
    eos = np.full(rows, NO_EOS, np.int32)
    for seq in self.running:
      pages = alloc.pages(seq.seq_id)
      table[index[id(seq)], :len(pages)] = pages
      eos[index[id(seq)]] = chunk.batch.eos[index[id(seq)]]
    batch = DecodeBatch(tokens=None, positions=None, block_table=table, remaining=None, eos=eos)
    return DecodeChunk(list(chunk.scheduled), batch, chunk.sampling, chunk.mode, steps, continues=True)

  def _build_decode(self, seqs: List[Sequence], steps: int) -> "DecodeChunk":
    cfg = self.config
    rows = bucket(len(seqs), cfg.min_seq_bucket, cfg.max_seqs)
    tokens = np.zeros(rows, np.int32)
    positions = np.zeros(rows, np.int32)
    table = np.zeros((rows, cfg.max_blocks_per_seq), np.int32)  # past a sequence's pages: unread
    remaining = np.zeros(rows, np.int32)  # padding rows: 0, inactive from the start
    eos = np.full(rows, NO_EOS, np.int32)
    for b, seq in enumerate(seqs):
      pages = self.allocator.pages(seq.seq_id)
      tokens[b] = seq.generated[-1]
      positions[b] = seq.num_computed
      table[b, :len(pages)] = pages
      remaining[b] = seq.num_remaining
      if seq.eos_token_id is not None:
        eos[b] = seq.eos_token_id
    params = sampling_arrays([s.sampling for s in seqs], [s.seq_id for s in seqs], rows)
    mode = sampling_mode(params.temperature, params.top_k, params.top_p)
    return DecodeChunk(seqs, DecodeBatch(tokens, positions, table, remaining, eos), params, mode, steps)

  def update_decode(self, chunk: "DecodeChunk", tokens: np.ndarray, counts: np.ndarray) -> List[Sequence]:
    """Records a decode call's results (tokens i32[S, steps], counts i32[S]); returns the sequences
    that finished (their pages, unused reserved ones included, are freed)."""
    done = []
    for b, seq in enumerate(chunk.scheduled):
      n = int(counts[b])
      if seq.finished:  # it stopped in the call before this one (`schedule_next_decode`)
        if n:
          raise RuntimeError(f"sequence {seq.seq_id} finished but a later call gave it {n} tokens")
        continue
      seq.generated.extend(int(t) for t in tokens[b, :n])
      seq.num_computed += n  # every generated token but the last was fed back and written
      if self._finish_if_done(seq):
        done.append(seq)
    return done


@dataclasses.dataclass
class DecodeChunk:
  """One multi-step decode call: its sequences (rows, in order) and the host arrays it runs on.

  batch: `decode.DecodeBatch` of NumPy arrays padded to the sequence bucket; sampling: NumPy
  `decode.SamplingParams`; mode: the static sampling mode; steps: the call's most steps.
  continues: True for a call that continues the call before it on the device
  (`Scheduler.schedule_next_decode`), scheduled before that call's tokens were known: its batch's
  tokens, positions and remaining are None (`decode.next_batch` makes them from that call's
  outputs). False: a call built from the host's state.
  """

  scheduled: List[Sequence]
  batch: DecodeBatch
  sampling: SamplingParams
  mode: str
  steps: int
  continues: bool = False

  @property
  def bucket(self) -> Tuple[int, int]:
    """(sequence bucket, steps): with the mode, the static shapes the jitted loop sees."""
    return self.batch.eos.shape[0], self.steps


def _serving_step(graphdef, state, k_cache, v_cache, tokens, batch: PagedBatch, sample_rows,
                  sampling: Optional[SamplingParams] = None, *, mode: str = "filter"):
  """One step: the model over the flat batch, a token sampled at `sample_rows` (each sequence's last
  row). Returns (next_tokens i32[S], logits [S, vocab], k_cache, v_cache).

  sampling: None: greedy (argmax); else `decode.SamplingParams` of S rows, drawn with `decode.sample`
  (static `mode`) keyed by the sampled row's position, as `decode.decode_loop` keys its steps.

  jitted with the model's graph static and the caches donated (updated in place): one compile per
  (model, cache shape, token bucket, sequence bucket, sampling or not, mode), shared by every
  `Engine` and `generate` call.
  """
  model = nnx.merge(graph_key(graphdef).graphdef, state)
  logits, k_cache, v_cache = model(tokens, k_cache, v_cache, batch, logits_indices=sample_rows)
  if sampling is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, k_cache, v_cache
  keys = token_keys(sampling, batch.positions[sample_rows])
  next_tokens = sample(logits, keys, sampling.temperature, sampling.top_k, sampling.top_p, mode=mode)
  return next_tokens, logits, k_cache, v_cache


# The graphdef travels as its `GraphKey` (graph_key's docstring: hashing it cost most of a call's dispatch).
serving_step = KeyedJit(_serving_step, static_argnames=("mode",), donate_argnums=(2, 3))


@dataclasses.dataclass
class StepOutput:
  step: StepBatch
  next_tokens: np.ndarray  # i32[S]: sampled token of each sequence row (meaningful where it samples)
  logits: jax.Array  # [S, vocab] at each sequence's last row (on device)
  finished: List[Sequence]


@dataclasses.dataclass
class ChunkOutput:
  chunk: DecodeChunk
  tokens: np.ndarray  # i32[S, steps]: row s's new tokens in [s, :counts[s]], decode.PAD_TOKEN after
  counts: np.ndarray  # i32[S]
  finished: List[Sequence]


@dataclasses.dataclass
class _InFlight:
  """A decode call dispatched and not read yet: its chunk and the device arrays it runs on / returns."""

  chunk: DecodeChunk
  batch: DecodeBatch
  sampling: SamplingParams
  tokens: jax.Array  # i32[S, steps]
  counts: jax.Array  # i32[S]


def _check_steps_per_call(steps_per_call) -> int:
  if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, (int, np.integer)):
    raise TypeError(f"steps_per_call must be an int, got {steps_per_call!r}")
  if steps_per_call < 1:
    raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
  return int(steps_per_call)


class Engine:
  """Runs a `DecoderLM` over a paged cache with a `Scheduler`; jitted, cache-donating calls.

      engine = Engine(model, num_blocks=64, block_size=16, max_tokens_per_step=64, steps_per_call=16)
      engine.add([1, 2, 3], max_new_tokens=8, sampling=Sampling(temperature=0.8, top_p=0.9))
      while engine.has_work: engine.advance()

  `step()` is the one-step path, `serving_step` (jitted; `serving_step._cache_size()` counts its
  compiles: one per (token bucket, sequence bucket) pair for a given model and cache shape).
  `decode_chunk()` runs up to `steps_per_call` decode steps in one call (`decode.decode_loop`, or
  `decode.decode_loop_cublas` for large buckets on Hopper, `decode.loop_for`: one compile per
  sequence bucket, sampling mode and step count) when `Scheduler.can_decode_many()` and the
  free pages cover the call; `advance()` runs whichever applies.

  Two options decide how decode calls follow each other; the defaults measured fastest (H200, the
  1.7B model: 8-10% a step at 1 and 16 sequences, 3-4% at 64; benchmarks/NOTES.md,
  "overlapped decode calls of static length"), and the tokens are the same under every setting:
  - `check_every` (default `decode.NEVER`): a call runs all its steps as a loop of static length,
    which XLA enqueues without reading anything back, so the call returns to Python at once and
    the host's work overlaps the GPU's. Its steps are cut to the smallest power of two reaching
    the longest sequence's remaining tokens (a few more programs in place of idle steps). An int
    >= 1 dividing `steps_per_call`: the loop checks for live sequences every that many steps and
    ends early; each check reads a flag back to the host, so the call returns only when done.
  - `overlap` (default True): `decode_chunk` dispatches the next decode call, seeded on the device
    from this one's outputs (`Scheduler.schedule_next_decode`, `decode.next_batch`), before it
    reads this call's tokens, so the GPU does not wait on the host's work between calls (reading
    and recording tokens, scheduling, dispatch: ~2-3 ms a call). This needs a call that returns
    before it is done (`check_every=NEVER`); with checks it only reorders the host's work. The
    cost: a sequence that stops in a call holds its row through the next call (making nothing),
    and a prompt that arrives meanwhile is admitted one call later. `step()` and `decode_chunk()`
    first finish any call in flight; `has_work` counts it.
  """

  def __init__(self, model: DecoderLM, *, num_blocks: int, block_size: int = 16,
               max_tokens_per_step: int = 256, max_seqs: int = 16, max_model_len: Optional[int] = None,
               min_token_bucket: int = 16, min_seq_bucket: int = 4, steps_per_call: int = 1,
               check_every: int = NEVER, overlap: bool = True):
    if max_model_len is None:
      max_model_len = num_blocks * block_size
    self.config = SchedulerConfig(num_blocks=num_blocks, block_size=block_size,
                                  max_tokens_per_step=max_tokens_per_step, max_seqs=max_seqs,
                                  max_model_len=max_model_len, min_token_bucket=min_token_bucket,
                                  min_seq_bucket=min_seq_bucket)
    self.steps_per_call = _check_steps_per_call(steps_per_call)
    self.check_every = check_steps_between_checks(check_every, self.steps_per_call)
    if not isinstance(overlap, (bool, np.bool_)):
      raise TypeError(f"overlap must be a bool, got {overlap!r}")
    self.overlap = bool(overlap)
    self._in_flight: Optional[_InFlight] = None  # a decode call dispatched, its tokens not read yet
    self.scheduler = Scheduler(self.config)
    self.model_config = model.config
    self.graphdef, self.state = nnx.split(model)
    self.k_cache, self.v_cache = init_cache(model.config, num_blocks, block_size)
    self.num_steps = 0  # one-step calls
    self.num_chunks = 0  # multi-step decode calls read back
    self.decode_build = None  # the decode loop build of the last decode_chunk ("default" / "cublas": decode.loop_for)
    # Seconds the last decode_chunk spent: on the host before waiting for its call ("schedule":
    # scheduling, building arrays, dispatching the call and, with overlap, the next one), waiting
    # until its tokens were on the host ("call"), and recording them ("update"). Where a call's
    # time goes, for benchmarks (bench_serving.py).
    self.chunk_seconds: Dict[str, float] = {}

  @property
  def allocator(self) -> PageAllocator:
    return self.scheduler.allocator

  @property
  def has_work(self) -> bool:
    return self._in_flight is not None or self.scheduler.has_work

  def add(self, prompt: Iterable[int], max_new_tokens: int, eos_token_id: Optional[int] = None,
          sampling: Optional[Sampling] = None) -> Sequence:
    return self.scheduler.add(prompt, max_new_tokens, eos_token_id, sampling)

  @staticmethod
  def step_sampling(step: StepBatch) -> Optional[SamplingParams]:
    """NumPy `SamplingParams` of the step's sampled rows, or None where every sequence is greedy."""
    seqs = [seq for seq, *_ in step.scheduled]
    if all(seq.sampling.greedy for seq in seqs):
      return None
    return sampling_arrays([s.sampling for s in seqs], [s.seq_id for s in seqs], step.sample_rows.shape[0])

  def device_args(self, step: StepBatch, sampling: Optional[SamplingParams] = None):
    """`serving_step`'s positional arguments for this step (graphdef, state, caches, tokens, batch,
    sample rows, and `sampling`, `step_sampling(step)` by default, where it is not None)."""
    # The host arrays go to the jitted call as they are: it moves them in one C++ dispatch, where a
    # jnp.asarray each cost ~25 us apiece (benchmarks/NOTES.md, "where a decode call's time goes on
    # the host").
    args = (self.graphdef, self.state, self.k_cache, self.v_cache, step.tokens, PagedBatch(*step.batch),
            step.sample_rows)
    sampling = self.step_sampling(step) if sampling is None else sampling
    return args if sampling is None else args + (SamplingParams(*sampling),)

  def step(self) -> Optional[StepOutput]:
    """Schedules, runs and records one step; None when there is no work left. A decode call still
    in flight is read first (its tokens land in its sequences; its ChunkOutput is not returned)."""
    while self._in_flight is not None:
      self.decode_chunk()
    step = self.scheduler.schedule()
    if step is None:
      return None
    sampling = self.step_sampling(step)  # NumPy: the static mode is read on the host, no device sync
    args = self.device_args(step, sampling)
    kwargs = {} if sampling is None else dict(mode=sampling_mode(*sampling[:3]))
    next_tokens, logits, self.k_cache, self.v_cache = serving_step(*args, **kwargs)
    next_tokens = np.asarray(next_tokens)
    finished = self.scheduler.update(step, next_tokens)
    self.num_steps += 1
    return StepOutput(step, next_tokens, logits, finished)

  def decode_args(self, chunk: DecodeChunk):
    """`decode.decode_loop`'s positional arguments (graphdef, state, caches, DecodeBatch, SamplingParams)."""
    return (self.graphdef, self.state, self.k_cache, self.v_cache, DecodeBatch(*chunk.batch),
            SamplingParams(*chunk.sampling))  # host arrays, as device_args passes them

  def _dispatch(self, chunk: DecodeChunk, batch: DecodeBatch, sampling: SamplingParams) -> _InFlight:
    """Dispatches chunk's decode call on `batch` (host or device arrays); does not wait for it."""
    loop = loop_for(chunk.bucket[0])
    self.decode_build = "cublas" if loop is decode_loop_cublas else "default"
    tokens, counts, self.k_cache, self.v_cache = loop(
        self.graphdef, self.state, self.k_cache, self.v_cache, batch, sampling, steps=chunk.steps,
        mode=chunk.mode,
        check_every=NEVER if self.check_every == NEVER else math.gcd(chunk.steps, self.check_every))
    return _InFlight(chunk, batch, sampling, tokens, counts)

  def _call_steps(self, steps: int, behind: int) -> int:
    """A call's steps: `steps`, or with `check_every=NEVER` (whose loop runs every step it is built
    for) the smallest power of two reaching the longest running sequence's remaining tokens, less
    `behind` of them that a call in flight makes first: a few programs (one per power of two) in
    place of idle steps at the ends of sequences."""
    if self.check_every != NEVER:
      return steps
    longest = max((s.num_remaining for s in self.scheduler.running), default=steps) - behind
    return min(steps, next_pow2(max(longest, 1)))

  def decode_chunk(self, steps: Optional[int] = None) -> Optional[ChunkOutput]:
    """Up to `steps` (default `steps_per_call`) decode steps of every running sequence in one jitted
    call; None, running nothing, when that may not run now (`Scheduler.schedule_decode`).

    With `overlap`, reads the call already in flight, if any, instead (its steps were fixed when it
    was scheduled), and first dispatches the call after it where one may run
    (`Scheduler.schedule_next_decode`).
    """
    steps = self.steps_per_call if steps is None else _check_steps_per_call(steps)
    t0 = time.perf_counter()
    current, self._in_flight = self._in_flight, None
    if current is None:
      chunk = self.scheduler.schedule_decode(self._call_steps(steps, 0))
      if chunk is None:
        return None
      batch, sampling = self.decode_args(chunk)[4:]
      if self.overlap:  # on device as the next calls' (one jit signature); sampling is theirs too
        batch, sampling = jax.device_put((batch, sampling))
      current = self._dispatch(chunk, batch, sampling)
    if self.overlap:
      chunk = self.scheduler.schedule_next_decode(current.chunk,
                                                  self._call_steps(current.chunk.steps, current.chunk.steps))
      if chunk is not None:
        batch = next_batch(current.batch, current.tokens, current.counts, chunk.batch.block_table)
        self._in_flight = self._dispatch(chunk, batch, current.sampling)
    t1 = time.perf_counter()
    tokens, counts = np.asarray(current.tokens), np.asarray(current.counts)
    t2 = time.perf_counter()
    finished = self.scheduler.update_decode(current.chunk, tokens, counts)
    self.num_chunks += 1
    self.chunk_seconds = dict(schedule=t1 - t0, call=t2 - t1, update=time.perf_counter() - t2)
    return ChunkOutput(current.chunk, tokens, counts, finished)

  def advance(self) -> Optional[Union[StepOutput, ChunkOutput]]:
    """One call: a multi-step decode where one may run (steps_per_call > 1), else one step; None
    when there is no work left."""
    if self.steps_per_call > 1 or self._in_flight is not None:
      out = self.decode_chunk()
      if out is not None:
        return out
    return self.step()

  def run(self) -> Dict[int, List[int]]:
    """Advances until every sequence has finished; returns seq_id -> generated tokens."""
    while self.advance() is not None:
      pass
    return {s.seq_id: list(s.generated) for s in self.scheduler.finished}


def generate(model: DecoderLM, prompts: Seq[Seq[int]], max_new_tokens: int, *,
             eos_token_id: Optional[int] = None, block_size: int = 16, num_blocks: Optional[int] = None,
             max_tokens_per_step: int = 128, max_seqs: int = 16, steps_per_call: int = 1,
             sampling: Optional[Sampling] = None, **engine_kwargs) -> List[List[int]]:
  """Generation for every prompt (lists of token ids); returns the generated ids per prompt.

  steps_per_call: decode steps per jitted call once every prompt is prefilled (1: one step per call).
  sampling: a `decode.Sampling` for every prompt (None: greedy).
  num_blocks defaults to enough pages for every sequence at once (no preemption).
  """
  prompts = [list(p) for p in prompts]
  longest = max(len(p) for p in prompts) + max_new_tokens
  if num_blocks is None:
    num_blocks = sum(_cdiv(len(p) + max_new_tokens, block_size) for p in prompts)
  engine_kwargs.setdefault("max_model_len", _cdiv(longest, block_size) * block_size)
  engine = Engine(model, num_blocks=num_blocks, block_size=block_size,
                  max_tokens_per_step=max_tokens_per_step, max_seqs=max_seqs, steps_per_call=steps_per_call,
                  **engine_kwargs)
  seqs = [engine.add(p, max_new_tokens, eos_token_id, sampling) for p in prompts]
  engine.run()
  return [list(s.generated) for s in seqs]
