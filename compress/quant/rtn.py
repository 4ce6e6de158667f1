"""Round-to-nearest: each weight rounded onto its group's grid. No data needed."""

from __future__ import annotations

import dataclasses

import torch

from .config import IntWeightConfig
from .grid import compute_qparams, dequantize, quantize


@dataclasses.dataclass
class QuantResult:
    """What a weight solver returns for one (rows, cols) weight.

    codes:      int8 signed codes (rows, cols)
    scale:      float32 (rows, groups), values exactly representable in the storage dtype
    zero_point: float32 integers (rows, groups), or None when symmetric
    weight:     the dequantized weight in float32 (what the model computes with)
    loss:       the solver's own error measure (GPTQ: its weighted loss; RTN: squared error)
    damp:       the GPTQ damping that succeeded, if any
    fallback:   why the solver fell back to round-to-nearest, if it did
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    weight: torch.Tensor
    loss: float
    damp: float | None = None
    fallback: str | None = None


def rtn_solve(weight: torch.Tensor, cfg: IntWeightConfig, scale_dtype: torch.dtype,
              col_weight: torch.Tensor | None = None) -> QuantResult:
    """Quantize ``weight`` (rows, cols) to the nearest grid point of its group.

    ``col_weight`` (cols,), e.g. the Hessian diagonal, only steers the MSE observer.
    """
    w = weight.float()
    scale, zp = compute_qparams(w, cfg.bits, cfg.group_size, cfg.symmetric, scale_dtype,
                                cfg.observer, col_weight)
    codes = quantize(w, scale, zp, cfg.bits, cfg.group_size)
    zero_point = None if cfg.symmetric else zp
    deq = dequantize(codes, scale, zero_point, cfg.group_size, torch.float32)
    return QuantResult(codes, scale, zero_point, deq, float((deq - w).pow(2).sum()))


def weighted_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's output error on the calibration inputs (up to a constant)."""
    delta = (weight.float() - quantized.float())
    return float(((delta @ hessian) * delta).sum())
