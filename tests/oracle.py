"""The judge: float64 NumPy attention written from docs/contract.md ("Semantics"), one sequence and head at a time.

It shares no code with the library: it takes each sequence's keys and values as plain arrays (the
test builds them from its own logical pages) and applies the semantics literally.
"""

from __future__ import annotations

import numpy as np


def reference_attention(q, keys, values, cu_seqlens_q, *, scale, causal=False, window=(-1, -1),
                        softcap=0.0, alibi=None):
  """q: [T, H, D]; keys / values: list over sequences of [sk_b, Hk, D]; cu_seqlens_q: [B + 1].

  alibi: None or [B, H] slopes. Returns (out f64[T, H, D], lse f64[H, T]); rows that see no key and
  rows past cu_seqlens_q[-1] are zero with lse +inf.
  """
  q = np.asarray(q, np.float64)
  T, H, D = q.shape
  out = np.zeros((T, H, D))
  lse = np.full((H, T), np.inf)
  left, right = window
  if causal:
    right = 0
  for b in range(len(cu_seqlens_q) - 1):
    q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
    sq = q1 - q0
    kb = np.asarray(keys[b], np.float64)
    vb = np.asarray(values[b], np.float64)
    sk = kb.shape[0]
    if sq <= 0 or sk == 0:
      continue
    group = H // kb.shape[1]
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
      s = q[q0:q1, h] @ kb[:, h // group].T * scale
      if softcap > 0:
        s = softcap * np.tanh(s / softcap)
      if alibi is not None:
        s = s - alibi[b, h] * np.abs(diag - j)
      s = np.where(allowed, s, -np.inf)
      m = s.max(axis=1, keepdims=True)
      seen = np.isfinite(m[:, 0])
      p = np.where(seen[:, None], np.exp(s - np.where(seen[:, None], m, 0.0)), 0.0)
      l = p.sum(axis=1)
      o = p @ vb[:, h // group]
      out[q0:q1, h] = np.where(seen[:, None], o / np.where(seen, l, 1.0)[:, None], 0.0)
      lse[h, q0:q1] = np.where(seen, m[:, 0] + np.log(np.where(seen, l, 1.0)), np.inf)
  return out, lse
