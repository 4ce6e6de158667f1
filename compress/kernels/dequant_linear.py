"""y = x @ dequantize(W_packed)^T + b for pack-quantized integer weights.

The reference unpacks the int32 words, applies ``(q - zp) * scale`` per group in float32 (the
formula in ``compress.quant.grid.dequantize``), casts once to the activation dtype and calls
``torch.nn.functional.linear``. Fused Triton kernels register here as further backends.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..quant.grid import dequantize
from ..quant.packing import unpack_int32

BACKENDS = ("auto", "torch")


def dequant_weight(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   bits: int, group_size: int | None, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in) weight from the packed checkpoint tensors."""
    q = unpack_int32(packed, bits, in_features)
    zp = None
    if zero_point is not None:
        zp = unpack_int32(zero_point, bits, packed.shape[0], dim=0)
    return dequantize(q, scale, zp, group_size, dtype)


def dequant_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                             zero_point: torch.Tensor | None, bias: torch.Tensor | None, *,
                             bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
    w = dequant_weight(packed, scale, zero_point, bits, group_size, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def dequant_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   zero_point: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int,
                   group_size: int | None, in_features: int, backend: str = "auto") -> torch.Tensor:
    """Dispatch: ``torch`` is the reference; ``auto`` picks the fastest available backend."""
    if backend not in BACKENDS:
        raise ConfigError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    return dequant_linear_reference(x, packed, scale, zero_point, bias, bits=bits,
                                    group_size=group_size, in_features=in_features)
