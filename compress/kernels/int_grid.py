"""The integer grid's raw-tensor half: the signed code range, the group count, and the one dequantize
formula every integer weight shares (the kernels' reference, QuantLinear, the solvers, the export).

Conventions follow compressed-tensors: codes ``q`` are signed, in ``[-2^(b-1), 2^(b-1)-1]``; the
zero point ``zp`` is a signed integer in the same range (None when symmetric); and

    W[o, i] = (q[o, i] - zp[o, g]) * scale[o, g],    g = i // group_size (or g_idx[i])

computed in float32 and cast once to the model dtype. Choosing scales and codes (observers, the
MSE search, rounding) is quantization and lives in ``compress.quant.grid``, which re-exports these.
"""

from __future__ import annotations

import math

import torch


def code_range(bits: int) -> tuple[int, int]:
    """Smallest and largest signed code: (-8, 7) for int4."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, group_size: int | None,
               dtype: torch.dtype, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The one dequantize formula: (q - zp) * scale in float32, cast once to ``dtype``.
    Column ``i`` belongs to group ``i // group_size``, or ``g_idx[i]`` when given (dynamic act-order)."""
    rows, cols = q.shape
    g = cols if group_size is None else group_size
    if g_idx is not None:
        idx = g_idx.to(device=q.device, dtype=torch.long)
    else:
        idx = torch.arange(cols, device=q.device) // g          # column -> group
    s = scale.float()[:, idx]
    w = q.float()
    if zp is not None:
        w = w - zp.float()[:, idx]
    return (w * s).to(dtype)
