"""SwiftKV (Qiao et al., 2024): SingleInputKV + AcrossKV, a prefill-saving model transformation.

SingleInputKV: for every layer l >= ``split`` the keys and values are computed from the output of
layer ``split - 1`` (x_{s-1}) instead of the layer's own input:

    K_l, V_l = k_proj_l(norm_l(x_{s-1})), v_proj_l(norm_l(x_{s-1}))       (norm_l: layer l's input norm)

The queries, attention output and MLP of layer l still run on the layer's own input h_{l-1}. During
prefill, a prompt token's later-layer hidden states feed only its own later-layer queries and its
own logits, so for every prompt token except the last SwiftKV runs layers < split plus the later
layers' k/v projections and nothing else; the full later layers run for the last prompt token and
the decoded tokens. The logits of those positions are exactly what a plain full-sequence forward of
the converted model gives at the same positions (the transformation keeps the model causal and
position-wise), which is how they are evaluated here (``scored_nll``).

AcrossKV: among the SingleInputKV layers, each group of ``across_group`` neighbouring layers shares
one KV cache: the group's first layer's k/v projections (and norm) serve every layer of the group
and the others' k/v projections are dropped.

Supported families: the decoders whose attention is Llama's (q/k/v/o projections, RoPE, RMSNorm
input norm without extra q/k norms): ``llama``, ``mistral``, ``qwen2``. Others are refused.

The converted modules keep the original parameter names (``self_attn.k_proj.weight``,
``input_layernorm.weight``), so LoRA/distillation target patterns and checkpoints see the same
model; followers' k/v projections are removed.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..modeling import find_decoder_layers

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass
class SwiftKVConfig:
    """split:         first layer whose KV comes from layer split-1's output (0 < split <= num_layers;
                      num_layers converts nothing). None: ``num_layers - round(fraction * num_layers)``.
    fraction:         share of the layers (the later ones) converted when split is None (0.5 in the paper).
    across_group:     AcrossKV group size among the converted layers (1 = off, 2 = halve their KV)."""

    split: int | None = None
    fraction: float = 0.5
    across_group: int = 1
    version: int = 1

    def resolve(self, num_layers: int) -> int:
        """The split layer for a model of ``num_layers`` decoder layers; bad values raise ConfigError."""
        if self.across_group < 1:
            raise ConfigError(f"swiftkv across_group must be >= 1 (1 = no AcrossKV, 2 = pairs), got {self.across_group}")
        if self.split is None:
            if not 0.0 <= self.fraction < 1.0:
                raise ConfigError(f"swiftkv fraction must be in [0, 1) (0.5 = the later half), got {self.fraction}")
            split = num_layers - round(self.fraction * num_layers)
        else:
            split = self.split
        if not 1 <= split <= num_layers:
            raise ConfigError(f"swiftkv split {split} is out of range for a model of {num_layers} decoder layers: "
                              f"give 1 <= split <= {num_layers} ({num_layers} converts nothing; "
                              f"{num_layers // 2} converts the later half)")
        return split

    def groups(self, num_layers: int) -> list[list[int]]:
        """The converted layers split into AcrossKV groups (the first of each group owns the cache)."""
        split = self.resolve(num_layers)
        later = list(range(split, num_layers))
        return [later[i:i + self.across_group] for i in range(0, len(later), self.across_group)]


class _SplitInput:
    """Holds x_{s-1}, the (B, T, H) output of layer split-1, for the forward pass in progress."""

    def __init__(self):
        self.x: torch.Tensor | None = None


class SplitInputNorm(nn.Module):
    """Layer ``split``'s input RMSNorm that also records its input x_{s-1} for the later layers."""

    def __init__(self, norm: nn.Module, holder: _SplitInput):
        super().__init__()
        self.weight = norm.weight                                  # same parameter, same state-dict key
        self.variance_epsilon = norm.variance_epsilon
        self._holder = (holder,)                                   # a tuple: not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._holder[0].x = x
        return rms_norm(x, self.weight, self.variance_epsilon)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Llama/Mistral/Qwen2 RMSNorm, bit for bit (normalized in float32, scaled in the input dtype).
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class SingleInputKVAttention(nn.Module):
    """Llama-style attention whose keys/values come from ``kv_norm(x_{s-1})`` through the k/v
    projections of ``owner`` (itself, or the first layer of its AcrossKV group)."""

    def __init__(self, attn: nn.Module, kv_norm: nn.Module, holder: _SplitInput, owner: "SingleInputKVAttention | None"):
        super().__init__()
        for name in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
                     "is_causal", "sliding_window"):
            if hasattr(attn, name):
                setattr(self, name, getattr(attn, name))
        self.q_proj, self.o_proj = attn.q_proj, attn.o_proj
        if owner is None:                                           # owns its cache: keeps its k/v projections
            self.k_proj, self.v_proj = attn.k_proj, attn.v_proj
        self._kv_norm = (kv_norm,)
        self._holder = (holder,)
        self._owner = (owner,)
        family = importlib.import_module(type(attn).__module__)
        self._rope = family.apply_rotary_pos_emb
        self._eager = family.eager_attention_forward

    def kv_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) (B, T, kv_heads * head_dim) before RoPE, from x_{s-1}."""
        owner = self._owner[0] or self
        x = self._holder[0].x
        if x is None:
            raise RuntimeError("SwiftKV: layer split-1's output was not recorded; run the whole model, not one layer")
        norm = owner._kv_norm[0]
        h = rms_norm(x, norm.weight, norm.variance_epsilon)                     # (B, T, H)
        return owner.k_proj(h), owner.v_proj(h)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)       # (B, heads, T, hd)
        k, v = self.kv_input()
        if k.shape[:-1] != input_shape:
            raise RuntimeError(f"SwiftKV: recorded x_(s-1) has shape {tuple(k.shape[:-1])}, the layer input "
                               f"{tuple(input_shape)}")
        k = k.view(hidden_shape).transpose(1, 2)                                 # (B, kv_heads, T, hd)
        v = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                 self.attention_dropout, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _check_family(model: nn.Module) -> None:
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"SwiftKV supports the Llama-style families {', '.join(SUPPORTED_FAMILIES)}; this model is "
                          f"{family!r} ({type(model).__name__}). Its attention would need its own SingleInputKV forward.")


def swiftkv(model: nn.Module, cfg: SwiftKVConfig) -> nn.Module:
    """Convert ``model`` in place to SwiftKV (see the module docstring) and return it."""
    _check_family(model)
    _, layers = find_decoder_layers(model)
    if any(isinstance(layer.self_attn, SingleInputKVAttention) for layer in layers):
        raise ConfigError("this model is already converted to SwiftKV; load the original model again")
    split = cfg.resolve(len(layers))
    if split == len(layers):
        return model
    holder = _SplitInput()
    layers[split].input_layernorm = SplitInputNorm(layers[split].input_layernorm, holder)
    for group in cfg.groups(len(layers)):
        owner = None
        for i in group:
            attn = SingleInputKVAttention(layers[i].self_attn, layers[i].input_layernorm, holder, owner)
            layers[i].self_attn = attn
            owner = owner or attn
    model.config.swiftkv = dataclasses.asdict(cfg) | {"split": split}
    return model


# --- accounting ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, config) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.num_hidden_layers, config.vocab_size)


def prefill_flops(shape: ModelShape, prompt_len: int, cfg: SwiftKVConfig) -> dict:
    """Matmul FLOPs (2 per multiply-add) of prefilling ``prompt_len`` tokens, original vs SwiftKV.

    Per token and layer: q (H x heads*hd), k and v (H x kv_heads*hd each), o (heads*hd x H), MLP
    (3 x H x I: gate, up, down), attention scores + weighted values 2 x 2 x heads*hd x (t+1) for the
    token at position t (causal). The logits (H x V) are counted for the last prompt token only, in
    both. SwiftKV skips, for layers >= split and every prompt token but the last, everything except
    the k/v projections; AcrossKV followers skip those too. Norms, RoPE, softmax are not counted."""
    s = shape
    split = cfg.resolve(s.layers)
    P = prompt_len
    q = o = 2 * s.hidden * s.heads * s.head_dim
    kv = 2 * 2 * s.hidden * s.kv_heads * s.head_dim
    mlp = 3 * 2 * s.hidden * s.intermediate
    attn_all = 4 * s.heads * s.head_dim * P * (P + 1) // 2          # sum over t of 4 * heads*hd * (t+1)
    attn_last = 4 * s.heads * s.head_dim * P
    per_layer = P * (q + kv + o + mlp) + attn_all
    logits = 2 * s.hidden * s.vocab
    original = s.layers * per_layer + logits
    owners = len(cfg.groups(s.layers))
    followers = (s.layers - split) - owners
    skipped_per_layer = (P - 1) * (q + o + mlp) + (attn_all - attn_last)
    skipped = (s.layers - split) * skipped_per_layer + followers * (P - 1) * kv
    return {"prompt_len": P, "split": split, "original": original, "swiftkv": original - skipped,
            "saved": skipped, "saved_fraction": skipped / original}


def kv_bytes_per_token(shape: ModelShape, cfg: SwiftKVConfig, bytes_per_value: int = 2) -> dict:
    """KV-cache bytes per token (all layers), original vs SwiftKV (AcrossKV: one cache per group)."""
    split = cfg.resolve(shape.layers)
    per_layer = 2 * shape.kv_heads * shape.head_dim * bytes_per_value
    caches = split + len(cfg.groups(shape.layers))
    return {"per_layer": per_layer, "caches": caches, "original": shape.layers * per_layer,
            "swiftkv": caches * per_layer, "saved_fraction": 1 - caches / shape.layers}


# --- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def scored_nll(model: nn.Module, windows: torch.Tensor, prompt_len: int, batch_size: int = 4) -> tuple[float, int]:
    """(summed next-token NLL, count) over the tokens after ``prompt_len`` in each (N, T) window.

    The first ``prompt_len`` tokens are the prompt (their later-layer KV comes from x_{s-1} in a
    SwiftKV model); tokens prompt_len .. T-1 are scored, predicted from positions prompt_len-1 ..
    T-2 (the last prompt token, then teacher-forced decode tokens)."""
    if not 1 <= prompt_len < windows.shape[1]:
        raise ConfigError(f"prompt_len must be in [1, {windows.shape[1] - 1}] for windows of {windows.shape[1]} "
                          f"tokens, got {prompt_len}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)                         # (B, T)
        logits = model(input_ids=ids, use_cache=False).logits[:, prompt_len - 1:-1].float()   # (B, T-P, V)
        labels = ids[:, prompt_len:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"))
        count += labels.numel()
    return total, count


def scored_perplexity(model: nn.Module, windows: torch.Tensor, prompt_len: int, batch_size: int = 4) -> float:
    total, count = scored_nll(model, windows, prompt_len, batch_size)
    return math.exp(total / count)


def qkv_targets(model: nn.Module) -> list[str]:
    """LoRA/distillation target patterns: the q/k/v projections of the converted layers (the paper
    trains only these), k/v of cache owners only."""
    names = [n for n, m in model.named_modules() if isinstance(m, SingleInputKVAttention)]
    if not names:
        raise ConfigError("the model has no SwiftKV layers: convert it with swiftkv(model, SwiftKVConfig(...)) first")
    out = []
    for n in names:
        attn = dict(model.named_modules())[n]
        out += [f"{n}.{p}" for p in ("q_proj", "k_proj", "v_proj") if p in attn._modules]
    return out
