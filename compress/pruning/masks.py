"""Which weights to zero, given a score per weight (higher = more important). Pure functions on
(rows, cols) tensors; a mask is True where the weight is KEPT.

- unstructured, per row:   every row keeps its cols - round(s * cols) best weights;
- unstructured, per layer: the layer keeps its numel - round(s * numel) best weights;
- N:M:                     every row keeps the N best of each M consecutive columns.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def prune_count(total: int, sparsity: float) -> int:
    """Weights to remove out of ``total`` (rounded to nearest)."""
    return int(round(sparsity * total))


def unstructured_mask(score: torch.Tensor, sparsity: float, comparison: str = "row") -> torch.Tensor:
    """Keep-mask removing the ``sparsity`` fraction of lowest scores per row or per layer."""
    rows, cols = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if comparison == "row":
        k = prune_count(cols, sparsity)
        if k:
            idx = torch.topk(score, k, dim=1, largest=False).indices          # (rows, k)
            keep.scatter_(1, idx, False)
    elif comparison == "layer":
        k = prune_count(score.numel(), sparsity)
        if k:
            idx = torch.topk(score.flatten(), k, largest=False).indices
            keep.view(-1)[idx] = False
    else:
        raise ConfigError(f"comparison must be 'row' or 'layer', got {comparison!r}")
    return keep


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``n`` best of every ``m`` consecutive columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ConfigError(f"an {n}:{m} pattern needs in_features divisible by {m}, got {cols}")
    grouped = score.reshape(rows, cols // m, m)                               # (rows, groups, m)
    idx = torch.topk(grouped, n, dim=2).indices
    keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(rows, cols)


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Does every group of ``m`` consecutive inputs of every row hold at most ``n`` nonzeros?"""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight != 0).reshape(rows, cols // m, m).sum(dim=2) <= n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / weight.numel() if weight.numel() else 0.0
