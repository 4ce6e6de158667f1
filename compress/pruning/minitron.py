"""Minitron width pruning (Muralidharan et al. 2024; Sreenivas et al. 2024): shrink the hidden
(embedding) dimension, the MLP width and optionally the attention heads together, to a parameter
target, ranked by activations, so the result is a smaller plain checkpoint.

Importance, from one walk of the shared calibration engine over the dense model:

    hidden channel j:  F_j = sum over every RMSNorm n of mean_t |n(x)_t,j|
                       (input_layernorm and post_attention_layernorm of every layer, and the final
                       norm: the norm outputs are what every block reads, aggregated over layers)
    MLP channel i:     mean_t |a_t,i| * ||W_down[:, i]||_2   (structured.py's activation score)
    head / KV group u: mean_t ||W_o[:, u] z_t,u||_2          (structured.py's activation score)

Then the sizes are chosen (explicit ones fixed; the free axes searched over multiples for the
configuration closest to ``target_params`` whose keep fractions are the most alike) and every
tensor is sliced along the axes it carries (``tensor_axes``: one table that both the parameter count
and the slicing read, so they cannot disagree):

    embed_tokens / lm_head (tied or not)   columns: hidden
    every norm of size hidden              entries: hidden
    q_proj (k_proj, v_proj)                rows: query heads (KV heads), columns: hidden
    o_proj                                 rows: hidden, columns: query heads
    gate_proj, up_proj / down_proj         rows: MLP channels, columns: hidden / the transpose

head_dim never changes: pruning the hidden size removes input columns of q/k/v and output rows of
o_proj, not features inside a head, so the config writes head_dim out explicitly (hidden_size /
heads no longer gives it). Head pruning keeps the grouped-query structure: whole KV groups
(``head_mode: kv_groups``) or the same number of query heads in every group (``query``).

RMSNorm divides by the root mean square over the hidden channels that remain, so removing hidden
channels changes every norm's scale a little: the one-shot model is worse than its MLP-only
counterpart at first, and distillation (``method: distill``) is what recovers it, as in the papers.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from typing import Literal

import torch
from torch import nn

from ..configs import MethodConfig, register_method
from ..engine import LayerMethod, default_device, run_layerwise
from ..errors import ConfigError
from ..modeling import find_decoder_layers
from ..structure import prepare_model
from .mlp_layouts import MLP_LAYOUTS, check_linear, find_mlp, slice_linear
from .structured import AbsSumStats, StructuredRecord, UnitOutputStats, _param_count, _unit_columns, keep_top

log = logging.getLogger(__name__)

# Families whose decoder is Llama-style (separate q/k/v/o, gate/up/down, RMSNorm, embeddings not
# scaled by sqrt(hidden_size)). Gemma scales the embeddings by sqrt(hidden_size): a narrower hidden
# size would change that factor, so it is refused rather than silently altered.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
AXES = ("hidden", "mlp", "heads")
LLAMA_MLP = MLP_LAYOUTS[0]
ATTN = "self_attn"


@dataclasses.dataclass
class MinitronConfig(MethodConfig):
    """Minitron width pruning: hidden size, MLP width and (optionally) heads together.

    target_params:        parameters after pruning (embeddings counted once when tied), e.g.
                          100_000_000. The free axes (``axes`` minus those given explicitly below) are
                          searched over multiples for the configuration within ``tolerance`` of it
                          whose keep fractions are the most alike (ties: the closest count).
    hidden_size:          explicit hidden size kept (a multiple of ``hidden_multiple``); fixed.
    intermediate_size:    explicit MLP width kept (a multiple of ``mlp_multiple``); fixed.
    num_attention_heads:  explicit query heads kept; a multiple of the query heads per KV group
                          ("kv_groups") or of the KV heads ("query"); fixed.
    axes:                 the widths ``target_params`` may shrink: any of hidden, mlp, heads. Minitron's
                          own 4B models keep the heads and prune hidden + MLP (the default).
    head_mode:            heads under grouped-query attention: remove whole KV groups ("kv_groups") or
                          the same number of query heads in every group ("query"), as in structured.
    hidden_multiple:      the kept hidden size is a multiple of this (64: int4 group_size 64 still fits).
    mlp_multiple:         the kept MLP width is a multiple of this.
    tolerance:            relative distance to ``target_params`` accepted (0.02 = within 2%).
    importance:           "activation" (calibration data, the module docstring) or "random" (seeded
                          baseline).
    seed:                 seed of "random".
    """

    method = "minitron"
    target_params: float | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    axes: list[str] = dataclasses.field(default_factory=lambda: ["hidden", "mlp"])
    head_mode: Literal["kv_groups", "query"] = "kv_groups"
    hidden_multiple: int = 64
    mlp_multiple: int = 64
    tolerance: float = 0.02
    importance: Literal["activation", "random"] = "activation"
    seed: int = 0

    def validate(self) -> None:
        if self.importance not in ("activation", "random"):
            raise ConfigError(f"importance must be 'activation' or 'random', got {self.importance!r}")
        if self.head_mode not in ("kv_groups", "query"):
            raise ConfigError(f"head_mode must be 'kv_groups' or 'query', got {self.head_mode!r}")
        bad = [a for a in self.axes if a not in AXES]
        if bad or not self.axes:
            raise ConfigError(f"axes must be a non-empty list of {list(AXES)}, got {self.axes!r}")
        for field in ("hidden_size", "intermediate_size", "num_attention_heads", "hidden_multiple", "mlp_multiple"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.target_params is not None and self.target_params <= 0:
            raise ConfigError(f"target_params is the parameter count after pruning and must be positive, "
                              f"got {self.target_params}")
        if self.target_params is None and self.explicit == {}:
            raise ConfigError("minitron needs target_params (e.g. 100_000_000) or at least one of hidden_size, "
                              "intermediate_size, num_attention_heads")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"tolerance is a relative distance to target_params, in (0, 1); got {self.tolerance}")

    @property
    def explicit(self) -> dict[str, int]:
        """The sizes given explicitly, by axis."""
        given = {"hidden": self.hidden_size, "mlp": self.intermediate_size, "heads": self.num_attention_heads}
        return {k: v for k, v in given.items() if v is not None}

    def describe(self) -> str:
        what = f"-> {self.target_params / 1e6:.1f}M" if self.target_params else \
            ", ".join(f"{k} {v}" for k, v in self.explicit.items())
        return f"width {what} ({'+'.join(self.axes)})"


# --- geometry and the axis table -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Widths:
    """One point of the search: hidden size, MLP width, query heads and KV heads (head_dim fixed)."""

    hidden: int
    mlp: int
    heads: int
    kv: int

    def sizes(self, head_dim: int) -> dict[str, int]:
        return {"hidden": self.hidden, "mlp": self.mlp, "q": self.heads * head_dim, "kv": self.kv * head_dim}


def _check_model(model: nn.Module) -> tuple[str, nn.ModuleList]:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED:
        why = " (it scales embeddings by sqrt(hidden_size), which a narrower hidden size would change)" \
            if model_type and model_type.startswith("gemma") else ""
        raise ConfigError(f"minitron width pruning supports Llama-style decoders {list(SUPPORTED)}, not "
                          f"{model_type or type(model).__name__}{why}; use method 'structured' (target mlp, heads "
                          f"or layers) instead")
    layers_name, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        where = f"{layers_name}.{i}"
        layout = find_mlp(layer, cfg, where)               # refuses MoE and non-linear layers by name
        if layout != LLAMA_MLP:
            raise ConfigError(f"{where} has a {layout.family} MLP; minitron needs gate_proj/up_proj/down_proj")
        attn = getattr(layer, ATTN, None)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if attn is None or not isinstance(getattr(attn, p, None), nn.Module):
                raise ConfigError(f"minitron needs Llama-style attention; {where}.{ATTN}.{p} is missing")
            check_linear(getattr(attn, p), f"{where}.{ATTN}.{p}")
    if getattr(cfg, "tie_word_embeddings", False) is False and model.get_output_embeddings() is None:
        raise ConfigError(f"{type(model).__name__} has no output embeddings (lm_head) to narrow")
    return layers_name, layers


def _geometry(model: nn.Module) -> tuple[Widths, int]:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Widths(cfg.hidden_size, cfg.intermediate_size, heads, kv), head_dim


def _layer_norms(layer: nn.Module, hidden: int) -> list[str]:
    """The decoder layer's own norms over the hidden size (direct children with a weight of that size;
    Qwen3's q_norm/k_norm, over head_dim, sit inside the attention and are not touched)."""
    return [n for n, m in layer.named_children()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1
            and m.weight.numel() == hidden and "norm" in type(m).__name__.lower()]


def _final_norm(model: nn.Module, layers_name: str, hidden: int) -> tuple[str, nn.Module]:
    base = layers_name.rpartition(".")[0]
    name = f"{base}.norm" if base else "norm"
    norm = model.get_submodule(name) if name in dict(model.named_modules()) else None
    if norm is None or getattr(norm, "weight", None) is None or norm.weight.numel() != hidden:
        raise ConfigError(f"minitron found no final norm {name} over the hidden size {hidden}")
    return name, norm


def tensor_axes(model: nn.Module) -> dict[str, tuple[nn.Parameter, tuple[str | None, ...]]]:
    """Every parameter (tied ones once) with the axis each of its dimensions carries: "hidden",
    "mlp", "q" (query-head features), "kv" (KV-head features) or None (unchanged). Both the
    parameter count of a candidate and the slicing read this table."""
    layers_name, layers = find_decoder_layers(model)
    hidden = model.config.hidden_size
    axes: dict[str, tuple[str | None, ...]] = {}
    embed = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is embed)
    axes[f"{emb_name}.weight"] = (None, "hidden")
    for i, layer in enumerate(layers):
        p = f"{layers_name}.{i}."
        for n in _layer_norms(layer, hidden):
            axes[f"{p}{n}.weight"] = ("hidden",)
        for proj, out in (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv")):
            axes[f"{p}{ATTN}.{proj}.weight"] = (out, "hidden")
            axes[f"{p}{ATTN}.{proj}.bias"] = (out,)
        axes[f"{p}{ATTN}.o_proj.weight"] = ("hidden", "q")
        axes[f"{p}{ATTN}.o_proj.bias"] = ("hidden",)
        for proj in LLAMA_MLP.ups:
            axes[f"{p}{proj}.weight"] = ("mlp", "hidden")
            axes[f"{p}{proj}.bias"] = ("mlp",)
        axes[f"{p}{LLAMA_MLP.down}.weight"] = ("hidden", "mlp")
        axes[f"{p}{LLAMA_MLP.down}.bias"] = ("hidden",)
    norm_name, _ = _final_norm(model, layers_name, hidden)
    axes[f"{norm_name}.weight"] = ("hidden",)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:
        head_name = next(n for n, m in model.named_modules() if m is head)
        axes[f"{head_name}.weight"] = (None, "hidden")
        axes[f"{head_name}.bias"] = (None,)
    table = {}
    for name, param in model.named_parameters():                   # tied parameters appear once
        labels = axes.get(name, (None,) * param.dim())
        table[name] = (param, labels)
    return table


def count_params(table, widths: Widths, head_dim: int) -> int:
    """Parameters of the model pruned to ``widths``, from the axis table (exact)."""
    sizes = widths.sizes(head_dim)
    return sum(math.prod(sizes[a] if a else d for a, d in zip(labels, p.shape)) for p, labels in table.values())


# --- choosing the widths ---------------------------------------------------------------------------------

def _heads_options(cfg: MinitronConfig, full: Widths) -> list[tuple[int, int]]:
    """Realizable (query heads, KV heads) under cfg.head_mode, largest first."""
    group = full.heads // full.kv
    if cfg.head_mode == "kv_groups":
        return [(k * group, k) for k in range(full.kv, 0, -1)]
    return [(full.kv * g, full.kv) for g in range(group, 0, -1)]


def choose_widths(cfg: MinitronConfig, table, full: Widths, head_dim: int) -> Widths:
    """The widths ``cfg`` asks for: explicit sizes as given, free axes searched (class docstring)."""
    explicit = cfg.explicit
    heads_opts = _heads_options(cfg, full)
    if "heads" in explicit:
        match = [o for o in heads_opts if o[0] == explicit["heads"]]
        if not match:
            step = full.heads // full.kv if cfg.head_mode == "kv_groups" else full.kv
            raise ConfigError(f"num_attention_heads {explicit['heads']} breaks grouped-query attention ({full.heads} "
                              f"query heads over {full.kv} KV heads): head_mode {cfg.head_mode!r} needs a multiple "
                              f"of {step} up to {full.heads}")
        heads_opts = match
    for axis, field, mult, limit in (("hidden", "hidden_size", cfg.hidden_multiple, full.hidden),
                                     ("mlp", "intermediate_size", cfg.mlp_multiple, full.mlp)):
        if axis in explicit and (explicit[axis] % mult or explicit[axis] > limit):
            raise ConfigError(f"{field} {explicit[axis]} must be a multiple of {axis}_multiple {mult} and at most "
                              f"{limit}; pass another size or {axis}_multiple=1")
    free = [a for a in cfg.axes if a not in explicit] if cfg.target_params is not None else []
    if cfg.target_params is not None and not free:
        raise ConfigError(f"target_params {cfg.target_params:.0f} leaves nothing to search: every axis in {cfg.axes} "
                          f"is given explicitly; drop target_params or an explicit size")

    def options(axis, full_size, mult):
        if axis in explicit:
            return [explicit[axis]]
        if axis in free:
            return list(range(mult, full_size + 1, mult)) or [full_size]
        return [full_size]

    hiddens = options("hidden", full.hidden, cfg.hidden_multiple)
    mlps = options("mlp", full.mlp, cfg.mlp_multiple)
    heads = heads_opts if "heads" in free or "heads" in explicit else heads_opts[:1]
    # transformers' configs of these families validate hidden_size % num_attention_heads == 0 (even with an
    # explicit head_dim), so a checkpoint breaking it would not load back.
    candidates = [Widths(h, m, q, kv) for h, m, (q, kv) in itertools.product(hiddens, mlps, heads) if h % q == 0]
    if not candidates:
        raise ConfigError(f"no hidden size among {hiddens[:3]}... is a multiple of the kept query heads {[q for q, _ in heads]}, "
                          f"which transformers requires (hidden_size % num_attention_heads == 0); pass another "
                          f"hidden_size / num_attention_heads or a smaller hidden_multiple")
    if cfg.target_params is None:
        return candidates[0]
    target = float(cfg.target_params)
    dense = count_params(table, full, head_dim)
    if target >= dense:
        raise ConfigError(f"target_params {target:.0f} is not below the model's {dense} parameters: minitron removes "
                          f"nothing; pass a smaller target_params")
    fractions = {"hidden": lambda w: w.hidden / full.hidden, "mlp": lambda w: w.mlp / full.mlp,
                 "heads": lambda w: w.heads / full.heads}

    def imbalance(w):
        logs = [math.log(fractions[a](w)) for a in free]
        return max(logs) - min(logs)

    scored = [(c, count_params(table, c, head_dim)) for c in candidates]
    inside = [(c, n) for c, n in scored if abs(n - target) <= cfg.tolerance * target]
    if not inside:
        best, n = min(scored, key=lambda cn: abs(cn[1] - target))
        raise ConfigError(f"no {'+'.join(free)} widths reach {target:.0f} parameters within tolerance {cfg.tolerance:g}; "
                          f"the closest is {n} (hidden {best.hidden}, MLP {best.mlp}, heads {best.heads}); pass a "
                          f"larger tolerance, smaller hidden_multiple / mlp_multiple, or a reachable target_params")
    return min(inside, key=lambda cn: (round(imbalance(cn[0]), 9), abs(cn[1] - target)))[0]


# --- importance ------------------------------------------------------------------------------------------

class _NoTargets(LayerMethod):
    name = "minitron importance"

    def is_target(self, name: str, module: nn.Module) -> bool:
        return False


@dataclasses.dataclass
class MinitronScores:
    hidden: torch.Tensor                   # (hidden,)
    mlp: list[torch.Tensor]                # per layer (intermediate,)
    heads: list[torch.Tensor]              # per layer (units,): KV groups or query heads


def activation_scores(model: nn.Module, cfg: MinitronConfig, calib, full: Widths, head_dim: int, *, device,
                      batch_size, progress) -> MinitronScores:
    """One engine walk; hooks gather every norm's |output|, down_proj's |input| and each head unit's
    output norm (module docstring)."""
    layers_name, layers = find_decoder_layers(model)
    norm_name, final_norm = _final_norm(model, layers_name, full.hidden)
    width = head_dim * (full.heads // full.kv if cfg.head_mode == "kv_groups" else 1)
    norm_sum = torch.zeros(full.hidden, dtype=torch.float64)     # sum over norms and tokens of |n(x)|
    tokens = [0]                                                   # tokens seen by each norm (the final one)
    mlp_stats = [AbsSumStats(full.mlp) for _ in layers]
    head_stats: list[UnitOutputStats | None] = [None] * len(layers)

    def add_norm(y):
        y = y.detach().reshape(-1, full.hidden).float()                          # (tokens, hidden)
        norm_sum.add_(y.abs().sum(dim=0).double().cpu())
        return y.shape[0]

    def on_norm(module, args, output):
        add_norm(output)

    def on_last_layer(module, args, kwargs, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        with torch.no_grad():
            tokens[0] += add_norm(final_norm.to(h.device)(h))

    def on_down(i):
        return lambda module, args: mlp_stats[i].add(args[0].detach().cpu())

    def on_o(i):
        def hook(module, args):
            if head_stats[i] is None:
                head_stats[i] = UnitOutputStats(module, width)
            head_stats[i].add(args[0].detach())
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            for n in _layer_norms(layer, full.hidden):
                handles.append(layer.get_submodule(n).register_forward_hook(on_norm))
            handles.append(layer.get_submodule(LLAMA_MLP.down).register_forward_pre_hook(on_down(i)))
            handles.append(layer.get_submodule(f"{ATTN}.o_proj").register_forward_pre_hook(on_o(i)))
        handles.append(layers[-1].register_forward_hook(on_last_layer, with_kwargs=True))
        run_layerwise(model, calib, _NoTargets(), device=device, batch_size=batch_size, progress=progress)
    finally:
        for h in handles:
            h.remove()
    mlp = []
    for i, layer in enumerate(layers):
        col_norm = layer.get_submodule(LLAMA_MLP.down).weight.detach().float().norm(dim=0).cpu()
        mlp.append(mlp_stats[i].mean * col_norm)
    # sum over norms of each norm's token mean: the papers' aggregation over layers of mean_t |n(x)|
    return MinitronScores((norm_sum / max(tokens[0], 1)).float(), mlp, [s.mean.cpu() for s in head_stats])


def random_scores(cfg: MinitronConfig, full: Widths, n_layers: int) -> MinitronScores:
    gen = torch.Generator().manual_seed(cfg.seed)
    units = full.kv if cfg.head_mode == "kv_groups" else full.heads
    return MinitronScores(torch.rand(full.hidden, generator=gen),
                          [torch.rand(full.mlp, generator=gen) for _ in range(n_layers)],
                          [torch.rand(units, generator=gen) for _ in range(n_layers)])


# --- slicing ---------------------------------------------------------------------------------------------

def _head_rows(cfg: MinitronConfig, scores: torch.Tensor, full: Widths, target: Widths, head_dim: int):
    """(query-feature rows, KV-feature rows) kept in one layer."""
    group = full.heads // full.kv
    if cfg.head_mode == "kv_groups":
        kept = keep_top(scores, target.kv)                                        # KV groups
        return _unit_columns(kept, group * head_dim), _unit_columns(kept, head_dim)
    per_group = scores.reshape(full.kv, group)                                    # (kv, heads per group)
    q_per = target.heads // full.kv
    kept = torch.cat([keep_top(row, q_per) + g * group for g, row in enumerate(per_group)])
    return _unit_columns(kept, head_dim), torch.arange(full.kv * head_dim)


def slice_width(model: nn.Module, cfg: MinitronConfig, scores: MinitronScores, target: Widths) -> dict:
    """Slice every tensor to ``target`` (kept = the top scores on each axis) and rewrite the config.
    Returns the kept indices: {"hidden": (h,), "mlp": [per layer], "q"/"kv": [per layer rows]}."""
    full, head_dim = _geometry(model)
    layers_name, layers = find_decoder_layers(model)
    hidden_idx = keep_top(scores.hidden, target.hidden)
    kept = {"hidden": hidden_idx, "mlp": [], "q": [], "kv": []}
    for i in range(len(layers)):
        kept["mlp"].append(keep_top(scores.mlp[i], target.mlp))
        q_rows, kv_rows = _head_rows(cfg, scores.heads[i], full, target, head_dim)
        kept["q"].append(q_rows)
        kept["kv"].append(kv_rows)
    table = tensor_axes(model)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    prefix = f"{layers_name}."
    for name, (param, labels) in table.items():
        layer = int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None
        data = param.detach()
        for dim, axis in enumerate(labels):
            if axis is None:
                continue
            idx = kept[axis] if axis == "hidden" else kept[axis][layer]
            data = data.index_select(dim, idx.to(data.device))
        if data.shape != param.shape:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, nn.Parameter(data.clone(), requires_grad=param.requires_grad))
    # Module attributes forward or generation may read, then the config.
    embed.embedding_dim = target.hidden
    if head is not None:
        if tied:
            head.weight = embed.weight
        head.in_features = target.hidden
    for layer in layers:
        attn, mlp = getattr(layer, ATTN), layer.get_submodule(LLAMA_MLP.block)
        for proj in ("q_proj", "k_proj", "v_proj"):
            m = getattr(attn, proj)
            m.in_features, m.out_features = target.hidden, m.weight.shape[0]
        attn.o_proj.in_features, attn.o_proj.out_features = attn.o_proj.weight.shape[1], target.hidden
        attn.num_key_value_groups = target.heads // target.kv
        for attr, value in (("num_heads", target.heads), ("num_attention_heads", target.heads),
                            ("num_key_value_heads", target.kv), ("hidden_size", target.hidden)):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, value)
        for proj in LLAMA_MLP.ups:
            m = mlp.get_submodule(proj.rpartition(".")[2])
            m.in_features, m.out_features = target.hidden, target.mlp
        down = mlp.get_submodule(LLAMA_MLP.down.rpartition(".")[2])
        down.in_features, down.out_features = target.mlp, target.hidden
        for obj in (mlp, layer):
            for attr, value in (("hidden_size", target.hidden), ("intermediate_size", target.mlp)):
                if isinstance(getattr(obj, attr, None), int):
                    setattr(obj, attr, value)
    c = model.config
    c.hidden_size, c.intermediate_size = target.hidden, target.mlp
    c.num_attention_heads, c.num_key_value_heads = target.heads, target.kv
    c.head_dim = head_dim                               # hidden_size / heads no longer gives it
    return kept


# --- the entry -------------------------------------------------------------------------------------------

def prune_width(model: nn.Module, cfg: MinitronConfig, calib=None, *, device=None, batch_size: int | None = None,
                progress: bool = True) -> dict[str, StructuredRecord]:
    """Minitron width pruning of ``model`` in place (module docstring). Returns StructuredRecords for
    the hidden size ("model.hidden"), each layer's MLP and attention, and "model" (parameter counts)."""
    prepare_model(model)
    if getattr(model, "config", None) is None:
        raise ConfigError(f"{type(model).__name__} has no config; minitron rewrites a transformers config")
    layers_name, layers = _check_model(model)
    if cfg.importance == "activation" and calib is None:
        raise ConfigError("minitron with importance 'activation' needs calibration data: pass calib=compress."
                          "calibration_data(tokenizer, TEXT_FILE, samples=..., seqlen=...) (recipe: a 'calibration' "
                          "section), or use importance 'random'")
    full, head_dim = _geometry(model)
    if full.heads % full.kv:
        raise ConfigError(f"{full.heads} query heads do not split over {full.kv} KV heads")
    if cfg.head_mode == "query" and full.heads == full.kv and ("heads" in cfg.axes or cfg.num_attention_heads):
        raise ConfigError("head_mode 'query' removes query heads within each KV group, but the model has one query "
                          "head per KV head; use head_mode 'kv_groups'")
    start = time.perf_counter()
    table = tensor_axes(model)
    target = choose_widths(cfg, table, full, head_dim)
    if target == full:
        raise ConfigError(f"minitron {cfg.describe()} removes nothing from hidden {full.hidden}, MLP {full.mlp}, "
                          f"{full.heads} heads; pass a smaller target_params or explicit sizes")
    predicted = count_params(table, target, head_dim)
    before = _param_count(model)
    dev = torch.device(device) if device is not None else default_device()
    scores = activation_scores(model, cfg, calib, full, head_dim, device=dev, batch_size=batch_size,
                               progress=progress) if cfg.importance == "activation" \
        else random_scores(cfg, full, len(layers))
    layer_params = [_param_count(layer) for layer in layers]
    kept = slice_width(model, cfg, scores, target)
    after = _param_count(model)
    if after != predicted:
        raise RuntimeError(f"minitron: {after} parameters after slicing, the axis table predicted {predicted}")
    records: dict[str, StructuredRecord] = {}
    h_removed = sorted(set(range(full.hidden)) - set(kept["hidden"].tolist()))
    records["model.hidden"] = StructuredRecord("model.hidden", "hidden_channel", full.hidden, target.hidden,
                                               h_removed, scores.hidden.tolist(), before, after)
    unit = "kv_group" if cfg.head_mode == "kv_groups" else "head"
    for i, layer in enumerate(layers):
        where = f"{layers_name}.{i}"
        m_removed = sorted(set(range(full.mlp)) - set(kept["mlp"][i].tolist()))
        records[f"{where}.mlp"] = StructuredRecord(f"{where}.mlp", "channel", full.mlp, target.mlp, m_removed,
                                                   scores.mlp[i].tolist(), layer_params[i], _param_count(layer))
        units = scores.heads[i].numel()
        kept_units = target.kv if cfg.head_mode == "kv_groups" else target.heads
        q_units = (kept["q"][i] // (head_dim * (full.heads // full.kv if unit == "kv_group" else 1))).unique()
        records[f"{where}.{ATTN}"] = StructuredRecord(f"{where}.{ATTN}", unit, units, kept_units,
                                                      sorted(set(range(units)) - set(q_units.tolist())),
                                                      scores.heads[i].tolist(), layer_params[i], _param_count(layer))
    records["model"] = StructuredRecord("model", "parameter", before, after, [], [], before, after)
    log.info("minitron %s: hidden %d -> %d, MLP %d -> %d, heads %d/%d -> %d/%d; %d -> %d parameters in %.1f s",
             cfg.describe(), full.hidden, target.hidden, full.mlp, target.mlp, full.heads, full.kv, target.heads,
             target.kv, before, after, time.perf_counter() - start)
    return records


__all__ = ["MinitronConfig", "Widths", "choose_widths", "count_params", "prune_width", "tensor_axes"]


register_method(MinitronConfig, prune_width, area="prune", needs_data=lambda cfg: cfg.importance == "activation",
                statistics="activation")
