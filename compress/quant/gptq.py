"""GPTQ: the error-feedback solve of Frantar et al. (2022), a pure function on tensors.

Columns are quantized one at a time; each column's rounding error, divided by the matching
diagonal entry of the upper Cholesky factor of H^-1, is subtracted from the columns still to come
(immediately inside a block of ``gptq_block_size`` columns, lazily for the columns after it).

Groups: without act-order, a group's scale is chosen when the solve reaches its first column, from
the weights as the error feedback has left them. With act-order, columns are visited by decreasing
H diagonal, but the groups stay the natural contiguous column ranges and their scales are fixed
before the solve ("static" groups), so the checkpoint needs no g_idx.

The grid is the format's (``cfg.weight_format.solver_grid``, ``formats.py``): the integer grid, or
E2M1 codes on NVFP4 / MXFP4 block scales (GPTQ on the FP4 grid: the same error feedback, the FP4
rounding of each column).
"""

from __future__ import annotations

import logging

import torch

from .config import GPTQConfig
from .formats import QuantResult
from .rtn import rtn_solve

log = logging.getLogger(__name__)

MAX_DAMP_ESCALATIONS = 4


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or inf in ``t``, checked a block of rows at a time (``isfinite(t).all()`` on the whole
    tensor peaks at 1.75x a float32 tensor's bytes: 1.4 GB on an 8B model's down_proj Hessian). Row
    blocks are views whatever the layout (LAPACK's outputs are column-major)."""
    if t.dim() == 0:
        return bool(torch.isfinite(t))
    step = max(1, chunk // max(1, t[0].numel()))
    return all(bool(torch.isfinite(block).all()) for block in t.split(step, dim=0))


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, *,
                           overwrite: bool = False) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of (H + d*mean(diag H)*I)^-1, escalating d tenfold on failure.

    Returns (None, last damp tried) when every attempt fails. ``overwrite``: ``hessian`` is the
    caller's scratch copy: it is damped in place and its storage is released once its Cholesky
    factor exists (left empty), so at most two cols^2 matrices live at a time, ``hessian``
    included (an 8B model's down_proj Hessian is 784 MiB in float32; without it, three)."""
    mean_diag = float(hessian.diagonal().mean())
    diag = hessian.diagonal().clone()
    h = hessian if overwrite else hessian.clone()
    lower = None
    for attempt in range(MAX_DAMP_ESCALATIONS + 1):
        d = damp * 10**attempt
        if lower is not None:
            # The inverse's factor failed after H's succeeded (rare): H was released, rebuild it.
            h = lower @ lower.mT
            lower = None
        h.diagonal().copy_(diag + d * mean_diag)                 # the same sums as a fresh copy's
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0:
            lower = None
            continue
        h.set_()                                                 # release H's storage (the caller's tensor too)
        del h
        # The factor is kept until the end for a rebuild of H if the next step fails; the upper factor
        # overwrites the inverse (the same values as a separate output), so two matrices at most.
        upper = torch.cholesky_inverse(lower)
        info = torch.empty((), dtype=torch.int32, device=upper.device)
        torch.linalg.cholesky_ex(upper, upper=True, out=(upper, info))
        if int(info) == 0 and all_finite(upper):
            if attempt:
                log.info("GPTQ: damping escalated to %.3g", d)
            return upper, d
        del upper
    return None, d


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, who: str, *,
                    own_hessian: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copies of (H, W) ready for an error-feedback solve (GPTQ, SparseGPT): inputs that
    were always zero get a unit diagonal and a zero weight, since their weight never mattered.
    ``own_hessian``: ``hessian`` is the caller's to consume (a float32 one is used, not copied)."""
    w = weight.float()
    if w is weight:                                   # float32 already: copy; otherwise .float() copied
        w = w.clone()
    h = hessian.float()
    if h is hessian and not own_hessian:
        h = h.clone()
    if not all_finite(h):
        raise ValueError(f"{who}: the Hessian has inf/NaN entries; the calibration activations overflowed "
                         "(try a float32 or bfloat16 model instead of float16)")
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return h, w


def gptq_solve(hessian: torch.Tensor, weight: torch.Tensor, cfg: GPTQConfig,
               scale_dtype: torch.dtype, fmt=None, keep: torch.Tensor | None = None, *,
               own_hessian: bool = False) -> QuantResult:
    """Quantize ``weight`` (rows, cols) given the input Hessian ``hessian`` (cols, cols), on the
    grid ``fmt`` (default: a fresh one of ``cfg.weight_format``: integer, NVFP4 or MXFP4).

    keep: bool (rows, cols), False where the weight must come out exactly zero (a pruned model's
    mask): those weights take the code of 0 and their error is pushed onto the columns still to
    come like any rounding error, as SparseGPT does with a fixed mask, so the sparsity survives.
    own_hessian: ``hessian`` is a scratch tensor the solve may overwrite (saves two in^2 copies)."""
    fmt = fmt or cfg.weight_format.solver_grid(scale_dtype, cfg.observer)
    h, w = prepare_hessian(hessian, weight, "GPTQ", own_hessian=own_hessian)
    del hessian
    if keep is not None:
        keep = keep.to(device=w.device, dtype=torch.bool)
        w = w * keep
    rows, cols = w.shape
    diag = h.diagonal().clone()

    g = fmt.group_size or cols
    static = cfg.act_order or fmt.group_size is None
    # Static groups: every group's scale is fitted to the weights before the solve; otherwise a
    # group is fitted when the solve reaches its first column.
    params = fmt.fit(w, diag) if static else fmt.empty(rows, cols, w.device)

    perm = torch.argsort(diag, descending=True) if cfg.act_order else torch.arange(cols, device=w.device)
    if cfg.act_order:                          # (the identity order needs no permuted copies)
        w, h = w[:, perm], h[perm][:, perm]
        keep = keep[:, perm] if keep is not None else None
    group_of = (perm // g).tolist()            # processed column -> its (natural) group

    hinv, damp = inverse_hessian_factor(h, cfg.damp, overwrite=True)      # h is this solve's own
    del h
    if hinv is None:
        msg = f"Cholesky failed even with damp={damp:g}; fell back to round-to-nearest"
        fresh = cfg.weight_format.solver_grid(scale_dtype, cfg.observer)
        result = rtn_solve(weight, cfg, scale_dtype, diag.clamp(min=0), fmt=fresh)
        result.fallback = msg
        return result

    block = max(cfg.gptq_block_size, g) if static else -(-cfg.gptq_block_size // g) * g
    codes = torch.zeros(rows, cols, dtype=fmt.codes_dtype, device=w.device)
    deq = torch.zeros_like(w)
    losses = torch.zeros(rows, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()               # (rows, block): receives the in-block updates
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % g == 0:    # dynamic group starts: fit it to the updated weights
                part = w1[:, i:i + g] if keep is None else w1[:, i:i + g] * keep[:, col:col + g]
                fmt.fit_group(params, col // g, part, diag[col:col + g])
            x = w1[:, i]
            q, xq = fmt.round_column(x, params, group_of[col])
            if keep is not None:               # pruned weights: the code of 0, whatever the update made them
                q0, x0 = fmt.round_column(torch.zeros_like(x), params, group_of[col])
                q, xq = torch.where(keep[:, col], q, q0), torch.where(keep[:, col], xq, x0)
            codes[:, col] = q
            deq[:, col] = xq
            d = hinv1[i, i]
            e = (x - xq) / d
            losses += e.square() * 0.5
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)

    if cfg.act_order:
        inv = torch.argsort(perm)
        codes, deq = codes[:, inv], deq[:, inv]
    return fmt.result(codes, params, deq, float(losses.sum()), damp=damp)
