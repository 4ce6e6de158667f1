"""AWQ's two searches (Lin et al., 2024), as pure functions on tensors.

Both measure the consumers' output error with the weights rounded on the integer grid of the
quantization pass that follows and the activations in float. With H = X^T X / t (t tokens) and
D = Q(W diag(s)) diag(1/s) - W, the mean squared output error is tr(D H D^T) / out, so each
candidate costs one (out x n x n) product instead of a pass over the tokens.

- ``search_scale``: s = mean|X|^a / mean|W~|^(1-a), normalised to geometric mean 1, for a = i / grid,
  plus s = 1 (so the chosen loss is never above the unsmoothed one).
- ``search_clip``: per weight group, max|w| shrunk by 1, 1 - 1/grid, ... > 1 - max_shrink; each
  group keeps the factor with the lowest error of its own share of the output (H's diagonal block).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats import WeightFormat
from ..quant.grid import compute_qparams, fake_quantize_grouped
from .fold import per_row


def weight_quantizer(bits: int, group_size: int | None, symmetric: bool,
                     in_features: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(out, in) float32 -> rounded on the integer grid (min-max scales per group, float32) and back:
    the formula of ``compress.quant.grid`` without building codes (the searches call this ~30 times
    per linear). A last group narrower than ``group_size`` is allowed: this only simulates the pass
    that follows, whose own format checks the shape."""
    WeightFormat.from_scheme("int", bits, group_size, symmetric, group_size is not None)    # validates

    def fake_quantize(w: torch.Tensor) -> torch.Tensor:
        scale, zp = compute_qparams(w, bits, group_size, symmetric, torch.float32)          # (out, groups)
        wq = fake_quantize_grouped(_grouped(w, group_size), scale, zp, bits)               # (out, groups, g)
        return wq.reshape(w.shape[0], -1)[:, :w.shape[1]]
    return fake_quantize


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, n) -> (out, groups, g), zero-padding a partial last group."""
    g = w.shape[1] if group_size is None else group_size
    pad = -w.shape[1] % g
    return torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, g)


def weight_mean(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """AWQ's mean|W~_j| (n,): each |w| divided by its group's max, averaged over the rows."""
    wg = _grouped(weight.abs(), group_size)
    wg = wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return wg.reshape(weight.shape[0], -1)[:, :weight.shape[1]].mean(dim=0)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(D H D^T) / out with D = quantized - weight: the mean squared output error per token and output."""
    d = quantized - weight
    return float(((d @ hessian) * d).sum() / weight.shape[0])


def search_scale(x_mean: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
                 quantize: Callable[[torch.Tensor], torch.Tensor], group_size: int | None, grid: int = 20,
                 rows: torch.Tensor | None = None) -> tuple[float | None, torch.Tensor, float, float]:
    """(a, s, loss at s = 1, loss at s): the best of s = 1 (a = None) and the ``grid`` AWQ
    candidates, for consumers ``weight`` (out, n) stacked, inputs' mean|X| ``x_mean`` (n,) and
    ``hessian`` (n, n). ``rows``: scales equal over channels that share a producer row (GQA)."""
    x = per_row(x_mean.float(), rows, "mean").clamp(min=1e-4)
    w = per_row(weight_mean(weight, group_size), rows, "mean").clamp(min=1e-4)
    ones = torch.ones_like(x)
    before = output_error(weight, quantize(weight), hessian)
    best = (None, ones, before, before)
    for i in range(grid):
        a = i / grid
        s = x.pow(a) / w.pow(1.0 - a)
        s = s / (s.max() * s.min()).sqrt()
        loss = output_error(weight, quantize(weight * s) / s, hessian)
        if loss < best[3]:
            best = (a, s, before, loss)
    return best


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor],
                group_size: int | None, grid: int = 20, max_shrink: float = 0.5
                ) -> tuple[torch.Tensor, float, float]:
    """(clipped weight, loss unclipped, loss clipped) for ``weight`` (out, n) with input ``hessian``
    (n, n): each group's range clipped to the shrink factor with its lowest output error."""
    out, n = weight.shape
    wg = _grouped(weight, group_size)                                   # (out, G, g)
    groups, g = wg.shape[1], wg.shape[2]
    h = torch.nn.functional.pad(hessian, (0, groups * g - n, 0, groups * g - n))
    blocks = torch.stack([h[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(groups)])   # (G, g, g)
    org_max = wg.abs().amax(dim=-1, keepdim=True)                       # (out, G, 1)
    best_err = best_max = before = None
    for i in range(max(1, int(max_shrink * grid))):
        max_val = org_max * (1.0 - i / grid)
        clipped = torch.maximum(torch.minimum(wg, max_val), -max_val).reshape(out, -1)[:, :n]
        d = _grouped(quantize(clipped) - weight, group_size)            # (out, G, g)
        err = (torch.einsum("ogi,gij->ogj", d, blocks) * d).sum(-1)     # (out, G)
        if best_err is None:
            before, best_err, best_max = err, err, max_val
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(out, -1)[:, :n]
    return clipped, float(before.sum() / out), float(best_err.sum() / out)


__all__ = ["weight_quantizer", "weight_mean", "output_error", "search_scale", "search_clip"]
