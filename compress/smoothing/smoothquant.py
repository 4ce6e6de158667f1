"""SmoothQuant's scale (Xiao et al., 2023), as pure functions on tensors.

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

over the calibration tokens and every consumer's column j. Dividing X by s and multiplying W's
columns by s moves the activations' outlier channels into the weights, whose per-output-channel
int8/FP8 grid absorbs them better than the activations' per-token grid does.

``w8a8_error`` is the loss a choice of s is measured by: the consumers' output error with
activations rounded per token and weights per output channel (the scheme of the quantization pass
that follows), relative to the float output. ``search_alpha`` picks the best alpha among candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats import WeightFormat
from ..kernels.act_quant import FP8_MAX, fake_quantize_activations
from .awq import weight_quantizer as int_quantizer
from .fold import per_row

# scheme -> (weight spelling of its integer grid or "fp8", activation kind); both per channel / per token.
SCHEMES = {"w8a8-int8": ("int8", "int8"), "fp8": ("fp8", "fp8")}


def smoothquant_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """s (n,) from max|X_j| and max|W_j| (n,), equal over the channels of one producer row (``rows``,
    see ``fold.per_row``). A channel that never carries signal (either max is 0) keeps s = 1."""
    x = per_row(x_max.float(), rows, "amax")
    w = per_row(w_max.float(), rows, "amax")
    s = x.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1.0 - alpha)
    return torch.where((x > 0) & (w > 0), s, torch.ones_like(s)).clamp(min=1e-5)


def weight_quantizer(scheme: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weight side of ``scheme``: (out, in) float32 -> rounded per output channel and back."""
    spelling, _ = SCHEMES[scheme]
    if spelling == "fp8":
        def fp8(w: torch.Tensor) -> torch.Tensor:
            scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)        # (out, 1)
            return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
        return fp8
    fmt = WeightFormat.parse(spelling)                                  # int8: per output channel
    return int_quantizer(fmt.bits, fmt.group_size, fmt.symmetric, 0)


def w8a8_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, scheme: str,
               reference: torch.Tensor | None = None) -> float:
    """Mean squared output error of consumers ``weight`` (out, n; stacked) on tokens ``x`` (t, n)
    when their inputs are divided by ``s`` and then rounded per token, and their columns multiplied
    by ``s`` and rounded per output channel, against the float output ``reference`` = x @ weight.T."""
    _, act_kind = SCHEMES[scheme]
    if reference is None:
        reference = x @ weight.T                                        # (t, out)
    xq = fake_quantize_activations(x / s, act_kind, "token")            # (t, n)
    wq = weight_quantizer(scheme)(weight * s)                           # (out, n)
    return float((xq @ wq.T - reference).pow(2).mean())


def search_alpha(x: torch.Tensor, weight: torch.Tensor, x_max: torch.Tensor, alphas: list[float], scheme: str,
                 rows: torch.Tensor | None = None) -> tuple[float, torch.Tensor, float, float]:
    """The alpha among ``alphas`` whose scale gives the lowest ``w8a8_error``: (alpha, s, loss at
    s = 1, loss at the chosen s). ``x_max`` may come from more tokens than ``x``."""
    w_max = weight.abs().amax(dim=0)
    reference = x @ weight.T
    before = w8a8_error(x, weight, torch.ones_like(x_max), scheme, reference)
    best = None
    for alpha in alphas:
        s = smoothquant_scales(x_max, w_max, alpha, rows)
        loss = w8a8_error(x, weight, s, scheme, reference)
        if best is None or loss < best[3]:
            best = (alpha, s, before, loss)
    return best


__all__ = ["SCHEMES", "smoothquant_scales", "weight_quantizer", "w8a8_error", "search_alpha"]
