"""Round-to-nearest: each weight rounded onto its group's grid. No data needed."""

from __future__ import annotations

import torch

from .config import IntWeightConfig
from .formats import QuantResult

__all__ = ["QuantResult", "rtn_solve", "weighted_error"]


def rtn_solve(weight: torch.Tensor, cfg: IntWeightConfig, scale_dtype: torch.dtype,
              col_weight: torch.Tensor | None = None, fmt=None) -> QuantResult:
    """Quantize ``weight`` (rows, cols) to the nearest grid point of its group.

    ``col_weight`` (cols,), e.g. the Hessian diagonal, only steers the MSE observer. ``fmt`` is the
    solver grid (default: a fresh one of ``cfg.weight_format``).
    """
    fmt = fmt or cfg.weight_format.solver_grid(scale_dtype, cfg.observer)
    w = weight.float()
    params = fmt.fit(w, col_weight)
    codes, deq = fmt.quantize(w, params)
    return fmt.result(codes, params, deq, float((deq - w).pow(2).sum()))


def weighted_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's output error on the calibration inputs (up to a constant)."""
    delta = (weight.float() - quantized.float())
    return float(((delta @ hessian) * delta).sum())
