"""Triton GEMM for W8A8 layers: ``y = (sa * A) @ (sb * W)^T + b`` on FP8 E4M3 or INT8 codes, with
the scales and the bias applied in the float32 epilogue (or per K tile for block scales).

The reference (``w8a8_linear.w8a8_linear_reference``) is the specification. Operands, as
``act_quant`` and the checkpoint hold them:

- ``a``   (M, K) float8_e4m3fn or int8 activation codes; ``sa`` float32: (1,) static per tensor
  (A_MODE 0), (M, 1) per token (1), or (M, ceil(K / A_GROUP)) per 1 x A_GROUP group (2);
- ``w``   (N, K) codes of the same kind; ``sb`` in the model dtype: (1,) per tensor (W_MODE 0),
  (N, 1) per output channel (1), or (ceil(N / W_BLOCK), ceil(K / W_BLOCK)) per block (2);
- ``bias`` (N,) optional; ``out`` (M, N) in the activation dtype.

**Row and channel scales** factor out of the sum, ``sum_k sa_m A_mk sb_n W_nk = sa_m sb_n sum_k
A_mk W_nk``: the K loop accumulates the raw codes (INT8: exactly, in int32; FP8: products of two
E4M3 numbers are exact in float32) and the epilogue multiplies once per output element.
**Group and block scales** change along K, so each K tile (BLOCK_K divides A_GROUP and W_BLOCK:
one group and one block per tile) is reduced by its own ``tl.dot`` and the float32 partial sum is
scaled by ``sa[m, g] * sb[n // W_BLOCK, g']`` before it is added (DeepSeek-V3's scheme). The
narrower last group or block (K not a multiple of 128) is a masked tile like any other.

FP8 operands go to ``tl.dot`` as they are on compute capability 8.9+ (``DOT_MODE`` 0). There,
on sm_90, the tensor cores accumulate FP8 products with a narrower adder; ``max_num_imprecise_acc
= BLOCK_K`` makes Triton promote the partial sum into the float32 accumulator after every K tile,
as cuBLAS does without fast accumulation. Elsewhere (the interpreter, whose FP8 dots are wrong in
Triton 3.9, and sm_80) the codes are loaded as bytes and decoded exactly (``_e4m3_value``) into
fp16 (exact for E4M3; DOT_MODE 1, sm_80) or float32 (DOT_MODE 2, interpreter) operands.

Small batches split K over the grid's second axis and add float32 partial sums with atomics (the
int kernels' ``split_k_launch`` / ``_store_output``), so one token still spreads over every SM.
Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant_triton import hw_fp8
from .dequant_linear_triton import _store_output, _tile_ids
from .fp4_linear_triton import _e4m3_value
from .tuning import KernelConfig, split_k_launch

A_MODES = {"tensor": 0, "token": 1, "group": 2}


def w8a8_configs() -> list[KernelConfig]:
    """Every configuration a call may run (the interpreter tests run each). BLOCK_M >= 16: INT8
    and FP8 ``tl.dot`` need it. BLOCK_K 128 divides the 128-column groups and blocks."""
    split = [KernelConfig("splitk", 16, n, k, s, 1, w, 4) for n, k, s, w in (
        (32, 128, 4, 4), (64, 128, 2, 4), (64, 256, 4, 4), (128, 128, 8, 4))]
    tiled = [KernelConfig("tiled", m, n, k, 1, 8, w, st) for m, n, k, w, st in (
        (32, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (64, 256, 128, 8, 3))]
    return split + tiled


def heuristic_config(m: int, n: int, k: int, sms: int, block_k_max: int) -> KernelConfig:
    """Small M: split K until there are about two programs per SM; larger M: tiles sized to fill the
    GPU. ``block_k_max`` caps BLOCK_K so that a tile never spans two groups or blocks."""
    cands = [c for c in w8a8_configs() if c.block_k <= block_k_max]
    if m <= 16:
        best = None
        for c in (c for c in cands if c.kind == "splitk"):
            programs = -(-n // c.block_n) * min(c.split_k, -(-k // c.block_k))
            score = abs(programs - 2 * sms)
            if best is None or score < best[0]:
                best = (score, c)
        return best[1]
    tiled = [c for c in cands if c.kind == "tiled"]
    for c in reversed(tiled):                     # largest tile that still gives one wave
        if -(-m // c.block_m) * -(-n // c.block_n) >= sms:
            return c
    return tiled[0]


@triton.jit
def _load_codes(ptr, rows, cols, R, K, stride, DOT_MODE: tl.constexpr):
    """(len(rows), len(cols)) code tile (or its transpose when ``rows``/``cols`` are passed as a
    column/row of offsets) ready for ``tl.dot``; 0 outside the matrix."""
    mask = (rows < R) & (cols < K)
    t = tl.load(ptr + rows.to(tl.int64) * stride + cols, mask=mask, other=0.0)
    if DOT_MODE == 1:
        t = _e4m3_value(t.to(tl.int32)).to(tl.float16)           # exact: E4M3 fits fp16
    elif DOT_MODE == 2:
        t = _e4m3_value(t.to(tl.int32))
    return t


@triton.jit
def _w8a8_matmul_kernel(a_ptr, sa_ptr, w_ptr, sb_ptr, bias_ptr, out_ptr,
                        M, N, K, stride_am, stride_wn, stride_sam, stride_sbn, stride_om, k_per_split,
                        A_MODE: tl.constexpr, W_MODE: tl.constexpr, A_GROUP: tl.constexpr, W_BLOCK: tl.constexpr,
                        IS_INT: tl.constexpr, DOT_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m_offs < M
    n_mask = n_offs < N
    PER_TILE: tl.constexpr = (A_MODE == 2) or (W_MODE == 2)

    # Scales that do not change along K: loaded once (float32), applied per tile or in the epilogue.
    if A_MODE == 0:
        sa = tl.load(sa_ptr).to(tl.float32)
    elif A_MODE == 1:
        sa = tl.load(sa_ptr + m_offs.to(tl.int64) * stride_sam, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    if W_MODE == 0:
        sb = tl.load(sb_ptr).to(tl.float32)
    elif W_MODE == 1:
        sb = tl.load(sb_ptr + n_offs.to(tl.int64) * stride_sbn, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    if IS_INT and not PER_TILE:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)       # exact integer sums
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _load_codes(a_ptr, m_offs[:, None], k[None, :], M, K, stride_am, DOT_MODE)    # (BLOCK_M, BLOCK_K)
        wt = _load_codes(w_ptr, n_offs[None, :], k[:, None], N, K, stride_wn, DOT_MODE)   # (BLOCK_K, BLOCK_N)
        if PER_TILE:
            part = tl.dot(a, wt).to(tl.float32)                                            # this tile only
            if A_MODE == 2:
                sa_t = tl.load(sa_ptr + m_offs.to(tl.int64) * stride_sam + k0 // A_GROUP, mask=m_mask,
                               other=0.0)[:, None]
                part = part * sa_t
            else:
                part = part * sa
            if W_MODE == 2:
                sb_t = tl.load(sb_ptr + (n_offs // W_BLOCK).to(tl.int64) * stride_sbn + k0 // W_BLOCK,
                               mask=n_mask, other=0.0).to(tl.float32)[None, :]
                part = part * sb_t
            else:
                part = part * sb
            acc += part
        elif DOT_MODE == 0 and not IS_INT:
            acc = tl.dot(a, wt, acc, max_num_imprecise_acc=BLOCK_K)
        elif IS_INT:
            acc = tl.dot(a, wt, acc, out_dtype=tl.int32)                 # exact int32 sums
        else:
            acc = tl.dot(a, wt, acc)
    if not PER_TILE:
        acc = acc.to(tl.float32) * sa * sb
    _store_output(acc, bias_ptr, out_ptr, m_offs, n_offs, M, N, stride_om, pid_k, HAS_BIAS, SPLIT_K)


def dot_mode(device: torch.device, kind: str) -> int:
    """0: FP8 (or INT8) codes straight into ``tl.dot``; 1: FP8 decoded to fp16 (sm_80);
    2: decoded to float32 (the interpreter)."""
    if kind == "int8" or hw_fp8(device):
        return 0
    return 1 if device.type == "cuda" else 2


def tile_k_limit(act: str, group_size: int, block: int | None) -> int:
    """Largest BLOCK_K allowed: a K tile must not span two activation groups or weight blocks."""
    limit = 256
    for size in ((group_size,) if act == "group" else ()) + ((block,) if block else ()):
        if size % 16:
            raise ValueError(f"the Triton W8A8 kernel needs activation groups and weight blocks that are "
                             f"multiples of 16 columns, got {size}; use backend='torch'")
        while size % limit:
            limit //= 2
    return limit


def w8a8_matmul(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor | None,
                *, kind: str, act: str, block: int | None, group_size: int, out_dtype: torch.dtype,
                config: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) codes ``a`` x (N, K) codes ``w`` -> (M, N) in ``out_dtype``: one launch.
    ``out`` (M, N), contiguous, receives the result when given (tests poison it)."""
    M, K = a.shape
    N = w.shape[0]
    if w.stride(-1) != 1:
        w = w.contiguous()
    limit = tile_k_limit(act, group_size, block)
    if config is None:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.device.type == "cuda" else 4
        config = heuristic_config(M, N, K, sms, limit)
    if config.block_k > limit or config.block_m < 16:
        raise ValueError(f"config {config.name}: BLOCK_K must divide the groups/blocks (<= {limit}) and "
                         f"BLOCK_M be >= 16")
    mode = dot_mode(a.device, kind)
    if mode:
        a, w = a.view(torch.uint8), w.view(torch.uint8)                    # decoded in the kernel
    if act == "tensor":
        sa_mode, stride_sa = 0, 0
    else:
        sa_mode, stride_sa = A_MODES[act], sa.stride(0)
    if block is not None:
        w_mode, stride_sb = 2, sb.stride(0)
    elif sb.numel() == 1:
        w_mode, stride_sb = 0, 0
    else:
        w_mode, stride_sb = 1, sb.reshape(-1).stride(0)
        sb = sb.reshape(-1)
    dummy = torch.empty(0, device=a.device, dtype=out_dtype)
    split_k, k_per_split, result, acc = split_k_launch(M, N, K, config, dummy, out)   # result: out_dtype
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), split_k)
    _w8a8_matmul_kernel[grid](
        a, sa, w, sb, bias if bias is not None else sb, acc,
        M, N, K, a.stride(0), w.stride(0), stride_sa, stride_sb, acc.stride(0), k_per_split,
        A_MODE=sa_mode, W_MODE=w_mode, A_GROUP=group_size, W_BLOCK=block or 1, IS_INT=kind == "int8",
        DOT_MODE=mode, HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, SPLIT_K=split_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if split_k > 1:
        result.copy_(acc)
    return result
