"""Triton kernels for ``y = x @ dequantize(W_fp4)^T + b`` with NVFP4 or MXFP4 weights (W4A16).

The reference (``fp4_linear.fp4_linear_reference``) is the specification. Layouts are the
checkpoint's (compressed-tensors ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``), read as
they are:

- ``x``       (M, K) activations, bf16/fp16/fp32, rows ``stride_xm`` apart;
- ``packed``  (N, K/2) uint8 E2M1 codes, column 2k in the low nibble of byte k. The kernels read
  it as (N, K/8) int32 words (a free view): on a little-endian GPU column ``8w + j`` sits in bits
  ``4j .. 4j+3`` of word ``w``, the int4 layout. Each word is loaded once (``evict_first``);
- ``scale``   NVFP4: (N, K/16) float8_e4m3fn, passed as its uint8 bits and decoded in the kernel
  (exact, normal and subnormal; Triton's own fp8 type needs compute capability 8.9); MXFP4:
  (N, K/32) uint8 E8M0 exponents;
- ``global``  NVFP4 only: float32 (1,), read on the device (no host sync, CUDA-graph safe).

The weight is ``e2m1(code) * scale / global`` (NVFP4) or ``e2m1(code) * 2^(e - 127)`` (MXFP4).

**Decoding, two codes per integer operation** (the ``tl.dot`` schedules and the dequantize kernel;
the one-token schedule decodes to float32 instead, see below). At one token a W4A16 matmul brings
one FMA per weight, and the decode is what competes with memory bandwidth (an H100 issues 64 int32
operations per SM per clock, half its float32 rate). Codes ``j`` and ``j + 4`` of a word sit 16
bits apart, so one shift by ``4j``, two masks and an or build both codes' fp16 bit patterns at
once: sign to bit 15, the magnitude bits ``e1 e0 m`` to bits 9-11. That fp16 number is exactly
``e2m1 * 2^-14`` (E2M1's subnormal 0.5 lands on fp16's subnormal), and widening it to float32 is
exact (one ``HADD2.F32`` per code on sm_90); the 2^-14 is folded into the block scale (times 2^14,
exact). No table, no gather. Activations are loaded in the matching column order, so every
product pairs the right activation and weight and the sum over K is unchanged.

**Block scales, applied once per block.** A scale block (16 or 32 columns, 2 or 4 words) is
narrower than any K tile (64..256), so a tile holds BLOCK_K / 16 (or / 32) blocks. Two cases:

- ``BLOCK_M = 1`` (split-K, one token, CUDA cores): the fp16 route above would need one
  ``HADD2.F32`` per code plus the ``PRMT`` Triton adds to re-pack fp16 halves, so this schedule
  decodes straight to float32 (``_e2m1_f32_pair``): two shifts and a mask-or per pair of codes put
  sign and ``e1 e0 m`` where a bf16 pair keeps them, and each half read as the top of a float32 is
  exactly ``e2m1 * 2^-126`` (e = 0 lands on float32 subnormals, as E2M1's 0.5 lands on fp16's).
  The activations are multiplied by 2^100 once per column (shared by the rows a thread holds), so
  each product is ``x * e2m1 * 2^-26``, exact; the 2^26 comes back once per output after the loop.
  bf16 activations are read as int32 pairs and widened by a shift or a mask (X_WORDS). For
  j = 0..3 the codes ``8w + j`` and ``8w + 4 + j`` of every word go into a per-word float32 sum
  with x (two FMA chains) in the words' own register layout; the per-word sums of a block are
  added (in-thread) and multiplied by the block's scale, one multiply per block and not per
  weight; the (BLOCK_N, BLOCK_K/16) block sums are accumulated across K tiles and reduced across
  blocks once, after the loop. With EVEN (N and K multiples of the tile) the loop has no masks.
  No shuffles and no shared memory in the loop: compiled offline for sm_90 (Llama-3-8B shapes,
  ``splitk_m1n64k128s8w4p3``) the loop is 368 SASS instructions per warp for 64 weights per thread,
  about 5.75 per weight (docs/kernel-budget.md). Limits of the 2^100: activations of magnitude
  2^28 (2.7e8) or more overflow, and products below 2^-100 in magnitude round as float32
  subnormals (absolute error under 2^-149 * 2^26 each).
- ``BLOCK_M >= 16`` (``tl.dot``): on the tensor cores one K = 16 slice is one MMA k-step, so
  scaling after the MMA would need a separate accumulator or dot per block and a (BLOCK_M, BLOCK_N)
  multiply per block: as many multiplies as scaling the weight, and more MMA issue overhead.
  Instead the tile splits into a *low* half (columns 8w .. 8w+3 of every word) and a *high* half
  (8w+4 .. 8w+7), each (BLOCK_N, BLOCK_K/2), decoded as above; each half, viewed as
  (BLOCK_N, BLOCK_K/16, 8), is multiplied by its scales broadcast along the last axis (a register
  broadcast, no per-element load), and two ``tl.dot`` (low and high half, x loaded in runs of 4
  columns to match) reduce the tile. For NVFP4 the operand is ``e2m1 * scale`` *without* the
  global divisor: a 2-bit significand times E4M3's 4-bit one needs at most 6 bits and lies in
  [2^-10, 2688], so it is exact in bf16 and fp16 and ``tl.dot`` loses nothing; the global scale
  divides the float32 accumulator once per output element (``div_rn``) at the end. For MXFP4 the
  operand is the reference weight itself (a power-of-two scale is exact).

Both matmul schedules therefore differ from the reference by summation order and, for NVFP4, by
being more precise: the reference rounds ``e2m1 * scale / global`` to the activation dtype per
weight, the kernels divide the float32 sum once. An all-zero block (codes 0, whatever its scale)
adds exact zeros whatever the activations in its columns. The one limit of the 2^14 fold: MXFP4
exponents above 240 (block scales of 2^114 and more, weights beyond 10^34, which no bf16/fp16
model holds) overflow in the matmul kernels; the dequantize kernel has no such limit.

The schedules and their choice are the int kernels' (``dequant_linear_triton``, ``tuning``):
split-K for M <= 16, tiled ``tl.dot`` tiles for medium M, and for large M a dequantize kernel
writing the dense weight (bit for bit ``fp4_dequant_weight``: ``e2m1 * (scale / global)`` in
float32, cast once) followed by ``torch.nn.functional.linear``. Importing this module imports
Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
# The int kernels' config choice and per-GPU autotuner: one table (and one cache file) for every format.
from .dequant_linear import pick_config
from .dequant_linear_triton import _dot, _dot_dtype, _store_output, _tile_ids
from .fp4_linear import BLOCK, FP4_KINDS
from .tuning import KernelConfig


ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP16_SUBNORMAL_SHIFT = tl.constexpr(16384.0)   # 2^14: the fp16 bits of a code hold e2m1 * 2^-14
# One token (BLOCK_M = 1): codes decode to e2m1 * 2^-126 (float32, subnormal for e = 0) and the
# activations are multiplied by 2^100, so products carry 2^-26, undone in the block scale (exact).
X_PRESCALE = tl.constexpr(2.0 ** 100)
F32_SUBNORMAL_SHIFT = tl.constexpr(2.0 ** 26)


@triton.jit
def _e2m1_pair(t):
    """``e2m1 * 2^-14`` (float32, exact) of the two codes in bits 0-3 and 16-19 of int32 ``t``.
    One shift-mask-or builds both fp16 bit patterns: sign to bit 15, ``e1 e0 m`` to bits 9-11."""
    pair = ((t & 0x70007) << 9) | (((t >> 3) & 0x10001) << 15)
    lo = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _e4m3_value(b):
    """float32 values of float8_e4m3fn bits (int32, 0..255), exact; 0x7F/0xFF (NaN) never occur."""
    # Sign to bit 31, exponent and mantissa to bits 20-26: the float32 e4m3 * 2^-120 (e = 0 lands
    # on float32 subnormals), times 2^120 (exact).
    bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20)
    return bits.to(tl.float32, bitcast=True) * 1.329227995784915872903807060280344576e36


@triton.jit
def _e8m0_value(e):
    """float32 ``2^(e - 127)`` of E8M0 exponents (int32, 0..255), from bits; e = 0 is 2^-127."""
    return tl.where(e == 0, 1 << 22, e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_words(words_ptr, n_offs, k0, N, KW, BLOCK_K: tl.constexpr, EVEN: tl.constexpr = False):
    """int32 words (BLOCK_N, BLOCK_K/8) of columns k0 .. k0+BLOCK_K; 0 outside the matrix (EVEN:
    every tile lies inside the matrix, no mask)."""
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    ptrs = words_ptr + n_offs[:, None].to(tl.int64) * KW + kw[None, :]
    # Each packed word is loaded once and streamed: weights are never reused within a call.
    if EVEN:
        return tl.load(ptrs, eviction_policy="evict_first")
    return tl.load(ptrs, mask=(n_offs[:, None] < N) & (kw[None, :] < KW), other=0, eviction_policy="evict_first")


@triton.jit
def _load_scales(scale_ptr, n_offs, k0, N, G, IS_NV: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN: tl.constexpr = False):
    """float32 block scales (BLOCK_N, BLOCK_K/SCALE_BLOCK): the E4M3 value (NVFP4, global divisor
    not applied) or 2^(e - 127) (MXFP4); 0 outside the matrix (EVEN: no mask, all inside)."""
    g = k0 // SCALE_BLOCK + tl.arange(0, BLOCK_K // SCALE_BLOCK)
    mask = (n_offs[:, None] < N) & (g[None, :] < G)
    ptrs = scale_ptr + n_offs[:, None].to(tl.int64) * G + g[None, :]
    if EVEN:
        bits = tl.load(ptrs, eviction_policy="evict_first").to(tl.int32)
    else:
        bits = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
    if IS_NV:
        s = _e4m3_value(bits)
    else:
        s = _e8m0_value(bits)
    # Out-of-matrix codes are 0 anyway; the select also anchors a layout that saves a third of
    # the tl.dot schedules' instructions on sm_90 (ptxas output compared offline).
    if EVEN:
        return s
    return tl.where(mask, s, 0.0)


@triton.jit
def _half_columns(k0, BLOCK_K: tl.constexpr):
    """Columns (BLOCK_K/2,) of the low half of the K tile at k0: 8w + j, j = 0..3, in (w, j)
    order; the high half is these + 4."""
    i = tl.arange(0, BLOCK_K // 2)
    return k0 + (i // 4) * 8 + i % 4


@triton.jit
def _scaled_halves(words, s, SCALE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EXACT_E2M1: tl.constexpr):
    """``e2m1 * 2^-14 * s`` (or ``e2m1 * s`` with EXACT_E2M1) of the low and high halves of a word
    tile (BLOCK_N, BLOCK_K/8) with block scales ``s`` (BLOCK_N, BLOCK_K/SCALE_BLOCK): two
    (BLOCK_N, BLOCK_K/2) float32 tiles in ``_half_columns`` order."""
    NB: tl.constexpr = BLOCK_K // SCALE_BLOCK
    HALF: tl.constexpr = SCALE_BLOCK // 2
    t = words[:, :, None] >> (tl.arange(0, 4) * 4)[None, None, :]     # code j at bits 0-3, j+4 at 16-19
    lo, hi = _e2m1_pair(t)                                             # (BLOCK_N, BLOCK_K/8, 4) each
    lo = tl.reshape(lo, (BLOCK_N, BLOCK_K // 2))
    hi = tl.reshape(hi, (BLOCK_N, BLOCK_K // 2))
    if EXACT_E2M1:
        lo = lo * FP16_SUBNORMAL_SHIFT                                 # exact
        hi = hi * FP16_SUBNORMAL_SHIFT
    # Each block's half is HALF contiguous columns of the half tile: the scale is a broadcast.
    return (tl.reshape(tl.reshape(lo, (BLOCK_N, NB, HALF)) * s[:, :, None], (BLOCK_N, BLOCK_K // 2)),
            tl.reshape(tl.reshape(hi, (BLOCK_N, NB, HALF)) * s[:, :, None], (BLOCK_N, BLOCK_K // 2)))


@triton.jit
def _e2m1_f32_pair(words, J: tl.constexpr):
    """``e2m1 * 2^-126`` (float32, exact) of codes ``8w + J`` and ``8w + 4 + J`` of int32 ``words``
    (bits 4J .. 4J+3 and 16+4J .. 19+4J), with no conversion instruction. Two shifts and a
    mask-or put both codes where a bf16 pair keeps sign and ``e1 e0 m`` (bits 15 and 6-8 of each
    half); each half read as the top of a float32 is ``s << 31 | e1 e0 m << 22``: exponent field e
    and mantissa m/2, so ``2^(e-127) (1 + m/2)`` for e > 0 and the subnormal ``m * 2^-127`` for
    e = 0, both ``e2m1 * 2^-126``. The low half moves up with one shift, the high half is masked."""
    if J < 2:
        mag = words << (6 - 4 * J)
    else:
        mag = words >> (4 * J - 6)              # arithmetic: the bits it fills are masked off
    pair = (mag & 0x01C001C0) | ((words << (12 - 4 * J)) & -2147450880)   # 0x80008000
    lo = (pair << 16).to(tl.float32, bitcast=True)
    hi = (pair & -65536).to(tl.float32, bitcast=True)                     # 0xFFFF0000
    return lo, hi


@triton.jit
def _x_columns(x_row, K, wcol, X_WORDS: tl.constexpr, EVEN: tl.constexpr):
    """Activations of columns ``wcol + j``, j = 0..7 (eight (BLOCK_K/8,) float32 vectors) times
    X_PRESCALE. X_WORDS (bf16 rows, 4-byte aligned): four int32 loads of bf16 pairs per word column,
    each bf16 widened by a shift or a mask (no conversion, half the loads)."""
    xs = ()
    if X_WORDS:
        xw = x_row.to(tl.pointer_type(tl.int32)) + wcol // 2
        for q in tl.static_range(4):
            if EVEN:
                w = tl.load(xw + q, eviction_policy="evict_last")
            else:
                w = tl.load(xw + q, mask=wcol < K - 2 * q, other=0, eviction_policy="evict_last")
            xs = xs + ((w << 16).to(tl.float32, bitcast=True) * X_PRESCALE,
                       (w & -65536).to(tl.float32, bitcast=True) * X_PRESCALE)
    else:
        for j in tl.static_range(8):
            if EVEN:
                v = tl.load(x_row + wcol + j, eviction_policy="evict_last")
            else:
                v = tl.load(x_row + wcol + j, mask=wcol < K - j, other=0.0, eviction_policy="evict_last")
            xs = xs + (v.to(tl.float32) * X_PRESCALE,)
    return xs


@triton.jit
def _gemv_tile(x_row, K, words, k0, BLOCK_K: tl.constexpr, X_WORDS: tl.constexpr, EVEN: tl.constexpr):
    """Sum over each word's 8 columns of ``x * 2^100 * e2m1 * 2^-126``: (BLOCK_N, BLOCK_K/8) float32,
    in the words' own layout (no data movement; the block reduction that follows stays in-thread).
    Every product is exact (a bf16 significand times a 2-bit one) unless ``|x * e2m1| < 2^-100``."""
    wcol = k0 + tl.arange(0, BLOCK_K // 8) * 8                          # first column of each word
    xs = _x_columns(x_row, K, wcol, X_WORDS, EVEN)
    acc = tl.zeros(words.shape, dtype=tl.float32)
    for j in tl.static_range(4):
        lo, hi = _e2m1_f32_pair(words, j)                                  # columns 8w + j, 8w + 4 + j
        acc += lo * xs[j][None, :]                                         # two FMA chains
        acc += hi * xs[j + 4][None, :]
    return acc


@triton.jit
def _fp4_matmul_kernel(x_ptr, words_ptr, scale_ptr, gscale_ptr, bias_ptr, out_ptr,
                       M, N, K, KW, G, stride_xm, stride_om, k_per_split,
                       IS_NV: tl.constexpr, SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       X_WORDS: tl.constexpr = False, EVEN: tl.constexpr = False, PIPE: tl.constexpr = 3):
    # Program -> (m tile, n tile) in bands of GROUP_M m-tiles (L2 reuse), axis 1 the K split: as
    # in the int kernel.
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    NB: tl.constexpr = BLOCK_K // SCALE_BLOCK
    USE_DOT: tl.constexpr = BLOCK_M >= 16
    m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_blocks = tl.zeros((BLOCK_N, NB), dtype=tl.float32)          # BLOCK_M = 1: per-block sums
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # tl.range with num_stages: the weight loads of the one-token path (no tl.dot, which Triton
    # pipelines by itself) go through cp.async, PIPE tiles ahead, so the loop never waits on DRAM.
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=PIPE):
        ONE_TOKEN_EVEN: tl.constexpr = EVEN and not USE_DOT
        words = _load_words(words_ptr, n_offs, k0, N, KW, BLOCK_K, ONE_TOKEN_EVEN)    # (BLOCK_N, BLOCK_K/8)
        s = _load_scales(scale_ptr, n_offs, k0, N, G, IS_NV, SCALE_BLOCK, BLOCK_K, ONE_TOKEN_EVEN)
        if USE_DOT:
            s = s * FP16_SUBNORMAL_SHIFT                 # undoes the codes' 2^-14 (exact)
            # Scale the exact E2M1 halves per block (a broadcast), then dot each over its columns.
            col = _half_columns(k0, BLOCK_K)                                      # (BLOCK_K/2,)
            x_rows = x_ptr + m_offs[:, None].to(tl.int64) * stride_xm + col[None, :]
            xmask = (m_offs[:, None] < M) & (col[None, :] < K)
            x_lo = tl.load(x_rows, mask=xmask, other=0.0, eviction_policy="evict_last")      # (BLOCK_M, BLOCK_K/2)
            x_hi = tl.load(x_rows + 4, mask=xmask, other=0.0, eviction_policy="evict_last")
            w_lo, w_hi = _scaled_halves(words, s, SCALE_BLOCK, BLOCK_N, BLOCK_K, False)  # (BLOCK_N, BLOCK_K/2)
            acc += _dot(x_lo, w_lo, DOT_DTYPE, INPUT_PRECISION, True)
            acc += _dot(x_hi, w_hi, DOT_DTYPE, INPUT_PRECISION, True)
        else:
            # One token: reduce each block on the exact values, scale the block sum once.
            per_word = _gemv_tile(x_ptr + pid_m.to(tl.int64) * stride_xm, K, words, k0, BLOCK_K, X_WORDS,
                                  EVEN)                                              # (BLOCK_N, BLOCK_K/8)
            per_block = tl.sum(tl.reshape(per_word, (BLOCK_N, NB, SCALE_BLOCK // 8)), axis=2)
            acc_blocks += per_block * s                                              # (BLOCK_N, NB), times 2^-26
    if not USE_DOT:
        acc = tl.sum(acc_blocks, axis=1)[None, :] * F32_SUBNORMAL_SHIFT            # (1, BLOCK_N), exact
    if IS_NV:
        acc = tl.math.div_rn(acc, tl.load(gscale_ptr))
    _store_output(acc, bias_ptr, out_ptr, m_offs, n_offs, M, N, stride_om, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _fp4_dequant_kernel(words_ptr, scale_ptr, gscale_ptr, w_ptr, N, K, KW, G, IS_NV: tl.constexpr,
                        SCALE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense (N, K) weight in ``w_ptr``'s dtype: ``e2m1 * (scale / global)`` in float32, cast once,
    the reference's operations in its order (bit for bit ``fp4_dequant_weight``)."""
    n_offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    s = _load_scales(scale_ptr, n_offs, k0, N, G, IS_NV, SCALE_BLOCK, BLOCK_K)
    if IS_NV:
        s = tl.math.div_rn(s, tl.load(gscale_ptr))
    # The exact E2M1 value times scale / global, rounded once, as the reference.
    w_lo, w_hi = _scaled_halves(_load_words(words_ptr, n_offs, k0, N, KW, BLOCK_K), s, SCALE_BLOCK, BLOCK_N,
                                BLOCK_K, True)
    col = _half_columns(k0, BLOCK_K)
    mask = (n_offs[:, None] < N) & (col[None, :] < K)
    ptrs = w_ptr + n_offs[:, None].to(tl.int64) * K + col[None, :]
    tl.store(ptrs, w_lo.to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + 4, w_hi.to(w_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers

def _check(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, kind: str) -> None:
    """Shapes and dtypes only: no values are read (that would sync with the GPU)."""
    if kind not in FP4_KINDS:
        raise ValueError(f"FP4 kind must be one of {FP4_KINDS}, got {kind!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"the packed FP4 weight must be a 2-D uint8 tensor (out_features, in_features / 2), "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    n, k = packed.shape[0], 2 * packed.shape[1]
    block = BLOCK[kind]
    if k % block:
        raise ValueError(f"{kind} needs in_features to be a multiple of {block}; the packed weight "
                         f"{tuple(packed.shape)} holds {k}")
    scale_dtype = torch.float8_e4m3fn if kind == "nvfp4" else torch.uint8
    if scale.dtype != scale_dtype or tuple(scale.shape) != (n, k // block):
        raise ValueError(f"{kind} block scales must be {scale_dtype} of shape ({n}, {k // block}) (one per "
                         f"{block} columns), got {scale.dtype} of shape {tuple(scale.shape)}")
    if kind == "nvfp4" and global_scale is None:
        raise ValueError("NVFP4 needs its float32 (1,) global scale (the layer's weight_global_scale); got None")
    if kind == "mxfp4" and global_scale is not None:
        raise ValueError("MXFP4 has no global scale (its E8M0 block scales are absolute); pass global_scale=None")
    if global_scale is not None and global_scale.numel() != 1:
        raise ValueError(f"the NVFP4 global scale is one float32 per tensor, got shape {tuple(global_scale.shape)}")


def _kernel_args(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, kind: str):
    """(int32 words (N, K/8), uint8 scale bits (N, G), float32 (1,) global or a placeholder)."""
    if packed.stride(-1) != 1 or packed.stride(0) != packed.shape[1] or packed.data_ptr() % 4:
        packed = packed.contiguous() if not packed.is_contiguous() else packed.clone()   # aligned rows
    words = packed.view(torch.int32)                                        # (N, K/8), a view
    bits = scale.contiguous().view(torch.uint8)
    if global_scale is None:
        g = bits                                                            # never read (IS_NV false)
    else:
        g = global_scale.to(device=packed.device, dtype=torch.float32).reshape(1)
    return words, bits, g


def _x_words(x2: torch.Tensor) -> bool:
    """Whether the one-token kernel may read the activations as int32 pairs of bf16 (4-byte aligned rows)."""
    return x2.dtype == torch.bfloat16 and x2.data_ptr() % 4 == 0 and x2.stride(0) % 2 == 0


def fp4_matmul(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
               bias: torch.Tensor | None, *, kind: str, config: KernelConfig,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) x packed (N, K/2) -> (M, N) in x's dtype with one launch of the fused kernel.
    ``out`` (M, N), contiguous, in x's dtype, receives the result when given (tests poison it)."""
    _check(packed, scale, global_scale, kind)
    if config.kind == "dense" or not (config.block_m == 1 or config.block_m >= 16):
        raise ValueError(f"fp4_matmul runs split-K or tiled configs with BLOCK_M 1 or >= 16, not {config.name}")
    M, K = x2.shape
    N = packed.shape[0]
    block = BLOCK[kind]
    if config.block_k % block:
        raise ValueError(f"BLOCK_K {config.block_k} of {config.name} must be a multiple of the {kind} block {block}")
    words, bits, g = _kernel_args(packed, scale, global_scale, kind)
    bm = config.block_m
    split_k, k_per_split, result, acc = tuning.split_k_launch(M, N, K, config, x2, out)
    dot_dtype, precision = _dot_dtype(x2.dtype)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, config.block_n), split_k)
    _fp4_matmul_kernel[grid](
        x2, words, bits, g, bias if bias is not None else g, acc,
        M, N, K, words.shape[1], bits.shape[1], x2.stride(0), acc.stride(0), k_per_split,
        IS_NV=kind == "nvfp4", SCALE_BLOCK=block, HAS_BIAS=bias is not None, BLOCK_M=bm,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m, SPLIT_K=split_k,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, X_WORDS=_x_words(x2),
        EVEN=K % config.block_k == 0 and N % config.block_n == 0, PIPE=config.num_stages,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if split_k > 1:
        result.copy_(acc)
    return result


def fp4_dequant_weight(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, *,
                       kind: str, dtype: torch.dtype, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """Dense (N, K) weight in ``dtype``, bit for bit ``fp4_linear.fp4_dequant_weight``."""
    _check(packed, scale, global_scale, kind)
    words, bits, g = _kernel_args(packed, scale, global_scale, kind)
    N, K = packed.shape[0], 2 * packed.shape[1]
    w = torch.empty(N, K, device=packed.device, dtype=dtype)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _fp4_dequant_kernel[grid](words, bits, g, w, N, K, words.shape[1], bits.shape[1], IS_NV=kind == "nvfp4",
                              SCALE_BLOCK=BLOCK[kind], BLOCK_N=block_n, BLOCK_K=block_k)
    return w


def fp4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
               bias: torch.Tensor | None, *, kind: str, config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype. ``config`` forces one kernel configuration (tests,
    benchmarks); otherwise the autotuned one for this GPU and shape, or the heuristic."""
    _check(packed, scale, global_scale, kind)
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"the FP4 kernels take {', '.join(str(d) for d in ACT_DTYPES)} activations, got {x.dtype}")
    N, K = packed.shape[0], 2 * packed.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but the packed weight {tuple(packed.shape)} "
                         f"holds in_features = {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, N)

    def run(cfg: KernelConfig) -> torch.Tensor:
        if cfg.kind == "dense":
            w = fp4_dequant_weight(packed, scale, global_scale, kind=kind, dtype=x2.dtype)
            return torch.nn.functional.linear(x2, w, bias)
        return fp4_matmul(x2, packed, scale, global_scale, bias, kind=kind, config=cfg)

    cfg = config or choose_config(x2, N, bias is not None, run, kind=kind)
    return run(cfg).reshape(*lead, N)


def autotune_key(kind: str, has_bias: bool, dtype: torch.dtype, m: int, n: int, k: int) -> str:
    """The autotune table's key; the format comes first (int keys start ``int4|``)."""
    return (f"{kind}|bias{int(has_bias)}|{str(dtype).removeprefix('torch.')}|m{tuning.m_bucket(m)}|"
            f"n{n}|k{k}")


def choose_config(x2: torch.Tensor, n: int, has_bias: bool, run, *, kind: str) -> KernelConfig:
    """As for the integer kernels (``dequant_linear.pick_config``); the FP4 block (16 or 32) plays
    the group size: it is narrower than every tile."""
    m, k = x2.shape
    return pick_config(x2, n, BLOCK[kind], autotune_key(kind, has_bias, x2.dtype, m, n, k), run)
