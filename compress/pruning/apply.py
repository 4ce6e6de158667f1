"""Apply magnitude, Wanda or SparseGPT to a model: pick the target linears, score and prune them
through the engine's driver (layer by layer with calibration data for Wanda and SparseGPT) and, for
SparseGPT's joint solve, swap in packed ``QuantLinear`` modules. The three methods are registered
at the bottom."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict

import torch
from torch import nn

from ..configs import register_method
from ..engine import LayerMethod, Records, compress_layers, select_linears, write_rows
from ..errors import ConfigError
from ..modeling import get_module, name_matches, set_module
from ..moe import describe_tokens, expert_of, prepare_experts, set_route_all, token_summary
from ..stats import HessianStats, InputStats
from ..structure import warn_uncompressed
from .config import MagnitudeConfig, PruneConfig, SparseGPTConfig, WandaConfig
from .masks import sparsity_of
from .sparsegpt import select_mask, sparsegpt_solve

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PruneRecord:
    """What happened to one linear: the sparsity asked and measured, the method's own loss
    (SparseGPT: OBS loss; Wanda: sum of pruned w^2 * E[x^2]; magnitude: sum of pruned w^2)."""

    name: str
    shape: tuple[int, int]
    target: float
    sparsity: float
    loss: float
    fallback: str | None = None


class Pruner(LayerMethod):
    """The engine method of the one-shot pruning configs."""

    def __init__(self, model: nn.Module, cfg: PruneConfig):
        self.cfg = cfg
        self.name = cfg.method
        self.records: dict[str, PruneRecord] = {}
        self._quant: dict[str, object] = {}
        self.joint = isinstance(cfg, SparseGPTConfig) and cfg.bits is not None
        self.sparsity: dict[str, float] = {}             # target name -> its sparsity
        self.routed: dict[str, int] = {}                 # expert name -> tokens routed to it
        self.targets = self._select_targets(model)

    def sparsity_for(self, name: str) -> float:
        for pattern, value in self.cfg.layer_sparsity.items():
            if name_matches(name, [pattern]):
                return float(value)
        return self.cfg.target_sparsity

    def _select_targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        nm = self.cfg.nm

        def check(name: str, module: nn.Linear) -> bool:
            sparsity = self.sparsity_for(name)
            if sparsity == 0:
                return False
            if nm is not None and module.in_features % nm[1]:
                raise ConfigError(f"pattern {self.cfg.pattern!r} groups {nm[1]} inputs, but in_features "
                                  f"{module.in_features} of {name} is not a multiple of {nm[1]}; add "
                                  f"{name!r} to ignore (it stays dense)")
            if self.joint:
                self.cfg.weight_format.check_shape(name, module.in_features)
            self.sparsity[name] = sparsity
            return True

        return select_linears(model, self.cfg.ignore, verb="prune", left="dense", check=check,
                              after=f" and layer_sparsity={self.cfg.layer_sparsity}")

    # --- the engine's interface -------------------------------------------------------------
    def prepare_layer(self, layer: nn.Module, prefix: str, inputs) -> None:
        """MoE layers: count the tokens routed to each expert; let every expert observe every
        token if asked."""
        self.routed.update(prepare_experts(layer, prefix, inputs, self.cfg.route_all_experts))

    def new_stats(self, module: nn.Linear) -> HessianStats | InputStats:
        stats = HessianStats if isinstance(self.cfg, SparseGPTConfig) else InputStats
        return stats(module.in_features, device=module.weight.device)

    def solve(self, names: list[str], modules: list[nn.Linear], stats) -> None:
        """Prune the linears that read one input. Rows are independent under per-row and N:M
        selection, so linears with the same sparsity are solved stacked (one Cholesky factor)."""
        has_data = stats is not None and stats.tokens > 0
        tokens = stats.tokens if stats is not None else 0
        few = not isinstance(self.cfg, MagnitudeConfig) and all(expert_of(n) for n in names) and \
            tokens < self.cfg.min_expert_tokens
        if few:
            has_data = False                     # an expert routed too few tokens: magnitude, summed per layer
        elif not has_data and not isinstance(self.cfg, MagnitudeConfig):
            log.warning("%s received no calibration input; pruned by magnitude", names[0])
        stackable = self.cfg.nm is not None or self.cfg.comparison == "row"
        batches: dict[object, list[int]] = defaultdict(list)
        for i, name in enumerate(names):
            batches[(self.sparsity[name], modules[i].in_features) if stackable else i].append(i)
        for members in batches.values():
            self._solve_stacked([names[i] for i in members], [modules[i] for i in members], stats, has_data)
        if few:
            for name in names:
                self.records[name].fallback = (f"magnitude: observed {tokens} calibration tokens, fewer "
                                               f"than min_expert_tokens={self.cfg.min_expert_tokens}")

    def _solve_stacked(self, names, modules, stats, has_data: bool) -> None:
        weight = torch.cat([m.weight.detach() for m in modules], dim=0)      # (sum of rows, in)
        dtype = modules[0].weight.dtype
        sparsity = self.sparsity[names[0]]
        fallback, quant = None, None
        if isinstance(self.cfg, SparseGPTConfig) and has_data:
            fmt = self.cfg.weight_format.solver_grid(dtype, self.cfg.observer) if self.joint else None
            result = sparsegpt_solve(stats.hessian, weight, self.cfg, sparsity=sparsity, fmt=fmt)
            new, loss, fallback, quant = result.weight, result.loss, result.fallback, result.quant
        else:
            w = weight.float()
            col = stats.diag if has_data else None
            score = w.abs() if col is None else w.abs() * col.sqrt()           # Wanda: |W| * ||X_j||
            keep = select_mask(score, sparsity, self.cfg.nm, self.cfg.comparison)
            new = w * keep
            pruned = w.square() * ~keep
            loss = float((pruned * col).sum()) if col is not None else float(pruned.sum())
            if self.joint:                                                     # no data: RTN survivors
                fmt = self.cfg.weight_format.solver_grid(dtype, self.cfg.observer)
                params = fmt.fit(new, col)
                codes, deq = fmt.quantize(new, params)
                new = deq * keep
                quant = fmt.result(codes, params, new, loss)
        for name, module, rows in zip(names, modules, write_rows(modules, new)):
            if quant is not None:
                self._quant[name] = quant.take_rows(rows)
            self.records[name] = PruneRecord(name, tuple(module.weight.shape), sparsity,
                                             sparsity_of(module.weight), loss, fallback)
            if fallback:
                log.warning("%s: %s", name, fallback)

    def solve_state(self, names: list[str]) -> dict:
        """The records (and joint quantization results) of the solve of ``names`` besides their weights,
        broadcast by data-parallel calibration from the rank that solved them."""
        return {n: (self.records[n], self._quant.get(n)) for n in names}

    def load_solve_state(self, state: dict) -> None:
        for name, (record, quant) in state.items():
            self.records[name] = record
            if quant is not None:
                self._quant[name] = quant

    def finalize(self, root: nn.Module, prefix: str, names: list[str]) -> None:
        """Joint SparseGPT + quantization: swap the solved linears for packed QuantLinear."""
        if set_route_all(root, False):
            summary = token_summary({n: c for n, c in self.routed.items() if n.startswith(prefix)})
            if summary:
                log.info("%s: %s", prefix.rstrip("."), describe_tokens(summary))
        if not self.joint:
            return
        for local in names:
            old = get_module(root, local)
            new = self.cfg.weight_format.pack(self._quant.pop(f"{prefix}{local}"), bias=old.bias,
                                              dtype=old.weight.dtype, observer=self.cfg.observer)
            set_module(root, local, new.to(old.weight.device))


def prune_weights(model: nn.Module, cfg: PruneConfig, calib=None, *, device=None, batch_size: int | None = None,
                  progress: bool = True, pruner=None) -> dict[str, PruneRecord]:
    """Prune every target linear of ``model`` in place. Wanda and SparseGPT need ``calib``;
    ``pruner(model, cfg)`` builds a Pruner subclass for methods that change the selection (DSnoT, GBLM)."""
    if not isinstance(cfg, PruneConfig):
        raise ConfigError(f"prune_weights takes a pruning config, got {type(cfg).__name__}")
    pruner = (pruner or Pruner)(model, cfg)
    start = time.perf_counter()
    data = not isinstance(cfg, MagnitudeConfig)
    if data and calib is None:
        raise ConfigError(f"{cfg.method} needs calibration data: pass calib=compress.calibration_data("
                          f"tokenizer, TEXT_FILE, samples=..., seqlen=...) (CLI: --calib FILE); "
                          f"magnitude pruning needs none")
    compress_layers(model, pruner, calib if data else None, device=device, batch_size=batch_size, progress=progress)
    total = sum(r.shape[0] * r.shape[1] for r in pruner.records.values())
    zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in pruner.records.values())
    log.info("%s: %d linears pruned to %.2f%% sparsity in %.1f s", cfg.method, len(pruner.records),
             100 * zeros / max(total, 1), time.perf_counter() - start)
    dense_by_choice = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pruner.sparsity_for(n) == 0}
    warn_uncompressed(model, set(pruner.records) | dense_by_choice, cfg.ignore, "pruned")
    experts = token_summary(pruner.routed)
    if experts:
        experts["magnitude_fallback"] = len({expert_of(n) for n, r in pruner.records.items()
                                             if (r.fallback or "").startswith("magnitude: observed")})
    return Records(pruner.records, {"experts": experts} if experts else None)


register_method(MagnitudeConfig, prune_weights, area="prune", needs_data=False)
register_method(WandaConfig, prune_weights, area="prune", statistics="input")
register_method(SparseGPTConfig, prune_weights, area="prune", statistics="hessian")
