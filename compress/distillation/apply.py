"""The distillation pass: LoRA retraining (``compress/lora/train.py``) with a teacher-matching loss.

The student is the compressed model: its pruned or quantized weights stay frozen, LoRA adapters
on its linears (plus norms and biases) are trained on the teacher's targets, then

- dense or pruned linears: the adapters merge under each layer's sparsity mask (as LoRA
  retraining does), so a 2:4 model stays exactly 2:4;
- quantized (packed) linears: ``quantized: correction`` keeps each adapter as a separate
  low-rank correction beside the packed weight; ``quantized: requantize`` folds it into the
  dequantized weight and rounds that onto the layer's own format again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import register_method
from ..engine import default_device
from ..errors import ConfigError
from ..kernels.packing import unpack_int32
from ..modeling import find_decoder_layers, set_module
from ..lora.adapters import LoRALinear, merge_lora, select_targets
from ..lora.train import LOSS_WINDOW, RetrainResult, calibration_ids, retrain
from ..quant.config import RTNConfig
from ..quant.fp4_linear import FP4Linear
from ..quant.grid import quantize
from ..quant.linear import QuantLinear
from ..quant.packed import PackedLinear
from ..quant.w8a8_linear import W8A8Linear
from ..quant.rtn import rtn_solve
from .config import DistillConfig
from .losses import forward_kl, hidden_mse, reverse_kl, topk_kl
from .teacher import LiveTeacher, TeacherBatch, TeacherTargets, _teacher_forward, compute_targets, resolve_layers

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DistillResult(RetrainResult):
    teacher: str = "cache"                                    # "cache" or "model"
    teacher_seconds: float = 0.0                              # computing the cached targets
    terms: dict[str, float] = dataclasses.field(default_factory=dict)   # each loss term, last steps' mean
    quantized: str | None = None                              # what happened to packed linears

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(teacher=self.teacher, teacher_seconds=self.teacher_seconds, terms=self.terms,
                   quantized=self.quantized)
        return out


def distillation_loss(cfg: DistillConfig, model: nn.Module, ids: torch.Tensor, target: TeacherBatch,
                      layers: list[int], terms: dict[str, list[float]] | None = None) -> torch.Tensor:
    """The weighted loss of the student ``model`` on ids (B, T) against the teacher's ``target``."""
    logits, hidden = _teacher_forward(model, ids, layers, grad=True)               # (B, T, V)
    T = cfg.temperature
    parts: dict[str, torch.Tensor] = {}
    mask = _teacher_better(logits, ids, target, T) if cfg.kl_tokens == "teacher_better" else None   # (B, T)
    if cfg.kl:
        if target.logits is not None and not cfg.top_k:
            parts["kl"] = forward_kl(logits, target.logits, temperature=T, mask=mask)
        else:
            if target.values is None:
                raise ConfigError("the teacher targets hold no logits (computed with kl 0?); recompute them")
            parts["kl"] = topk_kl(logits, target.values, target.indices, temperature=T,
                                  teacher_logsumexp=target.logsumexp, mask=mask)
    if cfg.reverse_kl:
        parts["reverse_kl"] = reverse_kl(logits, target.logits, temperature=T, mask=mask)
    if cfg.lm:
        shifted = logits[:, :-1].float()                                            # (B, T-1, V)
        parts["lm"] = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1))
    if cfg.hidden:
        parts["hidden"] = torch.stack([hidden_mse(hidden[i], target.hidden[i]) for i in layers]).mean()
    if terms is not None:
        for name, value in parts.items():
            terms.setdefault(name, []).append(float(value.detach()))
    weights = {"kl": cfg.kl, "reverse_kl": cfg.reverse_kl, "lm": cfg.lm, "hidden": cfg.hidden}
    return sum(weights[name] * value for name, value in parts.items())


@torch.no_grad()
def _teacher_better(logits: torch.Tensor, ids: torch.Tensor, target: TeacherBatch,
                    temperature: float = 1.0) -> torch.Tensor:
    """(B, T) bool: positions where the teacher gives the next token of ``ids`` a higher log-probability
    (temperature 1) than the student's ``logits`` (B, T, V) do; the last position has no next token."""
    labels = ids[:, 1:]                                                                 # (B, T-1)
    student = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if target.logits is not None:
        teacher = torch.log_softmax(target.logits[:, :-1].float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    else:
        # Cached: the label's logit if it is among the teacher's top k; else the teacher is not better.
        # The cached logsumexp is the exact normalizer at temperature 1; at another temperature the
        # top k's own logsumexp stands in (smaller than the true one, so it errs towards "better").
        hit = target.indices[:, :-1].long() == labels.unsqueeze(-1)                       # (B, T-1, k)
        values = target.values[:, :-1].float()
        norm = (target.logsumexp[:, :-1].float() if temperature == 1.0 and target.logsumexp is not None
                else torch.logsumexp(values, dim=-1))
        teacher = torch.where(hit.any(-1), (values * hit).sum(-1) - norm, torch.full_like(norm, -torch.inf))
    better = teacher > student
    return torch.cat([better, torch.zeros_like(better[:, :1])], dim=1)


def distill(model: nn.Module, cfg: DistillConfig, calib, *, teacher, device: torch.device | str | None = None,
            progress: bool = True, micro_batch_size: int | None = None,
            state_path: str | os.PathLike | None = None) -> DistillResult:
    """Distil ``teacher`` into the compressed ``model`` in place (see the module docstring).

    calib:    the training windows (CalibrationData or a (samples, seqlen) int64 tensor).
    teacher:  the uncompressed model (an nn.Module; with ``cfg.teacher == "cache"`` its targets are
              computed here first), or ``TeacherTargets`` computed earlier on the same windows, or
              the path of a saved cache.
    state_path: the training-state file that lets an interrupted run resume (``retrain``).
    """
    ids = calibration_ids(calib)
    device = torch.device(device) if device is not None else default_device()
    start = time.perf_counter()
    layers = resolve_layers(cfg.hidden_layers, _num_layers(model)) if cfg.hidden else []
    source, live = _teacher_source(teacher, cfg, ids, layers, device, progress)
    teacher_seconds = time.perf_counter() - start
    packed = [n for n, m in select_targets(model, cfg).items() if isinstance(m, PackedLinear)]
    train_cfg = cfg
    if packed:
        # Packed weights cannot take a merge: keep the adapters and decide afterwards (packed bases
        # get no mask: a correction beside the packed weight is its own dense low-rank matrix).
        train_cfg = dataclasses.replace(cfg, merge=False)
    terms: dict[str, list[float]] = {}

    def loss_fn(student: nn.Module, batch_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return distillation_loss(cfg, student, batch_ids, source.batch(index, batch_ids), layers, terms)

    try:
        result = retrain(model, train_cfg, ids, device=device, progress=progress, loss_fn=loss_fn,
                         micro_batch_size=micro_batch_size, state_path=state_path)
    finally:
        if live:
            source.close()
    if packed and cfg.quantized == "requantize":
        requantize_adapters(model)
    window = LOSS_WINDOW * max(1, cfg.batch_size // (micro_batch_size or cfg.batch_size // cfg.grad_accum))
    out = DistillResult(**{f.name: getattr(result, f.name) for f in dataclasses.fields(RetrainResult)},
                        teacher="model" if live else "cache", teacher_seconds=teacher_seconds,
                        terms={k: sum(v[-window:]) / len(v[-window:]) for k, v in terms.items() if v},
                        quantized=cfg.quantized if packed else None)
    log.info("distill: %d steps, loss %.4f -> %.4f, terms %s", out.steps, out.first_loss, out.last_loss,
             {k: round(v, 4) for k, v in out.terms.items()})
    return out


def _num_layers(model: nn.Module) -> int:
    return len(find_decoder_layers(model)[1])


def _teacher_source(teacher, cfg: DistillConfig, ids: torch.Tensor, layers: list[int], device: torch.device,
                    progress: bool):
    """(an object with ``batch(index, ids)``, whether it is a live model)."""
    if isinstance(teacher, (str, os.PathLike)):
        teacher = TeacherTargets.load(teacher)
    if isinstance(teacher, TeacherTargets):
        teacher.check(cfg, ids, layers)
        return dataclasses.replace(teacher, k=cfg.top_k), False
    if isinstance(teacher, nn.Module):
        if cfg.teacher == "model":
            return LiveTeacher(teacher, cfg, device), True
        return compute_targets(teacher, ids, cfg, device=device, batch_size=cfg.batch_size, progress=progress), False
    raise ConfigError(f"distillation needs a teacher: the uncompressed model (nn.Module), TeacherTargets or the "
                      f"path of a saved cache; got {type(teacher).__name__}. In a recipe the runner provides it.")


@torch.no_grad()
def requantize_adapters(model: nn.Module) -> int:
    """Fold every LoRALinear around a packed base into its dequantized weight and round that onto
    the base's own format (fresh scales, round-to-nearest); dense bases merge plainly."""
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        base = module.base
        if not isinstance(base, PackedLinear):
            set_module(model, name, merge_lora(module, keep_mask=True))
            continue
        weight = base.dequantize(torch.float32) + module.delta_weight(masked=False)           # (out, in)
        weight = torch.where(base.dequantize(torch.float32) == 0, 0.0, weight) if _is_sparse(base) else weight
        set_module(model, name, _requantized(base, weight))
        count += 1
    return count


def _is_sparse(base: PackedLinear) -> bool:
    # A pruned-then-quantized layer (>= 40% exact zeros, e.g. 2:4) keeps its zeros.
    return float((base.dequantize(torch.float32) == 0).float().mean()) >= 0.4


def _requantized(base: PackedLinear, weight: torch.Tensor) -> PackedLinear:
    """``weight`` (out, in) rounded onto ``base``'s own grid. Integer layers keep their scales and
    zero points: a fresh fit would move weights the update never touched (measured on tiny models:
    a fresh min-max grid undid the distillation, the kept grid kept most of it). FP4 layers
    (whose block scales are tied to the format's FP8 / E8M0 encodings) get a fresh fit."""
    bias = base.bias
    if isinstance(base, QuantLinear) and base.weight_g_idx is None:
        scale = base.weight_scale.float()                                            # (out, groups)
        zp = (torch.zeros_like(scale) if base.symmetric else
              unpack_int32(base.weight_zero_point, base.bits, base.out_features, dim=0).float())
        codes = quantize(weight, scale, zp, base.bits, base.group_size)
        new = QuantLinear.from_codes(codes, scale, None if base.symmetric else zp, bits=base.bits,
                                     group_size=base.group_size, bias=bias, dtype=base.dtype,
                                     observer=base.observer, actorder=base.actorder, act_dtype=base.act_dtype)
    elif isinstance(base, QuantLinear):                 # dynamic act-order: scales per g_idx group; refit
        cfg = RTNConfig(bits=base.bits, group_size=base.group_size, symmetric=base.symmetric,
                        observer=base.observer or "minmax", partial_groups=True, ignore=[])
        r = rtn_solve(weight, cfg, base.dtype)
        new = QuantLinear.from_codes(r.codes, r.scale, r.zero_point, bits=base.bits, group_size=base.group_size,
                                     bias=bias, dtype=base.dtype, observer=base.observer, act_dtype=base.act_dtype)
    elif isinstance(base, FP4Linear):
        cfg = RTNConfig(bits=4, group_size=None, scheme=base.scheme, observer=base.observer or "minmax", ignore=[])
        r = rtn_solve(weight, cfg, base.dtype)
        new = FP4Linear.from_codes(r.codes, r.scale, r.global_scale, scheme=base.scheme, bias=bias, dtype=base.dtype,
                                   input_global_scale=getattr(base, "input_global_scale", None),
                                   observer=base.observer)
    elif isinstance(base, W8A8Linear):              # fresh weight scales; the static input scale is kept
        return base.requantized(weight)
    else:
        raise ConfigError(f"cannot requantize a {type(base).__name__}; use quantized: correction")
    new.backend = getattr(base, "backend", "auto")
    return new.to(weight.device)


def distill_pass(model: nn.Module, cfg: DistillConfig, calib=None, *, device=None, batch_size: int | None = None,
                 progress: bool = True, teacher=None, state_path=None) -> DistillResult:
    """The ``apply`` handler of DistillConfig; ``batch_size`` is the micro-batch size as for LoRA."""
    if teacher is None:
        raise ConfigError("distillation needs a teacher: apply(model, DistillConfig(...), calib, teacher=<the "
                          "uncompressed model, or its TeacherTargets>); recipes provide it themselves")
    return distill(model, cfg, calib, teacher=teacher, device=device, progress=progress,
                   micro_batch_size=batch_size, state_path=state_path)


register_method(DistillConfig, distill_pass, area="distill", options=("teacher", "state_path"))
