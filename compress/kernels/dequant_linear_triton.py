"""Triton kernels for ``y = x @ dequantize(W)^T + b`` with pack-quantized integer weights.

The reference (``dequant_linear.dequant_linear_reference``) is the specification. Layouts are the
checkpoint's, so nothing is repacked at load time:

- ``x``       (M, K) activations, bf16/fp16/fp32, rows ``stride_xm`` apart;
- ``packed``  (N, KW) int32, KW = ceil(K / PER), PER = 32 // BITS codes per word, code ``k`` of a
  row in bits ``(k % PER) * BITS`` of word ``k // PER``, stored unsigned (``u = q + 2^(BITS-1)``);
- ``scale``   (N, G) any float dtype; G groups of GROUP_SIZE columns (one group when per channel);
- ``zp``      (ceil(N / PER), G) int32, zero points packed along N the same way (asymmetric only);
- ``g_idx``   (K,) int32 group of each column (checkpoints with dynamic act-order only).

With ``uz = zp + 2^(BITS-1)`` (``2^(BITS-1)`` when symmetric) the weight is ``(u - uz) * scale``.

One kernel, two schedules (the launcher's ``KernelConfig`` picks them):
- **split-K** for small batches: grid (M tiles x N tiles, SPLIT_K); each program streams its
  slice of K once (evict-first: the weights are read exactly once per call), keeps the
  activations in cache (evict-last), and adds its partial sums into a float32 output with
  atomics, so that one token still spreads over every SM. BLOCK_M = 1 reduces on the CUDA cores
  (``_gemv_tile``: per-word sums, reduced once after the K loop; see docs/kernel-budget.md);
  BLOCK_M >= 16 uses ``tl.dot``.
- **tiled** for medium batches: SPLIT_K = 1, BLOCK_M up to 128, programs ordered in GROUP_M
  bands so that neighbouring programs share weight tiles in L2; output written once, in the
  activation dtype, bias fused.

When a K tile lies inside one group (per-channel, or BLOCK_K dividing GROUP_SIZE: GROUP_MODE 0),
the tile is reduced on the signed integer codes and the scale is applied once per tile:
``sum_k x*(u - uz)*s = s * sum_k x*(u - uz)``. ``u - uz`` is an integer in [-255, 255], exact in
bf16/fp16, so ``tl.dot`` on it loses nothing, and nothing cancels (an all-zero group adds exact
zeros whatever its scale). Otherwise (GROUP_MODE 1: groups narrower than the tile; GROUP_MODE 2:
a ``g_idx`` gather) each element is dequantized before the reduction. A tile of exactly 2 or 4
whole groups (GROUP_MODE 3) keeps the scale-once path at M = 1, one sub-tile per group, with every
sub-tile's words loaded before the first is decoded: the wider tile puts more bytes in flight.

Static act-order checkpoints (``actorder="static"``) store columns in their natural order and
need no gather at all; only dynamic act-order pays for GROUP_MODE 2.

Importing this module imports Triton; ``compress.kernels`` imports it only when first needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import KernelConfig, split_k_launch


@triton.jit
def _unpack_tile(packed_ptr, n_offs, kw0, N, KW, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Unsigned codes (BLOCK_N, BLOCK_K) int32 of rows ``n_offs``, words kw0 .. kw0+BLOCK_K/PER."""
    PER: tl.constexpr = 32 // BITS
    kw = kw0 + tl.arange(0, BLOCK_K // PER)
    mask = (n_offs[:, None] < N) & (kw[None, :] < KW)
    # Each packed word is loaded once and streamed: weights are never reused within a call.
    words = tl.load(packed_ptr + n_offs[:, None].to(tl.int64) * KW + kw[None, :], mask=mask, other=0,
                    eviction_policy="evict_first")                       # (BLOCK_N, BLOCK_K // PER)
    shifts = tl.arange(0, PER) * BITS
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # (BLOCK_N, BLOCK_K//PER, PER)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _zero_codes(zp_ptr, n_offs, g, N, G, BITS: tl.constexpr):
    """``uz = zp + 2^(BITS-1)`` for rows ``n_offs`` and groups ``g`` (broadcastable), int32."""
    PER: tl.constexpr = 32 // BITS
    word = tl.load(zp_ptr + (n_offs // PER) * G + g, mask=n_offs < N, other=0)
    return (word >> ((n_offs % PER) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _dot(x, w, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    """(BLOCK_M, BLOCK_K) x (BLOCK_N, BLOCK_K) -> (BLOCK_M, BLOCK_N) float32."""
    if USE_DOT:
        return tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=INPUT_PRECISION)
    else:
        return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


MAGIC = tl.constexpr(0x4B000000)      # float32 bits of 2^23: (u | MAGIC) is the float 2^23 + u, exactly


@triton.jit
def _gemv_words(packed_ptr, n_offs, N, KW, k0, BITS: tl.constexpr, SUB_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The packed words of rows ``n_offs``, columns k0 .. k0+SUB_K: (BLOCK_N, SUB_K/PER) uint32.
    Each word is loaded once and streamed (evict-first): weights are never reused within a call."""
    PER: tl.constexpr = 32 // BITS
    kw = k0 // PER + tl.arange(0, SUB_K // PER)
    return tl.load(packed_ptr + n_offs[:, None].to(tl.int64) * KW + kw[None, :],
                   mask=(n_offs < N)[:, None] & ((kw[None, :] < KW) | EVEN_K), other=0,
                   eviction_policy="evict_first").to(tl.uint32, bitcast=True)


@triton.jit
def _gemv_reduce(words, x_row, K, k0, scale_ptr, zp_ptr, n_offs, N, G, BITS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """One token, ``words`` = columns k0 .. k0+SUB_K inside one group: ``s * sum_j x * (u - uz)``
    per packed word, (BLOCK_N, SUB_K/PER) float32 in the words' own register layout (no reshape,
    no shuffle; the sum over words happens once, after the K loop).

    Decoding without shifts or int-to-float conversions: the J = 23 // BITS codes of a word that sit
    in its low 23 bits (int4: 5) are masked *in place* and or-ed into the mantissa of 2^23, one
    and-or each: ``(w & (mask << BITS*j)) | MAGIC`` is the float ``2^23 + u * 2^(BITS*j)``, and
    subtracting ``2^23 + uz * 2^(BITS*j)`` leaves ``(u - uz) * 2^(BITS*j)`` exactly. The activation
    of that column is multiplied by ``2^-(BITS*j)`` once per word column (shared by the rows a
    thread holds), so each product equals ``x * (u - uz)`` bit for bit. The next J codes come from
    the word shifted right by BITS*J (one shift per word and round). EVEN_K (every tile inside K)
    drops the column masks of x and of the words."""
    PER: tl.constexpr = 32 // BITS
    J: tl.constexpr = 23 // BITS                                          # codes per 23-bit window
    MASK: tl.constexpr = (1 << BITS) - 1
    kw = k0 // PER + tl.arange(0, SUB_K // PER)
    n_mask = n_offs < N
    if GROUP_SIZE > 0:
        g = k0 // GROUP_SIZE
        s_mask = n_mask & (n_offs * 0 + g < G)        # a sub-tile past a ragged K reads no scale
    else:
        g = 0
        s_mask = n_mask
    s = tl.load(scale_ptr + n_offs * G + g, mask=s_mask, other=0.0).to(tl.float32)     # (BLOCK_N,)
    if HAS_ZP:
        uz = _zero_codes(zp_ptr, n_offs, g, N, G, BITS).to(tl.float32)                      # (BLOCK_N,)
    else:
        uz = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
    wcol = kw * PER                                                       # first column of each word
    part = tl.zeros((BLOCK_N, SUB_K // PER), dtype=tl.float32)
    for j in tl.static_range(PER):
        jj = j % J                                                        # position in the 23-bit window
        step = 1 << (BITS * jj)
        if jj == 0 and j > 0:
            words = words >> (BITS * J)
        if EVEN_K:
            xj = tl.load(x_row + wcol + j, eviction_policy="evict_last")
        else:
            xj = tl.load(x_row + wcol + j, mask=wcol < K - j, other=0.0, eviction_policy="evict_last")
        xj = xj.to(tl.float32) * (1.0 / step)                                             # (SUB_K // PER,)
        u = ((words & (MASK << (BITS * jj))) | MAGIC).to(tl.float32, bitcast=True)        # 2^23 + u * step
        zero = uz * step + 8388608.0                                                      # 2^23 + uz * step, exact
        part += (u - zero[:, None]) * xj[None, :]
    return part * s[:, None]


@triton.jit
def _gemv_tile(x_row, K, k0, packed_ptr, scale_ptr, zp_ptr, n_offs, N, KW, G, BITS: tl.constexpr,
               GROUP_SIZE: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               SUB: tl.constexpr, EVEN_K: tl.constexpr):
    """Columns k0 .. k0+BLOCK_K of one token as SUB (1, 2 or 4) sub-tiles of one group each.

    The words of every sub-tile are loaded before any is decoded, so a program keeps SUB times
    more bytes in flight per iteration: at M = 1 the kernel is bound by how many loads are in
    flight across the GPU (Little's law), not by its instruction count."""
    SUB_K: tl.constexpr = BLOCK_K // SUB
    w0 = _gemv_words(packed_ptr, n_offs, N, KW, k0, BITS, SUB_K, EVEN_K)
    if SUB >= 2:
        w1 = _gemv_words(packed_ptr, n_offs, N, KW, k0 + SUB_K, BITS, SUB_K, EVEN_K)
    if SUB >= 4:
        w2 = _gemv_words(packed_ptr, n_offs, N, KW, k0 + 2 * SUB_K, BITS, SUB_K, EVEN_K)
        w3 = _gemv_words(packed_ptr, n_offs, N, KW, k0 + 3 * SUB_K, BITS, SUB_K, EVEN_K)
    part = _gemv_reduce(w0, x_row, K, k0, scale_ptr, zp_ptr, n_offs, N, G, BITS, GROUP_SIZE, HAS_ZP, BLOCK_N,
                        SUB_K, EVEN_K)
    if SUB >= 2:
        part += _gemv_reduce(w1, x_row, K, k0 + SUB_K, scale_ptr, zp_ptr, n_offs, N, G, BITS, GROUP_SIZE, HAS_ZP,
                             BLOCK_N, SUB_K, EVEN_K)
    if SUB >= 4:
        part += _gemv_reduce(w2, x_row, K, k0 + 2 * SUB_K, scale_ptr, zp_ptr, n_offs, N, G, BITS, GROUP_SIZE,
                             HAS_ZP, BLOCK_N, SUB_K, EVEN_K)
        part += _gemv_reduce(w3, x_row, K, k0 + 3 * SUB_K, scale_ptr, zp_ptr, n_offs, N, G, BITS, GROUP_SIZE,
                             HAS_ZP, BLOCK_N, SUB_K, EVEN_K)
    return part


@triton.jit
def _tile(acc, x_ptr, stride_xm, m_offs, M, K, k0, packed_ptr, scale_ptr, zp_ptr, gidx_ptr, n_offs, N, KW, G,
          BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_ZP: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
          INPUT_PRECISION: tl.constexpr):
    """``acc`` (BLOCK_M, BLOCK_N) plus the contribution of columns k0 .. k0+BLOCK_K."""
    PER: tl.constexpr = 32 // BITS
    k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + m_offs[:, None].to(tl.int64) * stride_xm + k[None, :],
                mask=(m_offs[:, None] < M) & (k[None, :] < K), other=0.0,
                eviction_policy="evict_last")                            # (BLOCK_M, BLOCK_K)
    u = _unpack_tile(packed_ptr, n_offs, k0 // PER, N, KW, BITS, BLOCK_N, BLOCK_K)   # (BLOCK_N, BLOCK_K)
    n_mask = n_offs < N
    if GROUP_MODE == 0:
        # The tile lies in one group: reduce the raw codes, scale once.
        if GROUP_SIZE > 0:
            g = k0 // GROUP_SIZE
        else:
            g = 0
        s = tl.load(scale_ptr + n_offs * G + g, mask=n_mask, other=0.0).to(tl.float32)      # (BLOCK_N,)
        if HAS_ZP:
            q = u - _zero_codes(zp_ptr, n_offs, g, N, G, BITS)[:, None]                      # (BLOCK_N, BLOCK_K)
        else:
            q = u - (1 << (BITS - 1))
        acc += _dot(x, q, DOT_DTYPE, INPUT_PRECISION, USE_DOT) * s[None, :]
    else:
        # Groups change inside the tile: dequantize every element first.
        k_mask = k < K
        if GROUP_MODE != 2:
            g = k // GROUP_SIZE
        else:
            g = tl.load(gidx_ptr + k, mask=k_mask, other=0)
        mask2 = n_mask[:, None] & k_mask[None, :]
        s = tl.load(scale_ptr + n_offs[:, None] * G + g[None, :], mask=mask2, other=0.0).to(tl.float32)
        if HAS_ZP:
            uz = _zero_codes(zp_ptr, n_offs[:, None], g[None, :], N, G, BITS)                # (BLOCK_N, BLOCK_K)
        else:
            uz = 1 << (BITS - 1)
        w = (u - uz).to(tl.float32) * s                                                      # (BLOCK_N, BLOCK_K)
        acc += _dot(x, w, DOT_DTYPE, INPUT_PRECISION, USE_DOT)
    return acc


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program (axis 0) -> (m tile, n tile), in bands of GROUP_M m-tiles so that programs running
    together read the same weight tiles (L2 reuse). Shared by the integer and FP4 kernels."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % band) % band_m, (pid % band) // band_m


@triton.jit
def _store_output(acc, bias_ptr, out_ptr, m_offs, n_offs, M, N, stride_om, pid_k, HAS_BIAS: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    """Epilogue shared by the integer and FP4 kernels: bias (added by the first K slice only), then
    a store in the output dtype, or a float32 atomic add when K is split."""
    n_mask = n_offs < N
    if HAS_BIAS:
        first = (pid_k == 0).to(tl.float32)
        acc += tl.load(bias_ptr + n_offs, mask=n_mask, other=0.0).to(tl.float32)[None, :] * first
    out_ptrs = out_ptr + m_offs[:, None].to(tl.int64) * stride_om + n_offs[None, :]
    mask = (m_offs[:, None] < M) & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def _dequant_matmul_kernel(x_ptr, packed_ptr, scale_ptr, zp_ptr, gidx_ptr, bias_ptr, out_ptr,
                           M, N, K, KW, G, stride_xm, stride_om, k_per_split,
                           BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr,
                           HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                           EVEN_K: tl.constexpr, PIPE: tl.constexpr = 3):
    # Program -> (m tile, n tile), in bands of GROUP_M m-tiles so that programs running together
    # read the same weight tiles (L2 reuse); axis 1 is the K split.
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    USE_DOT: tl.constexpr = BLOCK_M >= 16
    # One token with the tile inside one group: per-word sums, reduced once after the loop.
    # (GROUP_MODE 3: the tile is 2 or 4 whole groups, one sub-tile each.)
    GEMV: tl.constexpr = (BLOCK_M == 1) and (GROUP_MODE == 0 or GROUP_MODE == 3)
    SUB: tl.constexpr = BLOCK_K // GROUP_SIZE if GROUP_MODE == 3 else 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_words = tl.zeros((BLOCK_N, BLOCK_K // SUB // (32 // BITS)), dtype=tl.float32)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # tl.range with num_stages: the weight loads of the one-token path (no tl.dot, which Triton
    # pipelines by itself) go through cp.async, PIPE tiles ahead, so the loop never waits on DRAM.
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=PIPE):
        if GEMV:
            acc_words += _gemv_tile(x_row, K, k0, packed_ptr, scale_ptr, zp_ptr, n_offs, N, KW, G, BITS,
                                    GROUP_SIZE, HAS_ZP, BLOCK_N, BLOCK_K, SUB, EVEN_K)
        else:
            acc = _tile(acc, x_ptr, stride_xm, m_offs, M, K, k0, packed_ptr, scale_ptr, zp_ptr, gidx_ptr, n_offs,
                        N, KW, G, BITS, GROUP_SIZE, GROUP_MODE, HAS_ZP, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE,
                        INPUT_PRECISION)
    if GEMV:
        acc = tl.sum(acc_words, axis=1)[None, :]                                   # (1, BLOCK_N)
    _store_output(acc, bias_ptr, out_ptr, m_offs, n_offs, M, N, stride_om, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequant_kernel(packed_ptr, scale_ptr, zp_ptr, gidx_ptr, w_ptr, N, K, KW, G,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr,
                    HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense (N, K) weight in ``w_ptr``'s dtype, for the large-batch dequantize-then-GEMM path."""
    PER: tl.constexpr = 32 // BITS
    n_offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    k_mask = k < K
    u = _unpack_tile(packed_ptr, n_offs, k0 // PER, N, KW, BITS, BLOCK_N, BLOCK_K)   # (BLOCK_N, BLOCK_K)
    if GROUP_MODE == 2:
        g = tl.load(gidx_ptr + k, mask=k_mask, other=0)
    elif GROUP_SIZE > 0:
        g = k // GROUP_SIZE
    else:
        g = k * 0
    mask2 = (n_offs[:, None] < N) & k_mask[None, :]
    s = tl.load(scale_ptr + n_offs[:, None] * G + g[None, :], mask=mask2, other=0.0).to(tl.float32)
    if HAS_ZP:
        uz = _zero_codes(zp_ptr, n_offs[:, None], g[None, :], N, G, BITS)
    else:
        uz = 1 << (BITS - 1)
    w = (u - uz).to(tl.float32) * s
    tl.store(w_ptr + n_offs[:, None].to(tl.int64) * K + k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask2)


def _interpreting() -> bool:
    return type(_dequant_matmul_kernel).__name__ == "InterpretedFunction"


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of ``tl.dot`` and its precision mode for activations of ``dtype``."""
    if dtype == torch.float16:
        return tl.float16, "ieee"
    if dtype == torch.bfloat16 and not _interpreting():
        return tl.bfloat16, "ieee"
    # float32 activations stay exact ("ieee", not tf32). bf16 under TRITON_INTERPRET also takes this
    # path: Triton 3.9's interpreter computes bf16 arithmetic on the raw bits and returns garbage.
    return tl.float32, "ieee"


def _group_mode(group_size: int | None, g_idx: torch.Tensor | None, block_k: int) -> int:
    """0: each K tile inside one group; 1: groups change inside the tile; 2: ``g_idx`` gather;
    3: the tile is exactly 2 or 4 whole groups (the M = 1 path loads them together, sub-tile by
    sub-tile; the tiled path treats it as 1)."""
    if g_idx is not None:
        return 2
    if group_size is None or group_size % block_k == 0:
        return 0
    if block_k % group_size == 0 and block_k // group_size in (2, 4):
        return 3
    return 1


def dequant_matmul(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   g_idx: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int, group_size: int | None,
                   in_features: int, config: KernelConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) x packed (N, K) -> (M, N) in x's dtype with one launch of the fused kernel.
    ``out`` (M, N), contiguous, in x's dtype, receives the result when given (tests poison it)."""
    M, K = x2.shape
    N, KW = packed.shape
    G = scale.shape[1]
    bm = config.block_m
    split_k, k_per_split, result, acc = split_k_launch(M, N, K, config, x2, out)
    dot_dtype, precision = _dot_dtype(x2.dtype)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, config.block_n), split_k)
    _dequant_matmul_kernel[grid](
        x2, packed, scale, zero_point if zero_point is not None else packed,
        g_idx if g_idx is not None else packed, bias if bias is not None else scale, acc,
        M, N, K, KW, G, x2.stride(0), acc.stride(0), k_per_split,
        BITS=bits, GROUP_SIZE=group_size or 0, GROUP_MODE=_group_mode(group_size, g_idx, config.block_k),
        HAS_ZP=zero_point is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, SPLIT_K=split_k, DOT_DTYPE=dot_dtype,
        INPUT_PRECISION=precision, EVEN_K=K % config.block_k == 0, PIPE=config.num_stages,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if split_k > 1:
        result.copy_(acc)
    return result


def dequant_weight(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   g_idx: torch.Tensor | None, *, bits: int, group_size: int | None, in_features: int,
                   dtype: torch.dtype, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """Dense (N, K) weight in ``dtype``."""
    N, KW = packed.shape
    K = in_features
    w = torch.empty(N, K, device=packed.device, dtype=dtype)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequant_kernel[grid](packed, scale, zero_point if zero_point is not None else packed,
                          g_idx if g_idx is not None else packed, w, N, K, KW, scale.shape[1],
                          BITS=bits, GROUP_SIZE=group_size or 0, GROUP_MODE=2 if g_idx is not None else 1,
                          HAS_ZP=zero_point is not None, BLOCK_N=block_n, BLOCK_K=block_k)
    return w
