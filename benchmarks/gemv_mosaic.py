"""Experiment (issue 15): a skinny matmul in Mosaic GPU, weights streamed by TMA (bench_gemv --mosaic).

y [M, N] = x [M, K] @ w [K, N] for M <= 16 (a decode step's rows), computed transposed so the weight
is wgmma's A operand (64 output features a warpgroup, wgmma's M) and the few rows its N (padded to
16): y.T [N, M] = w.T [N, K] @ x.T [K, M]. Each CTA owns `block_n` output features and one of
`split_k` K ranges; `emit_pipeline` keeps `stages` weight tiles [block_k, block_n] (and x's [16,
block_k]) in flight by TMA, so a CTA has stages x block_k x block_n x 2 bytes of weights on the way
with no per-thread address arithmetic. The CTA writes its f32 partial [block_n, 16]; one XLA fusion
sums the K ranges, transposes and casts (the step's consumer would fuse that in a model).

Not in the library: it asked whether TMA streaming beats XLA's split-K GEMMs at 4-16 rows. On an
H200 it did not (benchmarks/NOTES.md session 18 item 4: 6-25% slower, o_proj aside): at these
sizes every GEMM kernel pays ~2 us of fill and drain beyond its bytes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

ROWS = 16  # x's rows padded to wgmma's N (a multiple of 8; 16 keeps the x tile one 8-row tile pair)


def pad_rows(x):
  """x [M, K] -> [ROWS, K], rows past M zero (the kernel's B operand)."""
  m = x.shape[0]
  if m > ROWS:
    raise ValueError(f"x has {m} rows; this kernel takes at most {ROWS}")
  return jnp.pad(x, ((0, ROWS - m), (0, 0)))


def partials(xp, w, block_n: int, block_k: int, split_k: int, stages: int, w_nk: bool = False):
  """f32 [split_k, N, ROWS]: (xp [ROWS, K] @ w [K, N]).T over split_k contiguous K ranges.
  w_nk: w is stored [N, K] (K contiguous: wgmma's A operand as it lies, no transposed read)."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  (rows, k), n = xp.shape, (w.shape[0] if w_nk else w.shape[1])
  if rows != ROWS:
    raise ValueError(f"xp must have {ROWS} rows (pad_rows), got {rows}")
  if n % block_n or k % (split_k * block_k):
    raise ValueError(f"N={n} must divide by block_n={block_n}, K={k} by split_k * block_k")
  k_per = k // split_k
  steps = k_per // block_k
  itemsize = jnp.dtype(w.dtype).itemsize

  def transforms(minor: int):
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))

  def body(x_gmem, w_gmem, o_gmem):
    pl.run_scoped(lambda o_smem: cta(x_gmem, w_gmem, o_gmem, o_smem),
                  plgpu.SMEM((block_n, ROWS), jnp.float32))

  def cta(x_gmem, w_gmem, o_gmem, o_smem):
    ni = lax.axis_index("n")
    si = lax.axis_index("s")

    def accumulate(acc_ref):
      def step(_, x_smem, w_smem):
        a = w_smem if w_nk else w_smem.transpose((1, 0))  # [block_n, block_k]
        plgpu.wgmma(acc_ref, a, x_smem.transpose((1, 0)))
        plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
          step, grid=(steps,),
          in_specs=[plgpu.BlockSpec((ROWS, block_k), lambda kk: (0, kk), transforms=transforms(block_k)),
                    plgpu.BlockSpec((block_n, block_k), lambda kk: (0, kk), transforms=transforms(block_k))
                    if w_nk else plgpu.BlockSpec((block_k, block_n), lambda kk: (kk, 0),
                                                 transforms=transforms(block_n))],
          max_concurrent_steps=stages,
      )(x_gmem.at[:, pl.ds(si * k_per, k_per)],
        w_gmem.at[pl.ds(ni * block_n, block_n), pl.ds(si * k_per, k_per)] if w_nk
        else w_gmem.at[pl.ds(si * k_per, k_per), pl.ds(ni * block_n, block_n)])
      return acc_ref[...]

    o_smem[...] = pl.run_scoped(accumulate, plgpu.ACC((block_n, ROWS), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * block_n, block_n)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((split_k, n, ROWS), jnp.float32),
      grid=(n // block_n, split_k), grid_names=("n", "s"),
  )(xp, w)


@functools.partial(jax.jit, static_argnames=("m", "block_n", "block_k", "split_k", "stages", "w_nk"))
def matmul(xp, w, m: int, block_n: int, block_k: int, split_k: int, stages: int, w_nk: bool = False):
  """y [m, N] in xp's dtype = xp[:m] @ w (w_nk: @ w.T): the kernel's partials summed, transposed,
  cast (one fusion)."""
  parts = partials(xp, w, block_n, block_k, split_k, stages, w_nk)
  return jnp.sum(parts, axis=0)[:, :m].T.astype(xp.dtype)
