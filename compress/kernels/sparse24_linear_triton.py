"""Triton kernel for ``y = x @ W^T + b`` with a 2:4 sparse weight in the compact layout.

The reference (``sparse24_linear.sparse24_linear_reference``) is the specification; the layout is
the checkpoint's (docs/sparse-format.md), read as stored, half the weight bytes of a dense layer:

- ``x``      (M, K) activations, bf16/fp16/fp32, rows ``stride_xm`` apart;
- ``meta``   (N, K/8) uint8: byte j of a row covers columns 8j .. 8j+7 (groups 2j and 2j+1) and
  holds the in-group positions of its 4 kept values, value c (0..3) in bits 2c .. 2c+1;
- ``values`` (N, K/2) kept values, 4 per metadata byte. bf16/fp16 values are read as int64 words,
  (N, K/8), one word per metadata byte holding its 4 values, and decoded with integer operations
  (bf16: a shift into the top of a float32; fp16: a bitcast), so no bf16 arithmetic is needed;
  float32 values are read as 4 loads per byte;
- int4: ``packed`` (N, ceil(K/16)) int32 codes, read as uint16 halves, (N, 2*ceil(K/16)): half j
  holds the 4 codes of metadata byte j (code c in bits 4c, stored as ``q + 8``), decoded with an
  or into the mantissa of 2^23 (exact, no int-to-float conversion); ``scale`` (N, G), one per
  GROUP_SIZE original columns (a multiple of 8, so a metadata byte never straddles two groups).

Each program owns BLOCK_N output rows and a slice of K, and walks it in tiles of BLOCK_K columns,
i.e. BLOCK_K/8 "lanes" (one metadata byte, 4 kept values, 8 columns each). Two schedules, as in the
integer kernels (``dequant_linear_triton``), picked by the launcher's ``KernelConfig``:

- ``BLOCK_M = 1`` (one token, CUDA cores): the tile's BLOCK_K activations come in one contiguous
  load (cache-resident, ``evict_last``) and are split in registers into 8 vectors over the lanes,
  column p of every lane (shared by every row of the tile); each kept value picks its activation
  with two bits of the metadata byte: a tree of three selects, ``bit0 ? x1 : x0``,
  ``bit0 ? x3 : x2``, then ``bit1`` between them, no gathered load. The
  products go into per-lane float32 sums (int4: times the lane's scale, one multiply per 4 codes),
  reduced across lanes once, after the K loop.
- ``BLOCK_M >= 16`` (``tl.dot``): the tile is expanded to its dense (BLOCK_N, BLOCK_K) form, each
  column ``value if position matches else 0``, and reduced with ``tl.dot`` against the plain
  activation tile. int4 tiles inside one scale group (per-channel, or BLOCK_K dividing the group
  size: SCALE_MODE 1) dot the integer codes (exact in bf16/fp16) and scale once per tile; narrower
  groups (SCALE_MODE 2) scale each lane's codes before the expansion.

K is split over grid axis 1 (SPLIT_K programs adding float32 partial sums with atomics, bias added by
the first slice only) so that a single token still spreads over every SM; N tails and the K tail
(K a multiple of 8, not of the tile) are masked. Both schedules compute ``sum_k value_k * x[col(k)]``
for every metadata byte, malformed ones included, as the reference does.

Importing this module imports Triton; ``compress.kernels`` imports it only when first needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from .packing import packed_words
from .dequant_linear_triton import _dot, _dot_dtype, _store_output, _tile_ids
from .tuning import KernelConfig, split_k_launch

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# How the kernel reads the kept values (VALUE_KIND).
FLOAT32, FLOAT16, BFLOAT16, INT4 = 0, 1, 2, 3
VALUE_KINDS = {torch.float32: FLOAT32, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}
MAGIC = tl.constexpr(0x4B000000)            # float32 bits of 2^23: (u | MAGIC) is 2^23 + u, exactly
MAGIC_Q0 = tl.constexpr(8388616.0)          # 2^23 + 8: subtracting it leaves the signed code u - 8


@triton.jit
def _fp16_at(h):
    """float32 value of the fp16 in the low 16 bits of int32 ``h``."""
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _code_at(h, c: tl.constexpr):
    """float32 signed int4 code ``u - 8`` of the unsigned code ``u`` in bits 4c .. 4c+3 of ``h``."""
    return (((h >> (4 * c)) & 15) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_Q0


@triton.jit
def _kept_values(vals_ptr, stride_v, n_offs, lanes, mask, VALUE_KIND: tl.constexpr):
    """The 4 kept values (or int4 codes) of every (row, lane): four (BLOCK_N, L) float32 tiles."""
    rows = vals_ptr + n_offs[:, None].to(tl.int64) * stride_v
    # Each weight byte is loaded once and streamed: weights are never reused within a call.
    if VALUE_KIND == 0:
        p = rows + lanes[None, :] * 4
        v0 = tl.load(p, mask=mask, other=0.0, eviction_policy="evict_first")
        v1 = tl.load(p + 1, mask=mask, other=0.0, eviction_policy="evict_first")
        v2 = tl.load(p + 2, mask=mask, other=0.0, eviction_policy="evict_first")
        v3 = tl.load(p + 3, mask=mask, other=0.0, eviction_policy="evict_first")
    elif VALUE_KIND == 3:
        # Masked lanes read codes 8 (signed 0); their activations are masked to 0 as well.
        h = tl.load(rows + lanes[None, :], mask=mask, other=0x8888,
                    eviction_policy="evict_first").to(tl.int32)
        v0 = _code_at(h, 0)
        v1 = _code_at(h, 1)
        v2 = _code_at(h, 2)
        v3 = _code_at(h, 3)
    else:
        w = tl.load(rows + lanes[None, :], mask=mask, other=0, eviction_policy="evict_first")   # int64
        lo = w.to(tl.int32)                                                # values 0, 1
        hi = (w >> 32).to(tl.int32)                                        # values 2, 3
        if VALUE_KIND == 1:
            v0 = _fp16_at(lo)
            v1 = _fp16_at(lo >> 16)
            v2 = _fp16_at(hi)
            v3 = _fp16_at(hi >> 16)
        else:                                                              # bf16: the top of a float32
            v0 = (lo << 16).to(tl.float32, bitcast=True)
            v1 = (lo & -65536).to(tl.float32, bitcast=True)
            v2 = (hi << 16).to(tl.float32, bitcast=True)
            v3 = (hi & -65536).to(tl.float32, bitcast=True)
    return v0.to(tl.float32), v1.to(tl.float32), v2.to(tl.float32), v3.to(tl.float32)


@triton.jit
def _pick(meta, c: tl.constexpr, x0, x1, x2, x3):
    """The activation of kept value c: x[position], position in bits 2c .. 2c+1 of ``meta``."""
    low = (meta & (1 << (2 * c))) != 0
    high = (meta & (2 << (2 * c))) != 0
    return tl.where(high, tl.where(low, x3, x2), tl.where(low, x1, x0))


@triton.jit
def _lane_dot(x_row, meta, v0, v1, v2, v3, k0, K, L: tl.constexpr, EVEN: tl.constexpr):
    """Per-lane sums ``sum_c v_c * x[col_c]`` (BLOCK_N, L) float32 for one activation row."""
    # The tile's BLOCK_K activations in one contiguous (vectorized) load, split into the 8 columns
    # of every lane: column 8 * lane + 4a + 2b + c, split on c, then b, then a.
    k = k0 + tl.arange(0, 8 * L)
    if EVEN:
        xv = tl.load(x_row + k, eviction_policy="evict_last").to(tl.float32)
    else:
        xv = tl.load(x_row + k, mask=k < K, other=0.0, eviction_policy="evict_last").to(tl.float32)
    even, odd = tl.split(tl.reshape(xv, (L, 2, 2, 2)))
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    x0 = x0[None, :]
    x1 = x1[None, :]
    x2 = x2[None, :]
    x3 = x3[None, :]
    x4 = x4[None, :]
    x5 = x5[None, :]
    x6 = x6[None, :]
    x7 = x7[None, :]
    acc = v0 * _pick(meta, 0, x0, x1, x2, x3)
    acc += v1 * _pick(meta, 1, x0, x1, x2, x3)
    acc += v2 * _pick(meta, 2, x4, x5, x6, x7)
    acc += v3 * _pick(meta, 3, x4, x5, x6, x7)
    return acc


@triton.jit
def _column(meta, c: tl.constexpr, t: tl.constexpr, va, vb):
    """(BLOCK_N, L): the weight at position t of the group holding kept values c and c + 1 of each
    lane (``va``, ``vb``): whichever of them sits there (both, added, for a malformed byte), else 0."""
    return (tl.where(((meta >> (2 * c)) & 3) == t, va, 0.0)
            + tl.where(((meta >> (2 * c + 2)) & 3) == t, vb, 0.0))


@triton.jit
def _dense_tile(meta, v0, v1, v2, v3, DOT_DTYPE: tl.constexpr):
    """The dense (BLOCK_N, BLOCK_K) tile in ``DOT_DTYPE``, columns in natural order. Built as 8
    (BLOCK_N, L) column tiles (column 8 * lane + p) interleaved three times: a register-level join,
    no 3-D broadcast (which spills on sm_90 at BLOCK_N 64, BLOCK_K 128)."""
    v0 = v0.to(DOT_DTYPE)
    v1 = v1.to(DOT_DTYPE)
    v2 = v2.to(DOT_DTYPE)
    v3 = v3.to(DOT_DTYPE)
    w0 = _column(meta, 0, 0, v0, v1)
    w1 = _column(meta, 0, 1, v0, v1)
    w2 = _column(meta, 0, 2, v0, v1)
    w3 = _column(meta, 0, 3, v0, v1)
    w4 = _column(meta, 2, 0, v2, v3)
    w5 = _column(meta, 2, 1, v2, v3)
    w6 = _column(meta, 2, 2, v2, v3)
    w7 = _column(meta, 2, 3, v2, v3)
    # interleave(a, b)[2i + j] = (a, b)[j][i]: the lowest bit of p picks the outer pair, the highest the inner.
    even = tl.interleave(tl.interleave(w0, w4), tl.interleave(w2, w6))         # p = 0, 2, 4, 6
    odd = tl.interleave(tl.interleave(w1, w5), tl.interleave(w3, w7))          # p = 1, 3, 5, 7
    return tl.interleave(even, odd)


@triton.jit
def _sparse24_kernel(x_ptr, vals_ptr, meta_ptr, scale_ptr, bias_ptr, out_ptr,
                     M, N, K, G, stride_xm, stride_v, stride_om, k_per_split,
                     VALUE_KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_MODE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, PIPE: tl.constexpr = 3, EVEN: tl.constexpr = False):
    # Program -> (m tile, n tile) in bands of GROUP_M m-tiles (L2 reuse), axis 1 the K split: as
    # in the integer kernels.
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    L: tl.constexpr = BLOCK_K // 8                   # lanes (metadata bytes) per row of a tile
    USE_DOT: tl.constexpr = BLOCK_M >= 16
    lanes_k = K // 8                                 # metadata bytes per row
    m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_lanes = tl.zeros((BLOCK_N, L), dtype=tl.float32)                 # BLOCK_M = 1: per-lane sums
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # tl.range with num_stages: the weight loads of the one-token path (no tl.dot, which Triton
    # pipelines by itself) go through cp.async, PIPE tiles ahead, so the loop never waits on DRAM.
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=PIPE):
        lanes = k0 // 8 + tl.arange(0, L)
        if EVEN:
            # every tile inside N and K: an all-true mask folds away and the loads vectorize
            mask = tl.full((BLOCK_N, L), 1, tl.int1)
        else:
            mask = n_mask[:, None] & (lanes < lanes_k)[None, :]
        meta = tl.load(meta_ptr + n_offs[:, None].to(tl.int64) * lanes_k + lanes[None, :], mask=mask,
                       other=0, eviction_policy="evict_first").to(tl.int32)       # (BLOCK_N, L)
        v0, v1, v2, v3 = _kept_values(vals_ptr, stride_v, n_offs, lanes, mask, VALUE_KIND)
        if SCALE_MODE == 1:
            # The tile lies in one scale group: one scale per row.
            if GROUP_SIZE > 0:
                g = k0 // GROUP_SIZE
            else:
                g = 0
            s = tl.load(scale_ptr + n_offs.to(tl.int64) * G + g, mask=n_mask, other=0.0).to(tl.float32)
        elif SCALE_MODE == 2:
            # One scale per lane (a lane's 8 columns lie in one group: GROUP_SIZE % 8 == 0).
            g = (lanes * 8) // GROUP_SIZE
            s = tl.load(scale_ptr + n_offs[:, None].to(tl.int64) * G + g[None, :], mask=mask,
                        other=0.0).to(tl.float32)                                   # (BLOCK_N, L)
        if USE_DOT:
            if SCALE_MODE == 2:
                v0, v1, v2, v3 = v0 * s, v1 * s, v2 * s, v3 * s
            w = _dense_tile(meta, v0, v1, v2, v3, DOT_DTYPE)                             # (BLOCK_N, BLOCK_K)
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m_offs[:, None].to(tl.int64) * stride_xm + k[None, :],
                        mask=(m_offs[:, None] < M) & (k[None, :] < K), other=0.0,
                        eviction_policy="evict_last")                               # (BLOCK_M, BLOCK_K)
            part = _dot(x, w, DOT_DTYPE, INPUT_PRECISION, True)                     # (BLOCK_M, BLOCK_N)
            if SCALE_MODE == 1:
                part = part * s[None, :]
            acc += part
        else:
            part = _lane_dot(x_row, meta, v0, v1, v2, v3, k0, K, L, EVEN)     # (BLOCK_N, L)
            if SCALE_MODE == 1:
                part = part * s[:, None]
            elif SCALE_MODE == 2:
                part = part * s
            acc_lanes += part
    if not USE_DOT:
        acc = tl.sum(acc_lanes, axis=1)[None, :]                                   # (1, BLOCK_N)
    _store_output(acc, bias_ptr, out_ptr, m_offs, n_offs, M, N, stride_om, pid_k, HAS_BIAS, SPLIT_K)


# --------------------------------------------------------------------------- launcher

def _scale_mode(bits: int | None, group_size: int | None, block_k: int) -> int:
    """0: float values; 1: int4, the K tile inside one scale group; 2: int4, a scale per lane."""
    if bits is None:
        return 0
    return 1 if group_size is None or group_size % block_k == 0 else 2


def _kernel_values(values_or_packed: torch.Tensor, bits: int | None, n: int, k: int) -> tuple[torch.Tensor, int]:
    """(the tensor the kernel reads, its VALUE_KIND): 16-bit values as int64 words (N, K/8), int4
    words as uint16 halves (N, 2 * ceil(K/16)), float32 values as they are."""
    t = values_or_packed
    if bits is None:
        if t.dtype not in VALUE_KINDS or tuple(t.shape) != (n, k // 2):
            raise ConfigError(f"2:4 values must be float32/float16/bfloat16 of shape (out, in/2) = {(n, k // 2)}; "
                              f"got {t.dtype} of shape {tuple(t.shape)}")
        kind = VALUE_KINDS[t.dtype]
    else:
        if t.dtype != torch.int32 or tuple(t.shape) != (n, packed_words(k // 2, 4)):
            raise ConfigError(f"2:4 int4 codes must be int32 of shape (out, ceil(in/16)) = "
                              f"{(n, packed_words(k // 2, 4))}; got {t.dtype} of shape {tuple(t.shape)}")
        kind = INT4
    if kind == FLOAT32:
        return t.contiguous(), kind
    if not t.is_contiguous() or t.data_ptr() % 8:
        t = t.clone(memory_format=torch.contiguous_format)                # aligned rows for the views
    return t.view(torch.uint16 if kind == INT4 else torch.int64), kind


def sparse24_matmul(x2: torch.Tensor, values_or_packed: torch.Tensor, meta: torch.Tensor,
                    scale: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int | None,
                    group_size: int | None, config: KernelConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) x 2:4 weight (N, K) -> (M, N) in x's dtype with one launch of the fused kernel.
    ``out`` (M, N), contiguous, in x's dtype, receives the result when given (tests poison it)."""
    if config.kind == "dense" or not (config.block_m == 1 or config.block_m >= 16) or config.block_k % 64:
        raise ValueError(f"sparse24_matmul runs split-K or tiled configs with BLOCK_M 1 or >= 16 and BLOCK_K a "
                         f"multiple of 64, not {config.name}")
    if x2.dtype not in ACT_DTYPES:
        raise ValueError(f"the 2:4 kernel takes {', '.join(map(str, ACT_DTYPES))} activations, got {x2.dtype}")
    M, K = x2.shape
    N = meta.shape[0]
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (N, K // 8) or K % 8:
        raise ConfigError(f"2:4 metadata must be uint8 (out, in/8) with in a multiple of 8; x has {K} features, "
                          f"meta is {meta.dtype} of shape {tuple(meta.shape)}")
    vals, kind = _kernel_values(values_or_packed, bits, N, K)
    meta = meta.contiguous()
    if bits is not None:
        groups = 1 if group_size is None else K // group_size
        if scale is None or tuple(scale.shape) != (N, groups):
            raise ConfigError(f"2:4 int4 scales must have shape (out, groups) = {(N, groups)}; got "
                              f"{None if scale is None else tuple(scale.shape)}")
        scale = scale.contiguous()
    bm = config.block_m
    split_k, k_per_split, result, acc = split_k_launch(M, N, K, config, x2, out)
    dot_dtype, precision = _dot_dtype(x2.dtype)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, config.block_n), split_k)
    _sparse24_kernel[grid](
        x2, vals, meta, scale if scale is not None else meta, bias if bias is not None else meta, acc,
        M, N, K, 1 if scale is None else scale.shape[1], x2.stride(0), vals.stride(0), acc.stride(0), k_per_split,
        VALUE_KIND=kind, GROUP_SIZE=group_size or 0, SCALE_MODE=_scale_mode(bits, group_size, config.block_k),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, SPLIT_K=split_k, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        PIPE=config.num_stages, EVEN=K % config.block_k == 0 and N % config.block_n == 0,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if split_k > 1:
        result.copy_(acc)
    return result
