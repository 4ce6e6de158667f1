"""A quantized KV cache that plugs into transformers generation (a ``transformers.Cache``).

    cache = QuantizedKVCache.for_model(model, KVCacheConfig(scheme="int4"))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=256)
    cache.memory()          # bytes held: quantized tokens, the full-precision window, per token

Every layer appends new keys/values to a full-precision window and moves the oldest tokens into
quantized storage as soon as the window holds more than ``residual_length`` tokens (integer
schemes: one key block of ``group_size`` tokens at a time, fp8: token by token). Attention then
reads the dequantized storage followed by the window: the current tokens too, once flushed, so a
prefill chunk attends to what decoding would see, not to a full-precision copy.

Sliding-window layers (``layer_types`` ``sliding_attention``: Gemma 2/3, Mistral) are stored the
same way but keep only the last ``sliding_window - 1`` tokens, as transformers' own sliding layers
do (``QuantizedSlidingWindowLayer``; docs/kv-cache.md says why they are quantized too).

With ``fused=True`` (the runtime sets it on CUDA) a single-token decode step returns a
``QuantizedKV`` view instead of dequantized tensors, and the ``compress_kv`` attention function
(``compress.kv.attention``) runs the Triton decode-attention kernel on the quantized bytes directly.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from ..errors import ConfigError
from ..kernels.hadamard import rotate
from .config import KVCacheConfig, dense_bytes_per_token
from .model import kv_config_of, kv_scales_of
from .quant import (FP8_DTYPE, FP8_MAX, QuantizedKV, packed_width, quantize_fp8, quantize_key_blocks,
                    quantize_values)

log = logging.getLogger(__name__)

# Layer kinds the cache holds (transformers' names): every other kind (chunked, linear, shared) is refused.
LAYER_TYPES = ("full_attention", "sliding_attention")


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
        self.sink_keys = key_states.new_empty(b, h, 0, d)       # the first sink_tokens, never quantized
        self.sink_values = value_states.new_empty(b, h, 0, d)
        if self.cfg.is_fp8:
            self.k_scale_fp8 = self._fp8_scale(self.k_scale_fp8, key_states, h)
            self.v_scale_fp8 = self._fp8_scale(self.v_scale_fp8, value_states, h)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._push(key_states, value_states)
        view = self.view()
        if self.fused and key_states.shape[2] == 1:
            return view, view                  # the compress_kv attention reads the bytes itself
        return view.dequantize()

    def get_seq_length(self) -> int:
        return self.length + (self.keys.shape[2] + self.sink_keys.shape[2] if self.is_initialized else 0)

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
    def _push(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append new tokens (B, H, T, D) to the window, then flush whole blocks past ``residual``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cfg.rotate_keys:
            key_states = rotate(key_states)
        take = min(self.cfg.sink_tokens - self.sink_keys.shape[2], key_states.shape[2])
        if take > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :take]], dim=2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :take]], dim=2)
            key_states, value_states = key_states[:, :, take:], value_states[:, :, take:]
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        block = self.cfg.flush_block
        over = self.keys.shape[2] - self.cfg.residual
        if over >= block:
            n = over // block * block
            self._append(self.keys[:, :, :n], self.values[:, :, :n])
            self.keys = self.keys[:, :, n:]
            self.values = self.values[:, :, n:]

    def view(self) -> QuantizedKV:
        s, cfg = self.store, self.cfg
        if not s:
            self._grow(0)
            s = self.store
        return QuantizedKV(bits=cfg.bits, fp8=cfg.is_fp8, group_size=cfg.group_size, length=self.length,
                           k_codes=s["k_codes"], k_scale=s.get("k_scale", self.k_scale_fp8), k_min=s.get("k_min"),
                           v_codes=s["v_codes"], v_scale=s.get("v_scale", self.v_scale_fp8), v_min=s.get("v_min"),
                           k_res=self.keys, v_res=self.values, rotated=cfg.rotate_keys,
                           k_sink=self.sink_keys if cfg.sink_tokens else None,
                           v_sink=self.sink_values if cfg.sink_tokens else None)

    def memory(self) -> dict[str, int]:
        """Bytes in use: ``quantized`` (codes and scales of the stored tokens), ``window`` (the
        full-precision tokens), and ``allocated`` (the preallocated buffers)."""
        if not self.is_initialized:
            return {"quantized": 0, "window": 0, "allocated": 0}
        b, h, _, d = self.keys.shape
        per_token = self.cfg.bytes_per_token(h, d) * b
        window = sum(t.numel() for t in (self.keys, self.values, self.sink_keys, self.sink_values))
        window *= self.keys.element_size()
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
            width, gv, sdt = packed_width(d, cfg.bits), cfg.value_group(d), cfg.scale_torch_dtype
            new = {"k_codes": torch.empty(b, h, cap, width, dtype=torch.uint8, device=dev),
                   "k_scale": torch.empty(b, h, cap // g, d, dtype=sdt, device=dev),
                   "k_min": torch.empty(b, h, cap // g, d, dtype=sdt, device=dev),
                   "v_codes": torch.empty(b, h, cap, width, dtype=torch.uint8, device=dev),
                   "v_scale": torch.empty(b, h, cap, d // gv, dtype=sdt, device=dev),
                   "v_min": torch.empty(b, h, cap, d // gv, dtype=sdt, device=dev)}
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
            codes, scale, lo = quantize_key_blocks(k, cfg.bits, g, cfg.scale_torch_dtype, cfg.clip)
            s["k_codes"][:, :, start:start + n] = codes
            s["k_scale"][:, :, start // g:(start + n) // g] = scale
            s["k_min"][:, :, start // g:(start + n) // g] = lo
            codes, scale, lo = quantize_values(v, cfg.bits, cfg.value_group(v.shape[-1]), cfg.scale_torch_dtype,
                                               cfg.clip)
            s["v_codes"][:, :, start:start + n] = codes
            s["v_scale"][:, :, start:start + n] = scale
            s["v_min"][:, :, start:start + n] = lo
        self.length += n

    def _map(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.store = {k: fn(t) for k, t in self.store.items()}



class QuantizedSlidingWindowLayer(QuantizedKVLayer):
    """A sliding-window layer (Gemma 2/3, Mistral-style ``sliding_attention``): stored like a full
    layer (quantized past, full-precision window), but only the last ``sliding_window - 1`` tokens
    are kept, as transformers' ``DynamicSlidingWindowLayer`` keeps them. Older tokens are dropped
    from the window and, in whole key blocks, from the quantized storage, so at most
    ``sliding_window - 1 + flush_block - 1`` tokens are held whatever the context.

    Storage holds valid quantized tokens ``[start, length)``; ``start`` is a whole key block, and the
    live part is moved back to the front only when an append would outgrow the buffers (amortized,
    no copy per token). Never fused: the window bounds the attention to ``sliding_window`` keys,
    which dequantize + SDPA reads as fast as the kernel would, and the kernel cannot start
    mid-block at the window's first token."""

    is_sliding = True

    def __init__(self, cfg: KVCacheConfig, sliding_window: int, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None):
        if cfg.sink_tokens:                    # the window drops the first tokens: no sink to keep
            cfg = dataclasses.replace(cfg, sink_tokens=0)
        super().__init__(cfg, k_scale, v_scale, fused=False)
        if sliding_window < 1:
            raise ConfigError(f"a sliding-window layer needs sliding_window >= 1, got {sliding_window}; check the "
                              f"model config's sliding_window")
        self.sliding_window = sliding_window
        self.cumulative_length = 0             # tokens seen, dropped ones included (positions, masks)
        self.start = 0                         # first quantized token still kept

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # The mask was sized by get_mask_sizes before this update: the last min(seen, window - 1)
        # past tokens followed by the new ones, so exactly those are returned.
        visible = min(self.cumulative_length, self.sliding_window - 1) + key_states.shape[2]
        self.cumulative_length += key_states.shape[2]
        self._push(key_states, value_states)
        k, v = self.view().dequantize()                                      # (B, H, kept, D)
        self._evict()
        return k[:, :, -visible:], v[:, :, -visible:]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of what ``update`` returns, as DynamicSlidingWindowLayer's."""
        past = min(self.cumulative_length, self.sliding_window - 1)
        return past + query_length, self.cumulative_length - past

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        super().reset()
        self.start = 0

    def view(self) -> QuantizedKV:
        """The kept tokens only: storage from ``start`` (a whole key block) on, then the window."""
        full = super().view()
        if not self.start:
            return full
        st, g = self.start, self.cfg.group_size
        if full.fp8:
            return dataclasses.replace(full, length=self.length - st, k_codes=full.k_codes[:, :, st:],
                                       v_codes=full.v_codes[:, :, st:])
        return dataclasses.replace(full, length=self.length - st, k_codes=full.k_codes[:, :, st:],
                                   k_scale=full.k_scale[:, :, st // g:], k_min=full.k_min[:, :, st // g:],
                                   v_codes=full.v_codes[:, :, st:], v_scale=full.v_scale[:, :, st:],
                                   v_min=full.v_min[:, :, st:])

    def memory(self) -> dict[str, int]:
        out = super().memory()
        if self.is_initialized:
            b, h, _, d = self.keys.shape
            out["quantized"] = int(round(self.cfg.bytes_per_token(h, d) * b * (self.length - self.start)))
        return out

    def _evict(self) -> None:
        """Drop what no later query can see: all but the last ``sliding_window - 1`` tokens (quantized
        ones in whole key blocks, so up to ``flush_block - 1`` more may stay)."""
        keep = self.sliding_window - 1
        window = self.keys.shape[2]
        if window >= keep:                      # the full-precision window alone covers what is visible
            self.keys, self.values = self.keys[:, :, window - keep:], self.values[:, :, window - keep:]
            self.start = self.length = 0        # nothing quantized is kept: reuse the buffers from the front
            return
        block = self.cfg.flush_block
        first = (self.length - (keep - window)) // block * block
        self.start = max(self.start, first)

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.length + k.shape[2] > self.capacity and self.start:
            self._compact()
        super()._append(k, v)

    def _compact(self) -> None:
        """Move the kept quantized tokens ``[start, length)`` to the front of the buffers."""
        st, n, g = self.start, self.length - self.start, self.cfg.group_size
        for name, t in self.store.items():
            per_block = name in ("k_scale", "k_min")             # indexed by key block, not token
            a, m = (st // g, -(-n // g)) if per_block else (st, n)
            t[:, :, :m] = t[:, :, a:a + m].clone()              # clone: the ranges may overlap
        self.start, self.length = 0, n


class QuantizedKVCache(Cache):
    """A ``transformers.Cache`` whose layers store keys and values quantized (see module doc)."""

    def __init__(self, config, kv: KVCacheConfig, *, scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 fused: bool = False):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        # The layer kinds and windows transformers' own DynamicCache(config=...) would build.
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        other = sorted(set(layer_types) - set(LAYER_TYPES))
        if other:
            raise ConfigError(f"a quantized KV cache holds full_attention and sliding_attention layers only; this "
                              f"{getattr(text, 'model_type', 'model')} has {other} layers; keep its KV cache in "
                              f"full precision (evaluate(..., kv_cache=False), no --kv-cache)")
        n_layers, kv_heads, head_dim = attention_geometry(config)
        kv.check_model(head_dim, f"{getattr(text, 'model_type', 'model')} (head_dim {head_dim})")
        if scales is not None and len(scales) != n_layers:
            raise ConfigError(f"{len(scales)} fp8 scale pairs for {n_layers} layers")
        self.kv_config = kv
        self.geometry = (n_layers, kv_heads, head_dim)
        layers: list[QuantizedKVLayer] = []
        for i, (kind, extra) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            k_scale, v_scale = scales[i] if scales else (None, None)
            if kind == "sliding_attention":
                layers.append(QuantizedSlidingWindowLayer(kv, extra["sliding_window"], k_scale, v_scale))
            else:
                layers.append(QuantizedKVLayer(kv, k_scale, v_scale, fused=fused))
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
