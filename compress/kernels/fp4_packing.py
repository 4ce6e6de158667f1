"""The 4-bit float element formats: E2M1 codes, E8M0 block exponents, two codes per byte.

An E2M1 code is a uint8 in 0..15: bit 3 is the sign, bits 0-2 index ``E2M1_VALUES`` =
(0, 0.5, 1, 1.5, 2, 3, 4, 6). The bit pattern is the IEEE-style float4_e2m1fn encoding (the one
``ml_dtypes.float4_e2m1fn`` uses), so code 8 is -0.

``pack_fp4`` puts column 2k in the low nibble and column 2k+1 in the high nibble of byte k, the
layout of compressed-tensors' ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``
(``compressors/nvfp4/helpers.py: pack_fp4_to_uint8``) and of NVIDIA Model Optimizer.

An E8M0 scale is a uint8 biased exponent: ``2^(s - 127)``, with 255 meaning NaN (OCP MX v1.0).
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
E8M0_BIAS = 127
E8M0_NAN = 255


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` (any float dtype, any shape) to the nearest E2M1 value; uint8 codes, same shape.

    Ties go to the even index (round half to even: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
    3.5->4, 5->4), magnitudes above 5 (inf included) saturate at 6, and the sign bit is the sign
    bit of ``x``: -0.0 and negatives that round to zero give code 8 (-0), exactly as the
    ``ml_dtypes.float4_e2m1fn`` cast does. NaN has no code; callers reject it first.
    """
    if not x.is_floating_point():
        raise ValueError(f"e2m1_encode expects a floating-point tensor, got {x.dtype}")
    a = x.abs()
    # Count the rounding boundaries that |x| has passed. A boundary whose upper neighbour has an
    # even index (0.75, 1.75, 3.5) is passed at equality; the others (0.25, 1.25, 2.5, 5) are not.
    idx = (a > 0.25).to(torch.uint8)
    idx += a >= 0.75
    idx += a > 1.25
    idx += a >= 1.75
    idx += a > 2.5
    idx += a >= 3.5
    idx += a > 5.0
    return idx | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """``e2m1_decode(e2m1_encode(x))`` as float32 values, several times faster (the activation path):
    the E2M1 grid has step 0.5 below 2, 1 below 4 and 2 up to 6, so rounding half to even within
    the step (``torch.round``) is rounding half to even on the grid; above 6 saturates."""
    a = x.float().abs().clamp(max=FP4_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, x.float())


def _check_codes(codes: torch.Tensor, what: str) -> None:
    if codes.dtype != torch.uint8:
        raise ValueError(f"{what} expects uint8 E2M1 codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"{what}: E2M1 codes must be in 0..15, got {int(codes.max())} "
                         f"(packed bytes? call unpack_fp4 first)")


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 E2M1 codes (code 8 decodes to -0.0)."""
    _check_codes(codes, "e2m1_decode")
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32,
                         device=codes.device)
    return table[codes.long()]


def e8m0_decode(scales: torch.Tensor) -> torch.Tensor:
    """float32 values ``2^(s - 127)`` of uint8 E8M0 exponents; 255 decodes to NaN.

    Built from bits, not ``exp2``, so it is exact everywhere: float32 has the same exponent bias,
    so exponent field ``s`` with an empty mantissa is ``2^(s-127)``; s = 0 (2^-127) is the float32
    subnormal with only mantissa bit 22 set.
    """
    if scales.dtype != torch.uint8:
        raise ValueError(f"E8M0 scales must be uint8 biased exponents, got {scales.dtype}")
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, torch.full_like(s, 1 << 22), s << 23)
    bits = torch.where(s == E8M0_NAN, torch.full_like(s, 0x7FC00000), bits)
    return bits.view(torch.float32)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) uint8 codes -> (rows, cols/2) bytes; column 2k low nibble, 2k+1 high nibble."""
    if codes.dim() != 2:
        raise ValueError(f"pack_fp4 expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    if cols % 2:
        raise ValueError(f"pack_fp4 needs an even number of columns to put two codes in a byte, "
                         f"got shape ({rows}, {cols}); pad the input dimension to an even size")
    _check_codes(codes, "pack_fp4")
    return codes[:, 0::2] | (codes[:, 1::2] << 4)                  # (rows, cols/2)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_fp4``: (rows, n) bytes -> (rows, 2n) uint8 codes."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_fp4 expects a 2-D uint8 tensor, got {packed.dtype} "
                         f"of shape {tuple(packed.shape)}")
    rows, n = packed.shape
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(rows, 2 * n)
