"""The integer grid: scales, zero points, codes, and the dequantize formula everything shares (the
formula, the code range and the group count live with the kernels, ``compress.kernels.int_grid``,
and are re-exported here).

Conventions follow compressed-tensors so that our codes are exactly what its checkpoints hold:
codes ``q`` are signed, in ``[-2^(b-1), 2^(b-1)-1]``; the zero point ``zp`` is a signed integer in
the same range (0 when symmetric); and

    W[o, i] = (q[o, i] - zp[o, g]) * scale[o, g],    g = i // group_size

computed in float32 and cast once to the model dtype. Scales are rounded to their storage dtype
*before* any code is chosen, so what we evaluate is bit for bit what we export.

Symmetric scales put amax on code 2^(b-1)-1 (amax / 7 for int4): on SmolLM2 that beats amax / 7.5
for round-to-nearest (35.2 vs 36.0 perplexity); the MSE observer may still use the code -8.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
# The codes -> values half of the grid is the kernels'; quantizing re-uses it and re-exports it.
from ..kernels.int_grid import code_range, dequantize, num_groups  # noqa: F401  (dequantize: re-export)

# Shrink factors the MSE observer tries: 1.0 down to 0.50 in steps of 0.02.
MSE_SHRINK = tuple(1.0 - 0.02 * i for i in range(26))


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group_size), zero-padding a partial last group."""
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    pad = num_groups(cols, group_size) * g - cols
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(rows, -1, g)


def _candidate_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                       scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = code_range(bits)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = scale.to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    if not symmetric:
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zp


def compute_qparams(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                    scale_dtype: torch.dtype, observer: str = "minmax",
                    col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32 holding ``scale_dtype`` values) and zero point (float32 holding integers),
    each (rows, groups), for the weight ``w`` (rows, cols).

    ``observer="mse"`` tries the ranges in MSE_SHRINK and keeps, per group, the one with the lowest
    squared error, each column weighted by ``col_weight`` (the Hessian diagonal when known).
    """
    wg = _grouped(w.float(), group_size)                       # (rows, groups, g)
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    if observer == "minmax":
        return _candidate_qparams(lo, hi, bits, symmetric, scale_dtype)
    if observer != "mse":
        raise ConfigError(f"observer must be 'minmax' or 'mse', got {observer!r}")
    cw = None
    if col_weight is not None:
        cw = _grouped(col_weight.float().reshape(1, -1), group_size)   # (1, groups, g)
    best_err = best_scale = best_zp = None
    for shrink in MSE_SHRINK:
        scale, zp = _candidate_qparams(lo * shrink, hi * shrink, bits, symmetric, scale_dtype)
        err = (fake_quantize_grouped(wg, scale, zp, bits) - wg).pow_(2)
        if cw is not None:
            err.mul_(cw)
        err = err.sum(dim=-1)                                  # (rows, groups)
        if best_err is None:
            best_err, best_scale, best_zp = err, scale, zp
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def fake_quantize_grouped(wg: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Round (rows, groups, g) weights onto the grid and back, in float32."""
    qmin, qmax = code_range(bits)
    s, z = scale.unsqueeze(-1), zp.unsqueeze(-1)
    return (torch.clamp(torch.round(wg / s) + z, qmin, qmax) - z) * s


def quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int,
             group_size: int | None) -> torch.Tensor:
    """Codes (int8, signed) of ``w`` (rows, cols) on the given per-group grid."""
    rows, cols = w.shape
    qmin, qmax = code_range(bits)
    wg = _grouped(w.float(), group_size)
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zp.unsqueeze(-1), qmin, qmax)
    return q.reshape(rows, -1)[:, :cols].to(torch.int8)
