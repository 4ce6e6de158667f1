"""GBLM-Pruner (Das et al., 2023, "Beyond Size: How Gradients Shape Pruning Decisions in LLMs"):
Wanda's score plus a gradient term, from one backward pass per calibration window.

    G_ij  = sqrt(sum_n (dL_n / dW_ij)^2)        the l2 norm over windows n of the gradient of
                                               window n's mean next-token loss (dense model)
    S_ij  = |W_ij| * (gradient_weight * G_ij + ||X_j||)
    ||X_j|| = sqrt(mean over windows of sum over the window's tokens of x_j^2)   (Wanda's scaler, as the paper)

compared within each output row (or N:M group) as Wanda does. The gradients are taken once, on
the dense model, before any layer is pruned; only the squared-gradient sums of the target
linears are kept (float32, accumulated by a hook as each .grad is produced, which then frees the
.grad), one window at a time. The activation norms come from the usual layer-by-layer walk.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..configs import register_method
from ..engine import write_rows
from ..errors import ConfigError
from .apply import Pruner, PruneRecord, prune_weights
from .config import PruneConfig
from .masks import sparsity_of
from .sparsegpt import select_mask

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GBLMConfig(PruneConfig):
    """GBLM-Pruner: score |W| * (gradient_weight * G + ||X||), G the l2 norm over calibration
    windows of the LM-loss gradient.

    gradient_weight:  the scale of the gradient term against the activation norm (the paper's
                      alpha, 100). 0 gives Wanda's score.
    """

    method = "gblm"
    gradient_weight: float = 100.0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.gradient_weight, bool) or not isinstance(self.gradient_weight, (int, float)) \
                or not self.gradient_weight >= 0:
            raise ConfigError(f"gradient_weight must be a number >= 0 (0 = Wanda's score), got {self.gradient_weight!r}")


def _input_ids(calib) -> torch.Tensor:
    ids = calib.input_ids if hasattr(calib, "input_ids") else calib
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ConfigError("gblm needs calibration windows (samples, seqlen) of token ids: pass "
                          "calib=compress.calibration_data(tokenizer, TEXT_FILE, samples=..., seqlen=...)")
    return ids


def gradient_norms(model: nn.Module, calib, names: list[str]) -> dict[str, torch.Tensor]:
    """name -> G (out, in) float32: the l2 norm over calibration windows of d(mean LM loss of the
    window)/dW for each linear in ``names``. One window per backward pass; no .grad is kept."""
    ids = _input_ids(calib)
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in names}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    hooks = []
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, w in weights.items():
            w.requires_grad_(True)

            def accumulate(param, name=name):
                sums[name].add_(param.grad.float().square())
                param.grad = None                                # memory-light: no .grad survives
            hooks.append(w.register_post_accumulate_grad_hook(accumulate))
        for window in ids:
            window = window.unsqueeze(0).to(device)             # (1, seqlen)
            loss = model(input_ids=window, labels=window).loss
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return {name: s.sqrt_() for name, s in sums.items()}


class GBLMPruner(Pruner):
    """The pruning engine method with GBLM's gradient-augmented score."""

    def __init__(self, model: nn.Module, cfg: GBLMConfig, grads: dict[str, torch.Tensor], windows: int):
        super().__init__(model, cfg)
        self.grads = grads                                       # name -> G (out, in)
        self.windows = max(1, windows)                           # calibration windows (the paper's nsamples)

    def _solve_stacked(self, names, modules, stats, has_data: bool) -> None:
        w = torch.cat([m.weight.detach() for m in modules], dim=0).float()    # (sum of rows, in)
        sparsity = self.sparsity[names[0]]
        fallback = None
        if has_data:
            # ||X_j||: sum of x^2 over a window's tokens, averaged over the windows (the Wanda scaler the
            # paper adds the gradient term to). Not over all tokens: that would weaken the gradient term
            # by sqrt(windows) against the paper's balance.
            xnorm = (stats.diag * (stats.tokens / 2 / self.windows)).sqrt()
            grad = torch.cat([self.grads.pop(n).to(w.device) for n in names], dim=0)
            score = w.abs() * (self.cfg.gradient_weight * grad + xnorm)
        else:
            score = w.abs()
            fallback = "no calibration input: pruned by magnitude"
        keep = select_mask(score, sparsity, self.cfg.nm, self.cfg.comparison)
        loss = float((w.square() * ~keep * (stats.diag / 2 if has_data else 1)).sum())
        for name, module, _ in zip(names, modules, write_rows(modules, w * keep)):
            self.records[name] = PruneRecord(name, tuple(module.weight.shape), sparsity,
                                             sparsity_of(module.weight), loss, fallback)


def prune_gblm(model: nn.Module, cfg: GBLMConfig, calib=None, **kwargs):
    """Prune ``model`` in place with GBLM-Pruner (needs ``calib``); returns the per-linear records."""
    if not isinstance(cfg, GBLMConfig):
        raise ConfigError(f"prune_gblm takes a GBLMConfig, got {type(cfg).__name__}")
    if calib is None:
        raise ConfigError("gblm needs calibration data: pass calib=compress.calibration_data(tokenizer, "
                          "TEXT_FILE, samples=..., seqlen=...) (CLI: --calib FILE)")
    names = list(Pruner(model, cfg).targets)
    grads = gradient_norms(model, calib, names)
    windows = _input_ids(calib).shape[0]
    log.info("gblm: gradients of %d linears over %d windows", len(grads), windows)
    return prune_weights(model, cfg, calib, pruner=lambda m, c: GBLMPruner(m, c, grads, windows), **kwargs)


register_method(GBLMConfig, prune_gblm, area="prune", statistics="input")
