"""LoRA adapters for retraining a pruned model, merged back under its sparsity mask (PERP).

PERP (Zimmer et al., 2023, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs"): after
pruning, retraining only low-rank adapters on the linear layers plus the norms and biases (well
under 1% of the parameters) recovers about as much as retraining every weight. A plain merge
``W + s * B @ A`` fills the pruned zeros, so the merge here is taken under the mask::

    W' = (W + s * B @ A) * M,    M = (W != 0),    s = alpha / rank

and the sparsity measured after the merge is the sparsity before it, zero for zero.

This file holds the config, the adapter module and the merge math; ``train.py`` holds the
training loop (``retrain``) that wraps a model, trains and merges.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import MethodConfig
from ..errors import ConfigError
from ..modeling import find_decoder_layers, name_matches, set_module
from ..moe import router_names
from ..quant.packed import PackedLinear

SCHEDULES = ("cosine", "constant", "linear")


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    """Parameter-efficient retraining of a (pruned) model: LoRA on the linears, norms, biases.

    rank:                 rank r of each adapter: A is (r, in_features), B is (out_features, r).
    alpha:                the update is scaled by alpha / rank (16 / 8 = 2 by default), so changing
                          the rank does not change the size of the first steps.
    dropout:              dropout on the adapter's input only (the frozen path never sees it).
    targets:              module-name patterns (globs on the full name or a dotted suffix such as
                          "self_attn.q_proj", or "re:<regex>") choosing which linears inside the
                          decoder layers get adapters; None = every linear in the decoder layers.
                          Nothing outside the decoder layers is wrapped (lm_head, often tied to the
                          embeddings, never is).
    train_norms:          also train the weight (and bias) of every normalization layer (RMSNorm,
                          LayerNorm, the final norm included). Dense vectors: no mask applies.
    train_biases:         also train the biases of the adapted linears (Qwen2's q/k/v, OPT's all).
    mask_during_training: train with the masked update: each layer computes with the merged weight
                          (W + s*B@A) * M itself, so the merge changes nothing the model computes.
                          Costs a full-size (out, in) weight gradient per layer and step (about 1.5x
                          the linear layers' training FLOPs; 1.3-1.5x the step time on SmolLM2, CPU).
                          False: the cheap base(x) + s * x @ A^T @ B^T; the merge then drops the
                          part of the update that lands on pruned weights, which training relied
                          on. See docs/pruning.md for what was measured.
    steps:                optimizer steps.
    learning_rate:        peak AdamW learning rate (adapters, norms and biases alike).
    batch_size:           calibration samples per optimizer step.
    grad_accum:           micro-batches each step's batch is split into (a memory knob: the step
                          and its loss are the same); must divide batch_size.
    warmup_steps:         steps of linear warm-up from lr / (warmup_steps + 1) to the peak.
    schedule:             learning-rate decay after warm-up: "cosine" (to zero at ``steps``, or
                          at ``max_minutes`` if that comes first), "linear" (likewise) or "constant".
    weight_decay:         AdamW decoupled weight decay, applied to the adapters only (decaying a
                          norm's weight towards zero would change the model's scale).
    max_grad_norm:        clip the global gradient norm of the trained set; None = no clipping.
    max_minutes:          wall-clock budget for training; when it runs out the loop stops after the
                          current step and still merges. The decay follows whichever runs out
                          first, steps or time, so a run cut short still ends at a low learning rate
                          (the number of steps, and so the result, then depends on the machine).
    keep_mask:            merge under the mask of the base weight's zeros (for every layer that has
                          any; dense layers merge plainly). False: plain merge W + s*B@A, which
                          fills the pruned zeros (for experiments and the negative control).
    merge:                fold the adapters into the weights at the end and put the original
                          nn.Linear modules back. False: keep the LoRALinear modules (for packed
                          bases, or to train further).
    seed:                 seeds the adapters' initialization, the sample order and dropout.
    grad_checkpointing:   recompute each decoder layer's activations in the backward pass
                          (transformers' gradient checkpointing): less memory, about 30% more time.
    samples:              recipes and the CLI only: how many windows of the calibration source to
                          train on, drawn with the calibration seed + 1 so that they differ from
                          the windows the pruning pass saw; None = the recipe's calibration windows.
                          The Python API trains on whatever ``calib`` it is given.
    checkpoint_every:     with a training-state file (recipes keep one in their work directory;
                          ``retrain(state_path=...)``), save the adapters and optimizer every that
                          many steps, so an interrupted run resumes there; 0 = only at the end.
    """

    method = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None
    train_norms: bool = True
    train_biases: bool = True
    mask_during_training: bool = True
    steps: int = 100
    learning_rate: float = 1e-3
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_minutes: float | None = None
    keep_mask: bool = True
    merge: bool = True
    seed: int = 0
    grad_checkpointing: bool = False
    samples: int | None = None
    checkpoint_every: int = 10

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be a positive integer (8 or 16 are typical), got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be positive (the update is scaled by alpha / rank), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets:
            raise ConfigError("targets is an empty list; give module-name patterns or null (every linear in "
                              "the decoder layers)")
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError(f"batch_size and grad_accum must be at least 1, got {self.batch_size} "
                              f"and {self.grad_accum}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"grad_accum {self.grad_accum} must divide batch_size {self.batch_size} "
                              f"(samples per step are split into equal micro-batches)")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be positive or null (no clipping), got {self.max_grad_norm}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be positive or null (no limit), got {self.max_minutes}")
        if self.samples is not None and self.samples < self.batch_size:
            raise ConfigError(f"samples {self.samples} is fewer than batch_size {self.batch_size}; draw at least "
                              f"one batch of training windows")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 (0 = save only at the end), got {self.checkpoint_every}")
        if self.mask_during_training and not self.keep_mask:
            raise ConfigError("mask_during_training trains under the mask that keep_mask merges with; with "
                              "keep_mask false set mask_during_training false too")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def base_weight(module: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight a base module computes with (packed layers dequantize)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if hasattr(module, "dequantize"):
        return module.dequantize()
    raise TypeError(f"{type(module).__name__} has neither a weight nor dequantize(); LoRA wraps nn.Linear "
                    f"and PackedLinear modules")


def sparsity_mask(weight: torch.Tensor) -> torch.Tensor | None:
    """M = (W != 0) as bool (out, in), or None when the weight has no zeros (a dense layer)."""
    mask = weight != 0
    return None if bool(mask.all()) else mask


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """W' = (W + scale * B @ A) * M, computed in float32 and returned in ``weight``'s dtype.

    weight (out, in), lora_A (rank, in), lora_B (out, rank), mask bool (out, in) or None (plain
    merge). Under a mask every zero of M is an exact zero of W'."""
    merged = weight.float() + scale * (lora_B.float() @ lora_A.float())     # (out, in)
    if mask is not None:
        merged = torch.where(mask, merged, 0.0)
    return merged.to(weight.dtype)


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update: base(x) + s * dropout(x) @ A^T @ B^T.

    The base keeps its dtype and module (nn.Linear, or a PackedLinear whose dequantized weight is
    used only to build the mask); A and B are float32 whatever the base dtype. The low-rank path
    runs in float32 and is cast to the base output's dtype. With ``mask_during_training`` a dense
    base computes with ``merged_weight(W, A, B, s, M)`` itself (one matmul, bit for bit the merged
    layer); with dropout or a packed base the masked update (s * B @ A) * M is added as its own
    matrix. ``mask`` (bool (out, in), a buffer) is
    the base weight's nonzero pattern, or None for a dense base or a plain merge. With
    ``mask_during_training`` the update is applied as the masked matrix (s * B @ A) * M, so the
    module computes exactly what ``merge_lora`` produces.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0,
                 mask: torch.Tensor | None = None, mask_during_training: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, alpha / rank
        self.mask_during_training = mask_during_training
        device = _device_of(base)
        # A: kaiming-uniform as nn.Linear (bound 1/sqrt(in)), drawn on the CPU so that a seed gives
        # the same adapters on every device; B: zeros, so the wrapped model starts out computing
        # exactly what the base does.
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if mask is not None and mask.shape != (self.out_features, self.in_features):
            raise ValueError(f"mask shape {tuple(mask.shape)} is not the weight's ({self.out_features}, "
                             f"{self.in_features})")
        self.register_buffer("mask", None if mask is None else mask.to(device=device, dtype=torch.bool))

    def delta_weight(self, masked: bool) -> torch.Tensor:
        """s * B @ A (times M when ``masked`` and there is a mask), float32 (out, in)."""
        delta = self.scale * (self.lora_B @ self.lora_A)
        if masked and self.mask is not None:
            delta = delta * self.mask
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked = self.mask_during_training and self.mask is not None
        if masked and isinstance(self.base, nn.Linear) and isinstance(self.dropout, nn.Identity):
            # W + (s*B@A) * M = (W + s*B@A) * M because W is zero off the mask: one matmul with
            # exactly the weight the merge will write (same function, same rounding), instead of the
            # base matmul plus a second full-size one for the update.
            weight = merged_weight(self.base.weight, self.lora_A, self.lora_B, self.scale, self.mask)
            return F.linear(x, weight, self.base.bias)
        y = self.base(x)
        h = self.dropout(x)
        if masked:
            # Dropout or a packed base: the masked update as its own (out, in) matrix, built in
            # float32 and multiplied in the activations' dtype.
            update = F.linear(h, self.delta_weight(masked=True).to(h.dtype))                  # (..., out)
        else:
            h = h.to(self.lora_A.dtype)
            update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale  # (..., r) -> (..., out)
        return y + update.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, mask={'none' if self.mask is None else 'sparse'}, "
                f"mask_during_training={self.mask_during_training}")


def _device_of(module: nn.Module) -> torch.device:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


def merge_lora(module: LoRALinear, keep_mask: bool = True) -> nn.Module:
    """Fold the adapter into the base weight in place and return the base module.

    keep_mask: W' = (W + s*B@A) * M with the module's mask (dense layers: plain merge); False:
    W' = W + s*B@A. The base weight keeps its Parameter object, dtype and device."""
    base = module.base
    if not isinstance(base, nn.Linear):
        raise ConfigError(f"cannot merge a LoRA adapter into a {type(base).__name__}: its weight is packed, and "
                          f"folding the update in would need requantizing it; retrain with merge=False to keep "
                          f"the adapters, or merge into the dense model before quantizing")
    with torch.no_grad():
        merged = merged_weight(base.weight, module.lora_A, module.lora_B, module.scale,
                               module.mask if keep_mask else None)
        base.weight.copy_(merged)
    return base


def is_norm(module: nn.Module) -> bool:
    """A normalization layer (nn.LayerNorm, LlamaRMSNorm, Qwen2RMSNorm, ...), found by type or name."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.lower().endswith("norm")


def select_targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, nn.Module]:
    """Full name -> linear (nn.Linear or PackedLinear) inside the decoder layers that ``cfg.targets``
    picks (all of them when targets is None)."""
    layers_name, layers = find_decoder_layers(model)
    routers = set(router_names(model))          # MoE routers keep their weights (their choices stay put)
    targets = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            full = f"{layers_name}.{i}.{name}"
            if isinstance(module, (nn.Linear, PackedLinear)) and full not in routers and (
                    cfg.targets is None or name_matches(full, cfg.targets)):
                targets[full] = module
    if not targets:
        raise ConfigError(f"targets {cfg.targets} match no linear layer inside {layers_name}; give patterns "
                          f"such as 'q_proj', 'mlp.*' or 're:layers\\.[0-3]\\.', or null for every linear")
    return targets


def wrap_lora(model: nn.Module, cfg: LoRAConfig, generator: torch.Generator | None = None) -> dict[str, LoRALinear]:
    """Replace every target linear with a LoRALinear around it (the base is frozen here)."""
    targets = select_targets(model, cfg)
    if cfg.merge:
        packed = [n for n, m in targets.items() if not isinstance(m, nn.Linear)]
        if packed:
            raise ConfigError(f"{len(packed)} target(s) are packed (quantized) layers, e.g. {packed[0]} "
                              f"({type(targets[packed[0]]).__name__}); adapters cannot be merged into packed "
                              f"weights: pass merge=False to keep them as LoRALinear modules")
    wrapped = {}
    for name, base in targets.items():
        for p in base.parameters():
            p.requires_grad_(False)
        # Packed (quantized) bases get no mask: their adapters stay a separate dense correction.
        mask = sparsity_mask(base.weight.detach()) if cfg.keep_mask and isinstance(base, nn.Linear) else None
        wrapped[name] = LoRALinear(base, cfg.rank, cfg.alpha, dropout=cfg.dropout, mask=mask,
                                   mask_during_training=cfg.mask_during_training, generator=generator)
        set_module(model, name, wrapped[name])
    return wrapped


def unwrap_lora(model: nn.Module, wrapped: dict[str, LoRALinear], *, keep_mask: bool = True) -> None:
    """Merge each adapter into its base (``merge_lora``) and put the base module back in its place."""
    for name, module in wrapped.items():
        set_module(model, name, merge_lora(module, keep_mask))
