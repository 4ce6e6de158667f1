"""The entry calls: one per area, dispatching on the config's type through one handler table."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from .configs import MethodConfig
from .errors import ConfigError
from .quant.apply import quantize_weights
from .kv import apply_kv_cache
from .quant.config import GPTQConfig, RTNConfig
from .kv.config import KVCacheConfig
from .pruning.apply import prune_weights
from .pruning.config import MagnitudeConfig, PruneConfig, SparseGPTConfig, WandaConfig
from .lora.adapters import LoRAConfig
from .lora.train import lora_retrain
from .pruning.structured import StructuredConfig, prune_structured
from .distillation.apply import distill as _distill
from .distillation.apply import distill_pass
from .distillation.config import DistillConfig

log = logging.getLogger(__name__)

# config type -> function(model, cfg, calib, **engine options) that applies it in place.
_HANDLERS: dict[type[MethodConfig], Callable] = {}


def register_handler(config_type: type[MethodConfig], fn: Callable) -> None:
    if config_type in _HANDLERS:
        raise TypeError(f"a handler for {config_type.__name__} is registered already")
    _HANDLERS[config_type] = fn


register_handler(RTNConfig, quantize_weights)
register_handler(GPTQConfig, quantize_weights)
register_handler(KVCacheConfig, apply_kv_cache)
register_handler(MagnitudeConfig, prune_weights)
register_handler(WandaConfig, prune_weights)
register_handler(SparseGPTConfig, prune_weights)
register_handler(StructuredConfig, prune_structured)
register_handler(LoRAConfig, lora_retrain)
register_handler(DistillConfig, distill_pass)


def apply(model: nn.Module, cfg: MethodConfig, calib=None, *, device=None, batch_size: int | None = None,
          progress: bool = True, **options):
    """Apply any registered method config to ``model`` in place; returns the method's records.
    ``options`` go to the method's handler (distillation: ``teacher=``, ``state_path=``)."""
    handler = _HANDLERS.get(type(cfg))
    if handler is None:
        raise ConfigError(f"no handler for {type(cfg).__name__}; known: {[t.__name__ for t in _HANDLERS]}")
    return handler(model, cfg, calib, device=device, batch_size=batch_size, progress=progress, **options)


def quantize(model: nn.Module, cfg: MethodConfig, calib=None, *, device=None, batch_size: int | None = None,
             progress: bool = True):
    """Quantize ``model``'s weights in place with ``cfg`` (RTNConfig, GPTQConfig), or set up its
    KV cache (KVCacheConfig: fp8 scales are calibrated on ``calib``; use ``compress.kv_cache``
    to get the cache for generation).

    GPTQ walks the decoder layers with ``calib`` (from ``calibration_data``) on ``device``
    (default: CUDA when available, else CPU), ``batch_size`` samples per forward chunk.
    Returns a dict of per-module records (loss, damping, fallbacks).
    """
    if not isinstance(cfg, (RTNConfig, GPTQConfig, KVCacheConfig)):
        raise ConfigError(f"quantize() takes a quantization config, got {type(cfg).__name__}")
    return apply(model, cfg, calib, device=device, batch_size=batch_size, progress=progress)


def prune(model: nn.Module, cfg: MethodConfig, calib=None, *, device=None, batch_size: int | None = None,
          progress: bool = True):
    """Prune ``model`` in place with ``cfg``: MagnitudeConfig, WandaConfig or SparseGPTConfig
    (weights set to zero, unstructured or N:M), or StructuredConfig (MLP channels, attention
    heads or whole layers removed: a smaller dense model). Wanda, SparseGPT and activation-ranked
    structured pruning walk the decoder layers with ``calib``. Returns per-module records."""
    if not isinstance(cfg, (PruneConfig, StructuredConfig)):
        raise ConfigError(f"prune() takes a pruning config, got {type(cfg).__name__}")
    return apply(model, cfg, calib, device=device, batch_size=batch_size, progress=progress)


def distill(model: nn.Module, cfg: DistillConfig, calib=None, *, teacher, device=None,
            batch_size: int | None = None, progress: bool = True, state_path=None):
    """Distil ``teacher`` (the uncompressed model, or its cached ``TeacherTargets``) into the
    compressed ``model`` in place: LoRA adapters trained on ``calib``'s windows to match the
    teacher, merged under the sparsity mask (dense/pruned layers) or kept as a low-rank
    correction / requantized (quantized layers). Returns a DistillResult (steps, losses, terms)."""
    if not isinstance(cfg, DistillConfig):
        raise ConfigError(f"distill() takes a DistillConfig, got {type(cfg).__name__}")
    return _distill(model, cfg, calib, teacher=teacher, device=device, progress=progress,
                    micro_batch_size=batch_size, state_path=state_path)
