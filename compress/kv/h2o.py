"""H2O: Heavy-Hitter Oracle KV-cache eviction (Zhang et al., 2023), optionally on quantized tokens.

    kv = KVCacheConfig(scheme="none", h2o_budget=0.2)            # keep 20% of the context, 16-bit
    kv = KVCacheConfig(scheme="int4", residual_length=0, h2o_budget=0.2)    # ... and quantize what is kept
    cache = compress.kv_cache(model, kv)                          # an H2OCache; switches attention to compress_h2o

Every layer keeps, per KV head, at most ``budget`` tokens: the ``recent`` newest ones and the
``heavy`` older ones with the largest accumulated attention received (the sum of the softmax
probabilities over every query so far, and over the query heads of a GQA group). After each
forward the layer adds this step's probabilities to the scores of the tokens it holds and evicts
the lowest-scoring older tokens down to the budget (the paper's greedy eviction; with a chunk of
several tokens per forward, all of the chunk's queries attend before the chunk's eviction).

Attention must hand the probabilities back, so the cache returns an ``H2OKV`` view and the
``compress_h2o`` attention function runs the eager reference (``matmul``, float32 softmax,
``matmul``: transformers' ``eager_attention_forward``) on it and calls ``observe``; the Triton
decode kernel is never used (it does not return probabilities). Positions stay those of the full
sequence (``get_seq_length`` counts every token seen); the mask covers the kept tokens (all in the
past) followed by the new ones.

Quantization (integer schemes): arrivals are quantized in blocks of ``group_size`` tokens as in
``QuantizedKVLayer`` (keys per channel per block, values per token; the newest
``residual_length`` tokens wait in full precision), whichever of them are still kept get their
dequantized values, and evicted ones are dropped. ``memory`` counts the bytes of what is kept:
codes and value scales per kept quantized token, key scales once per block that still holds a
kept token, and the full-precision arrivals not yet quantized.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..errors import ConfigError
from .cache import attention_geometry
from .config import KVCacheConfig
from .quant import dequantize_keys, dequantize_values, quantize_key_blocks, quantize_values

log = logging.getLogger(__name__)

ATTENTION = "compress_h2o"


@dataclasses.dataclass
class H2OKV:
    """What an H2O layer hands to attention: the kept keys/values (B, Hkv, N, D) and the layer to
    give this step's attention probabilities back to."""

    keys: torch.Tensor
    values: torch.Tensor
    layer: H2OLayer

    def __getattr__(self, name):               # read as a tensor by another attention function: say why
        raise ConfigError(f"an H2O cache's keys reached an attention function other than 'compress_h2o' (it read "
                          f".{name}); build the cache with compress.kv_cache(model, cfg), which switches the model")


class H2OLayer(DynamicLayer):
    """One layer's kept tokens, their positions and accumulated attention scores."""

    is_croppable = False
    is_sliding = False

    def __init__(self, cfg: KVCacheConfig):
        super().__init__()
        self.cfg = cfg
        self.seen = 0                          # tokens of the sequence so far, evicted ones included
        self.pending = False                   # an update whose probabilities were not observed yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.cfg.check_model(d)
        self.keys = key_states.new_empty(b, h, 0, d)            # kept, (B, H, N, D), in position order
        self.values = value_states.new_empty(b, h, 0, d)
        self.pos = torch.empty(b, h, 0, dtype=torch.long, device=self.device)          # (B, H, N)
        self.score = torch.zeros(b, h, 0, dtype=torch.float32, device=self.device)     # accumulated attention
        self.quantized = torch.zeros(b, h, 0, dtype=torch.bool, device=self.device)    # holds dequantized codes
        self.stage_k = key_states.new_empty(b, h, 0, d)         # arrivals not quantized yet (evicted or not)
        self.stage_v = value_states.new_empty(b, h, 0, d)
        self.stage_start = 0                                    # position of stage_k[:, :, 0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending:
            raise ConfigError("an H2O cache got a second update without the attention probabilities of the first: "
                              "the model is not running the 'compress_h2o' attention; build the cache with "
                              "compress.kv_cache(model, cfg), which switches it")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, n, _ = key_states.shape
        pos = torch.arange(self.seen, self.seen + n, device=self.device).expand(b, h, n)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.pos = torch.cat([self.pos, pos], dim=2)
        self.score = torch.cat([self.score, self.score.new_zeros(b, h, n)], dim=2)
        self.quantized = torch.cat([self.quantized, self.quantized.new_zeros(b, h, n)], dim=2)
        self.seen += n
        if self.cfg.scheme != "none":
            self._stage(key_states, value_states)
        self.pending = True
        view = H2OKV(self.keys, self.values, self)
        return view, view

    def observe(self, probs: torch.Tensor) -> None:
        """Add this step's attention probabilities (B, Hq, q, N) to the scores, then evict."""
        b, hq, _, n = probs.shape
        h = self.keys.shape[1]
        received = probs.float().sum(dim=2).reshape(b, h, hq // h, n).sum(dim=2)    # (B, H, N)
        self.score = self.score + received
        self.pending = False
        self._evict()

    def _evict(self) -> None:
        heavy, recent = self.cfg.h2o_kept(self.seen)
        n = self.keys.shape[2]
        if n <= heavy + recent:
            return
        old = n - recent                                        # candidates: everything but the recent tokens
        top = self.score[:, :, :old].topk(heavy, dim=2).indices.sort(dim=2).values      # (B, H, heavy)
        tail = torch.arange(old, n, device=self.device).expand(*top.shape[:2], recent)
        idx = torch.cat([top, tail], dim=2)                     # (B, H, kept), in position order
        d = self.keys.shape[3]
        self.keys = self.keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
        self.values = self.values.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
        self.pos, self.score, self.quantized = (t.gather(2, idx) for t in (self.pos, self.score, self.quantized))

    def _stage(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Quantize arrivals block by block once more than ``residual`` wait; kept tokens of a block
        take their dequantized values (what a quantized store would give back)."""
        cfg, g = self.cfg, self.cfg.group_size
        self.stage_k = torch.cat([self.stage_k, key_states], dim=2)
        self.stage_v = torch.cat([self.stage_v, value_states], dim=2)
        while self.stage_k.shape[2] - cfg.residual >= g:
            k, v = self.stage_k[:, :, :g], self.stage_v[:, :, :g]                      # (B, H, G, D)
            codes, scale, lo = quantize_key_blocks(k, cfg.bits, g, cfg.scale_torch_dtype, cfg.clip)
            kd = dequantize_keys(codes, scale, lo, cfg.bits, g, k.dtype)
            codes, scale, lo = quantize_values(v, cfg.bits, cfg.value_group(v.shape[-1]), cfg.scale_torch_dtype,
                                               cfg.clip)
            vd = dequantize_values(codes, scale, lo, cfg.bits, v.dtype)
            rel = self.pos - self.stage_start                                           # (B, H, N)
            inside = (rel >= 0) & (rel < g)
            at = rel.clamp(0, g - 1).unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            self.keys = torch.where(inside.unsqueeze(-1), kd.gather(2, at), self.keys)
            self.values = torch.where(inside.unsqueeze(-1), vd.gather(2, at), self.values)
            self.quantized = self.quantized | inside
            self.stage_k, self.stage_v = self.stage_k[:, :, g:], self.stage_v[:, :, g:]
            self.stage_start += g

    # --- transformers Cache layer interface ---------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The kept tokens (all in the past) then the new ones: kv_length, and an offset that puts
        the kept tokens just before the new ones, so every query sees all of them."""
        kept = self.keys.shape[2] if self.is_initialized else 0
        return kept + query_length, self.seen - kept

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.seen, self.pending = 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an H2O cache cannot be cropped (assisted generation / DoLa): evicted tokens are gone")

    def offload(self):
        raise NotImplementedError("offloading an H2O cache is not supported")

    def _map(self, fn) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "pos", "score", "quantized", "stage_k", "stage_v"):
                setattr(self, name, fn(getattr(self, name)))

    def memory(self, dtype_bytes: int = 2) -> dict[str, int]:
        """Bytes of what is kept: ``quantized`` (codes, value scales, key scales of blocks still
        holding a kept token), ``window`` (kept full-precision tokens; for integer schemes the
        not-yet-quantized arrivals, evicted ones included, which a block needs; ``dtype_bytes``
        each element, 2 = a bf16 cache whatever the model computes in) and ``kept`` (tokens per KV head)."""
        if not self.is_initialized:
            return {"quantized": 0, "window": 0, "kept": 0}
        cfg = self.cfg
        b, h, n, d = self.keys.shape
        size = dtype_bytes
        if cfg.scheme == "none":
            return {"quantized": 0, "window": 2 * b * h * n * d * size, "kept": n}
        scale_bytes = 2 * (torch.finfo(cfg.scale_torch_dtype).bits // 8)            # scale + min
        per_token = 2 * d * cfg.bits / 8 + (d // cfg.value_group(d)) * scale_bytes  # k + v codes, v scales
        nq = int(self.quantized.sum())
        head = torch.arange(b * h, device=self.device).reshape(b, h, 1).expand(b, h, n)
        blocks = torch.unique((head * (self.seen // cfg.group_size + 1) + self.pos // cfg.group_size)[self.quantized])
        quantized = nq * per_token + blocks.numel() * d * scale_bytes
        window = 2 * self.stage_k.numel() * size
        return {"quantized": int(round(quantized)), "window": window, "kept": n}


class H2OCache(Cache):
    """A ``transformers.Cache`` of ``H2OLayer``s (see module doc). Full-attention layers only."""

    def __init__(self, config, kv: KVCacheConfig):
        if not kv.is_h2o:
            raise ConfigError("H2OCache needs a KVCacheConfig with h2o_budget set (e.g. h2o_budget=0.2)")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types, _ = get_layer_types_and_kwargs(text)
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ConfigError(f"H2O eviction is implemented for full_attention layers only; this "
                              f"{getattr(text, 'model_type', 'model')} has {other} layers; drop h2o_budget")
        n_layers, kv_heads, head_dim = attention_geometry(config)
        kv.check_model(head_dim, f"{getattr(text, 'model_type', 'model')} (head_dim {head_dim})")
        self.kv_config = kv
        self.geometry = (n_layers, kv_heads, head_dim)
        super().__init__(layers=[H2OLayer(kv) for _ in layer_types])

    def memory(self) -> dict[str, float]:
        """Totals over layers, tokens seen, and the bytes held per context token per layer."""
        parts = [layer.memory() for layer in self.layers]
        out: dict[str, float] = {k: sum(p[k] for p in parts) for k in ("quantized", "window")}
        out["kept_per_head"] = max(p["kept"] for p in parts)
        seen = self.get_seq_length()
        out["tokens"] = seen
        batch = self.layers[0].keys.shape[0] if self.layers and self.layers[0].is_initialized else 1
        out["bytes_per_token_per_layer"] = (out["quantized"] + out["window"]) / max(1, seen * batch * len(self.layers))
        return out


def h2o_cache(model: nn.Module, kv: KVCacheConfig) -> H2OCache:
    """A fresh H2O cache for ``model``; switches the model to the ``compress_h2o`` attention."""
    use_h2o_attention(model)
    return H2OCache(model.config, kv)


def use_h2o_attention(model: nn.Module) -> None:
    """Register ``compress_h2o`` (eager attention + probabilities to the cache on H2O views, SDPA
    otherwise; eager-style masks) with transformers on first use and switch ``model`` to it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, h2o_attention)
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


def h2o_attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask, scaling=None,
                  dropout: float = 0.0, **kwargs):
    """transformers attention function. Returns (B, q_len, Hq, D) and the probabilities."""
    if not isinstance(key, H2OKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    out, probs = eager_attention(query, key.keys, key.values, attention_mask,
                                 scaling if scaling is not None else query.shape[-1] ** -0.5,
                                 dropout if module.training else 0.0)
    key.layer.observe(probs)
    return out, probs


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: query (B, Hq, q, D), key/value (B, Hkv, N, D) -> output (B, q, Hq, D) and
    probabilities (B, Hq, q, N), the same operations as transformers' eager attention."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)                                # (B, Hq, N, D)
    value = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling              # (B, Hq, q, N)
    if mask is not None:
        mask = mask[:, :, :, :key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    elif query.shape[2] > 1:                                                 # causal, bottom-right aligned
        q, n = query.shape[2], key.shape[2]
        causal = torch.ones(q, n, dtype=torch.bool, device=query.device).tril(n - q)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()            # (B, q, Hq, D)
    return out, probs
