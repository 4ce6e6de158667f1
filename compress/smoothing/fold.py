"""Folding a per-input-channel scale into a group of linears and the module that feeds them.

For consumers C_i reading x (..., n) and a scale s (n,), the float computation is unchanged by

    C_i.weight[:, j] *= s_j                          (every consumer; routers included)
    producer output channel j /= s_j                 (so each consumer now reads x_j / s_j)

and the producer side is, by kind:

- RMSNorm / LayerNorm ``y = n(x) * (c + w) + b`` (c = 0, or 1 for Gemma's ``x * (1 + w)``):
  ``w <- (c + w) / s - c`` and ``b <- b / s``. ``c`` is found by probing the norm (``norm_offset``).
- a linear's output rows (up_proj for down_proj, v_proj for o_proj): ``W[r, :] /= s_r``,
  ``b[r] /= s_r``, with ``r = rows[j]`` the producer row of consumer channel j. Consumer channels
  sharing a producer row (GQA: the query heads of one kv head) must carry equal scales; the caller
  gives one scale per producer row (``per_row``) and expands it with ``rows``.

Arithmetic runs in float32 and is cast back to each weight's dtype once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """c in ``y = n(x) * (c + w) + b``, by probing: with w = b = 0 the norm gives n(x) * c, with
    w = 1 (b = 0) n(x) * (c + 1). The parameters are restored before returning."""
    params = [p for p in (norm.weight, getattr(norm, "bias", None)) if isinstance(p, torch.Tensor)]
    saved = [p.detach().clone() for p in params]
    weight = norm.weight
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        for p in params:
            p.zero_()
        at_zero = norm(x).float()                  # n(x) * c
        weight.fill_(1.0)
        at_one = norm(x).float()                   # n(x) * (c + 1)
    finally:
        for p, value in zip(params, saved):
            p.copy_(value)
    if at_zero.abs().max() == 0:
        return 0.0
    if torch.allclose(at_one, 2 * at_zero, rtol=1e-3, atol=1e-5):
        return 1.0
    raise ConfigError(f"{type(norm).__name__} computes neither n(x) * w nor n(x) * (1 + w) (+ b); a scale cannot "
                      f"be folded into its weight")


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor, offset: float) -> None:
    """Divide the norm's output channels by ``s`` (n,): w <- (c + w) / s - c, b <- b / s."""
    w = norm.weight
    w.copy_(((offset + w.float()) / s - offset).to(w.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))


@torch.no_grad()
def fold_into_rows(linear: nn.Module, s: torch.Tensor, rows: torch.Tensor) -> None:
    """Divide rows ``rows`` (k,) of ``linear``'s output (weight rows, bias entries) by ``s`` (k,)."""
    w = linear.weight
    rows = rows.to(w.device)
    w[rows] = (w[rows].float() / s[:, None]).to(w.dtype)
    if getattr(linear, "bias", None) is not None:
        linear.bias[rows] = (linear.bias[rows].float() / s).to(linear.bias.dtype)


@torch.no_grad()
def scale_columns(consumers: list[nn.Module], s: torch.Tensor) -> None:
    """Multiply input column j of every consumer's weight (out, n) by ``s[j]``."""
    for module in consumers:
        w = module.weight
        w.copy_((w.float() * s[None, :]).to(w.dtype))


def fold(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor, rows: torch.Tensor | None,
         offset: float = 0.0) -> None:
    """Fold the consumer-channel scale ``s`` (n,) into ``consumers`` and ``producer`` (a norm when
    ``rows`` is None, else a linear whose row ``rows[j]`` feeds channel j; ``s`` must then be
    equal over the channels of one row, which ``per_row`` guarantees)."""
    s = s.float().to(consumers[0].weight.device)
    scale_columns(consumers, s)
    if rows is None:
        fold_into_norm(producer, s, offset)
    else:
        unique, first = _first_index(rows.to(s.device))
        fold_into_rows(producer, s[first], unique)


def _first_index(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique rows, index of each one's first occurrence in ``rows``)."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    first = torch.full((len(unique),), len(rows), dtype=torch.long, device=rows.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(rows), device=rows.device), reduce="amin")
    return unique, first


def per_row(values: torch.Tensor, rows: torch.Tensor | None, reduce: str) -> torch.Tensor:
    """Per-consumer-channel ``values`` (n,) made equal over the channels that share a producer row:
    reduced ("amax" or "mean") over each row's channels and expanded back to (n,). Norms (rows None)
    and MHA (one channel per row) are left as they are."""
    if rows is None:
        return values
    rows = rows.to(values.device)
    unique, inverse = torch.unique(rows, return_inverse=True)
    if len(unique) == len(rows):
        return values
    init = torch.zeros(len(unique), dtype=values.dtype, device=values.device)
    reduced = init.scatter_reduce(0, inverse, values, reduce=reduce, include_self=False)
    return reduced[inverse]


__all__ = ["norm_offset", "fold", "fold_into_norm", "fold_into_rows", "scale_columns", "per_row"]
