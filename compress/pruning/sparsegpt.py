"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with weight reconstruction, a pure
function on tensors.

The columns of W (rows, cols) are visited left to right in blocks of ``sparsegpt_block_size``.
At the start of a block (unstructured) or of every M columns (N:M), the weights to remove are
chosen by the OBS saliency w^2 / [U]_jj^2, U the upper Cholesky factor of H^-1 (the same factor
GPTQ uses). Then each column is pruned (and, for the joint solve, its survivors rounded onto the
format's grid); the error, divided by [U]_jj, is pushed onto the columns still to come exactly
as GPTQ pushes its rounding error. Pruned weights stay exact zeros because the update only
reaches columns after the current one.

A fixed ``keep`` mask skips the selection: the solve then only reconstructs (or quantizes) the
weights around a mask chosen elsewhere, so sparsity survives a later quantization.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from ..quant.formats import QuantResult
from ..quant.gptq import inverse_hessian_factor, prepare_hessian
from .config import SparseGPTConfig
from .masks import nm_mask, unstructured_mask


@dataclasses.dataclass
class SparseResult:
    """weight: the pruned (and, joint, dequantized) float32 weight; keep: True where kept;
    quant: the codes and scales of the joint solve; loss: the OBS loss estimate sum(e^2)/2."""

    weight: torch.Tensor
    keep: torch.Tensor
    loss: float
    damp: float | None = None
    fallback: str | None = None
    quant: QuantResult | None = None


def select_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, comparison: str) -> torch.Tensor:
    return nm_mask(score, *nm) if nm is not None else unstructured_mask(score, sparsity, comparison)


def sparsegpt_solve(hessian: torch.Tensor, weight: torch.Tensor, cfg: SparseGPTConfig, *,
                    sparsity: float | None = None, fmt=None, keep: torch.Tensor | None = None) -> SparseResult:
    """Prune ``weight`` (rows, cols) to ``sparsity`` (default: the config's) given the input
    Hessian (cols, cols). ``fmt``: a symmetric weight format (``compress.quant.formats``) to
    quantize the survivors in the same solve. ``keep``: a fixed keep-mask (no selection)."""
    nm = cfg.nm
    sparsity = cfg.target_sparsity if sparsity is None else sparsity
    h, w = prepare_hessian(hessian, weight, "SparseGPT")
    rows, cols = w.shape
    if nm is not None and cols % nm[1]:
        raise ConfigError(f"an {nm[0]}:{nm[1]} pattern needs in_features divisible by {nm[1]}, got {cols}")
    if fmt is not None and not getattr(fmt, "symmetric", True):
        raise ConfigError("joint pruning + quantization needs a symmetric grid (zero must be a code)")
    diag = h.diagonal().clone()
    hinv, damp = inverse_hessian_factor(h, cfg.damp, overwrite=True)      # h: prepare_hessian's copy
    if hinv is None:
        return _fallback(w, diag, cfg, sparsity, fmt, keep, damp)

    g = (fmt.group_size or cols) if fmt is not None else None
    block = cfg.sparsegpt_block_size
    if g is not None and fmt.group_size is not None:
        if g % (nm[1] if nm else 1):
            raise ConfigError(f"group_size {g} must be a multiple of the pattern's M={nm[1]}")
        block = -(-block // g) * g            # groups never straddle a block
    params = None
    if fmt is not None:
        params = fmt.fit(w, diag) if fmt.group_size is None else fmt.empty(rows, cols, w.device)
        codes = torch.zeros(rows, cols, dtype=fmt.codes_dtype, device=w.device)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=w.device) if keep is None else keep.clone().bool()
    out = torch.zeros_like(w)
    losses = torch.zeros(rows, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()                                  # (rows, block): takes in-block updates
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = hinv1.diagonal()
        if keep is None and nm is None:                           # the whole block's mask at once
            mask[:, i1:i2] = select_mask(w1.square() / d1.square(), sparsity, None, cfg.comparison)
        for i in range(i2 - i1):
            col = i1 + i
            if keep is None and nm is not None and i % nm[1] == 0:  # N:M: choose on the updated weights
                m = nm[1]
                mask[:, col:col + m] = nm_mask(w1[:, i:i + m].square() / d1[i:i + m].square(), *nm)
            if params is not None and fmt.group_size is not None and col % g == 0:
                fmt.fit_group(params, col // g, w1[:, i:i + g] * mask[:, col:col + g], diag[col:col + g])
            x = w1[:, i]
            q = x * mask[:, col]
            if params is not None:
                codes[:, col], q = fmt.round_column(q, params, col // g)
            out[:, col] = q
            e = (x - q) / hinv1[i, i]
            losses += e.square() * 0.5
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)

    out = out * mask                                              # exact zeros whatever the grid did
    quant = fmt.result(codes, params, out, float(losses.sum()), damp=damp) if params is not None else None
    return SparseResult(out, mask, float(losses.sum()), damp=damp, quant=quant)


def _fallback(w, diag, cfg, sparsity, fmt, keep, damp) -> SparseResult:
    """Cholesky failed even with escalated damping: Wanda's score, no reconstruction."""
    if keep is None:
        keep = select_mask(w.abs() * diag.clamp(min=0).sqrt(), sparsity, cfg.nm, cfg.comparison)
    out = w * keep
    quant = None
    if fmt is not None:
        params = fmt.fit(out, diag)
        codes, deq = fmt.quantize(out, params)
        out = deq * keep
        quant = fmt.result(codes, params, out, 0.0)
    msg = f"Cholesky failed even with damp={damp:g}; pruned by Wanda's score without reconstruction"
    return SparseResult(out, keep.bool(), 0.0, damp=damp, fallback=msg, quant=quant)
