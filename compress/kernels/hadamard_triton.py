"""Triton kernel for the Hadamard transform y = x @ (H_m (x) H_p) / sqrt(n) along rows of length
n = m * p (``hadamard.hadamard_transform_reference`` is the specification).

One program per row. The row is held as an (M_P2, P) float32 tile, row index i_m (padded to a power
of two, M_P2 >= m) and column index i_p:

- the m part, Y = H_m^T X: m outer products, each adding H_m[i, :] (a column of the tile) times the
  loaded segment x[i * P : (i + 1) * P] (a row of the tile); float32 FMAs, no tensor-core rounding;
- the p part, the fast Walsh-Hadamard butterfly in registers: each of log2(P) stages splits the
  lowest bit of i_p off (reshape to (M_P2, P / 2, 2), ``tl.split``), forms (a + b, a - b) and joins
  them as the new highest bit (``tl.join`` then a permute), so after all stages every bit has had
  one H_2 and the index order is back where it started;
- scaled by 1 / sqrt(n), rows i_m < m stored in the input's dtype. bfloat16 is rounded to nearest
  even on the float32 bits first (``_round_bf16``): the interpreter's cast truncates, the GPU's
  rounds, and the reference rounds; this way all three agree.

The tile is the whole row (M_P2 * P values): rows up to ``MAX_TILE`` values take the kernel, wider
ones the reference. Importing this module imports Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_TILE = 32768                      # float32 values per program (128 KB; spills to local memory above ~8k)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(m: int, p: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot take rows of n = m * p of ``dtype``, or None when it can."""
    if dtype not in DTYPES:
        return f"the kernel reads float16, bfloat16 and float32 rows, not {dtype}"
    tile = triton.next_power_of_2(m) * p
    if tile > MAX_TILE:
        return f"a row of {m} x {p} needs a tile of {tile} values, above the kernel's {MAX_TILE}"
    return None


@triton.jit
def _round_bf16(v):
    """float32 ``v`` rounded to the nearest bfloat16 (ties to even), still float32; NaN kept."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536                  # -65536 = 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def _hadamard_kernel(x_ptr, h_ptr, y_ptr, stride_x, stride_y, scale,
                     M: tl.constexpr, M_P2: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    j = tl.arange(0, M_P2)                                               # output index i_m
    c = tl.arange(0, P)                                                  # index i_p
    # m part: acc[j, :] = sum_i H_m[i, j] * x[i, :]
    acc = tl.zeros((M_P2, P), dtype=tl.float32)
    for i in range(M):
        h = tl.load(h_ptr + i * M + j, mask=j < M, other=0.0)            # (M_P2,) row i of H_m
        xi = tl.load(x_row + i * P + c).to(tl.float32)                   # (P,)
        acc += h[:, None] * xi[None, :]
    # p part: one H_2 per bit of i_p, the processed bit rotated to the top each stage.
    for _ in tl.static_range(LOG_P):
        a, b = tl.split(tl.reshape(acc, (M_P2, P // 2, 2)))              # (M_P2, P / 2) each
        pair = tl.join(a + b, a - b)                                     # (M_P2, P / 2, 2)
        acc = tl.reshape(tl.permute(pair, (0, 2, 1)), (M_P2, P))
    acc = acc * scale
    if y_ptr.dtype.element_ty == tl.bfloat16:
        acc = _round_bf16(acc)
    out = y_ptr + row * stride_y + j[:, None] * P + c[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(j < M)[:, None])


def hadamard_transform(x: torch.Tensor, m: int, p: int, core: torch.Tensor) -> torch.Tensor:
    """x @ H_n along the last dim in blocks of n = m * p; ``core`` is H_m (+-1, float32, on x's
    device). The caller checks ``unsupported`` first."""
    n = m * p
    x2 = x.reshape(-1, n)                                                # (R, n), R = rows * k / n
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return y.reshape(x.shape)
    m_p2 = triton.next_power_of_2(m)
    tile = m_p2 * p
    _hadamard_kernel[(x2.shape[0],)](x2, core.contiguous(), y, x2.stride(0), y.stride(0), 1.0 / math.sqrt(n),
                                     M=m, M_P2=m_p2, P=p, LOG_P=p.bit_length() - 1,
                                     num_warps=min(16, max(4, tile // 1024)))
    return y.reshape(x.shape)
