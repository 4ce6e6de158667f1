"""Adapt-Pruner (Pan et al. 2025): layer-wise adaptive sparsity for structured pruning of MLP
channels, removed incrementally with short training in between.

Layer importance is the block importance structured.py uses for whole layers,

    I_l = mean_t (1 - cos(x_t, layer_l(x_t)))       (a layer that barely turns its input matters least)

and each layer's removal ratio is spread around the overall ratio r in proportion to it:

    r_l = r - 2 A (I_l - mean(I)) / (max(I) - min(I))         (amplitude A; mean(r_l) = r exactly)

so the least important layer loses about r + A of its channels and the most important about r - A.
The per-layer channel counts are then rounded so their sum is exactly the overall target (largest
remainder, every layer between ``multiple_of`` and its current width).

Incremental pruning (the paper's Adapt-Accel): instead of removing r at once, ``step`` of the
original channels (about 5%) go at a time; each increment re-measures layer and channel importance on
the current model, prunes to the cumulative target with fresh adaptive ratios, then trains
(``train``: a ``lora`` pass, LM loss, or a ``distill`` pass with ``teacher=``). Channels inside a
layer are ranked by structured.py's activation score (mean |a_i| * ||W_down[:, i]||).

Per-layer widths differ, and a Llama/Qwen2 config has one ``intermediate_size``. With ``pad: true``
(default) every MLP is finally zero-padded to the widest layer: padded channels have zero gate/up
rows and a zero down column, so they add exactly nothing (act(0) * 0 = 0), the checkpoint is a plain
transformers one, and the records report the effective (unpadded) parameters. Later LoRA or
distillation passes merge under the zero mask, so the padding stays zero. ``pad: false`` leaves the
ragged widths in memory (the model runs; ``save_pretrained`` output would not reload).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import MethodConfig, config_from_dict, register_method
from ..data import CalibrationData
from ..distillation.apply import distill
from ..engine import LayerMethod, default_device, run_layerwise
from ..errors import ConfigError
from ..lora.train import calibration_ids, retrain
from ..modeling import find_decoder_layers
from ..structure import prepare_model
from .mlp_layouts import find_mlp, slice_mlp
from .structured import AbsSumStats, StructuredRecord, _param_count, keep_top

log = logging.getLogger(__name__)

TRAIN_METHODS = ("lora", "distill")


@dataclasses.dataclass
class AdaptConfig(MethodConfig):
    """Adapt-Pruner: adaptive per-layer MLP-channel ratios, pruned incrementally with training.

    ratio:              fraction of all MLP channels removed overall, in (0, 1); the total kept is
                        exactly round((1 - ratio) * layers * width / multiple_of) * multiple_of.
    amplitude:          A: per-layer ratios span about ratio +- A (module docstring); 0 = uniform.
    step:               fraction of the original channels removed per increment (the paper: ~5%);
                        increments = ceil(ratio / step); 1.0 = one shot.
    train:              a pass run after every increment: {method: lora, steps: ...} (LM loss) or
                        {method: distill, ...} (needs teacher=); null = no training (pruning only).
    importance_samples: calibration windows used to measure importance at each increment (the first
                        ones of the data; training uses all of them).
    multiple_of:        every layer's kept width is a multiple of this.
    pad:                zero-pad every MLP to the widest layer at the end, so the checkpoint is plain
                        (module docstring).
    target:             "mlp" (heads are not supported yet: per-layer head counts would need the same
                        padding on the KV cache).
    """

    method = "adapt"
    target: Literal["mlp"] = "mlp"
    ratio: float = 0.25
    amplitude: float = 0.1
    step: float = 0.05
    train: dict[str, Any] | None = None
    importance_samples: int = 64
    multiple_of: int = 1
    pad: bool = True

    def validate(self) -> None:
        if self.target != "mlp":
            raise ConfigError(f"adapt prunes target 'mlp' only, got {self.target!r}; prune heads with method "
                              f"'structured' (target heads)")
        if not 0 < self.ratio < 1:
            raise ConfigError(f"ratio is the fraction of MLP channels removed, in (0, 1); got {self.ratio}")
        if not 0 <= self.amplitude < 1:
            raise ConfigError(f"amplitude spreads the per-layer ratios (ratio +- amplitude), in [0, 1); "
                              f"got {self.amplitude}")
        if not 0 < self.step <= 1:
            raise ConfigError(f"step is the fraction of channels removed per increment, in (0, 1]; got {self.step}")
        if self.multiple_of < 1 or self.importance_samples < 1:
            raise ConfigError("multiple_of and importance_samples must be positive integers")
        if self.train is not None:
            if not isinstance(self.train, dict) or self.train.get("method") not in TRAIN_METHODS:
                raise ConfigError(f"train must be a pass with method one of {list(TRAIN_METHODS)} "
                                  f"(e.g. {{method: lora, steps: 4}}), got {self.train!r}")
            self.train_config()                     # unknown keys fail here, naming the key

    def train_config(self):
        return config_from_dict(dict(self.train), "adapt.train") if self.train else None

    @property
    def increments(self) -> int:
        return max(1, math.ceil(self.ratio / self.step - 1e-9))

    def describe(self) -> str:
        return f"mlp -{100 * self.ratio:g}% A={self.amplitude:g} in {self.increments} step(s)"


# --- pure functions -----------------------------------------------------------------------------------

def adaptive_ratios(importance: torch.Tensor, ratio: float, amplitude: float) -> torch.Tensor:
    """Per-layer removal ratios r_l = ratio - 2 A (I_l - mean I) / (max I - min I): mean exactly
    ``ratio``, the least important layer the largest (module docstring). Equal importances: uniform."""
    imp = importance.double()
    spread = float(imp.max() - imp.min())
    if spread <= 0 or amplitude == 0:
        return torch.full_like(imp, ratio)
    return ratio - 2 * amplitude * (imp - imp.mean()) / spread


def allocate_keeps(desired: torch.Tensor, total: int, caps: list[int], multiple_of: int = 1) -> list[int]:
    """Integer per-layer widths, multiples of ``multiple_of`` in [multiple_of, caps[l]], summing to
    exactly ``total`` and as close to the float ``desired`` widths as that allows (largest remainder)."""
    m = multiple_of
    caps_m = [c // m * m for c in caps]
    if total % m or not m * len(caps) <= total <= sum(caps_m):
        raise ConfigError(f"cannot keep {total} channels over {len(caps)} layers as multiples of {m} between {m} "
                          f"and the current widths {caps}")
    keeps = [min(max(m, int(d // m) * m), c) for d, c in zip(desired.tolist(), caps_m)]
    left = total - sum(keeps)
    gap = [d - k for d, k in zip(desired.tolist(), keeps)]
    while left != 0:
        sign = 1 if left > 0 else -1
        movable = [i for i in range(len(keeps)) if m <= keeps[i] + sign * m <= caps_m[i]]
        i = max(movable, key=lambda j: sign * gap[j])           # the layer furthest below (above) its share
        keeps[i] += sign * m
        gap[i] -= sign * m
        left -= sign * m
    return keeps


# --- measuring --------------------------------------------------------------------------------------------

class _Walk(LayerMethod):
    name = "adapt importance"

    def is_target(self, name: str, module: nn.Module) -> bool:
        return False


def measure(model: nn.Module, layout, calib, *, device, batch_size, progress) -> tuple[torch.Tensor, list]:
    """Layer importance (1 - cos, per layer) and each layer's channel scores on the current model."""
    _, layers = find_decoder_layers(model)
    turned = torch.zeros(len(layers), dtype=torch.float64)
    tokens = torch.zeros(len(layers), dtype=torch.float64)
    stats = [AbsSumStats(layer.get_submodule(layout.down).in_features) for layer in layers]

    def on_layer(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)              # (batch, seq)
            turned[i] += float((1 - cos).sum())
            tokens[i] += cos.numel()
        return hook

    def on_down(i):
        return lambda module, args: stats[i].add(args[0].detach().cpu())

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
            handles.append(layer.get_submodule(layout.down).register_forward_pre_hook(on_down(i)))
        run_layerwise(model, calib, _Walk(), device=device, batch_size=batch_size, progress=progress)
    finally:
        for h in handles:
            h.remove()
    scores = [s.mean * layer.get_submodule(layout.down).weight.detach().float().norm(dim=0).cpu()
              for s, layer in zip(stats, layers)]
    return (turned / tokens.clamp(min=1)).float(), scores


def pad_mlp(layer: nn.Module, layout, width: int) -> None:
    """Zero-pad ``layer``'s MLP to ``width`` channels: zero gate/up rows and down columns (exactly inert)."""
    down = layer.get_submodule(layout.down)
    extra = width - down.in_features
    if extra <= 0:
        return
    for name in layout.ups:
        lin = layer.get_submodule(name)
        w = lin.weight.detach()
        lin.weight = nn.Parameter(torch.cat([w, w.new_zeros(extra, w.shape[1])]), requires_grad=lin.weight.requires_grad)
        if lin.bias is not None:
            lin.bias = nn.Parameter(torch.cat([lin.bias.detach(), lin.bias.new_zeros(extra)]))
        lin.out_features = width
    w = down.weight.detach()
    down.weight = nn.Parameter(torch.cat([w, w.new_zeros(w.shape[0], extra)], dim=1), requires_grad=down.weight.requires_grad)
    down.in_features = width
    parent = layer.get_submodule(layout.block)
    if isinstance(getattr(parent, layout.width_field, None), int):
        setattr(parent, layout.width_field, width)


# --- the entry --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AdaptRecord:
    """What one increment did: the cumulative target, the layer importances and ratios it used, the
    widths after it, and the training result (its to_dict, or None)."""

    increment: int
    keep_total: int
    importance: list[float]
    ratios: list[float]
    widths: list[int]
    train: dict | None


def _train(model, cfg, data, k: int, teacher, device, progress):
    """Increment k's training. The LM loss reads the k-th of ``increments`` equal slices of the windows,
    so all increments together see each window once (as one-shot pruning + the same steps would);
    distillation reads all of them (cached teacher targets are indexed by window)."""
    tcfg = cfg.train_config()
    if tcfg is None:
        return None
    ids = calibration_ids(data)
    part = ids.chunk(cfg.increments)[k - 1] if ids.shape[0] >= cfg.increments else ids
    if tcfg.method == "distill":
        if teacher is None:
            raise ConfigError("adapt train {method: distill} needs teacher= (the uncompressed model or its "
                              "TeacherTargets on the same windows); use {method: lora} for the LM loss")
        return distill(model, tcfg, data, teacher=teacher, device=device, progress=progress).to_dict()
    return retrain(model, tcfg, part, device=device, progress=progress).to_dict()


def prune_adaptive(model: nn.Module, cfg: AdaptConfig, calib=None, *, device=None, batch_size: int | None = None,
                   progress: bool = True, teacher=None, train_data=None) -> dict:
    """Adapt-Pruner on ``model`` in place (module docstring). ``calib``: the windows for importance (the
    first ``importance_samples``) and, unless ``train_data`` is given, for training (all). Returns StructuredRecords per MLP and "model"
    (effective parameters: padding excluded) plus "increments": a list of AdaptRecord."""
    prepare_model(model)
    if calib is None:
        raise ConfigError("adapt needs calibration data (layer and channel importance are measured on it): pass "
                          "calib=compress.calibration_data(...) or add a 'calibration' section to the recipe")
    if getattr(model, "config", None) is None:
        raise ConfigError(f"{type(model).__name__} has no config; adapt rewrites a transformers config")
    if cfg.train and cfg.train.get("method") == "distill" and teacher is None:
        raise ConfigError("adapt train {method: distill} needs teacher= (the uncompressed model or its "
                          "TeacherTargets on the same windows); use {method: lora} for the LM loss")
    layers_name, layers = find_decoder_layers(model)
    layouts = {find_mlp(layer, model.config, f"{layers_name}.{i}") for i, layer in enumerate(layers)}
    if len(layouts) != 1:
        raise ConfigError("adapt needs one MLP layout in every decoder layer")
    layout = layouts.pop()
    width = layout.width(model.config)
    n = len(layers)
    m = cfg.multiple_of
    final_total = int(math.floor((1 - cfg.ratio) * n * width / m + 0.5)) * m
    if final_total >= n * width:
        raise ConfigError(f"ratio {cfg.ratio:g} removes none of the {n * width} MLP channels; pass a larger ratio")
    if final_total < n * m:
        raise ConfigError(f"ratio {cfg.ratio:g} leaves {final_total} channels, fewer than {m} per layer; pass a "
                          f"smaller ratio")
    ids = calib.input_ids if hasattr(calib, "input_ids") else calib
    probe = CalibrationData(ids[:cfg.importance_samples], "adapt importance", 0)
    dev = torch.device(device) if device is not None else default_device()
    start = time.perf_counter()
    params_before = _param_count(model)
    original = [_param_count(layer) for layer in layers]
    first_scores: list[torch.Tensor] | None = None
    removed: list[set[int]] = [set() for _ in layers]
    alive = [torch.arange(width) for _ in layers]            # original indices of the current channels
    history: list[AdaptRecord] = []
    for k in range(1, cfg.increments + 1):
        cum = min(cfg.ratio, k * cfg.step)
        total = final_total if k == cfg.increments else int(math.floor((1 - cum) * n * width / m + 0.5)) * m
        caps = [layer.get_submodule(layout.down).in_features for layer in layers]
        total = min(total, sum(c // m * m for c in caps))
        importance, scores = measure(model, layout, probe, device=dev, batch_size=batch_size, progress=progress)
        if first_scores is None:
            first_scores = scores
        ratios = adaptive_ratios(importance, 1 - total / (n * width), cfg.amplitude)
        keeps = allocate_keeps(width * (1 - ratios), total, caps, m)
        for i, layer in enumerate(layers):
            if keeps[i] < caps[i]:
                kept = keep_top(scores[i], keeps[i])
                removed[i] |= set(alive[i].tolist()) - set(alive[i][kept].tolist())
                alive[i] = alive[i][kept]
                slice_mlp(layer, layout, kept)
        result = _train(model, cfg, calib if train_data is None else train_data, k, teacher, dev, progress)
        history.append(AdaptRecord(k, total, importance.tolist(), [1 - w / width for w in keeps], keeps, result))
        log.info("adapt increment %d/%d: %d of %d channels kept, widths %d..%d%s", k, cfg.increments, total,
                 n * width, min(keeps), max(keeps), f", loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}"
                 if result else "")
    widths = history[-1].widths
    effective = _param_count(model)
    records: dict = {}
    for i, layer in enumerate(layers):
        name = f"{layers_name}.{i}.{layout.block}".rstrip(".")
        records[name] = StructuredRecord(name, "channel", width, widths[i], sorted(removed[i]),
                                         first_scores[i].tolist(), original[i], _param_count(layer))
    widest = max(widths)
    if cfg.pad:
        for layer in layers:
            pad_mlp(layer, layout, widest)
        setattr(model.config, layout.width_field, widest)
    else:
        setattr(model.config, layout.width_field, widest)
        log.warning("adapt pad: false leaves MLP widths %d..%d; save_pretrained output will not reload until "
                    "every MLP is padded (compress.pruning.adapt.pad_mlp)", min(widths), widest)
    records["model"] = StructuredRecord("model", "parameter", params_before, effective, [], [], params_before,
                                        effective)
    records["increments"] = history
    log.info("adapt %s: %d -> %d effective parameters (%d stored, padded to width %d) in %.1f s", cfg.describe(),
             params_before, effective, _param_count(model), widest, time.perf_counter() - start)
    return records


__all__ = ["AdaptConfig", "AdaptRecord", "adaptive_ratios", "allocate_keeps", "pad_mlp", "prune_adaptive"]


register_method(AdaptConfig, prune_adaptive, area="prune", statistics="layer")
