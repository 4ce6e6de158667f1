"""DSnoT (Zhang et al., 2023, "Dynamic Sparse No Training"): refine a Wanda or magnitude mask
without training, by prune-and-grow swaps inside each output row.

For output row i with weights w and keep-mask k, the expected reconstruction error over the
calibration tokens is

    err_i = E[w . x - (k * w) . x] = sum_{j pruned} w_j * mu_j           (mu = E[x], per input feature)

Each cycle, every still-active row grows the pruned weight that moves err_i furthest toward zero,
argmax_j sign(err_i) * w_j * mu_j, and prunes the kept weight of lowest Wanda score |w_j| ||x_j||
among those whose removal also moves err_i toward zero (sign(err_i) * w_j * mu_j < 0). A swap is
accepted only when it lowers the row's squared error estimate err_i^2 + sum_{j pruned} w_j^2 var_j
(the mean part plus the per-feature variance part, as the paper weighs growth by the input
variance) and does not flip err_i's sign. A row stops when no swap is accepted, or |err_i| falls
to ``update_threshold``; all rows stop after ``max_cycles``. Linear time in the weights per cycle,
no backpropagation, no weight update; sparsity per row (and N:M: per group) never changes, since
for an N:M mask the pruned weight is taken from the grown weight's group of M.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ..configs import register_method
from ..engine import write_rows
from ..errors import ConfigError
from .apply import Pruner, PruneRecord, prune_weights
from .config import PruneConfig
from .masks import sparsity_of
from .sparsegpt import select_mask


@dataclasses.dataclass
class DSnoTConfig(PruneConfig):
    """DSnoT: a Wanda (or magnitude) mask, then training-free prune-and-grow swaps per row.

    initial:          the mask DSnoT starts from: "wanda" (|W| ||X||) or "magnitude" (|W|).
    max_cycles:       swap rounds at most (the paper's default 50).
    update_threshold: a row stops once its expected error |E[dense - sparse output]| is at most
                      this (the paper's default 0.1).
    """

    method = "dsnot"
    initial: Literal["wanda", "magnitude"] = "wanda"
    max_cycles: int = 50
    update_threshold: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.initial not in ("wanda", "magnitude"):
            raise ConfigError(f"initial must be 'wanda' or 'magnitude' (the mask DSnoT refines), got {self.initial!r}")
        if isinstance(self.max_cycles, bool) or not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise ConfigError(f"max_cycles must be an integer >= 0 (0 = the initial mask alone), got {self.max_cycles!r}")
        if not self.update_threshold >= 0:
            raise ConfigError(f"update_threshold must be >= 0, got {self.update_threshold!r}")

    def describe(self) -> str:
        return super().describe() + f" dsnot({self.initial})"


class MomentStats:
    """Per input feature: sum x, sum x^2 and the token count, accumulated in float32; ``diag``
    (2 * mean(x^2)) as InputStats gives it, plus ``mean`` and ``var``."""

    REDUCE = {"sum": "sum", "sumsq": "sum", "tokens": "sum", "amax": "max"}

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.sumsq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.amax = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).float()              # (tokens, in)
        self.sum += x.sum(dim=0)
        self.sumsq += x.square().sum(dim=0)
        self.tokens += x.shape[0]
        if x.numel():
            self.amax = torch.maximum(self.amax, x.abs().amax())

    def _check(self) -> None:
        if self.tokens == 0:
            raise RuntimeError("MomentStats read before any input was added")

    @property
    def mean(self) -> torch.Tensor:
        self._check()
        return self.sum / self.tokens

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq / self.tokens - self.mean.square()).clamp_min(0)

    @property
    def diag(self) -> torch.Tensor:
        self._check()
        return self.sumsq * (2.0 / self.tokens)


def dsnot_refine(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 sqnorm: torch.Tensor, *, nm: tuple[int, int] | None = None, max_cycles: int = 50,
                 update_threshold: float = 0.1) -> tuple[torch.Tensor, int]:
    """The DSnoT swaps on one weight (rows, cols) and its keep-mask (True = kept); ``mean``,
    ``var`` and ``sqnorm`` (E[x^2]) are per input feature (cols,). Returns the new keep-mask (the
    same count per row, and per group of M for ``nm``) and the number of swaps made."""
    w = weight.float()
    keep = keep.clone()
    rows, cols = w.shape
    contrib = w * mean                                           # (rows, cols): w_j mu_j
    varcost = w.square() * var                                   # (rows, cols): variance of a pruned weight
    wanda = w.abs() * sqnorm.sqrt()                              # (rows, cols): Wanda score
    err = (contrib * ~keep).sum(dim=1)                           # (rows,): E[dense - sparse]
    sign0 = torch.sign(err)
    active = err.abs() > update_threshold
    arange = torch.arange(rows, device=w.device)
    swaps = 0
    for _ in range(max_cycles):
        if not active.any():
            break
        s = torch.sign(err).unsqueeze(1)                         # (rows, 1)
        toward = s * contrib                                     # > 0: growing it / < 0: pruning it moves err to 0
        grow_score = torch.where(~keep & (toward > 0), toward, torch.full_like(toward, -float("inf")))
        grow = grow_score.argmax(dim=1)                          # (rows,)
        can = grow_score[arange, grow] > -float("inf")
        candidates = keep & (toward < 0)
        if nm is not None:                                       # prune only inside the grown weight's group
            m = nm[1]
            group = torch.arange(cols, device=w.device) // m     # (cols,)
            candidates &= group.unsqueeze(0) == (grow // m).unsqueeze(1)
        prune_score = torch.where(candidates, wanda, torch.full_like(wanda, float("inf")))
        prune = prune_score.argmin(dim=1)                        # (rows,)
        can &= prune_score[arange, prune] < float("inf")
        new_err = err - contrib[arange, grow] + contrib[arange, prune]
        # squared-error estimate: mean part err^2 plus the variance of the pruned weights
        gain = err.square() - new_err.square() + varcost[arange, grow] - varcost[arange, prune]
        accept = active & can & (gain > 0) & (torch.sign(new_err) == sign0)
        if not accept.any():
            break
        r = arange[accept]
        keep[r, grow[accept]] = True
        keep[r, prune[accept]] = False
        err = torch.where(accept, new_err, err)
        swaps += int(accept.sum())
        active = accept & (err.abs() > update_threshold)
    return keep, swaps


class DSnoTPruner(Pruner):
    """The pruning engine method with mean/variance statistics and the DSnoT refinement."""

    def __init__(self, model, cfg: DSnoTConfig):
        super().__init__(model, cfg)
        self.swaps = 0                                           # accepted prune-and-grow swaps, all linears

    def new_stats(self, module) -> MomentStats:
        return MomentStats(module.in_features, device=module.weight.device)

    def _solve_stacked(self, names, modules, stats, has_data: bool) -> None:
        w = torch.cat([m.weight.detach() for m in modules], dim=0).float()    # (sum of rows, in)
        sparsity = self.sparsity[names[0]]
        cfg = self.cfg
        score = w.abs() if cfg.initial == "magnitude" or not has_data else w.abs() * stats.diag.sqrt()
        keep = select_mask(score, sparsity, cfg.nm, cfg.comparison)
        swaps, fallback = 0, None
        if has_data:
            keep, swaps = dsnot_refine(w, keep, stats.mean, stats.var, stats.diag / 2, nm=cfg.nm,
                                       max_cycles=cfg.max_cycles, update_threshold=cfg.update_threshold)
        else:
            fallback = "no calibration input: the initial mask without DSnoT swaps"
        new = w * keep
        loss = float((w.square() * ~keep * stats.diag / 2).sum()) if has_data else float((w.square() * ~keep).sum())
        for name, module, _ in zip(names, modules, write_rows(modules, new)):
            self.records[name] = PruneRecord(name, tuple(module.weight.shape), sparsity,
                                             sparsity_of(module.weight), loss, fallback)
        self.swaps += swaps


def prune_dsnot(model, cfg: DSnoTConfig, calib=None, **kwargs):
    """Prune ``model`` in place with DSnoT (needs ``calib``); returns the per-linear records."""
    if not isinstance(cfg, DSnoTConfig):
        raise ConfigError(f"prune_dsnot takes a DSnoTConfig, got {type(cfg).__name__}")
    return prune_weights(model, cfg, calib, pruner=DSnoTPruner, **kwargs)


register_method(DSnoTConfig, prune_dsnot, area="prune", statistics="input")
