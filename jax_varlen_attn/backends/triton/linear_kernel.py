"""The Triton kernel of `jax_varlen_attn.nn.fused_linear`: a projection of a few token rows with
its RMSNorm before it and its residual add or SwiGLU after it, in one launch.

    out[T, N] = epilogue(prologue(x)[T, K] @ w[N, K]^T)
      prologue  NORM: x -> RMSNorm(x) * norm_scale, rounded to x's dtype (as `nnx.RMSNorm`)
      epilogue  RESIDUAL: residual + y            SILU_MUL: silu(y[:, :N]) * y[:, N:] (w is [2N, K])

One program computes BLOCK_N output columns for every row (T <= BLOCK_M: a decode step's tokens),
streaming its BLOCK_N rows of w (K contiguous: the weight is stored [out, in]) through NUM_STAGES
buffers; with SILU_MUL it streams the gate's and the up projection's rows together and multiplies
them in registers. NORM needs no pass of its own: RMSNorm scales each row by one number, so the
loop multiplies (x * norm_scale) rounded to x's dtype into the product while it sums x's squares,
and the product is scaled by each row's 1 / rms at the end (the jnp form rounds x * scale / rms
instead: the same error bound). The product is rounded to x's dtype before the residual add and
before silu, as the jnp form (`jax_varlen_attn.nn.linear`) rounds it.

In a decode step this replaces XLA's GEMM with its split-K partial sums and the small kernels
around it (the residual add, the RMSNorm's reduction and its apply, silu * up): benchmarks/NOTES.md,
"fused linears".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jax_varlen_attn.backends import device
from jax_varlen_attn.backends.triton.call import launch, route_for
from jax_varlen_attn.spec import next_pow2

# The MMA's smallest row tile: calls of at most this many tokens take the kernel (`fits`).
MAX_ROWS = 16


@dataclasses.dataclass(frozen=True)
class LinearConfig:
  """Tile of `fused_linear_kernel`: BLOCK_N output columns a program, BLOCK_K of K a step."""

  block_n: int
  block_k: int
  num_stages: int
  num_warps: int

  @classmethod
  def get_default(cls, k: int, n: int) -> "LinearConfig":
    # 32 columns where that still gives every SM a program, else 16 (the narrowest MMA tile):
    # 32 x 256 tiles in 4 buffers read the model's q|k|v and gate|up fastest (NOTES.md "fused linears").
    block_n = 32 if n // 32 >= device.num_sms() else 16
    block_k = max(16, min(256, next_pow2(k)))
    return cls(block_n=min(block_n, max(16, next_pow2(n))), block_k=block_k, num_stages=4, num_warps=4)


def fits(num_rows: int) -> bool:
  """Whether a call over `num_rows` token rows takes the kernel (else the jnp form: XLA's GEMM)."""
  return 0 < num_rows <= MAX_ROWS


@triton.jit
def _load_rows(ptr, rows, cols, row_ok, col_ok, STRIDE: tl.constexpr, EVEN: tl.constexpr):
  """A [len(rows), len(cols)] tile of a row-major [*, STRIDE] array; out-of-range entries 0."""
  at = ptr + rows[:, None].to(tl.int64) * STRIDE + cols[None, :]
  if EVEN:
    return tl.load(at, mask=row_ok[:, None], other=0.0)
  return tl.load(at, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def fused_linear_kernel(
    x_ptr, w_ptr, scale_ptr, res_ptr,  # x [T, K]; w [N or 2N, K]; scale [K]; residual [T, N]
    out_ptr,  # [T, N]
    T: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    EVEN_K: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr, RESIDUAL: tl.constexpr,
    SILU_MUL: tl.constexpr,
):
  dtype = x_ptr.dtype.element_ty
  offs_m = tl.arange(0, BLOCK_M)
  offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_k = tl.arange(0, BLOCK_K)
  row_ok = offs_m < T
  col_ok = offs_n < N
  sum_sq = tl.zeros([BLOCK_M], tl.float32)
  acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
  acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
  for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
    k_ok = k0 + offs_k < K
    xk = _load_rows(x_ptr + k0, offs_m, offs_k, row_ok, k_ok, K, EVEN_K)
    if NORM:
      xf = xk.to(tl.float32)
      sum_sq += tl.sum(xf * xf, 1)
      s = tl.load(scale_ptr + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
      xk = (xf * s[None, :]).to(dtype)
    w = _load_rows(w_ptr + k0, offs_n, offs_k, col_ok, k_ok, K, EVEN_K)
    acc += tl.dot(xk, tl.trans(w))
    if SILU_MUL:
      w_up = _load_rows(w_ptr + N * K + k0, offs_n, offs_k, col_ok, k_ok, K, EVEN_K)
      acc_up += tl.dot(xk, tl.trans(w_up))
  if NORM:
    inv_rms = tl.rsqrt(sum_sq / K + EPS)[:, None]
    acc *= inv_rms
    acc_up *= inv_rms
  y = acc.to(dtype).to(tl.float32)
  if SILU_MUL:
    y = (y * tl.sigmoid(y)).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
  if RESIDUAL:
    y = _load_rows(res_ptr, offs_m, offs_n, row_ok, col_ok, N, False).to(tl.float32) + y
  at = out_ptr + offs_m[:, None] * N + offs_n[None, :]
  tl.store(at, y.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


def fused_linear(x, w, norm_scale, eps: float, residual, silu_mul: bool, config: LinearConfig = None):
  """The launch: x [T, K] (T <= MAX_ROWS), w [N or 2N, K] -> [T, N] in x's dtype.

  Arguments are validated (`jax_varlen_attn.nn.fused_linear`); norm_scale [K] or None (no norm),
  residual [T, N] or None.
  """
  t, k = x.shape
  n = w.shape[0] // 2 if silu_mul else w.shape[0]
  cfg = config or LinearConfig.get_default(k, n)
  unused = jnp.zeros((1,), x.dtype)  # the pointer of an absent operand: never read
  inputs = dict(x_ptr=x, w_ptr=w, scale_ptr=unused if norm_scale is None else norm_scale,
                res_ptr=unused if residual is None else residual)
  consts = dict(T=t, K=k, N=n, BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                NUM_STAGES=cfg.num_stages, EVEN_K=k % cfg.block_k == 0, NORM=norm_scale is not None,
                EPS=float(eps), RESIDUAL=residual is not None, SILU_MUL=bool(silu_mul))
  grid = (-(-n // cfg.block_n),)
  (out,) = launch(fused_linear_kernel, inputs, [jax.ShapeDtypeStruct((t, n), x.dtype)], grid, cfg.num_warps,
                  cfg.num_stages, consts, route=route_for(t))
  return out
