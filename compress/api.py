"""The entry calls: one per area, each dispatching through the method registry (``configs.py``)."""

from __future__ import annotations

import logging

from torch import nn

from . import methods  # noqa: F401  (registers the built-in methods)
from .configs import MethodConfig, method_of
from .errors import ConfigError
from .guards import check_device, check_finite
from .structure import prepare_model

log = logging.getLogger(__name__)

def apply(model: nn.Module, cfg: MethodConfig, calib=None, *, device=None, batch_size: int | None = None,
          progress: bool = True, **options):
    """Apply any registered method config to ``model`` in place; returns the method's records.
    ``options`` go to the method's handler, which declares them at registration (distillation:
    ``teacher=``, ``state_path=``). A handler refuses a missing ``calib`` itself, with a message
    that names what the data is for; recipes and the CLI check the registration's ``needs_data``
    before loading the model."""
    method = method_of(cfg)
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        raise ConfigError(f"{method.name} takes no option(s) {unknown}"
                          + (f"; it takes {list(method.options)}" if method.options else ""))
    check_device(device)              # refused here, before any method runs: a device this machine lacks,
    check_finite(model)               # NaN/inf weights
    prepare_model(model)              # every weight a pass may compress is an nn.Linear (MoE experts)
    return method.handler(model, cfg, calib, device=device, batch_size=batch_size, progress=progress, **options)


def _entry(area: str, call: str, what: str, cfg: MethodConfig) -> None:
    method = method_of(cfg)
    if method.area != area:
        raise ConfigError(f"{call}() takes {what}, got {type(cfg).__name__} (method {method.name!r}, "
                          f"area {method.area!r}); use compress.apply for any method")


def quantize(model: nn.Module, cfg: MethodConfig, calib=None, *, device=None, batch_size: int | None = None,
             progress: bool = True):
    """Quantize ``model``'s weights in place with ``cfg`` (RTNConfig, GPTQConfig), or set up its
    KV cache (KVCacheConfig: fp8 scales are calibrated on ``calib``; use ``compress.kv_cache``
    to get the cache for generation).

    GPTQ walks the decoder layers with ``calib`` (from ``calibration_data``) on ``device``
    (default: CUDA when available, else CPU), ``batch_size`` samples per forward chunk.
    Returns a dict of per-module records (loss, damping, fallbacks).
    """
    _entry("quantize", "quantize", "a quantization config", cfg)
    return apply(model, cfg, calib, device=device, batch_size=batch_size, progress=progress)


def prune(model: nn.Module, cfg: MethodConfig, calib=None, *, device=None, batch_size: int | None = None,
          progress: bool = True):
    """Prune ``model`` in place with ``cfg``: MagnitudeConfig, WandaConfig or SparseGPTConfig
    (weights set to zero, unstructured or N:M), or StructuredConfig (MLP channels, attention
    heads or whole layers removed: a smaller dense model). Wanda, SparseGPT and activation-ranked
    structured pruning walk the decoder layers with ``calib``. Returns per-module records."""
    _entry("prune", "prune", "a pruning config", cfg)
    return apply(model, cfg, calib, device=device, batch_size=batch_size, progress=progress)


def distill(model: nn.Module, cfg: MethodConfig, calib=None, *, teacher, device=None,
            batch_size: int | None = None, progress: bool = True, state_path=None):
    """Distil ``teacher`` (the uncompressed model, or its cached ``TeacherTargets``) into the
    compressed ``model`` in place: LoRA adapters trained on ``calib``'s windows to match the
    teacher, merged under the sparsity mask (dense/pruned layers) or kept as a low-rank
    correction / requantized (quantized layers). ``batch_size`` is the micro-batch size.
    Returns a DistillResult (steps, losses, terms)."""
    _entry("distill", "distill", "a DistillConfig", cfg)
    return apply(model, cfg, calib, device=device, batch_size=batch_size, progress=progress, teacher=teacher,
                 state_path=state_path)
