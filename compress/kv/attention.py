"""KV-cache quantization on a model: the ``kv_cache`` pass, FP8 scale calibration, and the
``compress_kv`` attention function that runs decode steps on the quantized cache.

    compress.apply(model, KVCacheConfig(scheme="fp8"), calib=calib)    # calibrate k_scale/v_scale
    cache = compress.kv_cache(model)                                   # a transformers Cache
    model.generate(ids, past_key_values=cache, max_new_tokens=200)

The pass changes no weights: it records the config on ``model.config.compress_kv_cache`` (so an
export carries it) and, for fp8, registers calibrated ``k_scale``/``v_scale`` buffers on every
attention module, which the export writes as the tensors vLLM reads.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..configs import register_method
from ..errors import ConfigError
from ..kernels.decode_attention import decode_attention, layout_unsupported
from ..kernels.dequant_linear import check_backend, resolve_backend
from ..kernels.hadamard import rotate
from .cache import QuantizedKVCache, attention_geometry
from .h2o import h2o_cache
from .config import KVCacheConfig
from .model import CONFIG_KEY, attention_modules, check_kv_layout, kv_config_of, module_device, set_kv_scales
from .quant import FP8_MAX, QuantizedKV

log = logging.getLogger(__name__)

ATTENTION = "compress_kv"


class _RangeRecorder(DynamicCache):
    """A throw-away cache that records the absolute maximum of every layer's post-RoPE keys and
    values per KV head, and keeps nothing."""

    def __init__(self, n_layers: int, rotate_keys: bool):
        super().__init__()
        self.amax: list[list[torch.Tensor | None]] = [[None, None] for _ in range(n_layers)]
        self.rotate_keys = rotate_keys

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = rotate(key_states) if self.rotate_keys else key_states
        for j, x in enumerate((k, value_states)):
            a = x.detach().abs().float().amax(dim=(0, 2, 3))                  # (H,)
            prev = self.amax[layer_idx][j]
            self.amax[layer_idx][j] = a if prev is None else torch.maximum(prev, a)
        return key_states, value_states


@torch.no_grad()
def calibrate_fp8_scales(model: nn.Module, calib, cfg: KVCacheConfig, *, batch_size: int = 8,
                         progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer fp8 (k_scale, v_scale) = amax / 448 over the calibration samples, per KV head or
    per tensor (the max over heads)."""
    n_layers, _, _ = attention_geometry(model.config)
    recorder = _RangeRecorder(n_layers, cfg.rotate_keys)
    ids = calib.input_ids if hasattr(calib, "input_ids") else calib
    device = module_device(model.get_input_embeddings())
    for batch in tqdm(ids.split(batch_size), desc="kv ranges", unit="batch", disable=not progress):
        model(input_ids=batch.to(device), past_key_values=recorder, use_cache=True)
        recorder.layers.clear()                  # nothing kept between batches
    scales = []
    for i, (k, v) in enumerate(recorder.amax):
        if k is None:
            raise ConfigError(f"layer {i} never updated the cache during calibration; cannot calibrate fp8 scales")
        if cfg.fp8_scale == "tensor":
            k, v = k.amax().reshape(1), v.amax().reshape(1)
        tiny = torch.finfo(torch.float32).tiny
        scales.append(((k / FP8_MAX).clamp_min(tiny).cpu(), (v / FP8_MAX).clamp_min(tiny).cpu()))
    return scales


def apply_kv_cache(model: nn.Module, cfg: KVCacheConfig, calib=None, *, device=None, batch_size=None,
                   progress: bool = True) -> dict:
    """The ``kv_cache`` pass: check the model fits the config, calibrate fp8 scales, attach the
    config. Returns per-layer records (fp8: the scales)."""
    n_layers, kv_heads, head_dim = attention_geometry(model.config)
    cfg.check_model(head_dim, f"{type(model).__name__} (head_dim {head_dim})")
    attention_modules(model)                                  # refuses unsupported layouts early
    records: dict = {}
    if cfg.is_fp8:
        if calib is None:
            raise ConfigError("kv_cache scheme fp8 calibrates static k/v scales: give calibration data "
                              "(a recipe 'calibration' section, or calib= in the API)")
        scales = calibrate_fp8_scales(model, calib, cfg, batch_size=batch_size or 8, progress=progress)
        set_kv_scales(model, scales, per_head=cfg.fp8_scale == "head")
        records = {f"layer {i}": {"k_scale": k.tolist(), "v_scale": v.tolist()} for i, (k, v) in enumerate(scales)}
    setattr(model.config, CONFIG_KEY, cfg.to_dict())
    per_token = cfg.bytes_per_token(kv_heads, head_dim)
    log.info("kv cache %s: %.1f bytes per token per layer (16-bit: %d), %d layers",
             cfg.describe(), per_token, 4 * kv_heads * head_dim, n_layers)
    return records


def kv_cache(model: nn.Module, cfg: KVCacheConfig | None = None, *, backend: str = "auto") -> QuantizedKVCache:
    """A fresh quantized cache for one ``generate`` call (or one evaluation batch).

    ``backend``: "auto" runs decode steps through the Triton kernel on CUDA and through
    dequantize + SDPA elsewhere; "triton" forces the kernel, "torch" the reference. Sliding-window
    layers always take the reference path (their attention is bounded by the window), and a model
    that caps attention logits (Gemma 2) keeps its own attention function: "auto" picks "torch".
    A config with ``h2o_budget`` gives an ``H2OCache`` (``compress.kv.h2o``), which always runs the
    eager reference: eviction needs the attention probabilities the kernel does not return."""
    check_backend(backend)
    check_kv_layout(model)
    h2o = cfg if cfg is not None else kv_config_of(model)
    if h2o is not None and h2o.is_h2o:          # eviction needs the probabilities: the eager reference
        return h2o_cache(model, h2o)
    emb = model.get_input_embeddings().weight
    probe = torch.empty(0, device=module_device(model.get_input_embeddings()), dtype=emb.dtype)
    fused = resolve_backend(backend, probe, 8) == "triton"
    if fused and (softcap := _attention_softcap(model.config)) is not None:
        # The kernel and SDPA compute plain softmax(q.k * scale); Gemma 2 caps the logits first.
        if backend == "triton":
            raise ConfigError(f"backend 'triton' cannot decode this model: it caps attention logits "
                              f"(attn_logit_softcapping={softcap}), which the decode-attention kernel does not; "
                              f"use backend='torch' (or 'auto', which picks it)")
        log.info("attention logit softcapping %s: decoding through the model's own attention, not the kernel", softcap)
        fused = False
    if fused:
        use_kv_attention(model)
    return QuantizedKVCache.for_model(model, cfg, fused=fused)


def _attention_softcap(config) -> float | None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text, "attn_logit_softcapping", None)


def use_kv_attention(model: nn.Module) -> None:
    """Switch ``model`` to the ``compress_kv`` attention (SDPA, except decode steps on a quantized
    cache, which run the decode-attention kernel). Registered with transformers on first use."""
    # Imported here, not at the top: these two modules pull in torch._dynamo and transformers' losses
    # (scipy), about 2 s, which `import compress` should not pay; a model exists by now, so they are
    # loaded already and this costs nothing.
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, kv_attention)
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


def kv_attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask, scaling=None,
                 dropout: float = 0.0, **kwargs):
    """transformers attention function: the decode kernel when the cache hands over a
    ``QuantizedKV`` (one new token), SDPA otherwise. Returns (B, q_len, Hq, D) like the others."""
    if not isinstance(key, QuantizedKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    masked = attention_mask is not None and not _all_visible(attention_mask)
    if masked or layout_unsupported(query[:, :, 0], key):
        k, v = key.dequantize()                 # padded batch, or a layout the kernel refuses: the SDPA path
        return sdpa_attention_forward(module, query, k, v, attention_mask, scaling=scale, dropout=dropout, **kwargs)
    out = decode_attention(query[:, :, 0], key, scale, backend="triton")      # (B, Hq, D)
    return out.unsqueeze(1), None


def _all_visible(mask: torch.Tensor) -> bool:
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


register_method(KVCacheConfig, apply_kv_cache, area="quantize", needs_data=lambda cfg: cfg.is_fp8, statistics="layer")
