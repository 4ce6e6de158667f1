"""Retrain a pruned model's LoRA adapters, norms and biases on calibration text, then merge under
the mask (PERP). The adapter module and the merge math are in ``adapters.py``.

``retrain`` wraps the target linears (``wrap_lora``), freezes everything else, trains the chosen
set with AdamW on ``loss_fn`` (the causal-LM loss unless a caller, e.g. distillation, passes its own),
and merges. Whatever happens, every parameter's ``requires_grad``, the train/eval mode and gradient
checkpointing are put back as they were; when training fails the original modules and the norm /
bias values are restored, so an exception leaves the model as it was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..engine import check_seqlen, default_device
from ..configs import register_method
from ..errors import ConfigError
from ..modeling import onloaded, set_module
from .adapters import LoRAConfig, LoRALinear, base_weight, is_norm, merged_weight, unwrap_lora, wrap_lora
from .train_state import TrainingCheckpoint, run_signature

log = logging.getLogger(__name__)

# loss_fn(model, input_ids (B, T), index (B,)) -> scalar loss tensor, averaged over the batch's
# predictions; index: the rows of the calibration windows in the batch (distillation looks up its
# cached teacher targets with it).
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# first_loss / last_loss average this many steps at each end of the run.
LOSS_WINDOW = 5


@dataclasses.dataclass
class LayerSparsity:
    """One adapted linear before and after retraining (fractions of exact zeros in its weight)."""

    name: str
    before: float
    after: float             # the merged weight, or what the adapter module computes with (merge=False)
    max_abs_pruned: float    # max |W'| over the weights that were zero before: 0.0 when the mask held


@dataclasses.dataclass
class RetrainResult:
    losses: list[float]                  # training loss of every optimizer step
    steps: int                           # optimizer steps done (fewer than asked when max_minutes ran out)
    tokens: int                          # input tokens the model was trained on
    seconds: float
    trainable_params: int                # adapters + norms + biases
    total_params: int                    # of the model before adapters were added
    layers: dict[str, LayerSparsity]
    merged: bool
    stopped: str | None = None           # "max_minutes" when the time budget ended training early

    @property
    def first_loss(self) -> float:
        return _mean(self.losses[:LOSS_WINDOW])

    @property
    def last_loss(self) -> float:
        return _mean(self.losses[-LOSS_WINDOW:])

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params

    @property
    def max_mask_deviation(self) -> float:
        """Largest |W'| at a position that was zero before, over every layer (0.0: mask kept)."""
        return max((s.max_abs_pruned for s in self.layers.values()), default=0.0)

    def __len__(self) -> int:
        # Like the per-module records of the other handlers: one entry per adapted linear.
        return len(self.layers)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(first_loss=self.first_loss, last_loss=self.last_loss, trainable_fraction=self.trainable_fraction,
                   max_mask_deviation=self.max_mask_deviation)
        return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over input_ids (B, T), computed in float32 (index unused)."""
    logits = model(input_ids=input_ids, use_cache=False).logits                  # (B, T, V)
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def lr_factor(step: int, cfg: LoRAConfig, elapsed: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based). ``elapsed``: the
    fraction of ``max_minutes`` spent so far; the decay follows whichever runs out first, steps or
    time, so a run that the time budget cuts short still ends at a low learning rate."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, max((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), elapsed))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress


def trainable_parameters(model: nn.Module, cfg: LoRAConfig,
                         wrapped: dict[str, LoRALinear]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(adapters, others): the LoRA matrices, and the norm weights/biases and linear biases
    that ``cfg`` asks to train (each parameter once, even when shared)."""
    adapters = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    others: dict[int, nn.Parameter] = {}
    if cfg.train_norms:
        for module in model.modules():
            if is_norm(module):
                others.update({id(p): p for p in module.parameters(recurse=False)})
    if cfg.train_biases:
        others.update({id(m.base.bias): m.base.bias for m in wrapped.values()
                       if isinstance(getattr(m.base, "bias", None), nn.Parameter)})
    return adapters, list(others.values())


class Float32Masters:
    """float32 master copies of trained parameters stored in a lower precision.

    An AdamW step is about the learning rate (1e-3 .. 1e-4), while a bfloat16 norm weight near 1.0
    moves in steps of 2^-7: stepping the bfloat16 parameter directly would round most updates away.
    The optimizer steps the masters; the model's parameters get the rounded values after each step."""

    def __init__(self, params: list[nn.Parameter]):
        self.pairs = [(p, nn.Parameter(p.detach().float().clone())) for p in params if p.dtype != torch.float32]
        self._master = {id(p): m for p, m in self.pairs}

    def for_optimizer(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        return [self._master.get(id(p), p) for p in params]

    def grads_to_masters(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)


def _sample_batches(samples: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches (batch_size,) forever: one seeded permutation per epoch, the short tail dropped."""
    while True:
        order = torch.randperm(samples, generator=gen)
        for i in range(0, samples - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def calibration_ids(calib) -> torch.Tensor:
    """The (samples, seqlen) int64 token ids of CalibrationData or of a tensor, checked."""
    if calib is None:
        raise ConfigError("LoRA retraining trains on calibration text: pass calib=compress.calibration_data("
                          "tokenizer, FILE, samples=..., seqlen=...) (in a recipe: a 'calibration' section)")
    ids = calib if isinstance(calib, torch.Tensor) else calib.input_ids
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ConfigError(f"calibration input_ids must be a (samples, seqlen) int64 tensor, got "
                          f"{tuple(ids.shape)} {ids.dtype}")
    return ids


def retrain(model: nn.Module, cfg: LoRAConfig, calib, *, device: torch.device | str | None = None,
            progress: bool = True, loss_fn: LossFn | None = None,
            micro_batch_size: int | None = None, state_path: str | os.PathLike | None = None) -> RetrainResult:
    """PERP retraining of ``model`` in place: LoRA on the target linears, plus norms and biases,
    trained on ``calib`` (CalibrationData or a (samples, seqlen) tensor of token ids) and merged
    under each layer's sparsity mask (``cfg.keep_mask``), or kept as LoRALinear (``cfg.merge``
    False).

    device: where to train (default: CUDA when available, else CPU); the model is moved there and
    back. loss_fn(model, input_ids) -> loss: default ``causal_lm_loss``. micro_batch_size: samples
    per forward/backward (default batch_size // grad_accum); must divide ``cfg.batch_size``.

    state_path: a file for the training state (adapters, optimizer, step; saved every
    ``cfg.checkpoint_every`` steps and at the end, ``train_state.py``): when it holds the state of
    this same run, training resumes where that run stopped.

    requires_grad: afterwards every parameter has the requires_grad it had before, except that
    with merge=False the adapters stay trainable and their bases frozen.
    """
    ids = calibration_ids(calib)
    check_seqlen(model, ids.shape[1])
    if cfg.batch_size > ids.shape[0]:
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {ids.shape[0]} calibration samples; lower "
                          f"batch_size or draw more samples")
    micro = micro_batch_size or cfg.batch_size // cfg.grad_accum
    if micro < 1 or cfg.batch_size % micro:
        raise ConfigError(f"micro-batch size {micro} must divide batch_size {cfg.batch_size}")
    device = torch.device(device) if device is not None else default_device()
    loss_fn = loss_fn or causal_lm_loss
    start = time.perf_counter()
    total_params = sum(p.numel() for p in model.parameters())
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    was_training, had_checkpointing = model.training, _is_checkpointing(model)
    with onloaded(model, device):
        wrapped = wrap_lora(model, cfg, torch.Generator().manual_seed(cfg.seed))
        adapters, others = trainable_parameters(model, cfg, wrapped)
        saved = [(p, p.detach().clone()) for p in others]
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in adapters + others:
                p.requires_grad_(True)
            before = {name: (base_weight(m.base) == 0).detach() for name, m in wrapped.items()}
            names = {id(p): n for n, p in model.named_parameters()}
            named = {names[id(p)]: p for p in adapters + others}
            checkpoint = None if state_path is None else TrainingCheckpoint(
                state_path, cfg.checkpoint_every, run_signature(cfg, ids, named))
            losses, stopped = _train(model, cfg, ids, named, len(adapters), loss_fn, micro, device, progress,
                                     start, checkpoint)
            if cfg.merge:
                unwrap_lora(model, wrapped, keep_mask=cfg.keep_mask)
            layers = _sparsity(wrapped, before, merged=cfg.merge)
        except BaseException:
            _restore(model, wrapped, saved)
            raise
        finally:
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            if not cfg.merge:
                for m in wrapped.values():
                    m.base.requires_grad_(False)
            if cfg.grad_checkpointing and not had_checkpointing:
                _set_checkpointing(model, False)
            model.train(was_training)
    trainable = sum(p.numel() for p in adapters + others)
    result = RetrainResult(losses=losses, steps=len(losses), tokens=len(losses) * cfg.batch_size * ids.shape[1],
                           seconds=time.perf_counter() - start, trainable_params=trainable,
                           total_params=total_params, layers=layers, merged=cfg.merge, stopped=stopped)
    log.info("lora: %d steps, loss %.4f -> %.4f, %d trainable parameters (%.2f%%), mask deviation %g, %.1f s",
             result.steps, result.first_loss, result.last_loss, trainable, 100 * result.trainable_fraction,
             result.max_mask_deviation, result.seconds)
    return result


def _train(model: nn.Module, cfg: LoRAConfig, ids: torch.Tensor, named: dict[str, nn.Parameter], n_adapters: int,
           loss_fn: LossFn, micro: int, device: torch.device, progress: bool, start: float,
           checkpoint: TrainingCheckpoint | None) -> tuple[list[float], str | None]:
    """The optimizer loop over ``named`` (the first ``n_adapters`` are LoRA matrices, the rest
    norms and biases); returns the loss of every step and why it stopped early (or None)."""
    params = list(named.values())
    adapters, others = params[:n_adapters], params[n_adapters:]
    masters = Float32Masters(others)
    groups = [{"params": adapters, "weight_decay": cfg.weight_decay},
              {"params": masters.for_optimizer(others), "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    batches = _sample_batches(ids.shape[0], cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    if cfg.grad_checkpointing:
        _set_checkpointing(model, True)
    model.train()
    names = {id(p): n for n, p in named.items()}
    master_of = {names[id(p)]: m for p, m in masters.pairs}
    losses: list[float] = []
    stopped, first = None, 0
    # Seeded dropout draws; the caller's RNG state is restored afterwards.
    with _seeded(cfg.seed, device):
        resumed = checkpoint.load(named, master_of, optimizer) if checkpoint is not None else None
        if resumed is not None:
            losses, stopped, first = resumed.losses, resumed.stopped, resumed.step
            start -= resumed.seconds                     # a max_minutes budget counts the time already spent
            for _ in range(first):                       # the same batches as an uninterrupted run
                next(batches)
        bar = tqdm(total=cfg.steps, initial=first, desc="lora retrain" if cfg.method == "lora" else cfg.method, unit="step", disable=not progress)
        with bar:
            for step in range(first, cfg.steps if stopped is None else first):
                loss_sum = _step(model, cfg, ids, next(batches), loss_fn, micro, device, optimizer, masters,
                                 stepped, step, start)
                losses.append(loss_sum)
                bar.update(1)
                bar.set_postfix(loss=f"{_mean(losses[-LOSS_WINDOW:]):.4f}")
                if cfg.max_minutes is not None and time.perf_counter() - start >= 60 * cfg.max_minutes:
                    stopped = "max_minutes"
                    log.info("lora: max_minutes %g reached after %d of %d steps", cfg.max_minutes, step + 1,
                             cfg.steps)
                if checkpoint is not None and (checkpoint.due(step + 1) or stopped or step + 1 == cfg.steps):
                    checkpoint.save(step + 1, losses, time.perf_counter() - start, stopped, named, master_of,
                                    optimizer)
                if stopped:
                    break
    return losses, stopped


def _step(model: nn.Module, cfg: LoRAConfig, ids: torch.Tensor, index: torch.Tensor, loss_fn: LossFn, micro: int,
          device: torch.device, optimizer: torch.optim.Optimizer, masters: Float32Masters,
          stepped: list[nn.Parameter], step: int, start: float) -> float:
    """One optimizer step on the windows ``index`` (batch_size,), split into micro-batches."""
    elapsed = (time.perf_counter() - start) / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
    for group in optimizer.param_groups:
        group["lr"] = cfg.learning_rate * lr_factor(step, cfg, elapsed)
    loss_sum = 0.0
    for chunk in index.split(micro):
        loss = loss_fn(model, ids[chunk].to(device), chunk) * (chunk.shape[0] / cfg.batch_size)
        loss.backward()
        loss_sum += float(loss.detach())
    if not math.isfinite(loss_sum):
        raise ConfigError(f"the training loss became {loss_sum} at step {step}; lower learning_rate "
                          f"(now {cfg.learning_rate:g}) or set max_grad_norm")
    masters.grads_to_masters()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(stepped, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    masters.masters_to_params()
    return loss_sum


def _is_checkpointing(model: nn.Module) -> bool:
    # transformers 5.x renamed gradient checkpointing to activation checkpointing (old names warn).
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; set "
                          f"grad_checkpointing false")
    # Non-reentrant checkpointing: gradients reach the adapters although the inputs are frozen.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs) if on else model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(kwargs) if on else model.gradient_checkpointing_disable()


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


@torch.no_grad()
def _sparsity(wrapped: dict[str, LoRALinear], zero_before: dict[str, torch.Tensor],
              merged: bool) -> dict[str, LayerSparsity]:
    """Zeros of each weight before, and of the weight the model computes with now: the merged
    base weight, or (adapters kept) the base weight plus the update as the adapter applies it."""
    out = {}
    for name, m in wrapped.items():
        if merged:
            after = base_weight(m.base)
        else:
            mask = m.mask if m.mask_during_training else None
            after = merged_weight(base_weight(m.base), m.lora_A, m.lora_B, m.scale, mask)
        zeros = zero_before[name]
        out[name] = LayerSparsity(name, before=float(zeros.float().mean()), after=float((after == 0).float().mean()),
                                  max_abs_pruned=float(after[zeros].abs().max()) if zeros.any() else 0.0)
    return out


@torch.no_grad()
def _restore(model: nn.Module, wrapped: dict[str, LoRALinear], saved: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Undo a failed retrain: the original modules back in place, norms and biases as they were."""
    for name, m in wrapped.items():
        set_module(model, name, m.base)
    for p, value in saved:
        p.copy_(value)


def lora_retrain(model: nn.Module, cfg: LoRAConfig, calib=None, *, device=None, batch_size: int | None = None,
                 progress: bool = True, state_path: str | os.PathLike | None = None) -> RetrainResult:
    """The ``apply`` handler of LoRAConfig. ``batch_size`` (the engine's samples per forward chunk)
    is the micro-batch size here: it splits each step's ``cfg.batch_size`` samples, it does not
    change the step."""
    return retrain(model, cfg, calib, device=device, progress=progress, micro_batch_size=batch_size,
                   state_path=state_path)


register_method(LoRAConfig, lora_retrain, area="retrain", options=("state_path",))
