"""Triton kernel for dynamic (per token, per 1 x group_size group) and static (per tensor)
activation quantization to FP8 E4M3, INT8 or INT4: the fused amax + scale + divide + round + cast
that runs before every W8A8 (and W4A8 / W4A4 int4) matmul.

The reference (``act_quant.quantize_activations_reference``) is the specification, and the kernel
reproduces it bit for bit: the same float32 operations in the same order.

- ``x``      (M, K) bf16/fp16/fp32, rows ``stride_xm`` apart;
- ``codes``  (M, K) float8_e4m3fn or int8 (INT4 codes in [-8, 7], one per byte), contiguous;
- ``scales`` float32: (M, 1) per token, (M, G) per group with G = ceil(K / group_size) (the last
  group may be narrower), or the static (1,) scale, which is read on the device (no host sync).

One program per row. ``token``: a first pass over the row keeps a running per-lane max |x|
(reduced once at the end), the scale is ``amax / qmax`` floored, and a second pass divides,
rounds and stores (the row is re-read from L2). ``group``: each tile holds GROUPS_PER_TILE whole
groups as a (groups, GROUP_P2) block, so one pass computes each group's amax, scale and codes.
``tensor``: one pass with the loaded scale.

Bit-exactness, on a GPU as in the interpreter:
- divisions are ``div_rn`` (IEEE round to nearest; Triton's ``/`` is approximate on the GPU);
- INT8 / INT4: ``y`` is clamped to [-128, 127] / [-8, 7] (``INT_MAX``) and rounded half-to-even by
  adding 1.5 * 2^23 (the float32 adder rounds to nearest even; the integer is then the low mantissa
  bits), which equals the reference's ``round`` then ``clamp`` because the bounds are integers;
- FP8: clamped to +-448, then either the hardware's round-to-nearest-even conversion (compiled for
  compute capability 8.9+, ``HW_FP8``) or ``_e4m3_bits``, an integer encoder (round to nearest even
  on the float32 bits, subnormals by the same 1.5 * 2^23 trick). The interpreter (whose FP8 casts
  are wrong in Triton 3.9) and older GPUs use the encoder; tests check it bit for bit, -0 included.

Importing this module imports Triton.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .act_quant import ACT_DTYPES, FP8_MAX, FP8_MIN_SCALE, INT8_MIN_SCALE, qmax

STRATEGY_IDS = {"token": 0, "group": 1, "tensor": 2}
RNE_MAGIC = tl.constexpr(12582912.0)         # 1.5 * 2^23: x + this rounds x to an integer (|x| < 2^22)
RNE_MAGIC_BITS = tl.constexpr(0x4B400000)    # its float32 bits
# The reference's constants, as Triton compile-time values (rounded to float32 where they meet one).
_FP8_MAX = tl.constexpr(FP8_MAX)
_FP8_MIN_SCALE = tl.constexpr(FP8_MIN_SCALE)
_INT8_MIN_SCALE = tl.constexpr(INT8_MIN_SCALE)


@dataclasses.dataclass(frozen=True)
class ActQuantConfig:
    """BLOCK_K: columns per tile (token/tensor) or the tile width in columns (group: rounded to whole
    groups). The interpreter tests run every one of ``act_quant_configs()``."""
    block_k: int = 1024
    num_warps: int = 4

    @property
    def name(self) -> str:
        return f"k{self.block_k}w{self.num_warps}"


def act_quant_configs() -> list[ActQuantConfig]:
    return [ActQuantConfig(256, 2), ActQuantConfig(1024, 4), ActQuantConfig(2048, 8)]


def heuristic_config(k: int) -> ActQuantConfig:
    """Wide rows take wide tiles (fewer loop trips); a 4096-column row is two trips of 2048."""
    return ActQuantConfig(2048, 8) if k >= 4096 else ActQuantConfig(1024, 4)


@triton.jit
def _round_int(y):
    """float32 ``y`` (|y| < 2^22) rounded half to even, as int32: the float adder rounds."""
    return (y + RNE_MAGIC).to(tl.int32, bitcast=True) - RNE_MAGIC_BITS


@triton.jit
def _e4m3_bits(y):
    """float8_e4m3fn bits (int32, 0..255) of float32 ``y`` with |y| <= 448, rounded to nearest even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # Normal (|y| >= 2^-6): round the 23-bit mantissa to 3 bits (to even), rebias 127 -> 7. A carry
    # into the exponent is right; |y| <= 448 never rounds past 448 (0x7E).
    rn = a + 0x7FFFF + ((a >> 20) & 1)
    normal = (rn >> 20) - (120 << 3)
    # Subnormal: multiples of 2^-9, so the code is |y| * 512 rounded to even (0..8; 8 is 2^-6, code 8).
    sub = _round_int(a.to(tl.float32, bitcast=True) * 512.0)
    return tl.where(a >= (121 << 23), normal, sub) | sign


@triton.jit
def _quantize(x, s, IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, INT_MAX: tl.constexpr):
    """Codes of float32 ``x`` over its float32 scale ``s`` (broadcast), ready to store; integer codes
    in [-INT_MAX - 1, INT_MAX] (127: INT8, 7: INT4)."""
    y = tl.math.div_rn(x, s)
    if IS_FP8:
        y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
        if HW_FP8:
            return y.to(tl.float8e4nv)
        else:
            return _e4m3_bits(y).to(tl.uint8)
    else:
        return _round_int(tl.minimum(tl.maximum(y, -INT_MAX - 1.0), INT_MAX)).to(tl.int8)


@triton.jit
def _scale(amax, IS_FP8: tl.constexpr, INT_MAX: tl.constexpr):
    """amax / qmax, floored: the reference's ``scale_from_amax`` in float32."""
    if IS_FP8:
        return tl.maximum(tl.math.div_rn(amax, _FP8_MAX), _FP8_MIN_SCALE)
    else:
        return tl.maximum(tl.math.div_rn(amax, INT_MAX), _INT8_MIN_SCALE)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, G, stride_xm, stride_qm, stride_sm,
                      IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, INT_MAX: tl.constexpr, STRATEGY: tl.constexpr,
                      GROUP_SIZE: tl.constexpr, GROUP_P2: tl.constexpr, GROUPS_PER_TILE: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if STRATEGY == 1:
        # Per group: a (GROUPS_PER_TILE, GROUP_P2) tile of whole groups, one pass.
        c = tl.arange(0, GROUP_P2)
        for g0 in range(0, G, GROUPS_PER_TILE):
            g = g0 + tl.arange(0, GROUPS_PER_TILE)
            k = g[:, None] * GROUP_SIZE + c[None, :]                                # (groups, GROUP_P2)
            mask = (c[None, :] < GROUP_SIZE) & (k < K)
            x = tl.load(x_row + k, mask=mask, other=0.0).to(tl.float32)
            s = _scale(tl.max(tl.abs(x), axis=1), IS_FP8, INT_MAX)                   # (groups,)
            tl.store(q_row + k, _quantize(x, s[:, None], IS_FP8, HW_FP8, INT_MAX), mask=mask)
            tl.store(s_ptr + row * stride_sm + g, s, mask=g < G)
    else:
        cols = tl.arange(0, BLOCK_K)
        if STRATEGY == 0:
            # Per token: running per-lane max, reduced once; the scale is stored for the GEMM.
            lane_max = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                lane_max = tl.maximum(lane_max, tl.abs(x))
            s = _scale(tl.max(lane_max, axis=0), IS_FP8, INT_MAX)
            tl.store(s_ptr + row * stride_sm, s)
        else:
            s = tl.load(s_ptr).to(tl.float32)                                        # static (1,)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + cols, _quantize(x, s, IS_FP8, HW_FP8, INT_MAX), mask=mask)


def hw_fp8(device: torch.device) -> bool:
    """Whether compiled code here has the hardware FP8 conversion (compute capability 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_activations(x2: torch.Tensor, kind: str, strategy: str, *, group_size: int = 128,
                         static_scale: torch.Tensor | None = None, config: ActQuantConfig | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of ``x2`` (M, K), bit for bit the reference's; one launch."""
    if x2.dim() != 2:
        raise ValueError(f"quantize_activations takes (M, K) activations, got shape {tuple(x2.shape)}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    codes = torch.empty(m, k, device=x2.device, dtype=ACT_DTYPES[kind])
    if strategy == "tensor":
        if static_scale is None:
            raise ValueError("static per-tensor activation quantization needs static_scale (from calibration)")
        scales = static_scale.reshape(1).to(device=x2.device, dtype=torch.float32)
        n_groups = 1
    else:
        n_groups = -(-k // group_size) if strategy == "group" else 1
        scales = torch.empty(m, n_groups, device=x2.device, dtype=torch.float32)
    if m == 0 or k == 0:
        if strategy != "tensor":
            scales.fill_(FP8_MIN_SCALE if kind == "fp8" else INT8_MIN_SCALE)
        return codes, scales
    cfg = config or heuristic_config(k)
    hw = kind == "fp8" and hw_fp8(x2.device)
    # Without the hardware conversion the kernel stores E4M3 bit patterns as bytes.
    q = codes if (kind != "fp8" or hw) else codes.view(torch.uint8)
    group_p2 = triton.next_power_of_2(group_size) if strategy == "group" else 1
    _act_quant_kernel[(m,)](
        x2, q, scales, k, n_groups, x2.stride(0), codes.stride(0), scales.stride(0) if scales.dim() == 2 else 0,
        IS_FP8=kind == "fp8", HW_FP8=hw, INT_MAX=0.0 if kind == "fp8" else qmax(kind),
        STRATEGY=STRATEGY_IDS[strategy], GROUP_SIZE=group_size,
        GROUP_P2=group_p2, GROUPS_PER_TILE=max(1, cfg.block_k // group_p2), BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps)
    return codes, scales
