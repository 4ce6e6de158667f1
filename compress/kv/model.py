"""The KV-cache facts a model carries, read and written on its attributes only: the config on
``model.config.compress_kv_cache`` (a ``kv_cache`` pass sets it, a checkpoint's config.json brings
it) and the calibrated fp8 ``k_scale``/``v_scale`` buffers of its attention modules.

The pass (``attention.py``), the cache (``cache.py``), the export and the loader all read these.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..modeling import find_decoder_layers
from .config import KVCacheConfig

CONFIG_KEY = "compress_kv_cache"


def kv_config_of(model: nn.Module) -> KVCacheConfig | None:
    """The KV-cache config a model carries (set by a ``kv_cache`` pass or read from a checkpoint)."""
    data = getattr(model.config, CONFIG_KEY, None)
    if not data:
        return None
    return KVCacheConfig.from_dict(dict(data), where=f"config.json {CONFIG_KEY}")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    check_kv_layout(model)
    name, layers = find_decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise ConfigError(f"{name}.{i} has no 'self_attn' module; KV-cache quantization supports "
                              f"Llama/Qwen2/Mistral/OPT-style decoders")
        out.append(attn)
    return out


def check_kv_layout(model: nn.Module) -> None:
    """Refuse attention whose cache is not per-head keys and values (DeepSeek's multi-head latent
    attention caches one compressed latent per token)."""
    config = getattr(model, "config", None)
    if getattr(config, "kv_lora_rank", None):
        raise ConfigError(f"model type {config.model_type!r} uses multi-head latent attention (kv_lora_rank "
                          f"{config.kv_lora_rank}): keys and values are expanded from a compressed latent, which is "
                          f"what serving engines cache; compress's quantized KV cache stores per-head keys and values "
                          f"and does not support it. Evaluate without kv_cache (the weights still compress)")


def kv_scales_of(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Calibrated fp8 (k_scale, v_scale) per layer, or None if the model has none."""
    modules = attention_modules(model)
    if not all(hasattr(m, "k_scale") and hasattr(m, "v_scale") for m in modules):
        return None
    return [(m.k_scale.detach().float().reshape(-1), m.v_scale.detach().float().reshape(-1)) for m in modules]


def set_kv_scales(model: nn.Module, scales: list[tuple[torch.Tensor, torch.Tensor]], per_head: bool) -> None:
    """Store fp8 scales as ``k_scale``/``v_scale`` buffers: shape (1,) per tensor, (H, 1, 1) per
    head, float32 (the shapes compressed-tensors gives "tensor" and "attn_head")."""
    for module, (k, v) in zip(attention_modules(model), scales, strict=True):
        for name, s in (("k_scale", k), ("v_scale", v)):
            s = s.detach().float().reshape(-1, 1, 1) if per_head else s.detach().float().reshape(1)
            if name in module._buffers:
                del module._buffers[name]
            module.register_buffer(name, s.to(module_device(module)))


def module_device(module: nn.Module) -> torch.device:
    """Where the module's parameters are: the CPU when it has none or they are on the meta device."""
    p = next(module.parameters(), None)
    return p.device if p is not None and not p.is_meta else torch.device("cpu")
