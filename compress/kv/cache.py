"""A quantized KV cache that plugs into transformers generation (a ``transformers.Cache``).

    cache = QuantizedKVCache.for_model(model, KVCacheConfig(scheme="int4"))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=256)
    cache.memory()          # bytes held: quantized tokens, the full-precision window, per token

Every layer appends new keys/values to a full-precision window and moves the oldest tokens into
quantized storage as soon as the window holds more than ``residual_length`` tokens (integer
schemes: one key block of ``group_size`` tokens at a time, fp8: token by token). Attention then
reads the dequantized storage followed by the window: the current tokens too, once flushed, so a
prefill chunk attends to what decoding would see, not to a full-precision copy.

With ``fused=True`` (the runtime sets it on CUDA) a single-token decode step returns a
``QuantizedKV`` view instead of dequantized tensors, and the ``compress_kv`` attention function
(``compress.kv.attention``) runs the Triton decode-attention kernel on the quantized bytes directly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import ConfigError
from ..kernels.hadamard import rotate
from .config import KVCacheConfig, dense_bytes_per_token
from .model import kv_config_of, kv_scales_of
from .quant import (FP8_DTYPE, FP8_MAX, SCALE_DTYPE, QuantizedKV, packed_width, quantize_fp8, quantize_key_blocks,
                    quantize_values)

log = logging.getLogger(__name__)


def attention_geometry(config) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a transformers decoder config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


class QuantizedKVLayer(DynamicLayer):
    """One layer's quantized storage (preallocated, grown by doubling) plus its window."""

    is_croppable = False

    def __init__(self, cfg: KVCacheConfig, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None, fused: bool = False):
        super().__init__()
        self.cfg = cfg
        self.fused = fused
        self.length = 0                        # quantized tokens
        self.capacity = 0
        self.k_scale_fp8 = k_scale             # fp8: float32 (H,), calibrated; None = from the first update
        self.v_scale_fp8 = v_scale
        self.store: dict[str, torch.Tensor] = {}

    # --- transformers Cache layer interface ---------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.cfg.check_model(d)
        self.keys = key_states.new_empty(b, h, 0, d)            # the full-precision window
        self.values = value_states.new_empty(b, h, 0, d)
        if self.cfg.is_fp8:
            self.k_scale_fp8 = self._fp8_scale(self.k_scale_fp8, key_states, h)
            self.v_scale_fp8 = self._fp8_scale(self.v_scale_fp8, value_states, h)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cfg.rotate_keys:
            key_states = rotate(key_states)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        block = self.cfg.flush_block
        over = self.keys.shape[2] - self.cfg.residual
        if over >= block:
            n = over // block * block
            self._append(self.keys[:, :, :n], self.values[:, :, :n])
            self.keys = self.keys[:, :, n:]
            self.values = self.values[:, :, n:]
        view = self.view()
        if self.fused and key_states.shape[2] == 1:
            return view, view                  # the compress_kv attention reads the bytes itself
        return view.dequantize()

    def get_seq_length(self) -> int:
        return self.length + (self.keys.shape[2] if self.is_initialized else 0)

    def reset(self) -> None:
        super().reset()
        self.length = self.capacity = 0
        self.store = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (assisted generation / DoLa); "
                                  "use the default cache for those")

    def offload(self):
        raise NotImplementedError("offloading a quantized KV cache is not supported")

    # --- storage ------------------------------------------------------------------------------
    def view(self) -> QuantizedKV:
        s, cfg = self.store, self.cfg
        if not s:
            self._grow(0)
            s = self.store
        return QuantizedKV(bits=cfg.bits, fp8=cfg.is_fp8, group_size=cfg.group_size, length=self.length,
                           k_codes=s["k_codes"], k_scale=s.get("k_scale", self.k_scale_fp8), k_min=s.get("k_min"),
                           v_codes=s["v_codes"], v_scale=s.get("v_scale", self.v_scale_fp8), v_min=s.get("v_min"),
                           k_res=self.keys, v_res=self.values, rotated=cfg.rotate_keys)

    def memory(self) -> dict[str, int]:
        """Bytes in use: ``quantized`` (codes and scales of the stored tokens), ``window`` (the
        full-precision tokens), and ``allocated`` (the preallocated buffers)."""
        if not self.is_initialized:
            return {"quantized": 0, "window": 0, "allocated": 0}
        b, h, _, d = self.keys.shape
        per_token = self.cfg.bytes_per_token(h, d) * b
        window = (self.keys.numel() + self.values.numel()) * self.keys.element_size()
        allocated = sum(t.numel() * t.element_size() for t in self.store.values())
        return {"quantized": int(round(per_token * self.length)), "window": window, "allocated": allocated}

    def _fp8_scale(self, scale: torch.Tensor | None, states: torch.Tensor, heads: int) -> torch.Tensor:
        if scale is None:                      # not calibrated: from this first update, per head
            amax = states.detach().abs().float().amax(dim=(0, 2, 3))
            log.info("fp8 KV cache without calibrated scales: using the first update's range per head")
            return (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        scale = scale.detach().float().reshape(-1).to(states.device)
        if scale.numel() == 1:
            scale = scale.expand(heads).contiguous()
        if scale.numel() != heads:
            raise ConfigError(f"fp8 KV scale has {scale.numel()} values; the layer has {heads} KV heads")
        return scale

    def _grow(self, needed: int) -> None:
        """Make room for ``needed`` quantized tokens (capacity doubles; a multiple of the key block)."""
        b, h, _, d = self.keys.shape
        cfg, g = self.cfg, self.cfg.group_size
        cap = max(needed, 2 * self.capacity, 256)
        cap = -(-cap // g) * g
        dev = self.device
        if cfg.is_fp8:
            new = {"k_codes": torch.empty(b, h, cap, d, dtype=FP8_DTYPE, device=dev),
                   "v_codes": torch.empty(b, h, cap, d, dtype=FP8_DTYPE, device=dev)}
        else:
            width, gv = packed_width(d, cfg.bits), cfg.value_group(d)
            new = {"k_codes": torch.empty(b, h, cap, width, dtype=torch.uint8, device=dev),
                   "k_scale": torch.empty(b, h, cap // g, d, dtype=SCALE_DTYPE, device=dev),
                   "k_min": torch.empty(b, h, cap // g, d, dtype=SCALE_DTYPE, device=dev),
                   "v_codes": torch.empty(b, h, cap, width, dtype=torch.uint8, device=dev),
                   "v_scale": torch.empty(b, h, cap, d // gv, dtype=SCALE_DTYPE, device=dev),
                   "v_min": torch.empty(b, h, cap, d // gv, dtype=SCALE_DTYPE, device=dev)}
        for name, old in self.store.items():
            n = old.shape[2]
            new[name][:, :, :n].copy_(old)
        self.store, self.capacity = new, cap

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize ``n`` tokens (a multiple of the flush block) onto the end of the storage."""
        n, start = k.shape[2], self.length
        if start + n > self.capacity:
            self._grow(start + n)
        s, cfg = self.store, self.cfg
        if cfg.is_fp8:
            s["k_codes"][:, :, start:start + n] = quantize_fp8(k, self.k_scale_fp8)
            s["v_codes"][:, :, start:start + n] = quantize_fp8(v, self.v_scale_fp8)
        else:
            g = cfg.group_size
            codes, scale, lo = quantize_key_blocks(k, cfg.bits, g)
            s["k_codes"][:, :, start:start + n] = codes
            s["k_scale"][:, :, start // g:(start + n) // g] = scale
            s["k_min"][:, :, start // g:(start + n) // g] = lo
            codes, scale, lo = quantize_values(v, cfg.bits, cfg.value_group(v.shape[-1]))
            s["v_codes"][:, :, start:start + n] = codes
            s["v_scale"][:, :, start:start + n] = scale
            s["v_min"][:, :, start:start + n] = lo
        self.length += n

    def _map(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.store = {k: fn(t) for k, t in self.store.items()}


class QuantizedKVCache(Cache):
    """A ``transformers.Cache`` whose layers store keys and values quantized (see module doc)."""

    def __init__(self, config, kv: KVCacheConfig, *, scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 fused: bool = False):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types = getattr(text, "layer_types", None) or []
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ConfigError(f"a quantized KV cache needs full-attention layers only; this model also has {other}")
        n_layers, kv_heads, head_dim = attention_geometry(config)
        kv.check_model(head_dim, f"{getattr(text, 'model_type', 'model')} (head_dim {head_dim})")
        if scales is not None and len(scales) != n_layers:
            raise ConfigError(f"{len(scales)} fp8 scale pairs for {n_layers} layers")
        self.kv_config = kv
        self.geometry = (n_layers, kv_heads, head_dim)
        layers = [QuantizedKVLayer(kv, *(scales[i] if scales else (None, None)), fused=fused)
                  for i in range(n_layers)]
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model: nn.Module, kv: KVCacheConfig | None = None, *, fused: bool = False) -> QuantizedKVCache:
        """A cache for ``model``: ``kv`` defaults to the config the model carries (a ``kv_cache``
        pass or a loaded checkpoint); fp8 scales come from the model's calibrated
        ``k_scale``/``v_scale`` buffers when it has them."""
        kv = kv or kv_config_of(model)
        if kv is None:
            raise ConfigError("the model carries no KV-cache config; pass one, e.g. KVCacheConfig(scheme='int4')")
        scales = kv_scales_of(model) if kv.is_fp8 else None
        return cls(model.config, kv, scales=scales, fused=fused)

    def memory(self) -> dict[str, float]:
        """Totals over layers, plus the per-token cost and its ratio to a 16-bit cache."""
        parts = [layer.memory() for layer in self.layers]
        out: dict[str, float] = {k: sum(p[k] for p in parts) for k in ("quantized", "window", "allocated")}
        n_layers, kv_heads, head_dim = self.geometry
        per_token = self.kv_config.bytes_per_token(kv_heads, head_dim)
        out["bytes_per_token_per_layer"] = per_token
        out["ratio_vs_16bit"] = dense_bytes_per_token(kv_heads, head_dim) / per_token
        out["tokens"] = self.get_seq_length()
        return out
