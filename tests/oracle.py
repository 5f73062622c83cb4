"""The judge: float64 NumPy attention written from docs/contract.md ("Semantics"), one sequence and head at a time.

It shares no code with the library: it takes each sequence's keys and values as plain arrays (the
test builds them from its own logical pages) and applies the semantics literally. fp8 inputs are
dequantized first, in float64 (`float(element) * descale[sequence, kv head]`); sinks join each row's
softmax denominator.
"""

from __future__ import annotations

import numpy as np


def _per_sequence_head(scale, batch: int, num_kv_heads: int) -> np.ndarray:
  """A descale (None, a scalar or [B, Hk]) as f64[B, Hk]."""
  return np.broadcast_to(np.asarray(1.0 if scale is None else scale, np.float64), (batch, num_kv_heads))


def reference_attention(q, keys, values, cu_seqlens_q, *, scale, causal=False, window=(-1, -1),
                        softcap=0.0, alibi=None, q_descale=None, k_descale=None, v_descale=None,
                        s_aux=None):
  """q: [T, H, D]; keys / values: list over sequences of [sk_b, Hk, D]; cu_seqlens_q: [B + 1].

  alibi: None or [B, H] slopes. q_descale / k_descale / v_descale: None (1.0), a scalar or [B, Hk]:
  q row of sequence b in q head h is float(q) * q_descale[b, h // group], its keys float(k) *
  k_descale[b, kv head], likewise values (pass them only where the tensor is fp8). s_aux: None or
  [H] sink logits (-inf: none). Returns (out f64[T, H, D], lse f64[H, T]); rows past
  cu_seqlens_q[-1] are zero with lse +inf; rows that see no key are zero with lse +inf, or s_aux[h]
  with a sink.
  """
  q = np.asarray(q).astype(np.float64)
  T, H, D = q.shape
  B = len(cu_seqlens_q) - 1
  out = np.zeros((T, H, D))
  lse = np.full((H, T), np.inf)
  left, right = window
  if causal:
    right = 0
  sinks = None if s_aux is None else np.asarray(s_aux, np.float64)
  for b in range(B):
    q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
    sq = q1 - q0
    kb = np.asarray(keys[b]).astype(np.float64)
    vb = np.asarray(values[b]).astype(np.float64)
    sk, Hk = kb.shape[0], kb.shape[1]
    if sq <= 0:
      continue
    group = H // Hk
    qd = _per_sequence_head(q_descale, B, Hk)[b]
    kb = kb * _per_sequence_head(k_descale, B, Hk)[b][None, :, None]
    vb = vb * _per_sequence_head(v_descale, B, Hk)[b][None, :, None]
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    diag = i + sk - sq  # bottom-right aligned position of query i among the keys
    allowed = np.ones((sq, sk), bool)
    if causal:
      allowed &= j <= diag
    if left >= 0:
      allowed &= j >= diag - left
    if right >= 0:
      allowed &= j <= diag + right
    for h in range(H):
      qh = q[q0:q1, h] * qd[h // group]
      s = qh @ kb[:, h // group].T * scale
      if softcap > 0:
        s = softcap * np.tanh(s / softcap)
      if alibi is not None:
        s = s - alibi[b, h] * np.abs(diag - j)
      s = np.where(allowed, s, -np.inf)
      # The sink is one more logit of the row, with no value.
      sink = -np.inf if sinks is None else sinks[h]
      m = np.maximum(s.max(axis=1, initial=-np.inf), sink)
      seen = np.isfinite(m)
      shift = np.where(seen, m, 0.0)
      p = np.where(seen[:, None], np.exp(s - shift[:, None]), 0.0)
      l = p.sum(axis=1) + np.where(seen, np.exp(sink - shift), 0.0)
      o = p @ vb[:, h // group]
      out[q0:q1, h] = np.where(seen[:, None], o / np.where(seen, l, 1.0)[:, None], 0.0)
      lse[h, q0:q1] = np.where(seen, m + np.log(np.where(seen, l, 1.0)), np.inf)
  return out, lse
