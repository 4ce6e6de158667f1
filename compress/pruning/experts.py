"""Expert pruning: drop whole experts of a mixture-of-experts model by their router statistics.

The calibration tokens run through the model layer by layer (the shared engine); at each MoE layer
the router's choices are counted. An expert's score is the routing weight it receives over the
calibration tokens, ``frequency x mean gate weight`` (``score="weight"``), or how often it is chosen
(``score="frequency"``). Every MoE layer keeps the same number of experts, its highest-scoring ones
in their original order (transformers builds every layer from one ``num_experts`` field); the
router's rows of the dropped experts go with them and the config is updated, so vanilla
transformers loads the exported, smaller model.

After pruning, a token's top-k is taken among the kept experts: the router renormalises over them
(Qwen3-MoE, Mixtral) exactly as it does over all experts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
from torch import nn

from ..configs import MethodConfig, register_method
from ..engine import LayerMethod, Records, compress_layers
from ..errors import ConfigError
from ..moe import LinearExperts, expert_blocks, expert_fields
from ..structure import prepare_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ExpertPruneConfig(MethodConfig):
    """Drop experts of every MoE layer.

    keep:      experts kept per MoE layer; or
    fraction:  the fraction of each layer's experts dropped (rounded to the nearest whole expert,
               at least one dropped), when ``keep`` is not given.
    score:     "weight" (routing weight received: frequency x mean gate weight) or "frequency"
               (how often the expert is among a token's top-k).
    """

    method = "expert_prune"
    keep: int | None = None
    fraction: float = 0.25
    score: Literal["weight", "frequency"] = "weight"

    def validate(self) -> None:
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"keep must be at least 1 expert per layer, got {self.keep}")
        if self.keep is None and not 0 < self.fraction < 1:
            raise ConfigError(f"fraction must be in (0, 1), got {self.fraction}")

    def kept(self, num_experts: int) -> int:
        if self.keep is not None:
            return self.keep
        return num_experts - max(1, round(self.fraction * num_experts))


@dataclasses.dataclass
class ExpertPruneRecord:
    """One MoE layer: the experts kept and dropped (original indices) and every expert's score."""

    name: str
    kept: list[int]
    dropped: list[int]
    scores: list[float]


class _RouterMass:
    """Per expert: how often it is chosen, and the routing weight it receives."""

    REDUCE = {"count": "sum", "weight": "sum", "tokens": "sum"}

    def __init__(self, num_experts: int):
        self.count = torch.zeros(num_experts, dtype=torch.float64)
        self.weight = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = 0

    def add(self, routed: tuple[torch.Tensor, torch.Tensor]) -> None:
        index, weight = (t.reshape(-1).cpu() for t in routed)           # (tokens * k,)
        valid = index < len(self.count)
        self.count.index_add_(0, index[valid], torch.ones_like(weight[valid], dtype=torch.float64))
        self.weight.index_add_(0, index[valid], weight[valid].double())
        self.tokens += routed[0].shape[0]


def _routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    weight = args[2] if len(args) > 2 else kwargs["top_k_weights"]
    return index, weight


class _RoutingObserver(LayerMethod):
    """Counts the router's choices at each MoE layer; compresses nothing."""

    name = "expert routing"

    def __init__(self):
        self.targets = {}
        self.mass: dict[str, _RouterMass] = {}

    def prepare_layer(self, layer: nn.Module, prefix: str, inputs) -> None:
        blocks = expert_blocks(layer, prefix)
        if blocks and inputs is not None:
            self.mass.update(inputs.observe(blocks, lambda m: _RouterMass(m.num_experts), select=_routing))


def prune_experts(model: nn.Module, cfg: ExpertPruneConfig, calib=None, *, device=None,
                  batch_size: int | None = None, progress: bool = True) -> Records:
    """Drop the lowest-scoring experts of every MoE layer of ``model`` in place (see the module
    docstring); returns a record per MoE layer."""
    prepare_model(model)
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, LinearExperts)}
    if not blocks:
        raise ConfigError(f"expert pruning needs a mixture-of-experts model; {type(model).__name__} has no experts")
    if calib is None:
        raise ConfigError("expert pruning ranks experts by the router's choices on calibration data: pass calib= "
                          "(CLI: --calib FILE)")
    num = {m.num_experts for m in blocks.values()}
    if len(num) != 1:
        raise ConfigError(f"the MoE layers have different expert counts {sorted(num)}; expert pruning keeps one "
                          f"count for all of them")
    total = num.pop()
    keep = cfg.kept(total)
    top_k = getattr(model.config, "num_experts_per_tok", 1)
    groups = getattr(model.config, "n_group", None) or 1
    if not top_k <= keep < total:
        raise ConfigError(f"keeping {keep} of {total} experts per layer: keep at least num_experts_per_tok={top_k} "
                          f"and fewer than {total}")
    if keep % groups:
        raise ConfigError(f"keeping {keep} experts: the router picks experts in n_group={groups} groups, so keep "
                          f"a multiple of {groups}")
    observer = _RoutingObserver()
    compress_layers(model, observer, calib, device=device, batch_size=batch_size, progress=progress)
    records = {}
    for name, block in blocks.items():
        mass = observer.mass.get(name)
        if mass is None:
            raise ConfigError(f"{name} saw no calibration tokens; cannot rank its experts")
        score = mass.weight if cfg.score == "weight" else mass.count
        score = score / max(mass.tokens, 1)
        kept = sorted(torch.topk(score, keep).indices.tolist())
        dropped = [e for e in range(total) if e not in kept]
        _keep_experts(model, name, block, kept)
        records[name] = ExpertPruneRecord(name, kept, dropped, [round(float(s), 6) for s in score])
    for field in expert_fields(model.config):
        setattr(model.config, field, keep)
    log.info("expert pruning: %d MoE layers keep %d of %d experts (score %s)", len(blocks), keep, total, cfg.score)
    return Records(records, {"experts_kept": keep, "experts_before": total})


def _keep_experts(model: nn.Module, name: str, block: LinearExperts, kept: list[int]) -> None:
    """Replace ``block`` by its ``kept`` experts and cut the router beside it to their rows."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    new = LinearExperts([block[e] for e in kept], block.layout)
    setattr(parent, name.rpartition(".")[2], new)
    router = getattr(parent, "gate", None)
    if router is None:
        raise ConfigError(f"{parent_name} has experts but no router named 'gate'; compress cannot cut its rows")
    index = torch.tensor(kept)
    with torch.no_grad():
        for attr in ("weight", "bias", "e_score_correction_bias"):
            tensor = getattr(router, attr, None)
            if isinstance(tensor, torch.Tensor) and tensor.shape[0] == block.num_experts:
                cut = tensor.detach()[index].clone()
                if isinstance(tensor, nn.Parameter):
                    setattr(router, attr, nn.Parameter(cut, requires_grad=tensor.requires_grad))
                else:
                    setattr(router, attr, cut)
        if isinstance(router, nn.Linear):
            router.out_features = len(kept)
    for attr in ("num_experts", "n_routed_experts"):
        if isinstance(getattr(router, attr, None), int):
            setattr(router, attr, len(kept))


register_method(ExpertPruneConfig, prune_experts, area="prune", statistics="routing")
