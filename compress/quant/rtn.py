"""Round-to-nearest: each weight rounded onto its group's grid. No data needed."""

from __future__ import annotations

import torch

from .config import IntWeightConfig
from .formats import QuantResult

__all__ = ["QuantResult", "rtn_solve", "rtn_solve_inplace", "weighted_error"]

# Elements of one row block of ``rtn_solve_inplace`` (4M: 16 MiB in float32, about 100 MiB of
# temporaries with the fit, rounding and error): the solve's workspace, whatever the weight's size.
ROW_BLOCK_ELEMENTS = 1 << 22


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


def rtn_solve_inplace(weights: list[torch.Tensor], cfg: IntWeightConfig, scale_dtype: torch.dtype,
                      col_weight: torch.Tensor | None = None, fmt=None,
                      block_elements: int = ROW_BLOCK_ELEMENTS) -> list[QuantResult] | None:
    """``rtn_solve`` of the rows of ``weights`` stacked (the linears that read one input), without
    stacking them: each weight is solved in row blocks of about ``block_elements`` and its
    dequantized rows are written back into it in place, so the workspace is one block whatever the
    weights' size (an 8B model's gate/up would need 8x their bytes as a whole). Rows are independent
    given the shared parts (NVFP4's global scale comes from the amax of all of ``weights``, as the
    stacked solve takes it), so the codes and scales are those of ``rtn_solve`` on the stack, bit for
    bit. Returns one result per weight (``weight`` None: it is in the tensor; ``loss``: the stack's
    squared error, as the stacked solve reports it), or None when the format's scale spans rows
    that cannot be cut apart (FP8 per-tensor, FP8 blocks across a weight's end): use ``rtn_solve``.
    """
    fmt = fmt or cfg.weight_format.solver_grid(scale_dtype, cfg.observer)
    unit = getattr(fmt, "row_unit", None)
    if unit is None or any(w.shape[0] % unit for w in weights[:-1]):
        return None
    if getattr(fmt, "kind", None) == "nvfp4" and fmt.global_scale is None:
        fmt._global(torch.stack([_abs_max(w, block_elements) for w in weights]).amax())
    results, loss = [], 0.0
    for w in weights:
        rows, cols = w.shape
        step = max(unit, block_elements // max(cols, 1) // unit * unit)
        codes = torch.empty(rows, cols, dtype=fmt.codes_dtype, device=w.device)
        params: list[dict[str, torch.Tensor]] = []
        for r in range(0, rows, step):
            block = w[r:r + step]
            wf = block.float()
            p = fmt.fit(wf, col_weight)
            c, deq = fmt.quantize(wf, p)
            loss += float((deq - wf).pow_(2).sum())
            codes[r:r + step] = c
            block.copy_(deq)                          # cast to the weight's dtype, as write_rows does
            params.append(p)
            del wf, c, deq
        merged = {k: torch.cat([p[k] for p in params]) if params[0][k] is not None else None for k in params[0]}
        results.append(fmt.result(codes, merged, None, 0.0))
    for r in results:
        r.loss = loss
    return results


def _abs_max(w: torch.Tensor, block_elements: int) -> torch.Tensor:
    """max |w| in float32, a row block at a time (no full-size abs copy)."""
    step = max(1, block_elements // max(w.shape[1], 1))
    return torch.stack([w[r:r + step].float().abs().amax() for r in range(0, w.shape[0], step)]).amax()


def weighted_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's output error on the calibration inputs (up to a constant)."""
    delta = (weight.float() - quantized.float())
    return float(((delta @ hessian) * delta).sum())
